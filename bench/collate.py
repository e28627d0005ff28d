"""Benchmark: collate's streaming pass against SAE encoding alone, on the same rows.

    python bench/collate.py                       # CPU-sized defaults
    python bench/collate.py --device cuda         # GPU sizes: 2M tokens, d_model 768
    python bench/collate.py --latents 4096 --full --window 16   # + records and files
    python bench/collate.py --records runs/demo --layer 3     # writing the records: latents/s

For --records (a finished run: its store, SAE and config's collate settings),
scan and windows run once, then, interleaved over rounds, collate's writer
(pipeline.collate.records.write_records) and a plain per-latent writer (a dict per
latent through json.dumps into its own file, as collate wrote them before) on
the same records: latents/s of each, their ratio, and the bytes each leaves.

For each n_latents, a synthetic store (random bfloat16 activations) and a random
SAE, then in one run:

    encode  sae.encode over the rows, already in memory: the most collate could reach
    scan    collate's pass 1 from the store: read + encode + the per-latent
            top/random/stats accumulators (the part that grows with tokens)
    full    (--full) the whole collate_sae: scan, record windows, every file

Goal: scan >= 0.5x encode. Peak memory: on CUDA the peak allocated; on CPU the
peak RSS of a fresh child process per measurement (next to the RSS it started
from once the SAE was loaded), so one measurement's high-water mark cannot
leak into the next.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(root: Path, args, n_latents: int):
    """Synthetic store (shared by all sizes) and one random SAE per size."""
    from pipeline.saes.topk import TopKSAE
    from pipeline.store import write_synthetic

    store_dir = root / "run"
    if not (store_dir / "activations.zarr").exists():
        n_seq = args.tokens // args.ctx
        g = torch.Generator().manual_seed(0)
        acts = torch.randn(n_seq * args.ctx, args.d_model, generator=g).to(torch.bfloat16)
        # Real text through the tests' small BPE tokenizer: random ids would be mostly
        # partial UTF-8 bytes, a worst case for decoding that real data never is.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import CORPUS, make_tokenizer

        tok = make_tokenizer(root / "tok")
        text = tok.encode(" ".join(CORPUS), add_special_tokens=False)
        tokens = np.resize(np.array(text, dtype=np.int32), (n_seq, args.ctx))
        write_synthetic(store_dir, acts, tokens, storage_dtype="bfloat16", attrs={"tokenizer": str(root / "tok")})
    folder = store_dir / "saes" / str(n_latents) / "resid_post"
    if not folder.exists():
        torch.manual_seed(0)
        TopKSAE(args.d_model, n_latents, args.k).save(folder)
    return store_dir, folder


def measure(kind: str, root: str, args: dict, n_latents: int) -> dict:
    """One measurement, meant to run in its own process."""
    from pipeline import collate as C
    from pipeline.collate import scan as S
    from pipeline.config import CollateConfig
    from pipeline.saes import load_sae
    from pipeline.store import ActivationStore

    a = argparse.Namespace(**args)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    store_dir, folder = build(Path(root), a, n_latents)
    store = ActivationStore(store_dir)
    sae = load_sae(folder, device=a.device)
    cfg = CollateConfig(batch_size=a.batch_size, n_top=a.n_top, n_random=a.n_random, window=a.window)
    n_rows = store.n_rows(0, "resid_post")
    if kind == "encode":
        x = store.read_rows(0, "resid_post", 0, n_rows)
    _sync(a.device)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()

    t0 = time.perf_counter()
    if kind == "encode":
        step = S.batch_rows_for(cfg, store.context_size)
        for i in range(0, n_rows, step):
            sae.encode(x[i: i + step].to(a.device))
    elif kind == "scan":
        S.scan(store, 0, "resid_post", sae, cfg, a.device)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.tokenizer or store.attrs["tokenizer"])
        out = Path(root) / "records" / str(n_latents)
        C.collate_sae(store, 0, "resid_post", sae, folder, tok, cfg, out, a.device)
    _sync(a.device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tok_s": n_rows / seconds, "peak_mb": _peak_mb(a.device), "start_mb": rss0}


def plain_write(out: Path, recs, text, ctx: int, n: int):
    """The reference writer: every latent's records as a dict, json.dumps, one file each."""
    from pipeline.collate.records import _dumps, _round

    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        seqs = []
        for r in range(recs.offsets[i], recs.offsets[i + 1]):
            at, length, start = recs.slot[r], int(recs.length[r]), int(recs.start[r])
            ids = recs.tokens[at, :length]
            seqs.append({"doc_id": int(recs.row[r]) // ctx, "idx": int(recs.row[r]) % ctx - start,
                         "act": round(float(recs.act[r]), 6), "acts": _round(recs.acts[at, :length]),
                         "tokens": text.strings(ids), "token_ints": ids.tolist(), "window_start": start})
        kind = recs.kind[recs.offsets[i]: recs.offsets[i + 1]]
        info = {"index": i, "top": [s for s, k in zip(seqs, kind) if k == 0],
                "random": [s for s, k in zip(seqs, kind) if k == 1]}
        (out / f"{i}.json").write_text(_dumps(info))


