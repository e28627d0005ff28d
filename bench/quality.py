"""SAE quality head to head: saepipe's default recipe against sparsify's, same rows, same budget.

    python bench/quality.py                               # the demo store, layer 3 (make demo CONFIG=configs/demo.yaml)
    python bench/quality.py --run runs/smollm2 --layer 15 --write

Both sides train an SAE of the same n_latents, k and batch on the same
training rows (the store's training chunks, BOS excluded) for the same number
of tokens, and both are scored by one function (`score`) on
the same held-out rows: the eval chunks saepipe itself holds out (FVU of the raw
rows, so an SAE trained on layer-normed inputs is scored where the others are).

- saepipe: `pipeline.train.run` end to end on a config that sets no learning
  rate (loader, AuxK, eval, checkpoints, pictures and save included in its
  wall time), in a scratch run folder that links the store.
- sparsify 1.3.3: its own SparseCoder / SignSGD / ScheduleFreeWrapper in its
  default recipe (bench/peer_sparsify.py), run by the peer venv of
  bench/peers.py; its wall time is the bare loop.

Prints held-out FVU, dead fraction (latents that never fire on the held-out
rows) and wall time of each; with --config (the store's run config, a causal
LM) also each SAE's delta CE from `saepipe eval` (pipeline.eval: the SAE
spliced into the model over held-out windows of the corpus), and the ratios against the better of sparsify's
SAE as saved and the same with its decoder rows put back to unit norm (its
saved schedule-free average has shorter rows); --write puts the table into
bench/RESULTS.md under its own heading (replacing an earlier one for the same store and layer).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
# Run as a script, bench/ leads sys.path, where a script named like a package (bench/kernels.py
# once shadowed the `kernels` transformers imports; tests/test_bench_names.py) would win:
# take bench/ off, and load peers.py from its file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
_spec = importlib.util.spec_from_file_location("bench_peers", HERE / "peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)
from pipeline import eval as lm_eval  # noqa: E402
from pipeline.config import config_from_dict, load_config  # noqa: E402
from pipeline.loader import RowFilter, eval_rows, split_chunks  # noqa: E402
from pipeline.saes import load_sae  # noqa: E402
from pipeline.saes.topk import TopKSAE  # noqa: E402
from pipeline.store import ActivationStore  # noqa: E402
from pipeline.train import run as train_run  # noqa: E402


def rows(store, layer, hook, eval_fraction):
    rf = RowFilter(store, layer, hook, True, False)
    train_chunks, eval_chunks = split_chunks(store.n_chunks(layer, hook), eval_fraction)
    x_train = torch.cat([rf(c, store.read_chunk(layer, hook, c)).float() for c in train_chunks])
    x_eval = eval_rows(store, layer, hook, eval_chunks, 65536, RowFilter(store, layer, hook, True, False))
    return x_train, x_eval


def ours(store_dir: Path, scratch: Path, layer, hook, a) -> tuple[TopKSAE, float]:
    run_dir = scratch / "run"
    run_dir.mkdir()
    (run_dir / "activations.zarr").symlink_to(store_dir.resolve() / "activations.zarr")
    cfg = config_from_dict({
        "run_dir": str(run_dir), "model": {"name": "bench"}, "data": {"path": "bench"},
        "harvest": {"layers": [layer], "hooks": [hook], "n_tokens": a.store_tokens, "context_size": a.context_size},
        "train": {"n_latents": a.n, "k": a.k, "batch_size": a.batch, "n_tokens": a.tokens, "seed": a.seed,
                  **json.loads(a.ours)}})
    t0 = time.perf_counter()
    train_run(cfg, progress=False)
    wall = time.perf_counter() - t0
    return load_sae(run_dir / "saes" / str(layer) / hook), wall


def ours_finetuned(store_dir: Path, scratch: Path, layer, hook, a) -> tuple[TopKSAE, float, float]:
    """saepipe's default recipe on a.tokens - a.finetune_tokens cached tokens, then `saepipe finetune`
    (pipeline.finetune: KL through the model) on a.finetune_tokens of the store's windows; (the
    fine-tuned SAE, train wall s, finetune wall s)."""
    from pipeline import finetune

    run_dir = scratch / "run-kl"
    run_dir.mkdir()
    cfg = load_config(a.config, [*a.set, f"run_dir={run_dir}", f"store={store_dir.resolve() / 'activations.zarr'}",
                                 f"harvest.layers=[{layer}]", f"harvest.hooks=[{hook}]", f"train.n_latents={a.n}",
                                 f"train.k={a.k}",
                                 f"train.batch_size={a.batch}", f"train.n_tokens={a.tokens - a.finetune_tokens}",
                                 f"train.seed={a.seed}", f"finetune.n_tokens={a.finetune_tokens}",
                                 f"finetune.seed={a.seed}", *a.finetune_set])
    t0 = time.perf_counter()
    train_run(cfg, progress=False)
    t1 = time.perf_counter()
    finetune.run(cfg, progress=False)
    t2 = time.perf_counter()
    return load_sae(run_dir / "saes" / str(layer) / f"{hook}@kl"), t1 - t0, t2 - t1


def sparsify(x_train: torch.Tensor, scratch: Path, a) -> tuple[TopKSAE, float]:
    py = peers.python("sparsify")
    np.save(scratch / "rows.npy", x_train.numpy())
    out = scratch / "sparsify.pt"
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}
    subprocess.run([str(py), str(HERE / "peer_sparsify.py"), str(scratch / "rows.npy"), str(out), "--n", str(a.n),
                    "--k", str(a.k), "--batch", str(a.batch), "--tokens", str(a.tokens), "--seed", str(a.seed),
                    "--threads", str(torch.get_num_threads())], check=True, env=env, stdout=subprocess.DEVNULL)
    w = torch.load(out, weights_only=True)
    sae = TopKSAE(x_train.shape[1], a.n, a.k, backend="torch")
    with torch.no_grad():
        for name in ("W_enc", "b_lat", "W_dec", "b_pre"):
            getattr(sae, name).copy_(w[name])
    return sae, w["wall_s"]


@torch.no_grad()
def score(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> dict:
    """FVU of the raw rows x and the dead fraction (latents that never fire on them), whatever the SAE's
    input normalisation: a layer_norm SAE's reconstruction gets each row's mean and scale back first."""
    mean = x.double().mean(0)
    se = var = 0.0
    fires = torch.zeros(sae.n_latents, dtype=torch.long)
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        x_hat, idx, vals = sae.reconstruct_raw(xb)
        se += (xb - x_hat).double().pow(2).sum().item()
        var += (xb.double() - mean).pow(2).sum().item()
        fires.scatter_add_(0, idx.reshape(-1), (vals > 0).long().reshape(-1))
    return {"fvu": se / var, "dead": (fires == 0).float().mean().item()}


def delta_ce(config: str, scratch: Path, name: str, store_dir: Path, sae: TopKSAE, like: dict, layer, hook,
             n_tokens: int, overrides=()) -> dict:
    """saepipe eval of `sae` in a scratch run of its own: ce_clean, ce_spliced, delta_ce, ce_recovered, kl."""
    run_dir = scratch / f"eval-{name}"
    run_dir.mkdir()
    (run_dir / "activations.zarr").symlink_to(store_dir.resolve() / "activations.zarr")
    keep = ("model", "revision", "layer", "hook", "dataset", "context_size", "prepend_bos", "exclude_bos")
    sae.save(run_dir / "saes" / str(layer) / hook, {key: like.get(key) for key in keep})
    cfg = load_config(config, [*overrides, f"run_dir={run_dir}", f"eval.layers=[{layer}]", f"eval.hooks=[{hook}]",
                               f"eval.n_tokens={n_tokens}"])
    [(_, _, row)] = lm_eval.run(cfg, progress=False)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="run folder holding activations.zarr")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--hook", default="resid_post")
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", help="several seeds: one run each, then medians and means")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours", default="{}", help="JSON of extra train settings for saepipe (default: none)")
    ap.add_argument("--config", help="the store's run config (a causal LM): adds each SAE's delta CE")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for delta CE (with --config)")
    ap.add_argument("--finetune-tokens", type=int, default=0,
                    help="(with --config) also saepipe trained on --tokens minus these, then KL fine-tuned on them")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides of --config (where its store is: harvest.n_tokens=...)")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides of the finetune section (finetune.lr=...)")
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    a = ap.parse_args()
    if a.finetune_tokens and not a.config:
        ap.error("--finetune-tokens needs --config (the fine-tune runs the model)")
    torch.set_num_threads(a.threads)
    store_dir = Path(a.run)
    store = ActivationStore(store_dir)
    a.store_tokens, a.context_size = store.n_rows(a.layer, a.hook), store.context_size
    x_train, x_eval = rows(store, a.layer, a.hook, 0.05)
    print(f"quality: {store_dir} layer {a.layer} {a.hook}: {len(x_train)} training rows, {len(x_eval)} held-out "
          f"rows; n {a.n}, k {a.k}, batch {a.batch}, {a.tokens} tokens", file=sys.stderr)
    per_seed = {}
    for seed in a.seeds or [a.seed]:
        a.seed = seed
        per_seed[seed] = one_seed(a, store_dir, x_train, x_eval)
    if a.seeds or a.finetune_tokens:
        table = seeds_table(per_seed, a)
    else:
        table = single_table(per_seed[a.seed], bool(a.config))
    print(table)
    if a.write:
        write_results(store_dir, a, len(x_train), len(x_eval), table)


def one_seed(a, store_dir: Path, x_train, x_eval) -> dict:
    """Every recipe of one seed: held-out FVU, dead, wall (and delta CE, KL with --config)."""
    results, saes = {}, {}
    recipes = [("sparsify", lambda: sparsify(x_train, scratch, a)),
               ("saepipe", lambda: ours(store_dir, scratch, a.layer, a.hook, a))]
    if a.finetune_tokens:
        recipes.append(("saepipe_kl", lambda: ours_finetuned(store_dir, scratch, a.layer, a.hook, a)))
    with tempfile.TemporaryDirectory(prefix="saepipe-quality-") as tmp:
        scratch = Path(tmp)
        for name, fn in recipes:
            sae, wall, *ft_wall = fn()
            results[name] = {**score(sae, x_eval), "wall": wall, "architecture": sae.architecture,
                             **({"ft_wall": ft_wall[0]} if ft_wall else {})}
            saes[name] = sae
            print(f"quality: seed {a.seed} {name}: held-out fvu {results[name]['fvu']:.4f}, dead "
                  f"{results[name]['dead']:.1%}, {wall:.1f} s" + (f" + fine-tune {ft_wall[0]:.1f} s" if ft_wall else ""),
                  file=sys.stderr)
            if name == "sparsify":
                # Its saved weights are the schedule-free average, whose decoder rows are shorter than 1; put
                # back on the unit sphere it reconstructs better on some stores, worse on others: the ratios
                # compare with the better of the two.
                unit = TopKSAE(sae.d_in, sae.n_latents, sae.k, backend="torch")
                unit.load_state_dict(sae.state_dict())
                unit.normalize_decoder()
                results["sparsify_unit"] = {**score(unit, x_eval), "wall": wall}
                saes["sparsify_unit"] = unit
        if a.config:  # after every training, so the wall times above are not shared with a model
            for name in saes:
                row = delta_ce(a.config, scratch, name, store_dir, saes[name], saes["saepipe"].cfg, a.layer, a.hook,
                               a.eval_tokens, a.set)
                results[name].update(dce=row["delta_ce"], kl=row["kl"], l0=row["l0"])
                print(f"quality: seed {a.seed} {name}: delta CE {row['delta_ce']:.4f} nats, KL {row['kl']:.4f} "
                      f"(ce clean {row['ce_clean']:.4f}, spliced {row['ce_spliced']:.4f}; {row['n_tokens']} tokens)",
                      file=sys.stderr)
    # sparsify's better of its two, by delta CE where measured (else FVU)
    key = "dce" if a.config else "fvu"
    results["sparsify_best"] = min(results["sparsify_unit"], results["sparsify"], key=lambda r: r[key])
    return results


def single_table(results: dict, ce: bool) -> str:
    raw, o, s = results["sparsify"], results["saepipe"], results["sparsify_best"]

    def cells(r):
        return f"| {r['fvu']:.4f} | {r['dead']:.1%} | " + (f"{r['dce']:.4f} | " if ce else "") + f"{r['wall']:.1f} |"

    return "\n".join([
        "| recipe | held-out FVU | dead | " + ("delta CE (nats) | " if ce else "") + "wall s |",
        "| --- | --- | --- | " + ("--- | " if ce else "") + "--- |",
        "| sparsify 1.3.3 default (signum, schedule-free; bare loop), as saved " + cells(raw),
        "| the same, decoder rows renormalised to 1 " + cells(results["sparsify_unit"]),
        "| saepipe default, no lr set (end to end) " + cells(o),
        f"| saepipe / sparsify (the better of its two) | {o['fvu'] / s['fvu']:.3f}x | {o['dead'] - s['dead']:+.1%} | "
        + (f"{o['dce'] / s['dce']:.3f}x | " if ce else "") + f"{o['wall'] / s['wall']:.2f}x |"])


def seeds_table(per_seed: dict, a) -> str:
    """Per seed and over seeds (median; mean +- its standard error): delta CE and KL of each recipe
    and ours / sparsify's better, the fine-tuned one included."""
    names = [("sparsify_best", "sparsify 1.3.3 default (the better of as saved / unit rows)"),
             ("saepipe", f"saepipe default, {a.tokens:,} cached tokens")]
    seeds = list(per_seed)
    if a.finetune_tokens:
        arch = per_seed[seeds[0]]["saepipe_kl"]["architecture"]
        names.append(("saepipe_kl", f"saepipe {arch}, {a.tokens - a.finetune_tokens:,} cached + "
                                    f"{a.finetune_tokens:,} KL fine-tune tokens"))
    lines = ["| recipe | " + " | ".join(f"seed {s}: delta CE, KL" for s in seeds)
             + " | median delta CE | median KL | mean delta CE +- se | mean KL +- se | FVU (median) | L0 |",
             "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- | --- | --- | --- |"]

    def stats(v):
        v = np.asarray(v, dtype=float)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        return float(np.median(v)), f"{v.mean():.4f} +- {se:.4f}"

    for key, label in names:
        rs = [per_seed[s][key] for s in seeds]
        md, mean_d = stats([r["dce"] for r in rs])
        mk, mean_k = stats([r["kl"] for r in rs])
        lines.append(f"| {label} | " + " | ".join(f"{r['dce']:.4f}, {r['kl']:.4f}" for r in rs)
                     + f" | {md:.4f} | {mk:.4f} | {mean_d} | {mean_k} | {np.median([r['fvu'] for r in rs]):.4f} | "
                     f"{np.median([r['l0'] for r in rs]):.1f} |")
    for key, label in names[1:]:
        rd = [per_seed[s][key]["dce"] / per_seed[s]["sparsify_best"]["dce"] for s in seeds]
        rk = [per_seed[s][key]["kl"] / per_seed[s]["sparsify_best"]["kl"] for s in seeds]
        md = np.median([per_seed[s][key]["dce"] for s in seeds]) / np.median(
            [per_seed[s]["sparsify_best"]["dce"] for s in seeds])
        mk = np.median([per_seed[s][key]["kl"] for s in seeds]) / np.median(
            [per_seed[s]["sparsify_best"]["kl"] for s in seeds])
        lines.append(f"| {label.split(',')[0]} / sparsify ({key}) | " + " | ".join(
            f"{x:.3f}x, {y:.3f}x" for x, y in zip(rd, rk)) + f" | {md:.3f}x | {mk:.3f}x | | | | |")
    if a.finetune_tokens:
        walls = [per_seed[s]["saepipe_kl"]["ft_wall"] for s in seeds]
        lines.append(f"\nFine-tune wall time: {np.median(walls):.1f} s for {a.finetune_tokens:,} tokens "
                     f"({np.median(walls) / a.finetune_tokens * 1e4:.1f} s per 10k tokens, median over seeds).")
    return "\n".join(lines)


def write_results(store_dir: Path, a, n_train: int, n_eval: int, table: str):
    store = ActivationStore(store_dir)
    heading = (f"## Quality — `bench/quality.py` on {store.attrs.get('model')} layer {a.layer} {a.hook}, "
               f"a store of {store.n_rows(a.layer, a.hook):,} tokens")
    body = (f"{heading}\n\n{datetime.date.today()}, {platform.machine()} CPU, {a.threads} threads. "
            f"n_latents {a.n}, k {a.k}, batch {a.batch}, {a.tokens:,} tokens; {n_train:,} training rows and "
            f"{n_eval:,} held-out rows, the same for both"
            + (f"; delta CE over {a.eval_tokens:,} held-out tokens of the corpus (`saepipe eval`)" if a.config else "")
            + f".\n\n{table}\n")
    path = HERE / "RESULTS.md"
    text = path.read_text()
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)
    print(f"quality: wrote the table to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
