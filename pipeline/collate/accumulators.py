"""What collate keeps per latent while it streams the store: fixed-size state,
fed one batch of whole sequences at a time by the Collator.

    top     BestN by key = -act: the N largest activations, at most one per sequence
    random  BestN by a seeded key: M positive activations, a uniform sample
    stats   LatentStats: count, max, sums of a, a², a³, a⁴, a histogram of positive acts
    bins    BinSample: per histogram bin, the P positive activations with the smallest
            seeded keys; at the end, `quantiles` cuts them into Q equal-width intervals
            of (0, max] and samples each (Quantiles)
    pairs   CoOccurrence: per pair of latents, the tokens where both fire (SAEs of at
            most collate.cooccurrence_max_latents latents); at the end each latent's
            partners of largest Jaccard index

Memory is O(n_latents * (N + M + bins * P)), plus n_latents² int32 for the pairs
when counted: never the dense [tokens, latents] matrix, never all nonzeros.

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

The quantile samples use the same keys: the P smallest keys among one interval's
activations are an exact uniform sample of that interval, and they are found among
the P smallest of each histogram bin it spans, whatever way the bins were merged.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Counts, maxima, power sums and histograms of each latent's positive activations.

    A histogram has a fixed number of bins; a latent whose activation would land
    past the last bin doubles its bin width, merging bins pairwise. With key
    ceil(a / w) that merge is exact (ceil(ceil(x) / 2) = ceil(x / 2)), so the final
    histogram equals one computed directly at the final width, recorded per latent.
    """

    def __init__(self, n_latents: int, bin_width: float, n_bins: int, device):
        self.count = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.max = torch.zeros(n_latents, dtype=torch.float32, device=device)
        # float64: sums of a⁴ over billions of tokens lose too much in float32.
        self.sums = torch.zeros(n_latents, 4, dtype=torch.float64, device=device)
        self.width = torch.full((n_latents,), bin_width, dtype=torch.float64, device=device)
        self.hist = torch.zeros(n_latents, n_bins, dtype=torch.int64, device=device)

    def add(self, lat, act) -> torch.Tensor:
        """Count the acts in; returns each one's bin, at the widths this batch left."""
        # index_put_(accumulate=True) rather than index_add_: on CUDA it sums in a
        # sorted order, so reruns produce bit-identical statistics.
        self.count.index_put_((lat,), torch.ones_like(lat), accumulate=True)
        self.max.scatter_reduce_(0, lat, act, "amax")
        a = act.double()
        a2 = a * a
        self.sums.index_put_((lat,), torch.stack([a, a2, a2 * a, a2 * a2], 1), accumulate=True)
        n_bins = self.hist.shape[1]
        while True:
            b = self.bin(lat, act)
            over = b >= n_bins
            if not bool(over.any()):
                break
            self._widen(torch.unique(lat[over]))
        flat = lat * n_bins + b
        self.hist.view(-1).index_put_((flat,), torch.ones_like(flat), accumulate=True)
        return b

    def bin(self, lat, act) -> torch.Tensor:
        """Each positive act's bin at its latent's current width: sae-viewer's key ceil(a / width), less 1."""
        return torch.ceil(act.double() / self.width[lat]).long() - 1

    def _widen(self, lats):
        h = self.hist[lats]
        half = h.view(len(lats), -1, 2).sum(-1)
        self.hist[lats] = torch.cat([half, torch.zeros_like(half)], 1)
        self.width[lats] *= 2


