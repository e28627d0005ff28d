"""The TopK sparse autoencoder (Gao et al., 2024), the default architecture.

    z      = W_enc (x - b_pre) + b_lat          dense [B, n], never differentiated
    idx, v = top-k of z per row, v = relu(v)     [B, k]
    x_hat  = sum_j v_j W_dec[idx_j] + b_pre      [B, d]

Training picks `idx` from `z` without a graph, then recomputes the k chosen
pre-activations with `encode_gather`, so autograd only ever sees [B, k]
tensors and the sparse kernels in `pipeline.kernels` do every backward product.
AuxK does the same with the top `k_aux` dormant latents.

Its settings in cfg.json: `k`. Scalar input normalisation is folded into the
weights at save time, so a saved SAE takes raw activations; per-token layer
norm cannot be folded and is applied by `encode` when cfg says so (base.py).
"""

from __future__ import annotations

import math
import torch

from dataclasses import dataclass, replace

from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.saes import register
from pipeline.saes.base import Dictionary, Settings, TrainOutput, TrainView

# AuxK runs as dense matmuls over the dormant columns while they number at most this many times k_aux
# (torch backend; on CPU the two paths cost the same near 4x, at d 384 and at d 768)
AUX_DENSE_RATIO = 4


class _DormantDecode(torch.autograd.Function):
    """AuxK's reconstruction from a few (m) dormant latents as dense matmuls over their columns.

    acts [B, m]: relu of the kept pre-activations, 0 elsewhere (from z, no graph); ids [m]: the latents;
    x_c [B, d]; W_enc, W_dec [n, d]; b_lat [n]  ->  acts @ W_dec[ids]  [B, d].
    The forward reuses z's values, so only the backward's four [B, m] x [m, d] products are paid; with
    dz = (g @ W_dec[ids].T) where acts > 0, the grads are W_dec[ids] += acts.T @ g, W_enc[ids] += dz.T @ x_c,
    b_lat[ids] += dz.sum(0) and x_c += dz @ W_enc[ids] (what autograd of the dense formulation gives)."""

    @staticmethod
    def forward(ctx, acts, ids, x_c, W_enc, b_lat, W_dec):
        W_d = W_dec.index_select(0, ids)
        ctx.save_for_backward(acts, ids, x_c, W_enc, W_d)
        ctx.n = W_dec.shape[0]
        return acts @ W_d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        acts, ids, x_c, W_enc, W_d = ctx.saved_tensors
        dz = (g @ W_d.T).mul_(acts > 0)
        grad_W_dec = grad_W_enc = grad_b = grad_x = None
        if ctx.needs_input_grad[5]:
            grad_W_dec = g.new_zeros(ctx.n, g.shape[1]).index_copy_(0, ids, acts.T @ g)
        if ctx.needs_input_grad[3]:
            grad_W_enc = g.new_zeros(ctx.n, g.shape[1]).index_copy_(0, ids, dz.T @ x_c)
        if ctx.needs_input_grad[4]:
            grad_b = g.new_zeros(ctx.n).index_copy_(0, ids, dz.sum(0))
        if ctx.needs_input_grad[2]:
            grad_x = dz @ W_enc.index_select(0, ids)
        return None, None, grad_x, grad_W_enc, grad_b, grad_W_dec


def validate_auxk(st, where):
    """AuxK's settings (dormant_tokens, k_aux, aux_alpha), for every architecture that revives its
    dormant latents the TopK way."""
    from pipeline.config import ConfigError

    for key in ("dormant_tokens", "k_aux"):
        if getattr(st, key) is not None and getattr(st, key) < 1:
            raise ConfigError(f"{where}: train.sae.{key} = {getattr(st, key)} must be >= 1")
    if not st.aux_alpha >= 0:
        raise ConfigError(f"{where}: train.sae.aux_alpha = {st.aux_alpha} must be >= 0")


