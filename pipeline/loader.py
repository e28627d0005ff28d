"""Shuffled training batches streamed from the activation store.

The row stream is a pure function of the seed and the store:

    for epoch e:      the training chunks in an order permuted from (seed, e)
      for window w:   the next `window_chunks` chunks of that order, read together,
                      BOS / non-finite rows dropped, rows permuted from (seed, e, w)
        rows ...

and batch s is rows [s*B, (s+1)*B) of that stream (a batch may straddle two
windows). A `Cursor` (epoch, window, offset) names a place in the stream; the
trainer checkpoints the cursor after each batch, so a resumed run sees exactly
the batches an uninterrupted one would.

Held-out chunks, spread evenly over the store, are never part of the stream;
`eval_rows` reads the first rows of them for evaluation.

A transcoder's rows are pairs: with `target`, each row is the input hook's row and the
target hook's row of the same token side by side ([.., d_in + d_out], read_rows), so the
pair is shuffled, filtered and batched as one row.

Reading: a background thread assembles windows ahead of the trainer (one
window in hand, `prefetch` more queued), each read by a pool of threads
(zarr decompression releases the GIL). Under torchrun every rank trains on the
same stream, but reads only its share of each window's chunks (positions rank,
rank + W, ...) and an all-gather over a side group hands it the others'
(pipeline.dist), so the store is read once however many ranks there are and
the window each rank assembles is the one a single process reads. On CUDA each window is pinned so
batches go to the GPU with non-blocking copies. With `cache`, every chunk is
read and decompressed once and kept (filtered) in memory for later epochs: the
trainer asks for it when the training rows fit in CACHE_BYTES and the budget
is more than one epoch, since on a small machine decompressing the store again
each epoch takes cores the training step needs.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pipeline import dist
from pipeline.errors import UserError
from pipeline.store import ActivationStore


CACHE_BYTES = 2**30  # training rows, as read, that a run may keep in memory across epochs


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints, the same on every platform."""
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def split_chunks(n_chunks: int, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(train, held_out) chunk ids. Held-out chunks are evenly spaced and do not depend on the seed,
    so SAEs trained with different seeds are evaluated on the same rows."""
    n_eval = 0 if eval_fraction <= 0 or n_chunks < 2 else min(n_chunks - 1, max(1, round(eval_fraction * n_chunks)))
    held = sorted({int((i + 0.5) * n_chunks / n_eval) for i in range(n_eval)}) if n_eval else []
    held_set = set(held)
    return [c for c in range(n_chunks) if c not in held_set], held


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    window: int = 0
    offset: int = 0  # rows of this window already consumed

    def as_list(self) -> list[int]:
        return [self.epoch, self.window, self.offset]


def excludes_bos(store: ActivationStore, exclude_bos: bool) -> bool:
    """Position 0 of every stored sequence holds BOS (or [CLS]) and the config leaves it out."""
    return exclude_bos and bool(store.attrs.get("prepend_bos", False))


def read_rows(store: ActivationStore, layer: int, hook: str, target: str | None, chunk: int) -> torch.Tensor:
    """Chunk `chunk` of (layer, hook), with (layer, target)'s rows beside it when given: the same
    tokens, since harvest cuts every hook's rows from the same windows."""
    x = store.read_chunk(layer, hook, chunk)
    return x if target is None else torch.cat([x, store.read_chunk(layer, target, chunk)], dim=1)


def row_width(store: ActivationStore, layer: int, hook: str, target: str | None) -> int:
    return store.d_model(layer, hook) + (store.d_model(layer, target) if target is not None else 0)


class RowFilter:
    """Which rows of a chunk may be trained on: not BOS (when excluded), finite."""

    def __init__(self, store: ActivationStore, layer: int, hook: str, exclude_bos: bool, skip_nonfinite: bool):
        self.ctx = store.context_size
        self.chunk_rows = store.chunk_rows(layer, hook)
        self.drop_bos = excludes_bos(store, exclude_bos)
        self.skip_nonfinite = skip_nonfinite
        self.where = f"layer {layer} {hook}"
        self.nonfinite: dict[int, int] = {}  # chunk -> rows dropped (a chunk is read once per epoch)

    @property
    def dropped_nonfinite(self) -> int:
        return sum(self.nonfinite.values())

    def __call__(self, chunk: int, x: torch.Tensor) -> torch.Tensor:
        keep = torch.isfinite(x).all(dim=1)
        bad = int(x.shape[0] - keep.sum())
        if bad:
            if not self.skip_nonfinite:
                raise UserError(
                    f"{self.where}: chunk {chunk} holds {bad} rows with NaN/Inf; set train.skip_nonfinite=true "
                    "to drop them, or re-harvest")
            self.nonfinite[chunk] = bad
        if self.drop_bos:
            rows = torch.arange(chunk * self.chunk_rows, chunk * self.chunk_rows + x.shape[0])
            keep &= rows % self.ctx != 0
        return x if bool(keep.all()) else x[keep]


class BatchLoader:
    """Iterate (batch [B, d] float32 on `device`, cursor after the batch) forever."""

    def __init__(self, store: ActivationStore, layer: int, hook: str, chunks: list[int], batch_size: int,
                 seed: int, window_chunks: int, row_filter: RowFilter, device: torch.device,
                 reader_threads: int = 4, prefetch: int = 1, start: Cursor = Cursor(), cache: bool = False,
                 target: str | None = None):
        if not chunks:
            raise UserError(f"layer {layer} {hook}: no chunks left to train on")
        self.store, self.layer, self.hook, self.target = store, layer, hook, target
        self.chunks, self.batch_size, self.seed = list(chunks), batch_size, seed
        self.window_chunks = max(1, min(window_chunks, len(self.chunks)))
        self.n_windows = -(-len(self.chunks) // self.window_chunks)
        self.filter, self.device, self.start = row_filter, device, start
        self.reader_threads, self.prefetch = reader_threads, prefetch
        self.pin = device.type == "cuda"
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None  # chunk -> its filtered rows
        self.group = dist.side_group()  # under torchrun: the ranks share each window's reads

    def window_ids(self, epoch: int, window: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        order = torch.randperm(len(self.chunks), generator=g).tolist()
        ids = order[window * self.window_chunks:(window + 1) * self.window_chunks]
        return [self.chunks[i] for i in ids]

    def read_window(self, epoch: int, window: int, pool: ThreadPoolExecutor) -> torch.Tensor:
        x = torch.cat(self._chunks(self.window_ids(epoch, window), pool))
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, window))
        x = x[torch.randperm(x.shape[0], generator=g)]
        return x.pin_memory() if self.pin else x

    def _chunks(self, ids: list[int], pool: ThreadPoolExecutor) -> list[torch.Tensor]:
        """The filtered rows of chunks `ids`, in order: from the cache, else read (under torchrun,
        each rank its share, then gathered). Every rank's cache holds the same chunks."""
        have = {} if self.cache is None else {c: self.cache[c] for c in ids if c in self.cache}
        todo = [c for c in ids if c not in have]
        if self.group is None:
            read = dict(zip(todo, pool.map(self._read, todo)))
        else:
            read = self._read_shared(todo, pool)
        if self.cache is not None:
            self.cache.update(read)
        return [have[c] if c in have else read[c] for c in ids]

    def _read(self, c: int) -> torch.Tensor:
        return self.filter(c, read_rows(self.store, self.layer, self.hook, self.target, c))

    def _read_shared(self, ids: list[int], pool: ThreadPoolExecutor) -> dict[int, torch.Tensor]:
        """Rank r reads ids r, r + W, ...; the rows of all of them (and the NaN/Inf rows each dropped,
        for the log) come back to every rank."""
        rank, world = dist.rank_world()
        mine = ids[rank::world]
        got = list(pool.map(self._read, mine))
        meta = torch.zeros(len(ids), 2, dtype=torch.long)  # rows kept, non-finite rows dropped
        for j, (c, x) in enumerate(zip(mine, got)):
            meta[rank + j * world] = torch.tensor([x.shape[0], self.filter.nonfinite.get(c, 0)])
        dist.all_reduce_(meta, self.group)
        rows = meta[:, 0].tolist()
        local = torch.cat(got) if got else torch.empty(0, row_width(self.store, self.layer, self.hook, self.target),
                                                         dtype=self.store.dtype(self.layer, self.hook))
        per_rank = dist.all_gather_rows(local, [sum(rows[r::world]) for r in range(world)], self.group)
        out = {}
        for r, block in enumerate(per_rank):
            for c, part in zip(ids[r::world], block.split(rows[r::world])):
                out[c] = part
        for c, dropped in zip(ids, meta[:, 1].tolist()):
            if dropped:
                self.filter.nonfinite[c] = dropped
        return out

    def _windows(self, out: queue.Queue, stop: threading.Event, gate: "_Gate"):
        """Producer thread: windows from the start cursor on, in order, as far as the gate allows."""
        epoch, window = self.start.epoch, self.start.window
        try:
            with ThreadPoolExecutor(self.reader_threads) as pool:
                produced = 0
                while gate.wait(produced):
                    item = (epoch, window, self.read_window(epoch, window, pool))
                    produced += 1
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    window += 1
                    if window == self.n_windows:
                        epoch, window = epoch + 1, 0
        except BaseException as e:  # hand the error to the consumer, which re-raises it
            while not stop.is_set():
                try:
                    out.put(e, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        # Shared reads are collectives: at close every rank's producer must have read the same windows.
        gate = _Gate(self.prefetch + 1, finish=self.group is not None)
        thread = threading.Thread(target=self._windows, args=(q, stop, gate), daemon=True, name="batch-loader")
        thread.start()

        def next_window():
            for _ in range(self.n_windows + 1):  # a whole epoch of empty windows: nothing to train on
                item = q.get()
                gate.took()
                if isinstance(item, BaseException):
                    raise item
                if item[2].shape[0]:
                    return item
            raise UserError(f"{self.filter.where}: no trainable rows left after dropping BOS and NaN/Inf rows")

        try:
            epoch, window, x = next_window()
            offset = self.start.offset
            B = self.batch_size
            while True:
                parts, need = [], B
                while need:
                    take = x[offset:offset + need]
                    parts.append(take)
                    need -= take.shape[0]
                    offset += take.shape[0]
                    if offset >= x.shape[0]:
                        epoch, window, x = next_window()
                        offset = 0
                batch = parts[0] if len(parts) == 1 else torch.cat(parts)
                if self.pin and len(parts) > 1:
                    batch = batch.pin_memory()
                batch = batch.to(self.device, non_blocking=True).float()
                yield batch, Cursor(epoch, window, offset)
        finally:
            stop.set()
            gate.close()
            thread.join(timeout=None if gate.finish else 5)


class _Gate:
    """How many windows the producer may read: `ahead` more than the consumer has taken. Under
    torchrun every rank's consumer takes the same windows, so with `finish` (shared reads) a closed
    gate still lets the producer read up to that count, and every rank's producer ends on the same
    window: their collectives pair up. Without it, a closed gate stops the producer at once."""

    def __init__(self, ahead: int, finish: bool):
        self.allowed, self.finish, self.closed = ahead, finish, False
        self.cv = threading.Condition()

    def took(self):
        with self.cv:
            self.allowed += 1
            self.cv.notify()

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify()

    def wait(self, produced: int) -> bool:
        """Whether window number `produced` may be read (waits until it may, or the gate closes)."""
        with self.cv:
            while produced >= self.allowed and not self.closed:
                self.cv.wait()
            return produced < self.allowed and (self.finish or not self.closed)


def count_nonfinite(store: ActivationStore, layer: int, hook: str, threads: int = 4, target: str | None = None) -> int:
    """NaN/Inf rows in the whole array (with `target`: pairs with one in either; one read pass, `threads` readers)."""
    def bad(c):
        x = read_rows(store, layer, hook, target, c)
        return int(x.shape[0] - torch.isfinite(x).all(dim=1).sum())

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(bad, range(store.n_chunks(layer, hook))))


def trainable_rows(store: ActivationStore, layer: int, hook: str, chunks: list[int], row_filter: RowFilter) -> int:
    """Rows per epoch, counting BOS exclusion but not non-finite drops (unknown until read)."""
    n_rows, rows = store.n_rows(layer, hook), row_filter.chunk_rows
    total = 0
    for c in chunks:
        lo, hi = c * rows, min((c + 1) * rows, n_rows)
        total += hi - lo
        if row_filter.drop_bos:
            total -= (hi - 1) // row_filter.ctx - (lo - 1) // row_filter.ctx  # multiples of ctx in [lo, hi)
    return total


def eval_rows(store: ActivationStore, layer: int, hook: str, chunks: list[int], n: int,
              row_filter: RowFilter, target: str | None = None) -> torch.Tensor:
    """About n filtered rows (pairs, with `target`) as float32 on CPU: an equal share from the start of
    each held-out chunk, so the eval set spans as many sequences of the corpus as the held-out chunks do."""
    share = -(-n // max(1, len(chunks)))
    out = [row_filter(c, read_rows(store, layer, hook, target, c))[:share].float() for c in chunks]
    return torch.cat(out)[:n] if out else torch.empty(0, row_width(store, layer, hook, target))
