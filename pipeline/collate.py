"""Collate: per-latent activation records for one trained SAE, in one streaming pass.

    scan     read the layer's rows in order, encode each batch to (idx, vals) [B, k]
             and fold it into fixed-size per-latent state:
               top     the N largest activations, at most one per sequence
               random  the M positive activations with the smallest seeded keys
               stats   count, sums of a, a², a³, a⁴, a histogram of positive acts
    windows  re-read only the sequences that were picked, encode them again, and cut
             out each record's tokens and this latent's acts around the picked token
    write    features/<i>.json (sae-viewer FeatureInfo), index.json, summary.json,
             the static viewer, and last a `done` marker holding the fingerprint of
             what the records were made from (SAE weights, output-deciding settings)

Positions left out of the statistics (BOS/[CLS] with exclude_bos) are left out of
the records too: their acts are 0, and summary.json lists them.

Memory is O(n_latents * (N + M + bins)) plus one batch: never the dense
[tokens, latents] matrix, never all nonzeros. Batches hold whole sequences, so a
sequence never spans two batches and "one per sequence" is a within-batch rule.

Top and random share one primitive, BestN: per latent, the N entries with the
smallest key (top: key = -act; random: key = a hash of (seed, row, latent)).
Keeping the M smallest of iid uniform keys is an exact uniform sample without
replacement, and because the key depends only on (seed, row, latent) the result
is the same for any batch size or device.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import fsio, viewer
from pipeline.config import CollateConfig
from pipeline.errors import UserError
from pipeline.paths import DONE, records_dir, sae_dir  # noqa: F401 (re-exported for stages)
from pipeline.sae import TopKSAE, saved_marker
from pipeline.store import ActivationStore


# ---------------------------------------------------------------------------
# Seeded keys for the random sample

_MASK32 = 0xFFFFFFFF
_LANES = (0x9E3779B9, 0x7F4A7C15)  # salts of the two independent 32-bit key halves


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, split in 16-bit halves so int64 never overflows."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h):
    """murmur3's 32-bit finalizer; works on Python ints and int64 tensors alike."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def row_hashes(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """[2, m]: two independent 32-bit hashes of (seed, row), one per key lane."""
    rows = rows.long()
    lanes = []
    for lane in _LANES:
        h0 = _fmix32(_fmix32((seed & _MASK32) ^ lane) ^ ((seed >> 32) & _MASK32))
        lanes.append(_fmix32(_fmix32((rows & _MASK32) ^ h0) ^ ((rows >> 32) & _MASK32)))
    return torch.stack(lanes)


def latent_keys(row_hash: torch.Tensor, latents: torch.Tensor, lanes=(0, 1)) -> torch.Tensor:
    """Finish the keys by mixing each candidate's latent into its row's hashes:
    lane 0 gives the high 31 bits of the 62-bit key, lane 1 the low 31."""
    key = torch.zeros_like(latents)
    for lane in lanes:
        key = key | ((_fmix32(row_hash[lane] ^ (latents & _MASK32)) >> 1) << (31 * (1 - lane)))
    return key