@dataclass
class TopKSettings(Settings):
    """`train.sae` of a TopK SAE. (Written flat in the train section, `train.k`, as configs did
    before this section existed, they mean the same.)"""
    architecture: str = setting("topk", "the dictionary: topk (this table)")
    k: int = setting(32, "latents kept per token (TopK); at most n_latents")
    dormant_tokens: int | None = setting(None, "a latent silent for this many training tokens is dormant and "
                                               "trained by AuxK; null = 8 batches (at most 10M tokens)")
    k_aux: int | None = setting(None, "dormant latents AuxK keeps per token; null = the power of two nearest "
                                      "d_model / 2")
    aux_alpha: float = setting(1 / 32, "weight of the AuxK loss; 0 = off")

    def validate(self, where):
        from pipeline.config import ConfigError

        if self.k <= 0:  # k <= n_latents needs d_model: resolve() checks it
            raise ConfigError(f"{where}: train.sae.k = {self.k} must be > 0")
        validate_auxk(self, where)

    def model_keys(self) -> tuple[str, ...]:
        return ("k",)

    def resolve(self, d_model: int, n_latents: int, batch_size: int, at: str, width: str) -> "TopKSettings":
        """Every default filled in, once the width is known; k above it refused in one line."""
        if self.k > n_latents:
            raise UserError(f"{at}train.k = {self.k} exceeds {width}; lower k or raise n_latents")
        return replace(self, k_aux=min(n_latents, self.k_aux or 2 ** max(0, round(math.log2(max(1, d_model / 2))))),
                       dormant_tokens=self.dormant_tokens or min(10_000_000, 8 * batch_size))


