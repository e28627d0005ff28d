"""The BatchTopK sparse autoencoder (Bussmann et al., 2024, arXiv 2412.06410).

    z      = W_enc (x - b_pre) + b_lat                  [B, n], never differentiated
    train: keep the K = k * B largest relu(z) of the whole batch (a row keeps any number; the mean is k)
    infer: f = z * 1[z > theta]                          one threshold theta > 0 for every latent
    x_hat  = sum_i f_i W_dec[i] + b_pre                  [B, d]

Training keeps TopK's recipe (topk.py): the latents are picked from z without a graph, their
pre-activations are recomputed with kernels.encode_gather and decoded with kernels.decode, so
autograd only sees the kept entries; AuxK trains the dormant latents exactly as TopK does.

Picking the batch's K largest without sorting all of z: each row's top c = CANDIDATES * k
(kernels.encode_topk, a block of latents at a time) holds every kept entry of that row unless
all c of them are kept; t = the K-th largest candidate. A row whose c-th candidate is >= t may
hold more values above t, so those rows (a few) get 4c candidates, recomputed for them alone,
and t is taken again, until no row is short (at most log4(n / c) rounds); t can only rise, so
a row once complete stays complete and the result is exact. Ties at t are kept in row order
until K entries are kept, so a low-precision z (bf16 on GPU, many ties) still keeps exactly K.

The kept entries vary in number per row, and the sparse kernels take fixed-width rows
[B, w]: padding every row to the widest would cost the widest row's count for every row.
Instead the entries are packed into "virtual rows" of width `pack_width` (k), each owned by
one batch row (and, for Matryoshka, one prefix group): a row keeping 3k latents fills three
virtual rows, one keeping none fills none. The kernels run on [R, pack_width] (R <= B + K /
pack_width, so at most about twice TopK's work), and the virtual rows' decodes are summed
back into their batch rows. What train_forward returns (TrainOutput.idx/vals) is the plain
[B, w] layout (w = the most a row keeps), as the contract has it.

Data-parallel training (torchrun, the ranks splitting the batch): the K = k * B_global are
the whole batch's, as in one process: t is the K-th largest of every rank's candidates
(dist.all_gather of each rank's top K, K values a rank), the ties are shared out in rank
order, and the threshold estimate is the minimum over the ranks. Latent sharding is refused
(shards = False).

The inference threshold, estimated while training (buffers `threshold` and `threshold_weight`,
float64, so they are checkpointed, resumed and saved with the weights). Each training step's
smallest kept positive activation m (the batch's own threshold: exactly its k * B largest lie
above it) enters a bias-corrected running average at rate r (SAELens' 0.01, or faster in a short
run: threshold_rate) with Adam's correction of its start:

    s     <- (1 - r) s + r                          s = 1 - (1 - r)^steps, 0 before the first
    theta <- ((1 - r) s_before theta + r m) / s     so the first batch gives theta = m

i.e. theta is the mean of every batch's m weighted r (1 - r)^age, normalised: a batch is
forgotten in ~1/r steps, and no starting value lingers. The rate is max(0.01, 20 / n_steps), so
the average spans at most the last ~5% of the run, where the decayed learning rate has let the
weights settle: at 0.01 over a 195-step run (the SmolLM2 block-15 benchmark) the average reached
back through half the run, while m was still falling, and theta came out 12% high (held-out L0
26.8 for k 32; theta from the final weights gave 32.1). Why not as is: SAELens starts theta at
0, and dictionary_learning seeds it with one early batch; either start keeps a weight of
0.99^t (0.05 after 300 steps), and the first batches are the least like the final weights (on
the test store m falls from 2.09 at step 0 to 1.43 at the end). Seeded that way, 300 steps
ended with theta 2% high and a held-out L0 of 3.61 for k = 4 (-10%); corrected, 4.12 (300
steps) and 3.99 (150). dictionary_learning's 0.999 rate (after a 1000-step warm-up) lags the
moving weights ten times longer. float64: a 1% update of a long-running float32 mean loses
bits. As the learning rate decays at the end the weights settle and theta with them; on held-out
rows from the same distribution about k latents a row then exceed it (the test checks +-10%).
Until a step has set it (theta = -1: an untrained SAE) inference falls back to the batch rule
on the rows it is given.

The saved theta is not that average: at the end of the run train re-fits it with the final
weights to the rows it holds out (calibrate: the (k N + 1)-th largest pre-activation of the N
rows, so they keep k a row on average; cfg.json `threshold_fit` gives the running average it
replaces, the re-fit value and N). Even the tail's average lags weights that still move: on
SmolLM2 block 15 (3 seeds, 195 steps) Matryoshka's sat 0.7% high, eval L0 31.3 for k 32 against
31.7 re-fit, and cost it 2% delta CE. N is about 19k rows there, so theta is a quantile of ~87k
kept values, not an estimate from one batch; eval's L0 on new windows is the check.

Saved: cfg.json `k`; sae.safetensors adds `threshold` and `threshold_weight` (scalars). SAELens loads it as a
`jumprelu` SAE (f = relu(z) * 1[z > threshold]) with theta copied to every latent, as
SAELens saves its own BatchTopK SAEs; sparsify has no threshold, so it cannot hold one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline import dist
from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.saes import register
from pipeline.saes import topk as _topk
from pipeline.saes.base import Dictionary, TrainOutput, TrainView
from pipeline.saes.topk import TopKSAE, TopKSettings, _DormantDecode

CANDIDATES = 4  # each row's top CANDIDATES * k latents are its candidates for the batch's top K
THRESHOLD_RATE = 0.01  # a new batch's weight in the threshold's running average (SAELens' rate)
TAIL = 0.05  # the share of the run the running average spans at most (threshold_rate)


def threshold_rate(n_steps: int) -> float:
    """The running average's rate for a run of n_steps: SAELens' 0.01, or faster so that it spans
    about the last TAIL of a short run (module docstring)."""
    return max(THRESHOLD_RATE, 1.0 / (TAIL * max(1, n_steps)))
UNSET = -1.0  # the threshold before training has estimated one (a real one is > 0)


@dataclass
class BatchTopKSettings(TopKSettings):
    """`train.sae` of a BatchTopK SAE: TopK's settings (AuxK included), k a batch's mean."""
    architecture: str = setting("batchtopk", "the dictionary: batchtopk (this table)")
    k: int = setting(32, "latents kept per token on average: a training batch keeps its k x batch_size largest "
                         "activations, and inference the ones above the threshold learnt from them; at most "
                         "n_latents")


@register
class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    Settings = BatchTopKSettings
    transcodes = {"saelens": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}  # Matryoshka's too
    exports = {"saelens": "jumprelu"}  # a single threshold copied to every latent; sparsify has none
    shards = False
    n_groups = 1  # what the virtual rows are split by besides the batch row (Matryoshka: its prefix groups)

    def __init__(self, d_in: int, n_latents: int, k: int, normalize: str = "none", backend: str = "auto"):
        Dictionary.__init__(self, d_in, n_latents, normalize, backend)
        self.k = k
        self.register_buffer("threshold", torch.tensor(UNSET, dtype=torch.float64))
        self.register_buffer("threshold_weight", torch.tensor(0.0, dtype=torch.float64))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """TopK's tied init, and no threshold yet."""
        super().reset_parameters(generator)
        self.threshold.fill_(UNSET)
        self.threshold_weight.zero_()

    @property
    def pack_width(self) -> int:
        """The width of a virtual row (module docstring): a row keeping about k latents fills one."""
        return self.k

    def group_of(self, cols: torch.Tensor) -> torch.Tensor:
        """The group of each latent id in cols (one group here)."""
        return torch.zeros_like(cols)

    def export_extras(self, fmt: str) -> tuple[dict, dict]:
        if self.threshold.item() < 0:
            raise UserError(f"this {self.architecture} SAE has no inference threshold (it was saved before a "
                            "training step estimated one); retrain it")
        theta = self.threshold.float().expand(self.n_latents).clone()
        return {"threshold": theta}, {}

    # ---- inference: the threshold
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx [B, w] int64, vals [B, w]): the latents with z > theta, w the most a row keeps (>= 1);
        a row keeping fewer has other (distinct) latents with vals 0 in its last slots."""
        return self.encode_threshold(self.preprocess(x).to(self.W_enc.dtype))

    @torch.no_grad()
    def encode_threshold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode() of x [B, d] already preprocessed: z a block of latents at a time (as
        kernels.encode_topk_blocked), never whole."""
        from pipeline.kernels import TOPK_BLOCK_BYTES

        x_c = self.center(x)
        B, n = x_c.shape[0], self.n_latents
        if self.threshold.item() < 0:  # never trained: the training rule on these rows
            rows, cols, vals = self.batch_top(x_c, self.k * B)[:3]
            return compact(rows, cols, vals, B)
        theta = self.threshold.to(x_c.dtype)  # compared in z's precision, as SAELens does with the exported one
        block = max(1, TOPK_BLOCK_BYTES // max(1, B * x_c.element_size()))
        rows, cols, vals = [], [], []
        for lo in range(0, n, block):
            z = torch.addmm(self.b_lat[lo:lo + block], x_c, self.W_enc[lo:lo + block].T)
            r, c = (z > theta).nonzero(as_tuple=True)
            rows.append(r)
            cols.append(c + lo)
            vals.append(z[r, c])
        return compact(torch.cat(rows), torch.cat(cols), torch.cat(vals), B)

    def forward(self, x: torch.Tensor):
        """Differentiable inference reconstruction of raw x (TopK's tuple): (x_hat, idx, vals, z_detached)."""
        from pipeline.kernels import encode_gather

        x = self.preprocess(x)
        x_c = self.center(x)
        with torch.no_grad():
            z = x_c @ self.W_enc.T + self.b_lat
            idx, on = self.encode_threshold(x)
        vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, idx, backend=self.backend,
                                        b_pre=self.gather_b_pre(x))) * (on > 0)
        return self.decode(idx, vals), idx, vals, z

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> dict:
        """theta re-fit to rows x [N, d] (preprocessed): the (k N + 1)-th largest positive pre-activation,
        so that exactly the k N largest lie above it and the rows keep k latents on average (fewer
        when fewer than k N are positive: then theta sits below the smallest positive one). The
        batch rule of training over one batch of N rows, with the final weights."""
        before = self.threshold.item()
        K = self.k * x.shape[0]
        vals = self.batch_top(self.center(x.to(self.W_enc.dtype)), K + 1)[2]
        if vals.numel():  # none positive: nothing to place theta by, it stays
            self.threshold.copy_(vals.min() if vals.numel() > K else vals.min() / 2)
            self.threshold_weight.fill_(1.0)
        return {"before": before, "after": self.threshold.item(), "rows": x.shape[0]}

    # ---- training
    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput:
        """The batch's top k * B with AuxK (TopK's rule for the latents silent for dormant_tokens),
        updating the threshold estimate; without settings (evaluation, pipeline.finetune) the
        threshold rule, whose kept values have a graph to the encoder when grad is on (a KL
        fine-tune trains W_enc and b_lat too, not only the decoder)."""
        if view.settings is None:
            idx, vals = self.encode_threshold(x)
            if torch.is_grad_enabled():
                from pipeline.kernels import encode_gather

                pre = encode_gather(self.center(x), self.W_enc, self.b_lat, idx, backend=self.backend,
                                    b_pre=self.gather_b_pre(x))
                vals = pre * (vals > 0)  # the kept ones (z > theta > 0): relu is the identity there
            return TrainOutput(self.decode(idx, vals), idx, vals, None)
        return self.train_parts(x, view)[0]

    def train_parts(self, x: torch.Tensor, view: TrainView) -> tuple[TrainOutput, torch.Tensor]:
        """train_forward's (TrainOutput, parts [B, G, d]) (forward_train), with the view's settings."""
        st = view.settings
        dormant = view.since_fired >= st.dormant_tokens
        view.n_dormant = int(dormant.sum())
        k_aux = min(st.k_aux, view.n_dormant) if st.aux_alpha > 0 else 0
        # shards is False: several ranks can only be splitting the batch
        split = dist.rank_world()[1] > 1
        return self.forward_train(x, dormant, k_aux, view.matmul_dtype, split=split,
                                  estimate=threshold_rate(view.n_steps))

    def forward_train(self, x: torch.Tensor, dormant: torch.Tensor | None = None, k_aux: int = 0,
                      matmul_dtype: torch.dtype | None = None, split: bool = False,
                      estimate: bool | float = False) -> tuple[TrainOutput, torch.Tensor]:
        """One training forward on already-normalised x [B, d]: (TrainOutput, parts [B, G, d]),
        parts[b, g] the reconstruction of row b by its kept latents of group g (without b_pre;
        G = n_groups), x_hat = parts.sum(1) + b_pre.

        `dormant` [n] and `k_aux`: AuxK as TopK's forward_train. `split`: the ranks hold parts of
        the batch (the top K is the whole batch's). `estimate`: update the threshold (at that rate;
        True: THRESHOLD_RATE).
        """
        from pipeline.kernels import encode_gather

        B, d, G, w = x.shape[0], x.shape[1], self.n_groups, self.pack_width
        x_c = self.center(x)
        rows, cols, pre, aux_pre, aux_idx, ids, low = self.batch_top(x_c, None, dormant, k_aux, matmul_dtype,
                                                                     split)
        # Virtual rows: the kept entries grouped by (batch row, group), pack_width a row.
        key = rows * G + self.group_of(cols)
        order = key.argsort(stable=True)
        key, rows, cols, pre = key[order], rows[order], cols[order], pre[order]
        # A full-precision z already holds the kept pre-activations (the gather's forward reuses them).
        v = VirtualRows.build(key, B * G, w, rows, cols, None if low else pre)
        b_pre = self.gather_b_pre(x)  # (x needing no gradient, its sum goes to b_pre directly)
        vals_v = torch.relu(encode_gather(v.inputs(x_c, G), self.W_enc, self.b_lat, v.idx, backend=self.backend,
                                          pre=v.pre, b_pre=b_pre)) * v.on
        parts = v.decode(vals_v, self.W_dec, B * G, self.backend).view(B, G, d)
        vals = vals_v[v.vrow, v.slot]  # [E] each kept entry's activation, differentiable
        if estimate:
            self.update_threshold(vals.detach(), split, THRESHOLD_RATE if estimate is True else estimate)
        idx_o, vals_o = compact(rows, cols, vals, B)
        aux_hat = self.aux_decode(x_c, None if low else aux_pre, aux_idx, ids, k_aux, b_pre)
        return TrainOutput(parts.sum(1) + self.b_pre, idx_o, vals_o, aux_hat), parts

    def aux_decode(self, x_c: torch.Tensor, aux_pre, aux_idx, ids, k_aux: int,
                   b_pre: torch.Tensor | None = None) -> torch.Tensor | None:
        """AuxK's reconstruction from the dormant latents each row keeps (TopK's forward_train, same
        two paths), or None without AuxK; b_pre as kernels.encode_gather takes it."""
        from pipeline.kernels import decode, encode_gather

        if aux_pre is not None and self.backend == "torch" and ids.numel() <= _topk.AUX_DENSE_RATIO * k_aux:
            acts = torch.zeros(x_c.shape[0], ids.numel(), dtype=x_c.dtype, device=x_c.device)
            acts.scatter_(1, torch.searchsorted(ids, aux_idx), aux_pre.clamp_min(0))
            return _DormantDecode.apply(acts, ids, x_c, self.W_enc, self.b_lat, self.W_dec)
        if aux_idx is None:
            return None
        aux_vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, aux_idx, backend=self.backend, pre=aux_pre,
                                            b_pre=b_pre))
        return decode(aux_idx, aux_vals, self.W_dec, backend=self.backend)

    @torch.no_grad()
    def batch_top(self, x_c: torch.Tensor, K: int | None = None, dormant: torch.Tensor | None = None,
                  k_aux: int = 0, matmul_dtype: torch.dtype | None = None, split: bool = False):
        """The K largest positive z of the centred batch x_c [B, d] (K = k * the whole batch's rows
        by default), exactly (module docstring): (rows [E], cols [E], pre [E], aux_pre, aux_idx, ids,
        low), E <= K entries with pre > 0, in no particular order, and AuxK's candidates as
        TopK.topk_candidates gives them. low: z was computed in matmul_dtype, so pre ranks the
        latents but is not their value."""
        from pipeline.kernels import encode_topk_blocked

        B, n = x_c.shape[0], self.n_latents
        if K is None:
            K = self.k * (int(dist.all_reduce_(torch.tensor(B, device=x_c.device))) if split else B)
        c = min(n, CANDIDATES * self.k)
        pre, idx, aux_pre, aux_idx, ids, low = self.topk_candidates(x_c, c, dormant, k_aux, matmul_dtype)
        rows = torch.arange(B, device=x_c.device).repeat_interleave(c)
        vals, cols = pre.reshape(-1), idx.reshape(-1)
        least = pre.min(1).values  # [B] each row's smallest candidate
        width = torch.full((B,), c, device=x_c.device)  # [B] each row's number of candidates
        t = _kth_largest(vals, K, split)
        while True:
            # A row all of whose candidates reach t may hold more above it: give it 4x the candidates.
            # (t only rises as candidates join, so a row that is complete stays complete.)
            more = (least >= t) & (width < n)
            n_more = more.sum()
            if not int(dist.all_reduce_(n_more) if split else n_more):
                break
            c = min(n, 4 * c)
            r = more.nonzero().squeeze(1)
            # torch's blocked top-k for these few rows: the fused kernel is made for a small k
            v, i = encode_topk_blocked(*(o.to(pre.dtype) for o in (x_c[r], self.W_enc, self.b_lat)), c)[:2]
            keep = ~more[rows]
            vals, cols = torch.cat([vals[keep], v.reshape(-1)]), torch.cat([cols[keep], i.reshape(-1)])
            rows = torch.cat([rows[keep], r.repeat_interleave(c)])
            least[r], width[r] = v.min(1).values, c
            t = _kth_largest(vals, K, split)
        # Every entry above t, and entries equal to t (ties: frequent in bf16) in order until K are kept.
        above, tie = vals > t, vals == t
        n_above = above.sum()
        room = K - (dist.all_reduce_(n_above.clone()) if split else n_above)
        ties = tie.sum()
        if split:  # the ties of the ranks before this one come first
            before = torch.stack(dist.all_gather(ties.reshape(1))).reshape(-1)[:dist.rank_world()[0]].sum()
            room = room - before
        kept = above | (tie & (tie.cumsum(0) <= room))
        kept &= vals > 0  # relu: a kept entry <= 0 is off
        return rows[kept], cols[kept], vals[kept], aux_pre, aux_idx, ids, low

    @torch.no_grad()
    def update_threshold(self, vals: torch.Tensor, split: bool = False, rate: float = THRESHOLD_RATE):
        """The running average (module docstring) from one batch's kept activations vals [E]: m = the
        smallest positive one (over every rank). A batch keeping none leaves it as it is. No host sync."""
        pos = vals[vals > 0]
        m = (pos.min() if pos.numel() else vals.new_tensor(torch.inf)).double()
        if split:
            m = torch.stack(dist.all_gather(m.reshape(1))).min()
        theta, s = self.threshold, self.threshold_weight
        s_new = (1 - rate) * s + rate
        theta_new = ((1 - rate) * s * theta.clamp_min(0) + rate * m) / s_new  # s = 0: theta = m
        ok = torch.isfinite(m)
        theta.copy_(torch.where(ok, theta_new, theta))
        s.copy_(torch.where(ok, s_new, s))