def random_keys(seed: int, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A uniform 62-bit int64 key for each (seed, row, latent). No RNG state: any
    batching on any device gives the same keys. 62 bits make ties negligible even
    for a latent that fires on billions of tokens."""
    return latent_keys(row_hashes(seed, rows), latents.long())


# ---------------------------------------------------------------------------
# Per-latent state


class BestN:
    """Per latent, the `size` entries with the smallest key offered so far.

    Ties go to the smaller row. With `one_per`, at most one entry per latent and
    block of `one_per` rows (a sequence): the best of that sequence.

    Offers are cheap: candidates that cannot beat their latent's current worst kept
    key are dropped, the rest wait in a pending list that `flush` merges in once it
    holds about n_latents * size / 2 entries (and before results are read). A
    threshold from the last merge is looser than the true one, so dropping by it
    is never wrong, and each merge's O(n_latents * size) cost is spread over many
    batches instead of paid on every one.

    Order matters: candidates must come in ascending row order, after every row
    already offered. Stable sorts then settle ties by row without carrying it as
    a second key.
    """

    def __init__(self, n_latents: int, size: int, key_dtype: torch.dtype, device, one_per: int | None = None):
        self.size, self.one_per = size, one_per
        self.empty = float("inf") if key_dtype.is_floating_point else torch.iinfo(key_dtype).max
        self.key = torch.full((n_latents, size), self.empty, dtype=key_dtype, device=device)
        self.row = torch.full((n_latents, size), -1, dtype=torch.int64, device=device)
        self.act = torch.zeros((n_latents, size), dtype=torch.float32, device=device)
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.n_pending = 0
        self.limit = max(1 << 16, n_latents * size // 2)

    def threshold(self, lat: torch.Tensor) -> torch.Tensor:
        """Each candidate's bar to clear: its latent's worst kept key (as of the last merge)."""
        return self.key[lat, -1]

    def offer(self, lat, key, row, act):
        """Candidates (latent, key, row, act), each [m]. With one_per, an offer holds
        whole sequences (none seen before), so "one per sequence" is settled here."""
        if self.size == 0:
            return
        keep = key < self.threshold(lat)
        lat, key, row, act = lat[keep], key[keep], row[keep], act[keep]
        if self.one_per and len(lat):
            # Sorted by (latent, sequence, key): the first of each run is its best. Within
            # a latent, the survivors stay in row order, which is all the ties need.
            seq = row // self.one_per
            seq = seq - seq.min()
            order = torch.sort(key, stable=True).indices
            pair = (lat * (int(seq.max()) + 1) + seq)[order]
            inner = torch.sort(pair, stable=True).indices
            pair, order = pair[inner], order[inner]
            first = torch.ones_like(pair, dtype=torch.bool)
            first[1:] = pair[1:] != pair[:-1]
            order = order[first]
            lat, key, row, act = lat[order], key[order], row[order], act[order]
        self.pending.append((lat, key, row, act))
        self.n_pending += len(lat)
        if self.n_pending >= self.limit:
            self.flush()

    def flush(self):
        if not self.n_pending:
            self.pending = []
            return
        lat, key, row, act = (torch.cat(t) for t in zip(*self.pending))
        self.pending, self.n_pending = [], 0
        order = torch.sort(key, stable=True).indices
        order = order[torch.sort(lat[order], stable=True).indices]  # (latent, key, row)
        lat, key, row, act = lat[order], key[order], row[order], act[order]

        # Rank of each candidate inside its latent's run; ranks >= size cannot make it.
        uniq = torch.unique_consecutive(lat)
        rank = torch.arange(len(lat), device=lat.device) - torch.searchsorted(lat, lat)
        fits = rank < self.size
        slot, rank = torch.searchsorted(uniq, lat[fits]), rank[fits]
        shape = (len(uniq), self.size)
        new_key = torch.full(shape, self.empty, dtype=self.key.dtype, device=lat.device)
        new_row = torch.full(shape, -1, dtype=torch.int64, device=lat.device)
        new_act = torch.zeros(shape, dtype=torch.float32, device=lat.device)
        new_key[slot, rank], new_row[slot, rank], new_act[slot, rank] = key[fits], row[fits], act[fits]

        # Kept entries first: on equal keys the stable sort prefers them (smaller rows).
        keys = torch.cat([self.key[uniq], new_key], 1)
        order = torch.sort(keys, dim=1, stable=True).indices[:, : self.size]
        self.key[uniq] = keys.gather(1, order)
        self.row[uniq] = torch.cat([self.row[uniq], new_row], 1).gather(1, order)
        self.act[uniq] = torch.cat([self.act[uniq], new_act], 1).gather(1, order)


class LatentStats:
    """Counts, power sums and histograms of each latent's positive activations.

    A histogram has a fixed number of bins; a latent whose activation would land
    past the last bin doubles its bin width, merging bins pairwise. With key
    ceil(a / w) that merge is exact (ceil(ceil(x) / 2) = ceil(x / 2)), so the final
    histogram equals one computed directly at the final width, recorded per latent.
    """

    def __init__(self, n_latents: int, bin_width: float, n_bins: int, device):
        self.count = torch.zeros(n_latents, dtype=torch.int64, device=device)
        # float64: sums of a⁴ over billions of tokens lose too much in float32.
        self.sums = torch.zeros(n_latents, 4, dtype=torch.float64, device=device)
        self.width = torch.full((n_latents,), bin_width, dtype=torch.float64, device=device)
        self.hist = torch.zeros(n_latents, n_bins, dtype=torch.int64, device=device)

    def add(self, lat, act):
        # index_put_(accumulate=True) rather than index_add_: on CUDA it sums in a
        # sorted order, so reruns produce bit-identical statistics.
        self.count.index_put_((lat,), torch.ones_like(lat), accumulate=True)
        a = act.double()
        a2 = a * a
        self.sums.index_put_((lat,), torch.stack([a, a2, a2 * a, a2 * a2], 1), accumulate=True)
        n_bins = self.hist.shape[1]
        while True:
            key = torch.ceil(a / self.width[lat]).long()
            over = key > n_bins
            if not bool(over.any()):
                break
            self._widen(torch.unique(lat[over]))
        flat = lat * n_bins + (key - 1)
        self.hist.view(-1).index_put_((flat,), torch.ones_like(flat), accumulate=True)

    def _widen(self, lats):
        h = self.hist[lats]
        half = h.view(len(lats), -1, 2).sum(-1)
        self.hist[lats] = torch.cat([half, torch.zeros_like(half)], 1)
        self.width[lats] *= 2


class Collator:
    """Everything the scan keeps, fed one batch of whole sequences at a time."""

    def __init__(self, n_latents: int, context_size: int, cfg: CollateConfig, device, skip_first: bool):
        self.ctx = context_size
        self.skip_first = skip_first  # position 0 holds BOS: not a real activation
        self.seed = cfg.seed
        self.stats = LatentStats(n_latents, cfg.hist_bin_width, cfg.hist_max_bins, device)
        self.top = BestN(n_latents, cfg.n_top, torch.float32, device, one_per=context_size)
        self.random = BestN(n_latents, cfg.n_random, torch.int64, device)
        self.n_tokens = 0  # tokens counted in the statistics (BOS positions excluded)

    def update(self, start: int, idx: torch.Tensor, vals: torch.Tensor):
        """One encoded batch: rows [start, start + B), idx/vals [B, k]."""
        B, k = idx.shape
        assert start % self.ctx == 0 and B % self.ctx == 0, "batches must hold whole sequences"
        rows = torch.arange(start, start + B, device=idx.device)
        # A non-finite act (a corrupt row) could not be ranked or binned: skip it.
        fired = (vals > 0) & torch.isfinite(vals)
        if self.skip_first:
            fired &= (rows % self.ctx != 0)[:, None]
            self.n_tokens += B - B // self.ctx
        else:
            self.n_tokens += B
        lat, act = idx[fired], vals[fired].float()
        row = rows[:, None].expand(B, k)[fired]  # row-major: ascending rows, as BestN needs
        self.stats.add(lat, act)
        self.top.offer(lat, -act, row, act)
        if self.random.size:
            # Hash rows once per batch, not once per (row, latent); then only candidates
            # whose high key half can still beat the latent's M-th key get the low half.
            row_hash = row_hashes(self.seed, rows)[:, row - start]
            high = latent_keys(row_hash, lat, lanes=(0,))
            near = high < self.random.threshold(lat)  # key < t implies high half < t
            lat, row, act, row_hash = lat[near], row[near], act[near], row_hash[:, near]
            self.random.offer(lat, latent_keys(row_hash, lat), row, act)

    def finish(self) -> "Collator":
        """Merge what is still pending; call once after the last batch."""
        self.top.flush()
        self.random.flush()
        return self


# ---------------------------------------------------------------------------
# Reading


def _read_ahead(fn, items, threads: int):
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


def batch_rows_for(cfg: CollateConfig, context_size: int) -> int:
    return max(1, cfg.batch_size // context_size) * context_size


def excludes_bos(store: ActivationStore, cfg: CollateConfig) -> bool:
    """Position 0 holds BOS/[CLS] in every stored sequence and the config leaves it out."""
    return cfg.exclude_bos and bool(store.attrs.get("prepend_bos", False))


def scan(store: ActivationStore, layer: int, hook: str, sae: TopKSAE, cfg: CollateConfig, device) -> Collator:
    """Pass 1: stream every row of the layer through the SAE into a Collator."""
    device = torch.device(device)
    n_rows, ctx = store.n_rows(layer, hook), store.context_size
    col = Collator(sae.n_latents, ctx, cfg, device, excludes_bos(store, cfg))

    def read(c):
        return store.read_chunk(layer, hook, c)

    chunks = _read_ahead(read, range(store.n_chunks(layer, hook)), cfg.reader_threads)
    with tqdm(total=n_rows, unit="tok", unit_scale=True, desc=f"collate {layer}/{hook}", smoothing=0.1) as bar:
        for start, x in _row_batches(chunks, batch_rows_for(cfg, ctx)):
            idx, vals = sae.encode(x.to(device))
            with _one_cpu_thread(idx.device):
                col.update(start, idx, vals)
            bar.update(len(x))
    with _one_cpu_thread(device):
        return col.finish()


@contextmanager
def _one_cpu_thread(device: torch.device):
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


# ---------------------------------------------------------------------------
# Pass 2: the records' windows


@dataclass
class Records:
    """Every picked (latent, row), ordered by (latent, top before random, rank).

    Latent i's records are offsets[i]:offsets[i+1]. Record r's window is row
    slot[r] of acts/tokens [R, W] (W = the widest window), valid up to length[r];
    slots follow the order pass 2 fills them in, so its writes are sequential.
    The two arrays may be memory-mapped scratch files.
    """

    latent: np.ndarray
    kind: np.ndarray  # 0 = top, 1 = random
    row: np.ndarray
    act: np.ndarray
    start: np.ndarray  # window start, a position in the sequence
    length: np.ndarray
    offsets: np.ndarray
    slot: np.ndarray
    acts: np.ndarray
    tokens: np.ndarray


def _scratch(path: Path, shape, dtype):
    """A disk-backed array, so the records never need to fit in RAM (mmap can't be empty)."""
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def pick(col: Collator, cfg: CollateConfig, context_size: int, scratch: Path) -> Records:
    """Flatten the top and random lists into Records with their windows laid out."""
    rows = torch.cat([col.top.row, col.random.row], 1).cpu().numpy()
    acts = torch.cat([col.top.act, col.random.act], 1).cpu().numpy()
    n, width = rows.shape
    valid = rows >= 0
    latent = np.broadcast_to(np.arange(n)[:, None], rows.shape)[valid]
    kind = np.broadcast_to((np.arange(width) >= cfg.n_top)[None, :], rows.shape)[valid].astype(np.int8)
    row, act = rows[valid], acts[valid]
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))])
    pos = row % context_size
    if cfg.window is None:
        start, length, W = np.zeros_like(pos), np.full_like(pos, context_size), context_size
    else:
        start = np.maximum(pos - cfg.window, 0)
        length = np.minimum(pos + cfg.window + 1, context_size) - start
        W = min(2 * cfg.window + 1, context_size)
    scratch.mkdir(parents=True, exist_ok=True)
    R = len(row)
    return Records(latent, kind, row, act, start, length, offsets, np.zeros(R, dtype=np.int64),
                   _scratch(scratch / "acts.npy", (R, W), np.float32),
                   _scratch(scratch / "tokens.npy", (R, W), np.int32))


