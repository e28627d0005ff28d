"""The JumpReLU sparse autoencoder (Rajamanoharan et al., 2024, arXiv 2407.14435).

    z      = W_enc (x - b_pre) + b_lat                  [B, n]
    f      = z * H(z - θ)                               [B, n], θ [n] > 0: one threshold per latent
    x_hat  = sum_i f_i W_dec[i] + b_pre                 [B, d]

H, the step, has no useful gradient. Straight-through estimators with a rectangle kernel
rect(u) = 1[-1/2 < u < 1/2] of bandwidth ε stand in for the derivatives in θ (the paper's
pseudo-derivatives; z gets none through the jump, the ordinary H(z - θ) through f):

    ∂/∂θ H(z - θ)      ≈ -(1/ε) rect((z - θ) / ε)
    ∂/∂θ z H(z - θ)    ≈ -(θ/ε) rect((z - θ) / ε)          ∂/∂z z H(z - θ) = H(z - θ)

Loss: FVU + λ_t S + aux_alpha AuxK, with L0 = mean over rows of sum_i H(z_i - θ_i) and

    S = (L0 / target_l0 - 1)^2      sparsity: target_l0, which steers L0 to the target
    S = L0                          sparsity: l0

λ_t rises linearly from 0 over the first l0_warmup of the run. The target form's optimum sits a
little above the target (where the FVU's gain from one more latent equals the penalty's slope);
with λ = 1: +2% on SmolLM2, +9% on the planted test store. The bandwidth is in pre-activation
units: z spreads about 1 at the start on our inputs (E||x||^2 ≈ d_model, unit encoder rows), and
the papers' ε = 1e-3 on inputs of unit mean squared norm is 1e-3 sqrt(d) of such a spread, 0.05 at
Gemma 2's d of 2304-3584.

The threshold is stored as `log_threshold` = log(θ) / threshold_rate (a buffer saved with the
weights; sqrt(d_model) / 2 for new SAEs): θ = exp(threshold_rate * log_threshold). The log keeps θ
positive (so f = relu(z) * 1[z > θ], SAELens' formula) and makes a step a fraction of θ whatever
its scale. The rate lets θ keep up with z: Adam moves a parameter by about lr a step and a
pre-activation, a sum over d_model inputs, by about lr sqrt(d_model) (pipeline.optim).

Dead latents: one that never clears its threshold gets no gradient at all (its z is never in the
kernel's window). Two rules bring it back, for the latents silent for dormant_tokens: AuxK as in
TopK (the k_aux most active of them, through relu(z), learn to predict the residual: their encoder
rows move towards what the live latents miss), and after each step their θ moves down one
optimiser step (lr in the stored parameter) until they fire.

Measured (SmolLM2-135M block 6 resid_post, d 576, n 4608, batch 1024, 390 steps, 16k held-out
tokens; TopK k 32: FVU 0.127, 3.2% dead):

    this recipe (target_l0 32)          L0 32.6   FVU 0.124   dead 3.2%
    θ stored as plain log θ (rate 1)    L0 10.9   FVU 0.156   dead 11%
    AuxK without the threshold decay    L0 32.3   FVU 0.126   dead 26%
    ε = 1e-3 sqrt(d) = 0.024            L0 32.8   FVU 0.125   dead 3.3%
    sparsity l0 (λ 0.002)               L0 17.8   FVU 0.143   dead 3.1%

Initialisation: tied unit encoder/decoder rows, b_lat = 0. Unless threshold_init is given, each
latent's θ is set on the first training batch (_prime) to fire on target_l0 / n_latents of its rows,
so L0 starts at the target and no latent starts dead or dense. The trainer hands reset_parameters no
data, so this happens in the first train_forward; until then θ is the analytic guess for z of unit
spread (a tied random encoder on inputs of norm sqrt(d_model)).

Training never differentiates the dense z: it is computed without a graph, the latents near or
above their threshold (z > θ - ε, a superset of every one with a gradient) are kept, packed into
virtual rows as ReLU's are (relu.fired_entries: rows fire unevenly, and padding each to the widest cost the
widest row's count for every row), and the sparse kernels of pipeline.kernels recompute and decode
those, as TopK's do. A latent kept below θ is off (f = 0) and gets exactly the dense formula's
gradient.

Its settings in cfg.json: `sparsity`, `target_l0`. Scalar input normalisation folds into the weights
without touching θ: z itself is unchanged by the fold (base.folded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

import pipeline.saes.topk as _topk
from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.saes import register
from pipeline.saes.base import Dictionary, Settings, TrainOutput, TrainView, active_width

SPARSITY = ("target_l0", "l0")
# A low-precision (bf16) z picks the kept latents only; the margin (a fraction of θ, about |z| near
# the window, 4x bf16's 2^-8 rounding) makes sure nothing the full-precision z would keep is lost.
LOW_PRECISION_MARGIN = 2.0 ** -6


def threshold_rate(d_in: int) -> float:
    """How much faster than Adam's lr the stored log-threshold moves θ: sqrt(d) / 2, so a step of
    lr moves θ (typically near 2, the z of the top few per cent of unit-spread pre-activations) by
    about lr sqrt(d), the pace of the pre-activations themselves."""
    return math.sqrt(d_in) / 2


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = z * H(z - θ) for z and θ of one shape (θ gathered per entry).

    Backward given g: dz = g H(z - θ); dθ = -(θ/ε) rect((z - θ)/ε) g."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = -(theta / ctx.eps) * _rect((z - theta) / ctx.eps) * g
        return g * (z > theta), grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - θ) as 0/1 in z's dtype. Backward: dθ = -(1/ε) rect((z - θ)/ε) g, and nothing for z:
    the L0 penalty trains the thresholds, not the encoder."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return None, -(1 / ctx.eps) * _rect((z - theta) / ctx.eps) * g, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """z * H(z - θ) with the straight-through gradient in θ (θ broadcast to z's shape)."""
    return _JumpReLU.apply(z, theta.expand_as(z), eps)


def heaviside(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """H(z - θ) (0/1) with the straight-through gradient in θ (θ broadcast to z's shape)."""
    return _Step.apply(z, theta.expand_as(z), eps)


def warmup(fraction: float, step: int, n_steps: int) -> float:
    """λ's factor at 0-based `step`: (step + 1) / (fraction n_steps), at most 1 (1 throughout when
    the warm-up is shorter than a step)."""
    ramp = fraction * n_steps
    return 1.0 if ramp < 1 else min(1.0, (step + 1) / ramp)


@dataclass
class JumpReLUSettings(Settings):
    """`train.sae` of a JumpReLU SAE."""
    architecture: str = setting("jumprelu", "the dictionary: jumprelu (this table)")
    sparsity: str = setting("target_l0", "the sparsity penalty: target_l0 = l0_coefficient * (L0 / target_l0 "
                                         "- 1)^2, which steers L0 to target_l0, or l0 = l0_coefficient * L0")
    target_l0: int | float = setting(32, "latents firing per token that the target_l0 penalty steers to; with "
                                         "either penalty, where L0 starts (unless threshold_init); at most "
                                         "n_latents")
    l0_coefficient: float | None = setting(None, "λ, the sparsity penalty's weight against the FVU; null = 1 for "
                                                 "target_l0, 0.002 for l0")
    l0_warmup: float | None = setting(None, "fraction of the run over which λ rises linearly from 0; null = 0 for "
                                            "target_l0 (L0 starts at its target), 0.05 for l0")
    bandwidth: float = setting(0.05, "ε, the width of the rectangle kernel in the thresholds' straight-through "
                                     "gradients, in pre-activation units (z spreads about 1 at the start on "
                                     "layer-normed or scalar-normalised inputs)")
    threshold_init: float | None = setting(None, "every latent's threshold at the start; null = set on the first "
                                                 "batch so that each latent fires on target_l0 / n_latents of its "
                                                 "rows")
    dormant_tokens: int | None = setting(None, "a latent silent for this many training tokens is dormant: AuxK "
                                               "trains it and its threshold decays; null = 8 batches (at most 10M "
                                               "tokens)")
    k_aux: int | None = setting(None, "dormant latents AuxK keeps per token; null = the power of two nearest "
                                      "d_model / 2")
    aux_alpha: float = setting(1 / 32, "weight of the AuxK loss; 0 = off")

    def validate(self, where):
        from pipeline.config import ConfigError

        if self.sparsity not in SPARSITY:
            raise ConfigError(f"{where}: train.sae.sparsity = {self.sparsity!r} must be one of "
                              f"{', '.join(SPARSITY)}")
        if not (self.target_l0 > 0 and math.isfinite(self.target_l0)):  # <= n_latents: resolve() checks it
            raise ConfigError(f"{where}: train.sae.target_l0 = {self.target_l0} must be > 0")
        for key in ("bandwidth", "threshold_init"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{where}: train.sae.{key} = {value} must be > 0")
        lam = self.l0_coefficient
        if lam is not None and not (lam >= 0 and math.isfinite(lam)):
            raise ConfigError(f"{where}: train.sae.l0_coefficient = {self.l0_coefficient} must be >= 0")
        if self.l0_warmup is not None and not 0 <= self.l0_warmup <= 1:
            raise ConfigError(f"{where}: train.sae.l0_warmup = {self.l0_warmup} must be in [0, 1]")
        _topk.validate_auxk(self, where)

    def model_keys(self) -> tuple[str, ...]:
        return ("sparsity", "target_l0")

    def resolve(self, d_model: int, n_latents: int, batch_size: int, at: str, width: str) -> "JumpReLUSettings":
        """Every default filled in, once the width is known; a target above it refused in one line."""
        if self.target_l0 > n_latents:
            raise UserError(f"{at}train.sae.target_l0 = {self.target_l0} exceeds {width}; lower target_l0 or "
                            "raise n_latents")
        target = self.sparsity == "target_l0"
        return replace(
            self,
            l0_coefficient=(1.0 if target else 0.002) if self.l0_coefficient is None else self.l0_coefficient,
            l0_warmup=(0.0 if target else 0.05) if self.l0_warmup is None else self.l0_warmup,
            k_aux=min(n_latents, self.k_aux or 2 ** max(0, round(math.log2(max(1, d_model / 2))))),
            dormant_tokens=self.dormant_tokens or min(10_000_000, 8 * batch_size))


@register
class JumpReLUSAE(Dictionary):
    architecture = "jumprelu"
    Settings = JumpReLUSettings
    # SAELens' jumprelu computes relu(z) * (z > threshold): our encode(). sparsify has no threshold.
    transcodes = {"saelens": ("jumprelu_transcoder", "jumprelu_skip_transcoder")}
    exports = {"saelens": "jumprelu"}
    finetunes = True  # the learnt thresholds stay where training left them (only the STE moves them)

    def __init__(self, d_in: int, n_latents: int, target_l0: float = 32, threshold_init: float | None = None,
                 sparsity: str = "target_l0", normalize: str = "none", backend: str = "auto"):
        super().__init__(d_in, n_latents, normalize, backend)
        self.target_l0, self.threshold_init, self.sparsity = target_l0, threshold_init, sparsity
        self.log_threshold = nn.Parameter(torch.zeros(n_latents))
        # Saved with the weights, so a folder keeps meaning the same θ should the rule change.
        self.register_buffer("threshold_rate", torch.tensor(threshold_rate(d_in)))
        # Left by train_forward for train_loss and after_step (TrainOutput has no place for them):
        # (pre [B, w], θ [B, w], the whole batch's rows) and the dormant mask [n].
        self._pending = None
        self._dormant = None
        self.reset_parameters()

    def settings(self) -> dict:
        return {"sparsity": self.sparsity, "target_l0": self.target_l0}

    @classmethod
    def from_cfg(cls, d_in: int, n_latents: int, settings: dict, normalize: str = "none",
                 backend: str = "auto") -> "JumpReLUSAE":
        return cls(d_in, n_latents, settings.get("target_l0", 32), settings.get("threshold_init"),
                   settings.get("sparsity", "target_l0"), normalize, backend)

    def export_extras(self, fmt: str) -> tuple[dict, dict]:
        return ({"threshold": self.threshold.detach()}, {}) if fmt == "saelens" else ({}, {})

    @property
    def threshold(self) -> torch.Tensor:
        """θ [n], differentiable through log_threshold."""
        return (self.log_threshold * self.threshold_rate).exp()

    @torch.no_grad()
    def set_threshold(self, theta: torch.Tensor | float):
        """Store θ (a number, or [n]); values below 1e-30 are raised to it."""
        theta = torch.as_tensor(theta, dtype=torch.float64).clamp_min(1e-30)
        self.log_threshold.copy_((theta.log() / self.threshold_rate.double()).to(self.log_threshold.dtype)
                                 .expand_as(self.log_threshold))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random unit decoder rows, the encoder tied to them, b_lat = 0; θ = threshold_init, else the
        threshold that n(1 - Φ(θ)) = target_l0 of n unit-normal pre-activations clear (what a tied random
        encoder gives an input of norm sqrt(d)), refined on the first training batch (_prime)."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_lat.zero_()
        theta = self.threshold_init
        if theta is None:
            frac = min(max(self.target_l0 / self.n_latents, 1e-9), 0.5)
            theta = max(float(torch.special.ndtri(torch.tensor(1 - frac, dtype=torch.float64))), 1e-3)
        self.set_threshold(theta)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations z [B, n] of raw x (for users and tests)."""
        x = self.preprocess(x).to(self.W_enc.dtype)
        return torch.addmm(self.b_lat, self.center(x), self.W_enc.T)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx [B, w] int64, vals [B, w]): each row's latents with z > θ, ordered by how far z clears θ;
        w the most any row of the batch has (at least 1), vals 0 where a row has fewer. z [B, n] is held
        whole."""
        z = self.pre_acts(x)
        above = z - self.threshold  # > 0 exactly where z > θ (a float difference has the comparison's sign)
        w = active_width(above > 0)
        idx = above.topk(min(w, self.n_latents), dim=1).indices
        vals = z.gather(1, idx)
        return idx, vals * (vals > self.threshold[idx])

    def decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """x_hat from (idx, vals), in the space after preprocess()."""
        from pipeline.kernels import decode

        return decode(idx, vals.to(self.W_dec.dtype), self.W_dec, backend=self.backend) + self.b_pre

    # ---- training
    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput:
        """One training forward on normalised x [B, d]: (x_hat, idx [B, w], vals [B, w], aux_hat).

        idx holds every latent within ε below its threshold or above it in some row (nothing else has a
        gradient); vals = z H(z - θ) through the straight-through estimator. With a view of no settings
        (evaluation) only the latents that fire are kept, and nothing is left for the loss."""
        from pipeline.kernels import encode_gather
        from pipeline.saes.relu import fired_entries

        st = view.settings
        eps = 0.0 if st is None else st.bandwidth
        x_c = self.center(x)
        with torch.no_grad():
            z, low = self._dense_z(x_c, view.matmul_dtype)
            if st is not None and view.step == 0 and st.threshold_init is None:
                self._prime(z, st.target_l0, eps, view.global_sum)
            theta = self.threshold.detach()
            # Kept: z > θ - ε (the window reaches θ - ε/2; the slack absorbs the rounding of its test).
            margin = eps + (LOW_PRECISION_MARGIN * 2 * theta if low else 0)
            # a low-precision z only picks; the gather recomputes
            fired = fired_entries(z > theta - margin, None if low else z)
        B, b_pre = x.shape[0], self.gather_b_pre(x)
        pre = encode_gather(fired.inputs(x_c), self.W_enc, self.b_lat, fired.idx, backend=self.backend,
                            pre=fired.pre, b_pre=b_pre)
        theta = self.threshold.index_select(0, fired.idx.reshape(-1)).view_as(fired.idx)
        # empty slots (latent 0) masked: from a low-precision z the gather recomputes latent 0's value there
        on = fired.on.to(pre.dtype)
        vals = (_JumpReLU.apply(pre, theta, eps) if st is not None else pre * (pre > theta)) * on
        x_hat = fired.decode(vals, self.W_dec, B, self.backend) + self.b_pre
        if st is None:
            return TrainOutput(x_hat, *fired.compact(vals, B), None)
        self._pending = (pre, theta, on, view.global_sum(torch.tensor(float(B), device=x.device)))

        dormant = view.since_fired >= st.dormant_tokens
        self._dormant = dormant
        view.n_dormant = int(dormant.sum())
        k_aux = min(st.k_aux, view.n_dormant) if st.aux_alpha > 0 else 0
        aux_hat = self._auxk(x_c, z, dormant, k_aux, low, b_pre) if k_aux > 0 else None
        return TrainOutput(x_hat, *fired.compact(vals, B), aux_hat)

    def _auxk(self, x_c: torch.Tensor, z: torch.Tensor, dormant: torch.Tensor, k_aux: int,
              low: bool, b_pre: torch.Tensor | None) -> torch.Tensor:
        """TopK's AuxK reconstruction [B, d] (no b_pre) from the k_aux largest relu(z) of the dormant
        latents per row: dense matmuls over their columns when they are few (topk._DormantDecode), else
        the sparse kernels (b_pre as kernels.encode_gather takes it)."""
        from pipeline.kernels import decode, encode_gather

        with torch.no_grad():
            ids = dormant.nonzero().squeeze(1)
            top, pos = z.index_select(1, ids).topk(k_aux, dim=1, sorted=False)
            aux_idx = ids[pos]
        if not low and self.backend == "torch" and ids.numel() <= _topk.AUX_DENSE_RATIO * k_aux:
            acts = torch.zeros(z.shape[0], ids.numel(), dtype=x_c.dtype, device=x_c.device)
            acts.scatter_(1, pos, top.clamp_min(0).to(x_c.dtype))
            return _topk._DormantDecode.apply(acts, ids, x_c, self.W_enc, self.b_lat, self.W_dec)
        aux_pre = None if low else top.to(x_c.dtype)
        aux_vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, aux_idx, backend=self.backend,
                                            pre=aux_pre, b_pre=b_pre))
        return decode(aux_idx, aux_vals, self.W_dec, backend=self.backend)

    def train_loss(self, x: torch.Tensor, o: TrainOutput, fvu: torch.Tensor,
                   view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
        """FVU + λ_t S + aux_alpha AuxK; for the log, everything beyond the FVU.

        Under torchrun each rank holds some rows: L0's denominator is the whole batch's rows, and
        (L0 / T - 1)^2, not a sum over rows, is taken at the whole batch's L0. Each rank's term is its
        rows' share of that value with the gradient 2 λ (L0 / T - 1) / T times its share of L0's, so
        the ranks' losses and gradients sum to the one-process ones."""
        st = view.settings
        pre, theta, on, rows = self._pending
        self._pending = None
        share = (_Step.apply(pre, theta, st.bandwidth) * on).sum() / rows  # this rank's part of the batch's L0
        lam = st.l0_coefficient * warmup(st.l0_warmup, view.step, view.n_steps)
        if st.sparsity == "l0":
            penalty = lam * share
        else:
            gap = view.global_sum(share.detach().clone()) / st.target_l0 - 1
            penalty = (lam * gap.square() * (x.shape[0] / rows)
                       + (2 * lam * gap / st.target_l0) * (share - share.detach()))
        aux = torch.zeros((), device=x.device)
        if o.aux_hat is not None:
            r = (x - o.x_hat).detach()
            aux = (o.aux_hat - r).pow(2).sum() / view.global_sum(r.pow(2).sum()).clamp_min(1e-30)
        extra = penalty + st.aux_alpha * aux
        return fvu + extra, extra.detach()

    @torch.no_grad()
    def after_step(self, view: TrainView):
        """Unit decoder rows; each dormant latent's threshold one optimiser step lower (lr off the
        stored parameter, the most an Adam step moves it), so it decays until the latent fires."""
        super().after_step(view)
        dormant, self._dormant = self._dormant, None
        if dormant is not None and view.optimizer is not None:
            lr = view.optimizer.param_groups[0]["lr"]
            self.log_threshold.sub_(lr * dormant.to(self.log_threshold.dtype))

    @torch.no_grad()
    def _dense_z(self, x_c: torch.Tensor, matmul_dtype: torch.dtype | None) -> tuple[torch.Tensor, bool]:
        """(z [B, n] without a graph, low): in `matmul_dtype` when it differs from x_c's (low = True, z
        returned as float32: it only picks the latents, the gathers recompute their values)."""
        if matmul_dtype is None or matmul_dtype == x_c.dtype:
            return torch.addmm(self.b_lat, x_c, self.W_enc.T), False
        z = torch.addmm(self.b_lat.to(matmul_dtype), x_c.to(matmul_dtype), self.W_enc.to(matmul_dtype).T)
        return z.float(), True

    @torch.no_grad()
    def _prime(self, z: torch.Tensor, target: float, eps: float, global_sum):
        """θ_i halfway between latent i's m-th and (m+1)-th largest z on this batch [B, n], m = B target / n
        rounded: each latent fires on m rows, L0 ≈ target. Under torchrun the ranks' values are averaged,
        so every rank starts from the same θ. A latent positive on fewer rows gets θ = ε (positive)."""
        B = z.shape[0]
        if B < 2:
            return
        m = min(B - 1, max(1, round(B * target / self.n_latents)))
        top = z.topk(m + 1, dim=0).values
        q = global_sum(((top[m - 1] + top[m]) / 2).float()) / global_sum(torch.ones((), device=z.device))
        self.set_threshold(q.clamp_min(eps or 1e-6))
