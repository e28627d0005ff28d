"""What collate keeps per latent while it streams the store: fixed-size state,
fed one batch of whole sequences at a time by the Collator.

    top     BestN by key = -act: the N largest activations, at most one per sequence
    random  BestN by a seeded key: M positive activations, a uniform sample
    stats   LatentStats: count, sums of a, a², a³, a⁴, a histogram of positive acts

Memory is O(n_latents * (N + M + bins)): never the dense [tokens, latents]
matrix, never all nonzeros.

The random key. Keeping the M smallest of iid uniform keys is an exact uniform
sample without replacement; a key that depends only on (seed, row, latent), with
no RNG state, gives the same sample for any batch size or device. With
fmix32 = murmur3's 32-bit finalizer and every product taken mod 2**32:

    fmix32(h): h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    for each lane, salt in (0, 0x9E3779B9), (1, 0x7F4A7C15):
        s          = fmix32(fmix32(seed_lo ^ salt) ^ seed_hi)      (lo/hi: 32-bit halves)
        r          = fmix32(fmix32(row_lo ^ s) ^ row_hi)
        half[lane] = fmix32(r ^ latent) >> 1                     (31 bits)
    key = half[0] << 31 | half[1]                                (62 bits, int64)

62 bits make ties negligible even for a latent that fires on billions of tokens.
"""

from __future__ import annotations

import torch

from pipeline.config import CollateConfig


# ---------------------------------------------------------------------------
# Seeded keys for the random sample

_MASK32 = 0xFFFFFFFF
_SALTS = (0x9E3779B9, 0x7F4A7C15)  # one per lane: the two independent 32-bit key halves


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
    for salt in _SALTS:
        h0 = _fmix32(_fmix32((seed & _MASK32) ^ salt) ^ ((seed >> 32) & _MASK32))
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
    """The uniform 62-bit int64 key of each (seed, row, latent), as the module docstring defines it."""
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
    """Everything the scan keeps, fed one batch of whole sequences at a time.

    Whole sequences: a sequence never spans two batches, so "one per sequence" is
    a within-batch rule. With skip_first, position 0 of every sequence (BOS) is
    left out of everything, the token count included.
    """

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