def cut_windows(store: ActivationStore, layer: int, hook: str, sae: TopKSAE, recs: Records,
                cfg: CollateConfig, device):
    """Pass 2: fill recs.acts / recs.tokens. Reads each store chunk holding a picked
    sequence once and encodes only the picked sequences, each once."""
    if len(recs.row) == 0:
        return
    device = torch.device(device)
    ctx = store.context_size
    seq_per_chunk = store.chunk_rows(layer, hook) // ctx  # harvest keeps chunks to whole sequences
    skip_first = excludes_bos(store, cfg)
    order = np.argsort(recs.row, kind="stable")  # records in row order; they get slots in this order
    needed = np.unique(recs.row // ctx)
    by_chunk = np.split(needed, np.flatnonzero(np.diff(needed // seq_per_chunk)) + 1)

    def read(seqs):
        c = int(seqs[0]) // seq_per_chunk
        first = c * seq_per_chunk
        x = store.read_chunk(layer, hook, c)
        x = x.view(-1, ctx, x.shape[-1])[torch.from_numpy(seqs - first)]
        return seqs, x, store.read_tokens(first, first + seq_per_chunk)[seqs - first]

    step = batch_rows_for(cfg, ctx)
    lo = 0
    with tqdm(total=len(needed), unit="seq", desc=f"records {layer}/{hook}") as bar:
        for seqs, x, tok in _read_ahead(read, by_chunk, cfg.reader_threads):
            flat = x.reshape(len(seqs) * ctx, -1)
            enc = [sae.encode(flat[i: i + step].to(device)) for i in range(0, len(flat), step)]
            idx, vals = torch.cat([e[0] for e in enc]), torch.cat([e[1] for e in enc]).float()
            if skip_first:
                # Excluded from the statistics, so excluded from the records too: a BOS
                # act of 0 is drawn unshaded instead of as the record's brightest token.
                vals.view(len(seqs), ctx, -1)[:, 0] = 0
            hi = lo + int(np.searchsorted(recs.row[order[lo:]] // ctx, seqs[-1], side="right"))
            with _one_cpu_thread(idx.device):
                _fill_windows(recs, order, lo, hi, seqs, idx, vals, tok, sae.n_latents, ctx)
            lo = hi
            bar.update(len(seqs))


def _fill_windows(recs: Records, order, lo: int, hi: int, seqs, idx, vals, tok, n_latents: int, ctx: int):
    """Windows of records order[lo:hi], whose sequences are `seqs`, encoded as idx/vals
    [len(seqs) * ctx, k]."""
    device = idx.device
    # The nonzeros as (sequence * n_latents + latent, position, act).
    r, j = torch.nonzero(vals > 0, as_tuple=True)
    ent_key = (r // ctx) * n_latents + idx[r, j]
    ent_pos, ent_val = r % ctx, vals[r, j]
    tok = torch.from_numpy(np.asarray(tok, dtype=np.int32)).to(device)
    span = torch.arange(recs.acts.shape[1], device=device)
    per_block = max(1, (1 << 22) // ctx)  # bounds a block's [pairs, ctx] table
    for b in range(lo, hi, per_block):
        e = min(hi, b + per_block)
        ids = order[b:e]
        recs.slot[ids] = np.arange(b, e)
        local = torch.from_numpy(np.searchsorted(seqs, recs.row[ids] // ctx)).to(device)
        lat = torch.from_numpy(recs.latent[ids]).to(device)
        # One table row per distinct (sequence, latent): the latent's act at every position.
        pairs, pair_of = torch.unique(local * n_latents + lat, return_inverse=True)
        at = torch.searchsorted(pairs, ent_key).clamp_max(len(pairs) - 1)
        hit = pairs[at] == ent_key
        table = torch.zeros(len(pairs), ctx, device=device)
        table[at[hit], ent_pos[hit]] = ent_val[hit]
        start = torch.from_numpy(recs.start[ids]).to(device)
        inside = span[None, :] < torch.from_numpy(recs.length[ids]).to(device)[:, None]
        pos = (start[:, None] + span[None, :]).clamp_max(ctx - 1)
        recs.acts[b:e] = (table[pair_of[:, None], pos] * inside).cpu().numpy()
        recs.tokens[b:e] = (tok[local[:, None], pos] * inside).cpu().numpy()


# ---------------------------------------------------------------------------
# Token text


class TokenText:
    """Per-token strings that concatenate back to the decoded text.

    Each token is decoded after a fixed anchor token, which gives it its
    in-context form (SentencePiece drops a word's leading space when it comes
    first; byte-level BPE maps bytes to printable stand-ins). A token holding only
    part of a UTF-8 character decodes to U+FFFD; windows with one are decoded
    incrementally instead, and the character goes to the token that completes it.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
        self.anchor_text = self._decode(self.anchor)
        # Lookup tables over token ids, filled on first sight: a window is one gather.
        self.text = np.empty(0, dtype=object)
        self.partial = np.zeros(0, dtype=bool)
        self.known = np.zeros(0, dtype=bool)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def piece(self, token: int) -> str:
        both = self._decode(self.anchor + [token])
        return both[len(self.anchor_text):] if both.startswith(self.anchor_text) else self._decode([token])

    def _learn(self, ids: np.ndarray):
        top = int(ids.max(initial=-1)) + 1
        if top > len(self.known):
            size = max(top, len(self.tok), 2 * len(self.known))
            grow = size - len(self.known)
            self.text = np.concatenate([self.text, np.empty(grow, dtype=object)])
            self.partial = np.concatenate([self.partial, np.zeros(grow, dtype=bool)])
            self.known = np.concatenate([self.known, np.zeros(grow, dtype=bool)])
        for t in np.unique(ids[~self.known[ids]]).tolist():
            self.text[t] = self.piece(t)
            self.partial[t] = "\ufffd" in self.text[t]
            self.known[t] = True

    def strings(self, ids) -> list[str]:
        ids = np.asarray(ids, dtype=np.int64)
        self._learn(ids)
        if self.partial[ids].any():
            return self._incremental(ids.tolist())
        return self.text[ids].tolist()

    def _incremental(self, ids: list[int]) -> list[str]:
        # Decode a short span at a time: the last emitted group (context, e.g. for a
        # leading space) plus the tokens since. Text is held back while it ends in an
        # incomplete character, for at most 4 tokens (a UTF-8 character has <= 4
        # bytes), so garbage bytes cannot make this quadratic.
        out, prev, read = [], 0, 0
        for j in range(len(ids)):
            before = self._decode(ids[prev:read])
            text = self._decode(ids[prev: j + 1])
            if text.endswith("\ufffd") and j + 1 < len(ids) and j + 1 - read < 4:
                out.append("")
                continue
            same = 0
            while same < min(len(before), len(text)) and before[same] == text[same]:
                same += 1
            out.append(text[same:])
            prev, read = read, j + 1
        return out


def load_tokenizer(store: ActivationStore):
    """The tokenizer the store was harvested with (pipeline.model owns how to load one)."""
    from pipeline.model import load_tokenizer as load

    attrs = store.attrs
    name = attrs.get("tokenizer")
    if not name:
        raise UserError(f"{store.path} does not name its tokenizer (attribute `tokenizer`); rerun `make harvest`")
    same = name == attrs.get("model") and attrs.get("revision") not in (None, "none")
    return load(name, attrs["revision"] if same else "main")


# ---------------------------------------------------------------------------
# Writing


def write_atomic(path: Path, text: str):
    """Temp name, then rename: a killed run never leaves a torn file. No fsync per file
    (100k latents would take minutes): everything here is written inside `.partial/`,
    which swap_dir syncs once before it takes the final name."""
    fsio.write_atomic(path, text, durable=False)


def _dumps(obj) -> str:
    # allow_nan=False: strict JSON, which JavaScript's JSON.parse and other tools accept.
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _round(values: np.ndarray) -> list[float]:
    # 6 decimals: far below any visible difference, and halves the size of the files.
    # rint(x * 1e6) / 1e6 is the double nearest the decimal, so it prints short.
    return np.round(values.astype(np.float64), 6).tolist()


def _sequence_info(recs: Records, r: int, text: TokenText, ctx: int) -> dict:
    n, at = int(recs.length[r]), recs.slot[r]
    ids = recs.tokens[at, :n]
    start = int(recs.start[r])
    return {
        "doc_id": int(recs.row[r]) // ctx,
        "idx": int(recs.row[r]) % ctx - start,
        "act": round(float(recs.act[r]), 6),
        "acts": _round(recs.acts[at, :n]),
        "tokens": text.strings(ids),
        "token_ints": ids.tolist(),
        "window_start": start,
    }


def _top_tokens(top: list[dict], n: int = 3, limit: int = 48) -> str:
    """The most common tokens at the top records' picked positions, quoted."""
    common = Counter(s["tokens"][s["idx"]] for s in top).most_common(n)
    out = " ".join(json.dumps(t, ensure_ascii=False) for t, _ in common)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _density_histogram(density: np.ndarray, bin_width: float = 0.25) -> dict:
    live = density[density > 0]
    if not len(live):
        return {"log10_bin_width": bin_width, "lower_edges": [], "counts": []}
    b = np.floor(np.log10(live) / bin_width).astype(np.int64)
    lo = int(b.min())
    counts = np.bincount(b - lo)
    return {"log10_bin_width": bin_width,
            "lower_edges": [round((lo + i) * bin_width, 6) for i in range(len(counts))],
            "counts": counts.tolist()}


def write_records(out: Path, col: Collator, recs: Records, text: TokenText, cfg: CollateConfig,
                  meta: dict) -> dict:
    """features/<i>.json for every latent, index.json, summary.json and the viewer."""
    ctx = col.ctx
    n_tok = max(col.n_tokens, 1)
    count = col.stats.count.cpu().numpy()
    sums = col.stats.sums.cpu().numpy().T / n_tok
    width = col.stats.width.cpu().numpy()
    hist = col.stats.hist.cpu().numpy()
    density = count / n_tok
    n = len(count)

    (out / "features").mkdir(parents=True, exist_ok=True)
    view = viewer.ViewerWriter(out, write_atomic)
    latents = []
    for i in tqdm(range(n), unit="latent", desc=f"write {meta['layer']}/{meta['hook']}", mininterval=1.0):
        lists = {0: [], 1: []}
        for r in range(recs.offsets[i], recs.offsets[i + 1]):
            lists[int(recs.kind[r])].append(_sequence_info(recs, r, text, ctx))
        m1, m2, m3, m4 = (float(s) for s in sums[:, i])
        bins = np.flatnonzero(hist[i])
        info = {
            "index": i,
            "layer": meta["layer"],
            "hook": meta["hook"],
            "density": float(density[i]),
            "mean_act": m1,
            "mean_act_squared": m2,
            # Undefined for a dead latent; null rather than NaN keeps the JSON strict.
            "skew": m3 / m2 ** 1.5 if m2 > 0 else None,
            "kurtosis": m4 / m2 ** 2 if m2 > 0 else None,
            "max_act": lists[0][0]["act"] if lists[0] else 0.0,
            "n_positive": int(count[i]),
            "hist_bin_width": float(width[i]),
            "hist": {str(int(b) + 1): int(hist[i, b]) for b in bins},
            "top": lists[0],
            "random": lists[1],
        }
        blob = _dumps(info)
        write_atomic(out / "features" / f"{i}.json", blob)
        view.add(i, blob)
        latents.append({"id": i, "density": info["density"], "max_act": info["max_act"],
                        "top_tokens": _top_tokens(lists[0])})

    dead = int((count == 0).sum())
    summary = {
        **meta,
        "n_latents": n,
        "n_tokens": col.n_tokens,
        "exclude_bos": col.skip_first,
        # Sequence positions left out of the statistics; their acts in the records are 0.
        "excluded_positions": [0] if col.skip_first else [],
        "dead": dead,
        "ultra_rare": int(((density > 0) & (density < cfg.ultra_rare_density)).sum()),
        "ultra_rare_below": cfg.ultra_rare_density,
        "density_histogram": _density_histogram(density),
        "n_top": cfg.n_top,
        "n_random": cfg.n_random,
        "seed": cfg.seed,
        "window": cfg.window,
    }
    index = {"layer": meta["layer"], "hook": meta["hook"], "n_latents": n, "n_tokens": col.n_tokens,
             "latents": latents}
    write_atomic(out / "index.json", _dumps(index))
    write_atomic(out / "summary.json", json.dumps(summary, allow_nan=False, ensure_ascii=False, indent=1))
    view.finish(index, summary)
    return summary


# ---------------------------------------------------------------------------
# One SAE, start to finish


# Collate settings that decide the bytes of the records. batch_size, reader_threads
# and device change only how fast they are made, so changing them redoes nothing.
OUTPUT_KEYS = ("n_top", "n_random", "seed", "window", "hist_bin_width", "hist_max_bins", "ultra_rare_density",
               "exclude_bos")


def fingerprint(cfg: CollateConfig, sae_folder: Path) -> dict:
    """What the records were made from, as flat `key: value` pairs named like the config."""
    marker = saved_marker(sae_folder) or {}
    return {**{f"collate.{k}": getattr(cfg, k) for k in OUTPUT_KEYS}, "sae.sha256": marker.get("sha256")}


def changed_settings(out: Path, want: dict) -> list[str] | None:
    """None when `out` holds no finished records; else what differs from `want`
    (an empty list: finished, and made from exactly `want`)."""
    try:
        done = json.loads((Path(out) / DONE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    have = done.get("fingerprint") if isinstance(done, dict) else None
    if not isinstance(have, dict):
        return ["the records predate settings fingerprints"]
    changes = []
    for key, value in want.items():
        if key == "sae.sha256":
            if have.get(key) != value:
                changes.append("the SAE was retrained (its weights' sha256 differs)")
        elif key not in have:
            changes.append(f"{key} (not recorded; now {value!r})")
        elif have[key] != value:
            changes.append(f"{key} {have[key]!r} -> {value!r}")
    return changes


def finished(out: Path, want: dict) -> bool:
    return changed_settings(out, want) == []


def collate_sae(store: ActivationStore, layer: int, hook: str, sae: TopKSAE, sae_folder: Path, tokenizer,
                cfg: CollateConfig, out: Path, device) -> Path:
    """Scan, cut windows and write into `<out>.partial/`, then swap it in.

    The folder only takes the final name with its `done` marker inside, so an
    interrupted run never looks finished and a rerun simply starts over; the
    old records keep the name until then. The caller holds this (layer, hook)'s
    lock. Returns the viewer's path.
    """
    out = Path(out)
    want = fingerprint(cfg, sae_folder)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    meta = {"layer": layer, "hook": hook, "d_in": sae.d_in, "k": sae.k}

    try:
        col = scan(store, layer, hook, sae, cfg, device)
        recs = pick(col, cfg, store.context_size, partial / "_scratch")
        cut_windows(store, layer, hook, sae, recs, cfg, device)
    except UserError:
        # A missing or corrupt store chunk: nothing of this run is worth keeping.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary = write_records(partial, col, recs, TokenText(tokenizer), cfg, meta)
    del recs  # closes the memory maps before their files go
    shutil.rmtree(partial / "_scratch")

    write_atomic(partial / DONE, _dumps({"layer": layer, "hook": hook, "n_latents": sae.n_latents,
                                         "n_tokens": col.n_tokens, "fingerprint": want}))
    fsio.swap_dir(partial, out)
    print(f"collate {layer}/{hook}: {summary['n_latents']} latents, {summary['dead']} dead, "
          f"{summary['ultra_rare']} ultra-rare (density < {cfg.ultra_rare_density:g}), "
          f"{col.n_tokens} tokens")
    return out / "viewer.html"