def _kth_largest(vals: torch.Tensor, K: int, split: bool) -> torch.Tensor:
    """The K-th largest of vals [N] (every rank's vals together under `split`: each rank sends its
    own K largest, padded with -inf)."""
    top = vals.topk(min(K, vals.numel()), sorted=False).values
    if split:
        top = torch.cat([top, top.new_full((K - top.numel(),), -torch.inf)])
        top = torch.cat(dist.all_gather(top)).topk(K, sorted=False).values
    return top.min()


def pack(key: torch.Tensor, n_keys: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries with sorted keys key [E] (in 0..n_keys) into virtual rows of `width` slots, each row
    holding entries of one key: (vrow [E], slot [E], owner [R]) with entry e at [vrow[e], slot[e]] and
    owner[r] the key of virtual row r. A key with c entries gets ceil(c / width) rows, except key 0
    always one (so R >= 1 even for a batch that keeps nothing)."""
    count = torch.bincount(key, minlength=n_keys)
    per = (count + width - 1) // width
    per[0] = per[0].clamp_min(1)
    first_row = per.cumsum(0) - per
    rank = torch.arange(key.numel(), device=key.device) - (count.cumsum(0) - count)[key]  # e's place in its key
    owner = torch.repeat_interleave(torch.arange(n_keys, device=key.device), per)
    return first_row[key] + rank // width, rank % width, owner


def compact(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept entries (rows, cols, vals [E]) as the contract's (idx [B, w], vals [B, w]): row b's latents in
    its first count_b slots (in the order given), w = the largest count (at least 1), the rest padded
    with the smallest latent ids the row does not use (distinct, so a row's idx is a set, as TopK's)
    and vals 0. vals is differentiable (index_put); it may carry trailing dims ([E, ...] -> [B, w, ...])."""
    order = rows.argsort(stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    count = torch.bincount(rows, minlength=B)
    w = max(1, int(count.max())) if B else 1
    rank = torch.arange(rows.numel(), device=rows.device) - (count.cumsum(0) - count)[rows]
    # Ids 0..w-1 hold at least w - count_b the row does not use: they pad its last slots.
    small = cols < w
    used = torch.zeros(B, w, dtype=torch.uint8, device=rows.device).index_put_(
        (rows[small], cols[small]), torch.ones_like(cols[small], dtype=torch.uint8))
    free = used.argsort(dim=1, stable=True)  # a row's unused ids first, in increasing order
    slots = torch.arange(w, device=rows.device)
    idx = free.gather(1, (slots - count[:, None]).clamp_min(0)).index_put_((rows, rank), cols)
    return idx, vals.new_zeros((B, w) + vals.shape[1:]).index_put((rows, rank), vals)


class VirtualRows(NamedTuple):
    """Kept entries packed into R virtual rows of w slots (`pack`), each row holding entries of one key
    (a batch row, or a batch row and a group): the sparse kernels run on [R, w], about the entries'
    number of pairs however unevenly the keys keep. Empty slots point at latent 0 and are off in `on`:
    a caller masks its values there (a gather from a low-precision z recomputes latent 0's value)."""
    rows: torch.Tensor   # [E] each entry's batch row
    cols: torch.Tensor   # [E] its latent
    idx: torch.Tensor    # [R, w] the virtual rows' latents
    on: torch.Tensor     # [R, w] bool: a slot that holds an entry
    pre: torch.Tensor | None  # [R, w] the entries' given values (0 in empty slots), or None
    owner: torch.Tensor  # [R] each virtual row's key
    vrow: torch.Tensor   # [E] each entry's virtual row
    slot: torch.Tensor   # [E] and slot

    @classmethod
    def build(cls, key: torch.Tensor, n_keys: int, width: int, rows: torch.Tensor, cols: torch.Tensor,
              pre: torch.Tensor | None = None) -> "VirtualRows":
        """Entries (rows, cols, pre [E]) with sorted keys key [E] (in 0..n_keys) into rows of `width`."""
        vrow, slot, owner = pack(key, n_keys, width)
        shape, at = (owner.shape[0], width), (vrow, slot)
        idx = torch.zeros(shape, dtype=torch.long, device=cols.device).index_put_(at, cols)
        on = torch.zeros(shape, dtype=torch.bool, device=cols.device).index_put_(
            at, torch.ones_like(cols, dtype=torch.bool))
        pre_v = None if pre is None else torch.zeros(shape, dtype=pre.dtype, device=pre.device).index_put_(at, pre)
        return cls(rows, cols, idx, on, pre_v, owner, vrow, slot)

    def inputs(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Each virtual row's copy of its batch row of x [B, d] -> [R, d] (gradients sum back); keys of
        `groups` groups a batch row."""
        return x.index_select(0, self.owner // groups if groups > 1 else self.owner)

    def decode(self, vals: torch.Tensor, W: torch.Tensor, n_keys: int, backend: str) -> torch.Tensor:
        """sum_j vals[r, j] W[idx[r, j]] of each virtual row, summed into its key -> [n_keys, d]."""
        from pipeline.kernels import decode

        part = decode(self.idx, vals, W, backend=backend)
        return part.new_zeros(n_keys, part.shape[1]).index_add(0, self.owner, part)

    def compact(self, vals: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Virtual-row values [R, w, ...] as the contract's (idx [B, w'], vals [B, w', ...]) (`compact`)."""
        return compact(self.rows, self.cols, vals[self.vrow, self.slot], B)