def records_bench(args):
    """--records: collate's writer against the plain per-latent one, interleaved."""
    from pipeline.collate import records
    from pipeline.config import load_config
    from pipeline.fsio import tree_size
    from pipeline.paths import sae_dir
    from pipeline.saes import load_sae
    from pipeline.collate.scan import scan
    from pipeline.store import ActivationStore
    from pipeline.collate.windows import TokenText, cut_windows, pick, store_tokenizer

    run = Path(args.records)
    cfg = load_config(args.config or f"configs/{run.name}.yaml", [f"run_dir={run}"]).collate
    store = ActivationStore(run)
    folder = sae_dir(run, args.layer, "resid_post")
    sae = load_sae(folder)
    text = TokenText(store_tokenizer(store))
    t0 = time.perf_counter()
    col = scan(store, args.layer, "resid_post", sae, cfg, "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="saepipe-bench-records-"))
    try:
        recs = pick(col, cfg, store.context_size, tmp / "scratch")
        cut_windows(store, args.layer, "resid_post", sae, recs, cfg, "cpu")
        prep = time.perf_counter() - t0
        n = sae.n_latents
        n_plain = min(n, args.plain_latents)
        meta = {"layer": args.layer, "hook": "resid_post", "d_in": sae.d_in, "k": sae.k}
        ours, plain, size = [], [], {}
        for r in range(args.rounds):
            out = tmp / f"ours{r}"
            out.mkdir()
            t = time.perf_counter()
            records.write_records(out, col, recs, text, cfg, meta)
            ours.append(n / (time.perf_counter() - t))
            size["ours"] = tree_size(out)
            shutil.rmtree(out)
            t = time.perf_counter()
            plain_write(tmp / f"plain{r}", recs, text, store.context_size, n_plain)
            plain.append(n_plain / (time.perf_counter() - t))
            size["plain"] = tree_size(tmp / f"plain{r}") * n / n_plain
            shutil.rmtree(tmp / f"plain{r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    o, p_ = float(np.median(ours)), float(np.median(plain))
    print(f"\n{run} layer {args.layer}: {n} latents, n_top {cfg.n_top}, n_random {cfg.n_random}, window "
          f"{cfg.window or 'whole sequence'} ({store.context_size} tokens); scan + windows {prep:.1f} s; "
          f"median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| writer | latents/s | bytes on disk |")
    print("| --- | --- | --- |")
    print(f"| plain: a dict per latent, json.dumps, one file each ({n_plain} latents a round) | {p_:,.0f} | "
          f"{size['plain'] / 2**20:.1f} MiB (extrapolated), and again in the viewer's shards before |")
    print(f"| collate (pipeline.collate.records.write_records): records once, compact, in the viewer's shards and "
          f"windows files | {o:,.0f} | "
          f"{size['ours'] / 2**20:.1f} MiB (whole folder) |")
    print(f"| ratio | {o / p_:.1f}x | |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", default="32768,131072", help="comma-separated n_latents")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, help="default: 65536 on CPU, 2097152 on CUDA")
    p.add_argument("--d-model", type=int, help="default: 256 on CPU, 768 on CUDA")
    p.add_argument("--batch-size", type=int, help="tokens per encode batch; default: 4096 on CPU, 16384 on CUDA")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n-top", type=int, default=50)
    p.add_argument("--n-random", type=int, default=20)
    p.add_argument("--window", type=int, default=None, help="record window for --full (default: whole sequence)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--full", action="store_true", help="also time the whole collate, records and files included")
    p.add_argument("--tokenizer", default=None, help="for --full: a tokenizer name or folder (default: a small BPE)")
    p.add_argument("--keep", help="build the synthetic store here and keep it (default: a temp dir)")
    p.add_argument("--records", help="a finished run folder: time writing its records (see above)")
    p.add_argument("--config", help="for --records: its config (default: configs/<run folder name>.yaml)")
    p.add_argument("--layer", type=int, default=3, help="for --records")
    p.add_argument("--rounds", type=int, default=3, help="for --records")
    p.add_argument("--plain-latents", type=int, default=512, help="for --records: latents the plain writer does")
    args = p.parse_args()
    if args.records:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        return records_bench(args)
    gpu = args.device.startswith("cuda")
    args.tokens = args.tokens or (2_097_152 if gpu else 65536)
    args.d_model = args.d_model or (768 if gpu else 256)
    args.batch_size = args.batch_size or (16384 if gpu else 4096)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="saepipe-bench-"))
    kinds = ["encode", "scan"] + (["full"] if args.full else [])
    rows = []
    spawn = mp.get_context("spawn")
    try:
        for n in [int(s) for s in args.latents.split(",")]:
            build(root, args, n)
            res = {}
            for kind in kinds:
                with spawn.Pool(1) as pool:  # a fresh process: its own peak memory
                    res[kind] = pool.apply(measure, (kind, str(root), vars(args), n))
            rows.append((n, res))
            print(json.dumps({"n_latents": n, **res}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def mem(m):
        return f"{m['peak_mb']:.0f}" if gpu else f"{m['peak_mb']:.0f} ({m['start_mb']:.0f})"

    print(f"\ndevice {args.device}, {args.tokens} tokens, d_model {args.d_model}, k {args.k}, "
          f"batch {args.batch_size} tokens, N={args.n_top} M={args.n_random}")
    unit = "peak alloc MiB" if gpu else "peak RSS MiB (at start)"
    head = f"| n_latents | encode tok/s | scan tok/s | scan / encode | encode {unit} | scan {unit} |"
    if args.full:
        head += f" full collate s | full {unit} |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n, r in rows:
        e, s = r["encode"], r["scan"]
        line = f"| {n} | {e['tok_s']:,.0f} | {s['tok_s']:,.0f} | {s['tok_s'] / e['tok_s']:.2f}x | {mem(e)} | {mem(s)} |"
        if args.full:
            line += f" {r['full']['seconds']:.1f} | {mem(r['full'])} |"
        print(line)


if __name__ == "__main__":
    main()
