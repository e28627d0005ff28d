"""Latent sharding (train.shard_latents): the n latents of one SAE split over the W ranks of torchrun.

OpenAI's recipe for SAEs too wide for one device. Rank r holds latents [lo, hi) =
[r n/W, (r+1) n/W): its rows of W_enc [n/W, d], b_lat [n/W] and W_dec [n/W, d] and
their Adam state; b_pre [d] is replicated. Every rank draws the whole batch x [B, d]
(the loader already gives each rank the same batch). One training forward:

    z_r       = W_enc[lo:hi] (x - b_pre) + b_lat[lo:hi]      [B, n/W], a block at a time, never whole
    cand_r    = top-k of z_r per row, ids made global         [B, k] values, [B, k] ids
    all_gather(cand)                                          moves W x B x k (value, id) pairs to each rank
    picks     = top-k of the W k candidates per row           [B, k], the same on every rank
    partial_r = sum of the picks in [lo, hi): v W_dec[id]     [B, d]
    all_reduce(partial)                                       B x d
    x_hat     = sum_r partial_r + b_pre                       [B, d], the same on every rank

AuxK does the same over the dormant latents (each rank's own: it sees every token, so its
fire counters need no reduction) with k_aux (bounded by the global dormant count) in place
of k: a second all_gather of B x k_aux pairs and all_reduce of B x d. So every rank holds
the one-process loss, and the backward needs one collective only:

  - d loss / d partial_r = d loss / d x_hat, which every rank already has (_SumOverRanks's
    backward passes it through): each rank's W_enc, b_lat, W_dec rows get exactly their
    one-process gradients, with nothing sent;
  - b_pre's decoder-path gradient (sum over rows of d loss / d x_hat) is the same on every
    rank; its encoder-path part (x - b_pre feeds each rank's block of z) is a per-shard partial
    sum, and _ReduceGrad all-reduces that part alone: d floats.

The decoder constraint and Adam are per latent row or per element: local. Nothing of size
n moves in a step; checkpoints, eval and the saved SAE gather the shards on rank 0 into the
one-process layout (`gather`), and a resume takes each rank's slice of it (`take`), so a run
may resume under another world size, or with the option toggled.
"""

from __future__ import annotations

import torch

from pipeline import dist
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.kernels import decode, encode_gather
from pipeline.saes import Dictionary, TrainOutput, architecture

SHARDED = ("W_enc", "b_lat", "W_dec")  # split along the latents; b_pre is replicated


def check(tc: TrainConfig, name: str):
    """Refuse, in one line, what latent sharding does not do (nothing to check for one process)."""
    _, world = dist.rank_world()
    if not tc.shard_latents or world == 1:
        return
    if not architecture(tc.sae.architecture).shards:
        raise UserError(f"{name}: train.shard_latents does not split a {tc.sae.architecture} SAE's latents; set "
                        "shard_latents: false (the ranks then split the batch)")
    if tc.n_latents % world:
        raise UserError(f"{name}: train.shard_latents splits n_latents = {tc.n_latents} over {world} ranks, which "
                        f"does not divide it; make n_latents a multiple of {world}, or change --nproc_per_node")
    for key, off in (("optimizer", tc.optimizer == "adam"), ("ema_decay", tc.ema_decay is None),
                     ("grad_clip", tc.grad_clip is None)):
        if not off:
            raise UserError(f"{name}: train.shard_latents trains with adam only, without ema_decay and grad_clip "
                            f"(train.{key} = {getattr(tc, key)!r}); drop it, or set shard_latents: false")


class _SumOverRanks(torch.autograd.Function):
    """partial [B, d] -> its sum over the ranks. Backward: the gradient unchanged, since every rank
    computes the same loss from the sum (summing the gradients would count it W times)."""

    @staticmethod
    def forward(ctx, partial):
        return dist.all_reduce_(partial.detach().clone())

    @staticmethod
    def backward(ctx, g):
        return g


class _ReduceGrad(torch.autograd.Function):
    """Identity on b_pre [d] where it feeds the encoder; the backward sums its gradient over the ranks
    (each rank's latents give their share of it)."""

    @staticmethod
    def forward(ctx, b):
        return b.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return dist.all_reduce_(g.clone())


