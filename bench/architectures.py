"""Every architecture on one frontier: step time against TopK's, and quality at equal L0.

    python bench/architectures.py --step                      # step time / TopK's step, anchor shape
    python bench/architectures.py --quality configs/smollm2.yaml --layer 6 [--run-dir runs/arch]
    python bench/architectures.py --quality configs/smollm2.yaml --layer 15 --seeds 0 1 2 \
        --set run_dir=runs/smol15 --set harvest.n_tokens=393216 --set eval.n_tokens=16384 --run-dir runs/arch15

--step: pipeline.train.train_step of each architecture at d 768, n 16384, B 1024 (k 32, or a
target L0 of 32, each latent's bias set so it fires on 32/n of the batch, where training
settles; --shapes N:D:B,... for other shapes, such as the corners of bench/train.py's --peers
grid), CPU, timed interleaved with TopK's in one process, medians of --rounds;
printed as ratios to TopK's step (the issue's targets: topk/batchtopk/matryoshka/jumprelu
<= 1.5x, relu/gated <= 2.5x).

--quality: every architecture as a member of one train.sweep on the config's store (the same
batches, width, budget and seed for all), at L0 32 (k for the TopK family, target_l0 for the
penalised ones), then `saepipe eval` on held-out windows: the table of held-out FVU, L0, dead
fraction, delta CE and KL per architecture, and the frontier picture
(saes/<L>/frontier-<hook>.png). With several --seeds, one sweep per seed (its own run folder,
<run-dir>/seed<S>) and the table of medians over them, with each architecture's ratio to TopK's.
--set: overrides of the config (where its store is, the eval's tokens), as saepipe's --set.

--peers CONFIG (after --quality on the same --run-dir and --seeds): dictionary_learning 0.1.0's trainers of the same architectures
(batch_top_k, matryoshka_batch_top_k, jumprelu, gdm as gated, standard as relu; bench/dl_peers.py,
their own venv) trained on the same training rows (the store's training chunks, BOS left out),
width, L0 and tokens, saved as saepipe SAE folders beside ours (`<hook>@dl-<architecture>`), and
scored by the same `saepipe eval`: delta CE, KL and the raw-space FVU of eval.json, ours against
theirs. Their jumprelu and gdm run at lr 1e-3: their defaults (7e-5, 5e-5) are for runs of 10k+
steps and leave L0 near 170 after a few hundred.

--transcoder: a TopK transcoder from the block's mlp_in to its mlp_out and a TopK SAE on
that mlp_out, k 32 each, trained on the same rows and budget (harvest both hooks first:
`saepipe harvest CONFIG --layers L --set 'harvest.hooks=[mlp_in, mlp_out]'`), then
`saepipe eval`: both spliced where the MLP writes, their delta CE, KL and FVU side by side. The store is the config's run_dir's (harvest it first: `make
harvest LAYERS=6`); the SAEs go into --run-dir's copy-free view of it (`store:` pointing at the
harvested one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402

# Run as a script, bench/ leads sys.path, where a script named like a package (bench/kernels.py
# once shadowed the `kernels` transformers imports; tests/test_bench_names.py)
# would win: the repository instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from pipeline.saes import ARCHITECTURES  # noqa: E402

L0 = 32
# How each architecture is asked for L0 = 32: the TopK family by k, the penalised ones by their target.
AT_L0 = {"topk": {"k": L0}, "batchtopk": {"k": L0}, "matryoshka": {"k": L0}, "jumprelu": {"target_l0": L0},
         "relu": {"target_l0": L0}, "gated": {"target_l0": L0}}


def sae_settings(name: str) -> dict:
    return {"architecture": name, **AT_L0.get(name, {})}


def step_times(rounds: int, d: int = 768, n: int = 16384, batch: int = 1024) -> dict:
    """Median ms of one train_step per architecture, interleaved round by round."""
    from pipeline.config import TrainConfig, sae_section
    from pipeline.model import resolve_device
    from pipeline.train import train_step
    from pipeline.train_state import TrainState

    device = resolve_device("cpu")
    torch.manual_seed(0)
    x = torch.randn(batch, d) * (1 + torch.rand(batch, 1))  # rows of uneven norm, as activations are
    runs = {}
    for name in ARCHITECTURES:
        sae = sae_section(sae_settings(name), "train.sae.", "bench").resolve(d, n, batch, "", f"n_latents = {n}")
        tc = TrainConfig(n_latents=n, sae=sae, batch_size=batch, lr=1e-4, backend="torch", n_tokens=batch * 1000)
        state = TrainState(tc, d, device)
        if not hasattr(sae, "k"):  # penalised: start where training settles, at L0 32, not at half the latents
            with torch.no_grad():
                z = (state.sae.preprocess(x) - state.sae.b_pre) @ state.sae.W_enc.T
                state.sae.b_lat.copy_(-z.quantile(1 - L0 / n, dim=0))
        runs[name] = (state, tc)
    times = {name: [] for name in runs}
    for i in range(rounds + 2):
        for name, (state, tc) in runs.items():
            t = time.perf_counter()
            # lr 0: the same work, but the weights stay where they were put. At n 65536 a step of 1e-4 is
            # 40% of an encoder weight (rows of norm d / n), and in five steps the penalised SAEs' L0 went
            # from 32 to ~3,600, timing another shape than the one named.
            train_step(state, state.sae.preprocess(x), 0.0, tc)
            if i >= 2:  # the first two warm up (Adam's state, the allocator)
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def quality(config: str, layer: int, run_dir: str, seed: int, overrides: tuple = ()) -> list[dict]:
    """One sweep of every architecture on the config's store, then saepipe eval; the rows."""
    from pipeline import eval as lm_eval
    from pipeline import train
    from pipeline.config import load_config
    from pipeline.store import Location

    base = load_config(config, list(overrides))
    store = Location.of(base).path
    sweep = [{"sae": sae_settings(name), "name": name} for name in ARCHITECTURES]
    cfg = load_config(config, [*overrides, f"run_dir={run_dir}", f"store={store}", f"harvest.layers=[{layer}]",
                               f"train.seed={seed}", f"train.sweep={json.dumps(sweep)}"])
    train.run(cfg, [layer])
    rows = []
    for lay, hook, row in lm_eval.run(cfg, [layer]):
        folder = Path(run_dir) / "saes" / str(lay) / hook
        ev = json.loads((folder / "cfg.json").read_text())["eval"]
        rows.append({"sae": hook, "architecture": row["architecture"], "l0": row["l0"], "fvu_heldout": ev["fvu"],
                     "dead": ev["dead_frac"], "delta_ce": row["delta_ce"], "kl": row["kl"]})
    return rows


