"""Benchmark: rows/s the trainer's loader reads from a store on S3 against the same
store on local disk.

    python bench/store_read.py                      # 64k rows, d_model 768, bfloat16, lz4
    python bench/store_read.py --rows 262144 --threads 1 4 16

One synthetic store is written twice, to local disk and to a local S3 server
(moto in its own process on 127.0.0.1, tests/s3server.py). Then, interleaved
over rounds, one epoch of training batches (pipeline.loader.BatchLoader: a
thread pool reading and decompressing the shuffle window's chunks, every chunk
checked for presence and checksum) is drawn from each, at each reader thread
count. Prints rows/s (median over rounds), the ratio S3 / disk, and the
server's ceiling: the same objects fetched all at once, nothing decoded.

The local server is not a real object store (no network latency, one Python
process serving every request), so the figure says whether the read path keeps
up when each chunk is a request, not what a data center link gives.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline.loader import BatchLoader, RowFilter  # noqa: E402
from pipeline.store import ActivationStore, Location, write_synthetic  # noqa: E402
from s3server import local_s3  # noqa: E402


def epoch_rows_per_s(store: ActivationStore, threads: int, batch: int, window: int) -> float:
    n = store.n_chunks(0, "resid_post")
    rf = RowFilter(store, 0, "resid_post", exclude_bos=False, skip_nonfinite=False)
    loader = BatchLoader(store, 0, "resid_post", list(range(n)), batch, 0, window, rf, torch.device("cpu"),
                         reader_threads=threads)
    steps = store.n_rows(0, "resid_post") // batch
    t0 = time.perf_counter()
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - t0
    batches.close()
    return steps * batch / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--window", type=int, default=16, help="chunks per shuffle window")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(args.rows, args.d_model, generator=g).to(torch.bfloat16)
    tokens = np.zeros((args.rows // args.context, args.context), dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp, local_s3() as s3:
        s3.make_bucket("bench")
        t0 = time.perf_counter()
        write_synthetic(Path(tmp) / "disk", acts, tokens, storage_dtype="bfloat16")
        t_disk = time.perf_counter() - t0
        t0 = time.perf_counter()
        where = Location(Path(tmp) / "s3", "s3://bench/acts.zarr", s3.options)
        write_synthetic(where, acts, tokens, storage_dtype="bfloat16")
        t_s3 = time.perf_counter() - t0
        disk, remote = ActivationStore(Path(tmp) / "disk"), ActivationStore(where)  # read-only, as train opens them
        n_chunks = disk.n_chunks(0, "resid_post")
        mib = args.rows * args.d_model * 2 / 2**20
        print(f"store: {args.rows} rows x d_model {args.d_model}, bfloat16, lz4: {n_chunks} chunks of "
              f"{disk.chunk_rows(0, 'resid_post')} rows, {mib:.0f} MiB; written in {t_disk:.1f} s to disk, "
              f"{t_s3:.1f} s to the local S3 server")
        times = {(where, t): [] for where in ("disk", "s3") for t in args.threads}
        fs, keys = s3.fs(), s3.fs().find("bench/acts.zarr/layers")
        ceiling = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fs.cat(keys)  # every chunk object, all at once, nothing decoded: what the server gives
            ceiling.append(args.rows / (time.perf_counter() - t0))
            for t in args.threads:
                for where, store in (("disk", disk), ("s3", remote)):
                    times[(where, t)].append(epoch_rows_per_s(store, t, args.batch, args.window))
        print(f"one epoch of batches of {args.batch} rows, shuffle window {args.window} chunks, "
              f"median of {args.rounds} interleaved rounds:")
        print("| reader threads | disk rows/s | S3 rows/s | S3 / disk |")
        print("| --- | --- | --- | --- |")
        for t in args.threads:
            d, s = (statistics.median(times[(w, t)]) for w in ("disk", "s3"))
            print(f"| {t} | {d:,.0f} | {s:,.0f} | {s / d:.2f}x |")
        print(f"the server's ceiling: {statistics.median(ceiling):,.0f} rows/s (every chunk object fetched at once "
              "by s3fs, nothing checked or decoded)")


if __name__ == "__main__":
    main()