class Shard:
    """Rank `rank`'s latents [lo, hi) of n_latents over `world` ranks."""

    def __init__(self, n_latents: int, rank: int, world: int):
        self.n_latents, self.world = n_latents, world
        self.n_local = n_latents // world
        self.lo, self.hi = rank * self.n_local, (rank + 1) * self.n_local

    @classmethod
    def of(cls, tc: TrainConfig) -> "Shard | None":
        """This rank's shard when tc shards the latents under torchrun, else None (one process, or data-parallel)."""
        rank, world = dist.rank_world()
        return cls(tc.n_latents, rank, world) if tc.shard_latents and world > 1 else None

    # ---- the step
    def count(self, dormant: torch.Tensor) -> int:
        """Dormant latents over every shard (dormant [n/W] bool, this rank's)."""
        return int(dist.all_reduce_(dormant.sum()))

    def _pick(self, vals: torch.Tensor | None, idx: torch.Tensor | None, k: int, B: int, like: torch.Tensor):
        """This rank's candidates (vals, idx [B, <= k], local ids; None: none) -> the global top-k per row,
        as (mine [B, k] bool: the picks in this shard, their local ids (0 elsewhere), their values (0 elsewhere)).
        Ranks short of k candidates pad with -inf; the union holds at least k real ones."""
        v = torch.full((B, k), -torch.inf, dtype=like.dtype, device=like.device)
        ids = torch.full((B, k), -1, dtype=torch.long, device=like.device)
        if vals is not None:
            v[:, :vals.shape[1]] = vals
            ids[:, :idx.shape[1]] = idx + self.lo
        v, ids = torch.cat(dist.all_gather(v), 1), torch.cat(dist.all_gather(ids), 1)
        v, j = v.topk(k, dim=1, sorted=False)
        ids = ids.gather(1, j)
        mine = (ids >= self.lo) & (ids < self.hi)
        return mine, torch.where(mine, ids - self.lo, 0), torch.where(mine, v, 0)

    def forward_train(self, sae: Dictionary, x: torch.Tensor, dormant: torch.Tensor | None, k_aux: int,
                      matmul_dtype: torch.dtype | None = None) -> TrainOutput:
        """The TopK forward_train of the whole SAE, from this rank's shard `sae` (n/W latents) and the whole
        normalised batch x [B, d]. `dormant` [n/W] marks this shard's dormant latents; `k_aux` is global
        (at most the dormant count over every shard). x_hat and aux_hat are the whole SAE's, the same on
        every rank; idx [B, k] and vals [B, k] are this shard's picks (local ids; vals 0 off the shard),
        which is what its fire counters need. The picks off the shard are masked, not compacted: the
        shapes stay [B, k] on every rank, and the sparse products (k per row) cost little next to the
        encoder's B x n/W x d."""
        B, k = x.shape[0], sae.k
        # b_pre's share of the encoder's gradient comes from this rank's latents alone: summed over the ranks
        b_pre = _ReduceGrad.apply(sae.b_pre)
        x_c = x - b_pre
        b_pre = None if x.requires_grad else b_pre  # (as Dictionary.gather_b_pre)
        pre, idx, aux_pre, aux_idx, _, low = sae.topk_candidates(x_c, min(k, self.n_local), dormant, k_aux,
                                                                 matmul_dtype)
        z_like = pre  # the dtype a rank short of candidates pads in
        with torch.no_grad():
            mine, idx, pre = self._pick(pre, idx, k, B, z_like)
        # a low-precision z only picks the latents; the gathers recompute their values
        vals = torch.relu(encode_gather(x_c, sae.W_enc, sae.b_lat, idx, backend=sae.backend,
                                        pre=None if low else pre, b_pre=b_pre)) * mine
        x_hat = _SumOverRanks.apply(decode(idx, vals, sae.W_dec, backend=sae.backend)) + sae.b_pre
        aux_hat = None
        if k_aux > 0:  # every rank takes part, dormant latents of its own or not
            with torch.no_grad():
                a_mine, a_idx, a_pre = self._pick(aux_pre, aux_idx, k_aux, B, z_like)
            a_vals = torch.relu(encode_gather(x_c, sae.W_enc, sae.b_lat, a_idx, backend=sae.backend,
                                              pre=None if low else a_pre, b_pre=b_pre)) * a_mine
            aux_hat = _SumOverRanks.apply(decode(a_idx, a_vals, sae.W_dec, backend=sae.backend))
        return TrainOutput(x_hat, idx, vals, aux_hat)

    # ---- the one-process layout, for checkpoints, eval and the saved SAE
    def rows(self, weights: dict) -> dict:
        """A whole SAE's state_dict -> this shard's: its rows of W_enc, b_lat and W_dec, and b_pre."""
        return {name: t[self.lo:self.hi].clone() if name in SHARDED else t for name, t in weights.items()}

    def take(self, state: dict) -> dict:
        """A TrainState.state_dict() in the one-process layout -> this rank's: its rows of the sharded
        weights, their Adam state and the fire counters; the rest as is."""
        out = dict(state)
        out["sae"] = self.rows(state["sae"])
        out["since_fired"] = state["since_fired"][self.lo:self.hi].clone()
        opt = state["optimizer"]
        names = list(state["sae"])  # parameter i of the optimizer is the module's i-th
        out["optimizer"] = {**opt, "state": {
            i: {key: t[self.lo:self.hi].clone() if names[i] in SHARDED and key != "step" else t for key, t in s.items()}
            for i, s in opt["state"].items()}}
        return out

    def gather(self, sae: Dictionary, opt: torch.optim.Optimizer, since_fired: torch.Tensor) -> dict | None:
        """take()'s inverse: on rank 0 {"sae": the whole Dictionary, "optimizer": its Adam state_dict, "since_fired"
        [n]}, None on the others. Every rank must call it at the same point; each sends its n/W rows. Rank 0
        holds the whole SAE on its device (eval runs there) and the rest on the CPU (only a checkpoint reads it),
        a tensor at a time."""
        def cat(t, cpu=True):
            parts = dist.gather(t)
            return None if parts is None else torch.cat([q.cpu() for q in parts] if cpu else parts)

        weights = {name: cat(p.detach(), cpu=False) if name in SHARDED else p.detach()
                   for name, p in sae.named_parameters()}
        names = list(weights)
        opt_state = opt.state_dict()
        moments = {i: {key: cat(t) if names[i] in SHARDED and key != "step" else t.cpu() for key, t in s.items()}
                   for i, s in opt_state["state"].items()}
        fired = cat(since_fired)
        if fired is None:
            return None
        whole = sae.empty_like(self.n_latents)
        whole.load_state_dict(weights)
        return {"sae": whole, "optimizer": {**opt_state, "state": moments}, "since_fired": fired}