PEER_LR = {"jumprelu": 1e-3, "gdm": 1e-3}


def peers(config: str, layer: int, run_dir: str, seed: int, overrides: tuple = (), only=None) -> list[dict]:
    """dictionary_learning's trainers on the training rows of the config's store, saved beside our
    SAEs in run_dir (after quality()), then saepipe eval on them; the rows of ours and theirs."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("dl_peers", _HERE / "dl_peers.py")  # bench/ is off sys.path
    dl_peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dl_peers)

    from pipeline import eval as lm_eval
    from pipeline.config import load_config
    from pipeline.loader import RowFilter, split_chunks
    from pipeline.paths import sae_dir
    from pipeline.store import ActivationStore, Location

    base = load_config(config, list(overrides))
    cfg = load_config(config, [*overrides, f"run_dir={run_dir}", f"store={Location.of(base).path}",
                               f"harvest.layers=[{layer}]", f"train.seed={seed}"])
    store, hook, tc = ActivationStore(Location.of(cfg)), cfg.harvest.hooks[0], cfg.train
    train_chunks, _ = split_chunks(store.n_chunks(layer, hook), tc.eval_fraction)
    rf = RowFilter(store, layer, hook, True, False)
    rows = np.concatenate([rf(c, store.read_chunk(layer, hook, c)).float().numpy() for c in train_chunks])
    width = tc.n_latents or tc.expansion_factor * store.d_model(layer, hook)
    names = []
    for trainer, arch in dl_peers.TRAINERS.items():
        if only and trainer not in only:
            continue
        name = f"dl-{arch}"
        out = sae_dir(run_dir, layer, hook, name)
        if not (out / "done").exists():
            info = dl_peers.train_peer(trainer, rows, width, L0, tc.n_tokens, tc.batch_size, seed, out,
                                       lr=PEER_LR.get(trainer))
            print(f"peers: {trainer}: {json.dumps(info)}")
            # What eval reads of an SAE's training: its place, and that BOS was left out (it passes through).
            c = json.loads((out / "cfg.json").read_text())
            c.update(layer=layer, hook=hook, exclude_bos=True, prepend_bos=store.attrs.get("prepend_bos"),
                     model=store.attrs.get("model"), store_fingerprint=store.attrs.get("fingerprint"),
                     store_sequences=store.attrs.get("n_sequences"))
            (out / "cfg.json").write_text(json.dumps(c, indent=2))
        names.append(name)
    sweep = [{"name": n, "sae": sae_settings(n[3:])} for n in names]
    ev = load_config(config, [*overrides, f"run_dir={run_dir}", f"store={Location.of(base).path}",
                              f"harvest.layers=[{layer}]", f"train.sweep={json.dumps(sweep)}"])
    lm_eval.run(ev, [layer])
    out = []
    for folder in sorted((Path(run_dir) / "saes" / str(layer)).glob(f"{hook}@*")):
        if not (folder / "eval.json").is_file():
            continue  # ours not evaluated yet (--quality does it)
        row = json.loads((folder / "eval.json").read_text())
        who = "dictionary_learning" if folder.name.split("@")[1].startswith("dl-") else "saepipe"
        out.append({"who": who, "architecture": row["architecture"], "l0": row["l0"], "fvu": row["fvu"],
                    "delta_ce": row["delta_ce"], "kl": row["kl"]})
    return out


def peer_table(rows: list[dict]):
    print(f"{'architecture':<12} {'who':<20} {'L0':>7} {'FVU (eval, raw)':>16} {'delta CE':>9} {'KL':>8} {'ours / theirs':>14}")
    for r in sorted(rows, key=lambda r: (r["architecture"], r["who"] != "saepipe")):
        theirs = next((q for q in rows if q["architecture"] == r["architecture"] and q["who"] != "saepipe"), None)
        ratio = (f"{r['delta_ce'] / theirs['delta_ce']:>13.3f}x" if theirs and r["who"] == "saepipe" else "")
        print(f"{r['architecture']:<12} {r['who']:<20} {r['l0']:>7.1f} {r['fvu']:>16.4f} {r['delta_ce']:>9.4f} "
              f"{r['kl']:>8.4f} {ratio:>14}")


def transcoder(config: str, layer: int, run_dir: str, seed: int, overrides: tuple = ()) -> list[dict]:
    """A TopK transcoder mlp_in -> mlp_out and a TopK SAE on mlp_out, then saepipe eval; the rows."""
    from pipeline import eval as lm_eval
    from pipeline import train
    from pipeline.config import load_config
    from pipeline.store import Location

    base = load_config(config, list(overrides))
    store = Location.of(base).path
    cfg = load_config(config, [*overrides, f"run_dir={run_dir}", f"store={store}", f"harvest.layers=[{layer}]",
                               "harvest.hooks=[mlp_in, mlp_out]", "train.hooks=[mlp_in, mlp_out]",
                               "train.transcode={mlp_in: mlp_out}", f"train.seed={seed}", f"train.k={L0}"])
    train.run(cfg, [layer])
    rows = []
    for lay, hook, row in lm_eval.run(cfg, [layer]):
        folder = Path(run_dir) / "saes" / str(lay) / hook.split("->")[0]
        ev = json.loads((folder / "cfg.json").read_text())["eval"]
        rows.append({"sae": hook, "architecture": hook, "l0": row["l0"], "fvu_heldout": ev["fvu"],
                     "dead": ev["dead_frac"], "delta_ce": row["delta_ce"], "kl": row["kl"]})
    return rows


KEYS = ("l0", "fvu_heldout", "dead", "delta_ce", "kl")


def medians(runs: dict) -> list[dict]:
    """Per architecture, the median of each number over the seeds' rows."""
    out = []
    for r in next(iter(runs.values())):
        same = [row for rows in runs.values() for row in rows if row["architecture"] == r["architecture"]]
        out.append({"architecture": r["architecture"],
                    **{k: sorted(row[k] for row in same)[len(same) // 2] for k in KEYS}})
    return out


def table(rows: list[dict], ratios: bool = False):
    topk = next((r for r in rows if r["architecture"] == "topk"), None)
    extra = f" {'dCE / topk':>11}" if ratios and topk else ""
    print(f"{'architecture':<16} {'L0':>7} {'FVU (held out)':>15} {'dead':>7} {'delta CE':>9} {'KL':>8}{extra}")
    for r in rows:
        more = f" {r['delta_ce'] / topk['delta_ce']:>10.3f}x" if extra else ""
        print(f"{r['architecture']:<16} {r['l0']:>7.1f} {r['fvu_heldout']:>15.4f} {r['dead']:>7.1%} "
              f"{r['delta_ce']:>9.4f} {r['kl']:>8.4f}{more}")


def seed_dir(a, seed: int) -> str:
    """A seed's run folder: --run-dir itself for one seed, <run-dir>/seed<S> for several."""
    return a.run_dir if len(a.seeds) == 1 else f"{a.run_dir}/seed{seed}"


def seeds(a, run, ratios: bool):
    """run(seed, folder) -> rows for each of --seeds, each seed's table, then their medians."""
    runs = {}
    for seed in a.seeds:
        runs[seed] = run(seed, seed_dir(a, seed))
        print(f"seed {seed}:")
        table(runs[seed])
    if len(a.seeds) > 1:
        print(f"median over seeds {', '.join(map(str, a.seeds))}:")
        table(medians(runs), ratios=ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--shapes", default="16384:768:1024", help="--step: N:D:BATCH shapes, comma-separated "
                    "(L0 32 at each; the default is the anchor)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quality", metavar="CONFIG")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--run-dir", default="runs/architectures")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--transcoder", metavar="CONFIG")
    ap.add_argument("--peers", metavar="CONFIG")
    ap.add_argument("--peer-trainers", nargs="+", default=None, help="only these dictionary_learning trainers")
    a = ap.parse_args()
    if a.step:
        for shape in filter(None, a.shapes.split(",")):
            n, d, batch = (int(v) for v in shape.split(":"))
            ms = step_times(a.rounds, d, n, batch)
            print(f"{'architecture':<12} {'step ms':>9} {'/ topk':>8}   (d {d}, n {n}, B {batch}, L0 32, CPU, "
                  f"median of {a.rounds}, interleaved)", flush=True)
            for name, t in ms.items():
                print(f"{name:<12} {t:>9.1f} {t / ms['topk']:>7.2f}x", flush=True)
    for run, config in ((quality, a.quality), (transcoder, a.transcoder)):
        if config:
            seeds(a, lambda seed, where: run(config, a.layer, where, seed, tuple(a.set)), ratios=run is quality)
    for seed in a.seeds if a.peers else []:
        print(f"seed {seed}, ours and dictionary_learning's, scored by one saepipe eval:")
        peer_table(peers(a.peers, a.layer, seed_dir(a, seed), seed, tuple(a.set), a.peer_trainers))
    if not (a.step or a.quality or a.transcoder or a.peers):
        ap.print_help()


if __name__ == "__main__":
    main()
