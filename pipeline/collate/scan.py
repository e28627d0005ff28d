"""Collate's pass 1: stream every stored row of a layer through the SAE into a
Collator, plus the reading helpers pass 2 (pipeline.collate.windows) shares.

Reads go through ActivationStore.read_chunk (checked: a missing or corrupt chunk
is a one-line error, never zeros), up to 2 * reader_threads chunks ahead of the
encode, and are re-cut into batches of whole sequences.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from pipeline.collate.accumulators import Collator
from pipeline.config import CollateConfig
from pipeline.loader import excludes_bos
from pipeline.saes import Dictionary
from pipeline.store import ActivationStore


def batch_rows_for(cfg: CollateConfig, context_size: int) -> int:
    return max(1, cfg.batch_size // context_size) * context_size


def read_ahead(fn, items, threads: int):
    """fn(item) for each item, yielded in order, with up to 2 * threads reads in flight
    (zarr decompression releases the GIL, so reads overlap the encode)."""
    with ThreadPoolExecutor(threads) as pool:
        inflight = deque()
        for item in items:
            inflight.append(pool.submit(fn, item))
            if len(inflight) >= 2 * threads:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()


def _row_batches(pieces, batch_rows: int):
    """Re-cut a stream of row blocks into (start_row, rows) batches of batch_rows."""
    buf, have, start = [], 0, 0
    for x in pieces:
        buf.append(x)
        have += len(x)
        while have >= batch_rows:
            rows = torch.cat(buf) if len(buf) > 1 else buf[0]
            yield start, rows[:batch_rows]
            start += batch_rows
            rest = rows[batch_rows:]
            buf, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield start, torch.cat(buf)


@contextmanager
def one_cpu_thread(device: torch.device):
    """The bookkeeping is many small ops. Split across CPU threads, each op waits at a
    barrier for all of them, which costs more than it saves (measured 30x slower on a
    busy 2-core VM); the encode's big matmul keeps every thread."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def scan(store: ActivationStore, layer: int, hook: str, sae: Dictionary, cfg: CollateConfig, device) -> Collator:
    """Pass 1: stream every row of the layer through the SAE into a Collator."""
    return scan_all(store, layer, hook, [sae], cfg, device)[0]


# The scan keeps every row's codes (idx int32 + vals float32) while they take at most this many bytes
# for all the SAEs scanned together, so that pass 2 cuts the records' windows from them instead of
# encoding those sequences again (the demo: 5 of collate's 40 s). Beyond it they are dropped.
CODES_BUDGET = 512 << 20


class Codes:
    """Batches of codes (idx [b, w_i], vals [b, w_i]) as one (idx [N, w], vals [N, w]) in row order,
    a batch narrower than the widest w padded with vals 0 (off), which every reader skips. The scan
    keeps every row's this way (idx int32, vals float32)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        w = max(i.shape[1] for i, _ in batches)
        self.idx = torch.cat([torch.nn.functional.pad(i, (0, w - i.shape[1])) for i, _ in batches])
        self.vals = torch.cat([torch.nn.functional.pad(v, (0, w - v.shape[1])) for _, v in batches])

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int64, vals float32) of these rows: copies, the caller's to change."""
        return self.idx[rows].long(), self.vals[rows]


def scan_all(store: ActivationStore, layer: int, hook: str, saes: list[Dictionary], cfg: CollateConfig,
             device, desc: str | None = None) -> list[Collator]:
    """Pass 1 for several SAEs of one layer (a train.sweep's members): each batch is read
    once and goes through every SAE into its own Collator. Each Collator's `codes` holds the
    rows' codes (Codes) when they fit CODES_BUDGET, else None."""
    device = torch.device(device)
    n_rows, ctx = store.n_rows(layer, hook), store.context_size
    cols = [Collator(sae.n_latents, ctx, cfg, device, excludes_bos(store, cfg.exclude_bos)) for sae in saes]
    kept: list[list] | None = [[] for _ in saes]
    size = 0

    def read(c):
        return store.read_chunk(layer, hook, c)

    chunks = read_ahead(read, range(store.n_chunks(layer, hook)), cfg.reader_threads)
    with tqdm(total=n_rows, unit="tok", unit_scale=True, desc=desc or f"collate {layer}/{hook}",
              smoothing=0.1) as bar:
        for start, x in _row_batches(chunks, batch_rows_for(cfg, ctx)):
            x = x.to(device)
            for j, (sae, col) in enumerate(zip(saes, cols)):
                idx, vals = sae.encode(x)
                with one_cpu_thread(idx.device):
                    col.update(start, idx, vals)
                if kept is not None:
                    kept[j].append((idx.to(torch.int32), vals.float()))
                    size += idx.numel() * 8
                    if size > CODES_BUDGET:
                        kept = None
            bar.update(len(x))
    for j, col in enumerate(cols):
        col.codes = Codes(kept[j]) if kept is not None and kept[j] else None
    with one_cpu_thread(device):
        return [col.finish() for col in cols]