class BinSample:
    """Per latent and histogram bin, the `size` positive activations with the smallest
    seeded keys: an exact uniform sample of the bin, from which the smallest keys of any
    union of bins can be drawn (they are among the smallest of each part).

    The bins are LatentStats': when it doubles a latent's width, the pairs of bins it
    merged are merged here too, keeping the smallest keys of each pair, so every sample
    stays exact. Ties between 62-bit keys are not ordered by row, unlike BestN's.
    """

    def __init__(self, stats: LatentStats, size: int):
        self.n_latents, self.n_bins = stats.hist.shape
        self.stats = stats
        self.width = stats.width.clone()  # the widths the kept bins are at
        self.best = BestN(self.n_latents * self.n_bins, size, torch.int64, stats.hist.device)
        self.size = size

    def slot(self, lat, hist_bin) -> torch.Tensor:
        """Each candidate's (latent, bin) slot; hist_bin at the histogram's widths after its batch."""
        self._follow_widening()
        return lat * self.n_bins + hist_bin

    def threshold(self, slot):
        return self.best.threshold(slot)

    def offer(self, slot, key, row, act):
        self.best.offer(slot, key, row, act)

    def finish(self):
        self._follow_widening()
        self.best.flush()

    def _follow_widening(self):
        lats = torch.nonzero(self.width != self.stats.width).flatten()
        if len(lats):
            self.best.flush()  # the pending candidates were put in bins of the old widths
        while len(lats):  # once per doubling: a latent may have doubled more than once since
            self._merge_pairs(lats)
            self.width[lats] *= 2
            lats = lats[self.width[lats] != self.stats.width[lats]]

    def _merge_pairs(self, lats):
        best = self.best
        shape, half, P = (self.n_latents, self.n_bins, self.size), self.n_bins // 2, self.size
        keys = best.key.view(shape)[lats].view(len(lats), half, 2 * P)
        keep = torch.sort(keys, dim=2, stable=True).indices[:, :, :P]
        for table, empty in ((best.key, best.empty), (best.row, -1), (best.act, 0.0)):
            per_bin = table.view(shape)
            merged = per_bin[lats].view(len(lats), half, 2 * P).gather(2, keep)
            per_bin[lats] = torch.cat([merged, torch.full_like(merged, empty)], 1)


N_RELATED = 5  # co-firing partners (and, in records, decoder neighbours) kept per latent


