"""Benchmark train.sweep: three SAEs from one pass over the batches against three runs one after another.

    python bench/sweep.py                       # 65536 rows x d 512 (bf16, zstd), 3 interleaved rounds
    python bench/sweep.py --rows 49152 --d 768 --n 1024    # small SAEs: reading is a larger share

The store is synthetic (Gaussian rows, bf16, zstd: what harvest writes by default). Each round
trains the same three members, `{}` (n 4096, k 32), `{k: 16}` and `{n_latents: n / 2, k: 32}`,
once as a sweep and once as three plain runs in a row, every one from scratch (--force), through
pipeline.train.run with its prints silenced. Reported: the chunk reads of each (ActivationStore.
read_chunk counted: the NaN/Inf pass, the init sample, the eval rows and the batches) and the
wall time of each, medians of the interleaved rounds, and their ratio. The budget is under one
epoch, so the loader keeps nothing in memory and every batch is read from the store.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402

from pipeline import train as trainer  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.store import ActivationStore, write_synthetic  # noqa: E402

def members(n: int) -> list[dict]:
    return [{}, {"k": 16}, {"n_latents": n // 2, "k": 32}]


def raw_config(run_dir: Path, rows: int, batch: int, n: int, sweep=None, **member) -> dict:
    train = {"n_latents": n, "k": 32, "batch_size": batch, "n_tokens": (rows * 3 // 4) // batch * batch,
             "init_sample": 8192, "eval_tokens": 8192, "log_every": 10, "eval_every": 10_000,
             "checkpoint_every": 10_000, "device": "cpu", **member}
    if sweep is not None:
        train["sweep"] = sweep
    return {"run_dir": str(run_dir), "model": {"name": "synthetic"}, "data": {"path": "synthetic"},
            "harvest": {"layers": [0], "n_tokens": rows, "context_size": 128}, "train": train}


def timed(raws: list[dict], reads: Counter) -> tuple[float, int]:
    """(seconds, chunk reads) of training each config in turn, from scratch."""
    before = sum(reads.values())
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        for raw in raws:
            trainer.run(config_from_dict(raw), force=True, progress=False)
    return time.perf_counter() - t, sum(reads.values()) - before


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536, help="rows in the store")
    ap.add_argument("--d", type=int, default=512, help="d_model")
    ap.add_argument("--batch", type=int, default=1024, help="tokens per step")
    ap.add_argument("--n", type=int, default=4096, help="n_latents of the plain member (another has half)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians reported")
    args = ap.parse_args()

    reads, read_chunk = Counter(), ActivationStore.read_chunk

    def counted(self, layer, hook, chunk, *a, **kw):
        reads[chunk] += 1
        return read_chunk(self, layer, hook, chunk, *a, **kw)

    ActivationStore.read_chunk = counted
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        x = torch.randn(args.rows, args.d, generator=torch.Generator().manual_seed(0))
        store = write_synthetic(run, x, np.zeros((args.rows // 128, 128), dtype=np.int32), storage_dtype="bfloat16",
                                codec="zstd")
        n_chunks = store.n_chunks(0, "resid_post")
        sweep = [raw_config(run, args.rows, args.batch, args.n, sweep=members(args.n))]
        alone = [raw_config(run, args.rows, args.batch, args.n, **m) for m in members(args.n)]
        steps = sweep[0]["train"]["n_tokens"] // args.batch
        print(f"cpu ({torch.get_num_threads()} threads); store {args.rows} rows x d {args.d}, bf16 zstd, "
              f"{n_chunks} chunks; {steps} steps x {args.batch} tokens per SAE; n_latents {args.n}, k 32, "
              f"members {members(args.n)}")
        times = {"sweep": [], "alone": []}
        counts = {}
        for r in range(args.rounds):
            for name, raws in (("sweep", sweep), ("alone", alone)) if r % 2 == 0 else (("alone", alone),
                                                                                          ("sweep", sweep)):
                seconds, n_reads = timed(raws, reads)
                times[name].append(seconds)
                counts[name] = n_reads
            print(f"round {r + 1}: sweep {times['sweep'][-1]:.1f} s, 3 runs {times['alone'][-1]:.1f} s")
    sweep_s, alone_s = statistics.median(times["sweep"]), statistics.median(times["alone"])
    print(f"chunk reads: sweep {counts['sweep']}, 3 runs in a row {counts['alone']} "
          f"({counts['alone'] / counts['sweep']:.2f}x)")
    print(f"wall time: sweep {sweep_s:.1f} s, 3 runs in a row {alone_s:.1f} s; sweep / runs = {sweep_s / alone_s:.3f} "
          f"(medians of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