@register
class TopKSAE(Dictionary):
    architecture = "topk"
    Settings = TopKSettings
    transcodes = {"sparsify": ("topk", "topk")}  # sparsify: `transcode` and `skip_connection` in its cfg
    exports = {"saelens": "topk", "sparsify": "topk"}  # both compute relu(topk(...)) as encode() does
    shards = True
    finetunes = True  # k is the L0 whatever the weights (batchtopk, matryoshka: a fixed threshold)

    def __init__(self, d_in: int, n_latents: int, k: int, normalize: str = "none", backend: str = "auto"):
        super().__init__(d_in, n_latents, normalize, backend)
        self.k = k
        self.reset_parameters()

    def settings(self) -> dict:
        return {"k": self.k}

    def export_extras(self, fmt: str) -> tuple[dict, dict]:
        return {}, {"k": self.k}

    @classmethod
    def from_cfg(cls, d_in: int, n_latents: int, settings: dict, normalize: str = "none",
                 backend: str = "auto") -> "TopKSAE":
        return cls(d_in, n_latents, settings["k"], normalize, backend)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random unit decoder rows; encoder tied to the decoder."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_lat.zero_()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations z [B, n] (for users and tests; training never backprops it)."""
        x = self.preprocess(x).to(self.W_enc.dtype)
        return self.center(x) @ self.W_enc.T + self.b_lat

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx [B, k] int64, vals [B, k]) with vals = relu(top-k of z), z never held whole
        (kernels.encode_topk: a block of latents at a time, or the fused kernel)."""
        from pipeline.kernels import encode_topk

        x = self.preprocess(x).to(self.W_enc.dtype)
        vals, idx, _, _ = encode_topk(self.center(x), self.W_enc, self.b_lat, self.k, backend=self.backend)
        return idx, vals.clamp_min(0)

    def decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """x_hat from (idx, vals), in the space after preprocess()."""
        from pipeline.kernels import decode

        return decode(idx, vals.to(self.W_dec.dtype), self.W_dec, backend=self.backend) + self.b_pre

    def forward(self, x: torch.Tensor):
        """Differentiable reconstruction of raw x: returns (x_hat, idx, vals, z_detached)."""
        from pipeline.kernels import encode_gather

        x = self.preprocess(x)
        x_c = self.center(x)
        with torch.no_grad():
            z = x_c @ self.W_enc.T + self.b_lat
            idx = z.topk(self.k, dim=-1, sorted=False).indices
        vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, idx, backend=self.backend,
                                        b_pre=self.gather_b_pre(x)))
        return self.decode(idx, vals), idx, vals, z

    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput:
        """forward_train with AuxK over the latents silent for dormant_tokens (k_aux of them a row, at
        most as many as are dormant), or the latent-sharded forward when the ranks split the latents."""
        st = view.settings
        if st is None:
            return self.forward_train(x, matmul_dtype=view.matmul_dtype)
        dormant = view.since_fired >= st.dormant_tokens
        view.n_dormant = int(dormant.sum()) if view.shard is None else view.shard.count(dormant)
        k_aux = min(st.k_aux, view.n_dormant) if st.aux_alpha > 0 else 0
        if view.shard is not None:
            return view.shard.forward_train(self, x, dormant, k_aux, view.matmul_dtype)
        return self.forward_train(x, dormant, k_aux, view.matmul_dtype)

    def train_loss(self, x: torch.Tensor, o: TrainOutput, fvu: torch.Tensor,
                   view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
        """FVU + aux_alpha * AuxK: the dormant latents learn to predict what the live ones missed
        (the residual, detached), normalised by the whole batch's residual energy."""
        aux = torch.zeros((), device=x.device)
        if o.aux_hat is not None:
            r = (x - o.x_hat).detach()
            aux = (o.aux_hat - r).pow(2).sum() / view.global_sum(r.pow(2).sum()).clamp_min(1e-30)
        return fvu + view.settings.aux_alpha * aux, aux

    def forward_train(self, x: torch.Tensor, dormant: torch.Tensor | None = None, k_aux: int = 0,
                      matmul_dtype: torch.dtype | None = None) -> TrainOutput:
        """One training forward on already-normalised x [B, d].

        `dormant` [n] bool marks latents eligible for AuxK; `k_aux` of them (the
        caller caps it at the number dormant) are kept per token. Only the dense
        z matmul runs in `matmul_dtype` (bf16 on GPU): the gathers recompute
        the chosen pre-activations in full precision. A full-precision z already
        holds them, and the gathers' forward takes them from it.
        """
        from pipeline.kernels import decode, encode_gather

        x_c = self.center(x)
        pre, idx, aux_pre, aux_idx, ids, low = self.topk_candidates(x_c, self.k, dormant, k_aux, matmul_dtype)
        if low:  # a low-precision z only picks the latents; the gathers recompute their values
            pre = aux_pre = None
        b_pre = self.gather_b_pre(x)
        vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, idx, backend=self.backend, pre=pre, b_pre=b_pre))
        x_hat = decode(idx, vals, self.W_dec, backend=self.backend) + self.b_pre
        aux_hat = None
        if aux_pre is not None and self.backend == "torch" and ids.numel() <= AUX_DENSE_RATIO * k_aux:
            # Few dormant latents, many kept a row (k_aux ~ d/2): plain matmuls over the m dormant
            # columns beat the sparse products, which pay per kept latent what a GEMM pays per column.
            acts = torch.zeros(x.shape[0], ids.numel(), dtype=x.dtype, device=x.device)
            acts.scatter_(1, torch.searchsorted(ids, aux_idx), aux_pre.clamp_min(0))
            aux_hat = _DormantDecode.apply(acts, ids, x_c, self.W_enc, self.b_lat, self.W_dec)
        elif aux_idx is not None:
            aux_vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, aux_idx, backend=self.backend,
                                                pre=aux_pre, b_pre=b_pre))
            aux_hat = decode(aux_idx, aux_vals, self.W_dec, backend=self.backend)
        return TrainOutput(x_hat, idx, vals, aux_hat)

    @torch.no_grad()
    def topk_candidates(self, x_c: torch.Tensor, k: int, dormant: torch.Tensor | None, k_aux: int,
                        matmul_dtype: torch.dtype | None):
        """kernels.encode_topk of the centred batch x_c [B, d], z in `matmul_dtype` when it differs from
        x_c's: (pre [B, k], idx [B, k], aux_pre, aux_idx [B, k_aux] or None, ids, low). ids [m]: the
        dormant latents AuxK ranks (None without AuxK); low: z was computed in lower precision, so pre
        ranks the latents but is not their value."""
        from pipeline.kernels import encode_topk

        low = matmul_dtype is not None and matmul_dtype != x_c.dtype
        operands = (x_c, self.W_enc, self.b_lat)
        if low:
            operands = tuple(t.to(matmul_dtype) for t in operands)
        # The AuxK top-k runs over the dormant columns only (a top-k costs in proportion
        # to the columns it scans), in the same sweep over the latents as the main one.
        ids = dormant.nonzero().squeeze(1) if dormant is not None and k_aux > 0 else None
        pre, idx, aux_pre, aux_idx = encode_topk(*operands, k, backend=self.backend, aux_ids=ids, k_aux=k_aux)
        return pre, idx, aux_pre, aux_idx, ids, low