def best_per_row(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [R, k], scores [R, k]): each row's k largest scores, largest first, ties to the
    smaller column so every device and block size agrees; -inf never counts (column -1, score
    -inf where a row has fewer than k others)."""
    R, n = score.shape
    cols = torch.full((R, k), -1, dtype=torch.int64, device=score.device)
    vals = torch.full((R, k), float("-inf"), dtype=score.dtype, device=score.device)
    kk = min(k, n)
    if kk == 0 or R == 0:
        return cols, vals
    # topk breaks ties arbitrarily. Where exactly kk entries reach its bar (nearly every row), it
    # picked the right ones and only their order needs fixing; other rows are ranked in full.
    top = score.topk(kk, dim=1)
    bar = top.values[:, -1:]
    easy = ((score >= bar).sum(1) == kk) & (bar[:, 0] > float("-inf"))
    rows = torch.nonzero(easy).flatten()
    if len(rows):
        c, order = top.indices[rows].sort(dim=1)
        v = top.values[rows].gather(1, order)
        order = torch.sort(-v, dim=1, stable=True).indices
        cols[rows, :kk], vals[rows, :kk] = c.gather(1, order), v.gather(1, order)
    rows = torch.nonzero(~easy).flatten()
    if len(rows):
        sub = score[rows]
        r, c = torch.nonzero((sub >= bar[rows]) & (sub > float("-inf")), as_tuple=True)  # columns ascending
        v = sub[r, c]
        order = torch.sort(-v, stable=True).indices
        order = order[torch.sort(r[order], stable=True).indices]
        r, c, v = r[order], c[order], v[order]
        rank = torch.arange(len(r), device=r.device) - torch.searchsorted(r, r)
        keep = rank < k
        cols[rows[r[keep]], rank[keep]] = c[keep]
        vals[rows[r[keep]], rank[keep]] = v[keep]
    return cols, vals


class CoOccurrence:
    """Per pair of latents i < j, the tokens where both fire: exact counts in a dense [n, n]
    int32 table, pair (i, j) at row i, column j (the lower triangle stays 0: each pair counts
    once). Half of it goes unused; the packed triangle would save that half but its index
    arithmetic made counting and reading the table back about twice as slow.

    The codes are sparse (w <= k latents per token), so a batch of B tokens adds at most
    B w(w-1)/2 pairs, counted with one scatter-add (integers: the same counts on any device and in
    any order); the pairs are made PAIRS_AT_ONCE at a time,
    which bounds the scratch memory for a wide code (a ReLU SAE's). int32 holds any count below
    2**31 tokens; past that many the table turns int64.
    """

    PAIRS_AT_ONCE = 1 << 23
    ROWS_BLOCK = 1 << 20  # table entries read back at once in partners(): [rows, n], never [n, n] more

    def __init__(self, n_latents: int, device):
        self.n = n_latents
        self.count = torch.zeros((n_latents, n_latents), dtype=torch.int32, device=device)
        self.key_dtype = torch.int32 if n_latents ** 2 < 2**31 else torch.int64
        self.tokens = 0
        self._columns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, idx: torch.Tensor, fired: torch.Tensor):
        """One batch: idx [B, w] latents, fired [B, w] the ones that count."""
        B, w = idx.shape
        if w < 2 or self.n < 2:
            return
        self.tokens += B
        if self.tokens >= 2**31 and self.count.dtype == torch.int32:
            self.count = self.count.long()
        n = self.n
        if w not in self._columns:
            self._columns[w] = tuple(torch.triu_indices(w, w, 1, device=idx.device))
        ia, ib = self._columns[w]
        # Each token's latents sorted, the ones that did not fire moved past every real one (to n):
        # then column a < column b means latent a < latent b, and a pair holding n is no pair.
        s = torch.where(fired, idx, n).to(self.key_dtype).sort(dim=1).values
        flat = self.count.view(-1)
        one = torch.ones(1, dtype=flat.dtype, device=idx.device)
        step = max(1, self.PAIRS_AT_ONCE // len(ia))
        for lo in range(0, B, step):
            part = s[lo: lo + step]
            a, b = part[:, ia].flatten(), part[:, ib].flatten()
            real = b < n
            if not bool(real.all()):
                a, b = a[real], b[real]
            # int32 arithmetic, int64 only for the scatter: scatter_add_ took 2/3 of index_put_'s time here
            key = a.mul_(n).add_(b).long()
            flat.scatter_add_(0, key, one.expand(len(key)))

    def partners(self, fires: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, jaccard, count), each [n, k]: each latent's k partners of largest Jaccard index
        c / (n_i + n_j - c), with c the tokens both fire on and n_i = fires[i] the tokens latent i
        fires on; ties to the smaller id; id -1 past a latent's last partner (c > 0 only).

        Jaccard rather than P(j | i) = c / n_i: the latter ranks a latent that fires everywhere
        first for every latent; c and n_i are both kept, so P(j | i) is c / n_positive."""
        n, device = self.n, self.count.device
        ids = torch.full((n, k), -1, dtype=torch.int64, device=device)
        jac = torch.zeros((n, k), dtype=torch.float64, device=device)
        cnt = torch.zeros((n, k), dtype=torch.int64, device=device)
        fires = fires.to(device).double()
        step = max(1, self.ROWS_BLOCK // max(n, 1))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            c = self.count[lo:hi] + self.count[:, lo:hi].T  # pairs (i, j > i) and (j < i, i)
            score = c / (fires[lo:hi, None] + fires[None, :] - c).clamp_min(1)
            score.masked_fill_(c == 0, float("-inf"))
            cols, vals = best_per_row(score, k)
            found = cols >= 0
            ids[lo:hi] = cols
            jac[lo:hi] = torch.where(found, vals, 0.0)
            cnt[lo:hi] = torch.where(found, c.gather(1, cols.clamp_min(0)).long(), 0)
        return ids, jac, cnt


@dataclass
class Quantiles:
    """Per latent, Q equal-width intervals of (0, max activation] and a sample of each.

    The bounds are snapped to the latent's histogram edges: each bin belongs to the
    interval holding its midpoint, so interval q holds the acts in (lo, hi], `count` of
    them. An interval no bin falls in (a latent whose acts span fewer than Q bins, or a
    dead one) is absent: present False. row/act [n, Q, P]: the interval's P smallest
    seeded keys, smallest first, an exact uniform sample of it; row -1 where it holds fewer.
    """

    lo: torch.Tensor  # [n, Q] float64
    hi: torch.Tensor  # [n, Q] float64
    count: torch.Tensor  # [n, Q] int64
    present: torch.Tensor  # [n, Q] bool
    row: torch.Tensor  # [n, Q, P] int64
    act: torch.Tensor  # [n, Q, P] float32


def quantiles(stats: LatentStats, bins: BinSample, n_quantiles: int) -> Quantiles:
    """Cut each latent's histogram into n_quantiles intervals and draw each one's sample
    from the samples of its bins."""
    hist, Q, P = stats.hist, n_quantiles, bins.size
    n, n_bins = hist.shape
    device = hist.device
    j = torch.arange(n_bins, device=device).expand(n, n_bins)
    last = torch.where(hist > 0, j, -1).amax(1, keepdim=True)
    # A dead latent's max is 0: its midpoints divide to inf, clamped, then dropped with every
    # bin above the last that counted an act (they go to a spare column Q).
    mid = (j + 0.5) * stats.width[:, None] * Q / stats.max.double()[:, None]
    q = torch.where(j <= last, mid.floor().clamp(max=max(Q - 1, 0)).long(), Q)
    count = torch.zeros(n, Q + 1, dtype=torch.int64, device=device).scatter_add_(1, q, hist)
    first = torch.full((n, Q + 1), n_bins, device=device).scatter_reduce_(1, q, j, "amin")
    end = torch.zeros(n, Q + 1, dtype=torch.int64, device=device).scatter_reduce_(1, q, j + 1, "amax")
    width = stats.width[:, None]

    # Interval q's sample: the P smallest keys over its bins' samples. They reach BestN out of
    # row order, which only a tie between two 62-bit keys would notice.
    pick = BestN(n * Q, P, torch.int64, device)
    if P and Q:
        per_latent = n_bins * P
        kept = [t.view(n, per_latent) for t in (bins.best.key, bins.best.row, bins.best.act)]
        step = max(1, (1 << 22) // per_latent)  # latents offered at once: bounds the copies
        for lo in range(0, n, step):
            key, row, act = (t[lo: lo + step].flatten() for t in kept)
            latent = torch.arange(lo, min(n, lo + step), device=device).repeat_interleave(per_latent)
            interval = q[lo: lo + step].repeat_interleave(P, dim=1).flatten()
            real = (interval < Q) & (row >= 0)
            pick.offer((latent * Q + interval)[real], key[real], row[real], act[real])
        pick.flush()
    return Quantiles(lo=first[:, :Q] * width, hi=end[:, :Q] * width, count=count[:, :Q],
                     present=end[:, :Q] > first[:, :Q], row=pick.row.view(n, Q, P), act=pick.act.view(n, Q, P))


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
        self.n_quantiles = cfg.n_quantiles
        self.bins = BinSample(self.stats, cfg.n_per_quantile if cfg.n_quantiles else 0)
        self.quantiles: Quantiles | None = None  # made by finish()
        self.n_tokens = 0  # tokens counted in the statistics (BOS positions excluded)
        # None: not counted, the SAE is wider than collate.cooccurrence_max_latents
        self.pairs = CoOccurrence(n_latents, device) if n_latents <= cfg.cooccurrence_max_latents else None
        self.cooccurring: tuple[torch.Tensor, ...] | None = None  # finish(): CoOccurrence.partners, when counted
        self.codes = None  # scan.Codes: every row's codes, when the scan kept them for pass 2

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
        if self.pairs is not None:
            self.pairs.add(idx, fired)
        lat, act = idx[fired], vals[fired].float()
        row = rows[:, None].expand(B, k)[fired]  # row-major: ascending rows, as BestN needs
        hist_bin = self.stats.add(lat, act)
        self.top.offer(lat, -act, row, act)
        if self.random.size or self.bins.size:
            # Hash rows once per batch, not once per (row, latent); then only candidates
            # whose high key half can still beat a sample's worst kept key get the low half
            # (key < t implies high half < t).
            row_hash = row_hashes(self.seed, rows)[:, row - start]
            high = latent_keys(row_hash, lat, lanes=(0,))
            near = torch.zeros_like(lat, dtype=torch.bool)
            if self.random.size:
                near |= high < self.random.threshold(lat)
            if self.bins.size:
                slot = self.bins.slot(lat, hist_bin)
                near |= high < self.bins.threshold(slot)
            lat, row, act, row_hash = lat[near], row[near], act[near], row_hash[:, near]
            key = latent_keys(row_hash, lat)
            self.random.offer(lat, key, row, act)
            if self.bins.size:
                self.bins.offer(slot[near], key, row, act)

    def finish(self) -> "Collator":
        """Merge what is still pending and draw the quantile samples; call once after the last batch."""
        self.top.flush()
        self.random.flush()
        self.bins.finish()
        self.quantiles = quantiles(self.stats, self.bins, self.n_quantiles)
        if self.pairs is not None:
            self.cooccurring = self.pairs.partners(self.stats.count, N_RELATED)
            self.pairs = None  # the table is most of the memory: gone once the partners are known
        return self
