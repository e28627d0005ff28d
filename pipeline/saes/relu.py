"""The standard sparse autoencoder: ReLU latents and an L1 penalty (SAELens `standard`;
Anthropic, "Towards Monosemanticity", 2023).

    z      = W_enc (x - b_pre) + b_lat                      [B, n]
    f      = relu(z)                                        [B, n], most entries 0
    x_hat  = sum_i f_i W_dec[i] + b_pre                     [B, d]
    loss   = FVU + lam * S,  S = mean_rows sum_i f_i |W_dec[i]| / rms
             (rms = the batch's root-mean-square centred row norm: S has no unit, like the FVU,
             so one lam means the same sparsity pressure whatever the inputs' scale)

lam rises linearly from 0 over the first `l1_warmup` of the steps. With `target_l0`, a
controller moves lam instead (`control_l1`), from each batch's L0: log(lam) integrates the
clamped log-ratio of L0 to the target at a rate set by the run's length, damped by the ratio's
change, so a stated L0 is reached without a hand sweep. lam acts through the weights, and
the decaying learning rate all but stops them at the end (the L0 then lags 17-26% above the
target on SmolLM2 at one epoch): in the last `calibrate` of the run every step also shifts b_lat
by the batch's threshold t (target x B of its pre-activations above t), so the run ends at the
target on its last batches, as BatchTopK's inference threshold does. lam and the last error live in the
persistent buffers `l1_lambda` and `l0_error`, so they are checkpointed and resumed with the
weights (and saved with them: lam records what the run ended at).

Dead latents are resampled (`resample_dead`), as in "Towards Monosemanticity": every
`resample_every` steps of the first `resample_until` of the run, each latent silent for
`dormant_tokens` gets a batch row drawn with probability proportional to its squared
reconstruction error: its decoder row becomes that row's direction (x - b_pre, unit norm), its
encoder row the same direction at 0.2 x the mean norm of the live encoder rows, its bias 0, and
its optimizer state is cleared (Adam's moments zeroed; schedule-free's z set to the new row). The
draw is seeded from the step, so a run resumed from a checkpoint resamples exactly as before.

The decoder keeps unit rows (base.after_step, and the trainer removes the gradient along each
row): the trainer assumes it (remove_parallel_grad, the schedule-free average renormalised,
steering by decoder rows), dictionary_learning's standard and gated trainers do the same, and
with unit rows the encoder cannot buy a smaller penalty by shrinking f while the decoder grows.
The penalty is still written with the row norms, so it stays scale-invariant should that change.

Training (`train_forward`) works on the latents that fire: z without a graph picks the entries
that are positive, and only those are recomputed with a graph (kernels.encode_gather) and decoded
(kernels.decode), as TopK does. Exact: relu passes no gradient where z <= 0. Rows fire unevenly
(one row may keep 80 times the mean), so the entries are packed into virtual rows as BatchTopK's
are (`fired_entries`), not padded to the widest row. While more than DENSE_ABOVE of the latents fire on
average (early on, when about half do) plain dense matmuls are cheaper, and are used.

Its settings in cfg.json: `l1_coefficient`, `target_l0` (what it was trained with; inference
needs none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.saes import register
from pipeline.saes.base import Dictionary, Settings, TrainOutput, TrainView, active_count, active_width
from pipeline.saes.batchtopk import VirtualRows

# Above this fraction of the latents firing (on average over the batch's rows), train_forward runs dense
# matmuls. A step at d 768, n 4096, B 1024 on CPU, rows padded to the widest then: both paths 0.19 s at
# n / 12 a row; sparse 0.085 s vs dense 0.21 s at n / 100.
DENSE_ABOVE = 1 / 12
# The target_l0 controller (control_l1): log(lam) moves by at most rate = L0_BUDGET / n_steps a step (so
# over ~L0_BUDGET / 3 of the run for a x e^3 change), kept within [L0_RATE_MIN, L0_RATE_MAX]. Slower is
# better where the run allows it: on the planted store at L0 7, 1000 steps, rate 0.01 ended at FVU
# 0.072, 0.05 at 0.099; 0.1 and above overshot (dead latents); 120 steps need 0.05 to arrive in time.
L0_BUDGET = 10.0
L0_RATE_MIN, L0_RATE_MAX = 0.005, 0.05
# Its damping: log(lam) also follows L0_DAMP x the change of the error, which stops lam rising while
# the L0 is already falling fast (the L0 lags lam by tens of steps: without it lam overshoots ~2x).
L0_DAMP = 1.0
# A resampled latent's encoder row: this times the mean norm of the live rows (Towards Monosemanticity).
RESAMPLE_ENCODER_SCALE = 0.2


@dataclass
class ReluSettings(Settings):
    """`train.sae` of a ReLU (L1) SAE."""
    architecture: str = setting("relu", "the dictionary: relu (this table), ReLU latents with an L1 penalty "
                                        "(SAELens `standard`)")
    l1_coefficient: float = setting(0.1, "lam, the L1 penalty's weight (the penalty is sum_i f_i |W_dec[i]| over "
                                          "the batch's RMS row norm: no unit); with target_l0, where the "
                                          "controller starts")
    l1_warmup: float = setting(0.05, "fraction of the steps over which lam rises linearly from 0 (not with "
                                     "target_l0: the controller's own start is gradual)")
    target_l0: float | None = setting(None, "latents per token to reach: a controller moves lam from the batches' "
                                            "L0 (held-out L0 within ~20%); null = lam fixed at l1_coefficient")
    dormant_tokens: int | None = setting(None, "a latent silent for this many training tokens is dead and is "
                                               "resampled; null = 8 batches (at most 10M tokens)")
    resample_every: int | None = setting(None, "steps between resamplings of the dead latents; null = an eighth "
                                               "of the run; 0 = never")
    resample_until: float = setting(0.5, "fraction of the run after which no latent is resampled (a resampled "
                                         "latent needs the rest to learn)")
    calibrate: float = setting(0.1, "with target_l0: the last fraction of the run in which every step also "
                                    "shifts the encoder bias to the batch's threshold for target_l0 (lam acts "
                                    "through the weights, which the decaying lr has all but stopped by then)")

    def validate(self, where):
        from pipeline.config import ConfigError

        if not self.l1_coefficient > 0:
            raise ConfigError(f"{where}: train.sae.l1_coefficient = {self.l1_coefficient} must be > 0")
        for key in ("l1_warmup", "resample_until", "calibrate"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{where}: train.sae.{key} = {getattr(self, key)} must be in [0, 1]")
        if self.target_l0 is not None and not self.target_l0 > 0:
            raise ConfigError(f"{where}: train.sae.target_l0 = {self.target_l0} must be > 0")
        if self.dormant_tokens is not None and self.dormant_tokens < 1:
            raise ConfigError(f"{where}: train.sae.dormant_tokens = {self.dormant_tokens} must be >= 1")
        if self.resample_every is not None and self.resample_every < 0:
            raise ConfigError(f"{where}: train.sae.resample_every = {self.resample_every} must be >= 0 (0: never)")

    def model_keys(self) -> tuple[str, ...]:
        return ("l1_coefficient", "target_l0")

    def resolve(self, d_model: int, n_latents: int, batch_size: int, at: str, width: str) -> "ReluSettings":
        if self.target_l0 is not None and self.target_l0 > n_latents:
            raise UserError(f"{at}train.sae.target_l0 = {self.target_l0} exceeds {width}; lower target_l0 or "
                            "raise n_latents")
        return replace(self, dormant_tokens=self.dormant_tokens or min(10_000_000, 8 * batch_size))


# --------------------------------------------------------------------------- shared by relu and gated
def compact(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense latents f [B, n] (0 where off) -> (idx [B, w] int64, vals [B, w]), w = the most latents
    active in any row (at least 1); a row with fewer is padded with latents whose value is 0."""
    vals, idx = f.topk(min(active_width(f > 0), f.shape[1]), dim=1, sorted=False)
    return idx, vals


def batch_stats(x: torch.Tensor, view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, var) of the whole batch (every rank's rows under torchrun): its row count and the summed
    squared distance of its rows from their mean, the FVU's denominator. No graph."""
    with torch.no_grad():
        rows = view.global_sum(torch.tensor(float(x.shape[0]), device=x.device, dtype=x.dtype))
        mean = view.global_sum(x.sum(0)) / rows
        var = view.global_sum((x - mean).pow(2).sum())
    return rows, var.clamp_min(1e-30)


def penalty_weight(sae: "ReluSAE", st: ReluSettings, view: TrainView) -> torch.Tensor:
    """lam this step: the buffer, ramped over l1_warmup of the steps unless the controller drives it."""
    if st.target_l0 is not None or st.l1_warmup == 0:
        return sae.l1_lambda
    return sae.l1_lambda * min(1.0, (view.step + 1) / max(1.0, st.l1_warmup * view.n_steps))


def sparsity(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, rows: torch.Tensor,
             var: torch.Tensor) -> torch.Tensor:
    """S = sum over this rank's rows of sum_j vals[b, j] |W_dec[idx[b, j]]|, over (whole-batch rows x rms):
    the L1 penalty weighted by the decoder rows' norms, without unit. idx, vals [B, w].

    Written so that no backward scatters into the norms: autograd's one for norms[idx] accumulates in
    an order that varies run to run on CPU (W_dec's gradient then differs in its last bits, and a
    resumed run with it). The norms' gradient is each latent's summed activation, taken here by a
    deterministic reduction; (norms - norms.detach()) is exactly 0, so the value is unchanged."""
    from pipeline.kernels import scatter_sum

    norms = W_dec.norm(dim=1)
    with torch.no_grad():
        # the dense path's idx is one arange expanded over the rows (stride 0): a column sum
        per_latent = vals.sum(0) if idx.stride(0) == 0 else scatter_sum(idx, vals, W_dec.shape[0])
    s = (vals * norms.detach()[idx]).sum() + ((norms - norms.detach()) * per_latent).sum()
    return s / (rows * (var / rows).sqrt())


def control_rate(n_steps: int) -> float:
    return min(L0_RATE_MAX, max(L0_RATE_MIN, L0_BUDGET / max(1, n_steps)))


@torch.no_grad()
def control_l1(lam: torch.Tensor, last: torch.Tensor, l0: torch.Tensor, target: float, rate: float,
               first: bool):
    """The target_l0 controller, in place on the buffers lam and last (the previous step's error):
    with e = clamp(log(l0 / target), -1, 1), lam *= exp(rate * e + L0_DAMP * (e - last)).

    An integral controller on log(lam) (multiplicative: the lam a given L0 needs spans orders of
    magnitude; the clamp bounds a step, so an early L0 of n/2 raises lam steadily, not at once), with
    a proportional term that damps it. On the first step (first) there is no previous error."""
    err = torch.log(l0.to(lam.dtype) / target).clamp(-1.0, 1.0)
    if first:
        last.copy_(err)
    lam.mul_(torch.exp(rate * err + L0_DAMP * (err - last)))
    last.copy_(err)


def calibrating(st: ReluSettings, view: TrainView) -> bool:
    """Whether the step just taken (view.step) lies in the run's last `calibrate` fraction."""
    return st.target_l0 is not None and view.step >= (1 - st.calibrate) * view.n_steps


@torch.no_grad()
def batch_threshold(pre: torch.Tensor, target: float, view: TrainView) -> torch.Tensor:
    """t such that target x B of the batch's pre-activations pre [B, n] exceed it: the bias shift
    that brings this batch to L0 = target (the mean of the ranks' t under torchrun)."""
    from pipeline import dist

    above = min(pre.numel(), max(1, round(target * pre.shape[0])))
    t = pre.flatten().kthvalue(pre.numel() - above).values if above < pre.numel() else pre.min() - 1
    return view.global_sum(t) / dist.rank_world()[1]


@torch.no_grad()
def shift_param(optimizer, p: torch.Tensor, delta: torch.Tensor):
    """p += delta, and schedule-free's z with it (its average would pull p back otherwise)."""
    p.add_(delta)
    z = optimizer.state.get(p, {}).get("z") if optimizer is not None else None
    if z is not None:
        z.add_(delta)


def resample_due(st: ReluSettings, view: TrainView) -> bool:
    """Whether the step just taken (view.step, 0-based) ends a resampling interval of the first
    resample_until of the run."""
    every = st.resample_every if st.resample_every is not None else max(1, view.n_steps // 8)
    done = view.step + 1
    return every > 0 and done % every == 0 and done <= st.resample_until * view.n_steps


@torch.no_grad()
def reset_optimizer_rows(optimizer, params: list[torch.Tensor], ids: torch.Tensor):
    """Forget the optimizer's memory of rows `ids` of each param (dim 0: the latent): Adam's moments
    zeroed, schedule-free's z set to the param's (new) rows so its average restarts there too."""
    if optimizer is None:
        return
    for p in params:
        state = optimizer.state.get(p, {})
        for key, t in state.items():
            if not torch.is_tensor(t) or t.shape != p.shape:
                continue
            if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t[ids] = 0
            elif key == "z":
                t[ids] = p[ids]


def fired_entries(keep: torch.Tensor, z: torch.Tensor | None) -> VirtualRows:
    """The entries where keep [B, n] (bool) is set, in virtual rows of the mean a row keeps (rounded
    up), so the sparse products handle at most about twice their number however unevenly the rows
    fire; their values from z [B, n] (None: no `pre`)."""
    B, n = keep.shape
    flat = keep.view(-1).nonzero().squeeze(1)  # row-major: the rows come out sorted
    rows = flat // n
    w = max(1, -(-flat.numel() // max(B, 1)))
    return VirtualRows.build(rows, B, w, rows, flat % n, None if z is None else z.view(-1)[flat])


# --------------------------------------------------------------------------- the SAE
@register
class ReluSAE(Dictionary):
    architecture = "relu"
    Settings = ReluSettings
    transcodes = {"saelens": ("transcoder", "skip_transcoder")}
    exports = {"saelens": "standard"}  # relu((x - b_dec) W_enc + b_enc), as encode(); sparsify is TopK only

    def __init__(self, d_in: int, n_latents: int, l1_coefficient: float = ReluSettings.l1_coefficient,
                 target_l0: float | None = None, normalize: str = "none", backend: str = "auto"):
        super().__init__(d_in, n_latents, normalize, backend)
        self.l1_coefficient, self.target_l0 = l1_coefficient, target_l0
        # lam: what the controller moves; a persistent buffer, so checkpoints and the saved SAE hold it.
        self.register_buffer("l1_lambda", torch.tensor(float(l1_coefficient)))
        self.register_buffer("l0_error", torch.tensor(0.0))  # the controller's previous error
        self._batch = None  # this step's (x, x_hat, L0), from train_loss to after_step
        self.add_parameters()
        self.reset_parameters()

    def add_parameters(self):
        """An architecture's parameters beyond the base's (gated: b_mag, r_mag), before the first reset."""

    def settings(self) -> dict:
        return {"l1_coefficient": self.l1_coefficient, "target_l0": self.target_l0}

    @classmethod
    def from_cfg(cls, d_in: int, n_latents: int, settings: dict, normalize: str = "none",
                 backend: str = "auto") -> "ReluSAE":
        return cls(d_in, n_latents, settings.get("l1_coefficient", ReluSettings.l1_coefficient),
                   settings.get("target_l0"), normalize, backend)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random unit decoder rows; encoder rows the same directions at norm min(1, d / n), so that
        the first reconstruction sum_i relu(z_i) W_dec[i] (about half the latents fire) is about
        x's size rather than n / d times it; biases 0; lam back to l1_coefficient."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w * min(1.0, self.d_in / self.n_latents))
        self.b_lat.zero_()
        self.l1_lambda.fill_(self.l1_coefficient)
        self.l0_error.zero_()

    # ---- inference
    def dense_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """f [B, n] for centred, preprocessed x_c = x - b_pre [B, d]."""
        return torch.relu(x_c @ self.W_enc.T + self.b_lat)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx [B, w] int64, vals [B, w]): the latents that fire, w the most in any row (dense compute)."""
        x = self.preprocess(x).to(self.W_enc.dtype)
        return compact(self.dense_acts(self.center(x)))

    def decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """x_hat [B, d] from (idx, vals), in the space after preprocess()."""
        from pipeline.kernels import decode

        return decode(idx, vals.to(self.W_dec.dtype), self.W_dec, backend=self.backend) + self.b_pre

    # ---- training
    @torch.no_grad()
    def candidates(self, x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                   matmul_dtype: torch.dtype | None) -> VirtualRows | None:
        """z = x_c W.T + b [B, n] without a graph (in matmul_dtype when given) -> its positive entries
        in virtual rows (`fired_entries`), or None when too many fire for the sparse path to pay."""
        low = matmul_dtype is not None and matmul_dtype != x_c.dtype
        z = (x_c.to(matmul_dtype) @ W.to(matmul_dtype).T + b.to(matmul_dtype)) if low else x_c @ W.T + b
        keep = z > 0
        if active_count(keep) > DENSE_ABOVE * keep.numel():
            return None
        return fired_entries(keep, None if low else z)

    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput:
        """(x_hat [B, d], idx [B, w], vals [B, w] differentiable, None) for a training-space batch x [B, d];
        counts the dead latents into view.n_dormant when training (view.settings set)."""
        from pipeline.kernels import encode_gather

        if view.settings is not None:
            view.n_dormant = int((view.since_fired >= view.settings.dormant_tokens).sum())
        x_c = self.center(x)
        fired = self.candidates(x_c, self.W_enc, self.b_lat, view.matmul_dtype)
        if fired is None:
            vals = self.dense_acts(x_c)
            idx = torch.arange(self.n_latents, device=x.device).expand(x.shape[0], -1)
            return TrainOutput(vals @ self.W_dec + self.b_pre, idx, vals, None)
        # empty slots masked: from a low-precision z the gather recomputes latent 0's value there
        vals = torch.relu(encode_gather(fired.inputs(x_c), self.W_enc, self.b_lat, fired.idx, backend=self.backend,
                                        pre=fired.pre, b_pre=self.gather_b_pre(x))) * fired.on
        x_hat = fired.decode(vals, self.W_dec, x.shape[0], self.backend) + self.b_pre
        return TrainOutput(x_hat, *fired.compact(vals, x.shape[0]), None)

    def train_loss(self, x: torch.Tensor, o: TrainOutput, fvu: torch.Tensor,
                   view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
        """FVU + lam * S (module docstring); returns (loss, lam * S for the log). Keeps what after_step
        needs: the batch, each row's squared error (for resampling) and the batch's L0 (for the controller)."""
        st = view.settings
        rows, var = batch_stats(x, view)
        penalty = penalty_weight(self, st, view) * sparsity(o.idx, o.vals, self.W_dec, rows, var)
        self.keep_batch(x, o, rows, view)
        return fvu + penalty, penalty.detach()

    def keep_batch(self, x: torch.Tensor, o: TrainOutput, rows: torch.Tensor, view: TrainView):
        """What after_step uses of this step's batch (references, no copies, no host sync): x, x_hat,
        and the whole batch's L0."""
        with torch.no_grad():
            l0 = view.global_sum((o.vals > 0).sum().to(x.dtype)) / rows
        self._batch = (x.detach(), o.x_hat.detach(), l0)

    def after_step(self, view: TrainView):
        """Unit decoder rows; then the controller's lam update and, when due, resampling."""
        super().after_step(view)
        st, batch, self._batch = view.settings, self._batch, None
        if st is None or batch is None:
            return
        x, x_hat, l0 = batch
        if st.target_l0 is not None:
            control_l1(self.l1_lambda, self.l0_error, l0, st.target_l0, control_rate(view.n_steps), view.step == 0)
        if calibrating(st, view):
            pre = self.center(x) @ self.W_enc.T + self.b_lat  # relu's z; gated's gate pi (b_lat = b_gate)
            shift_param(view.optimizer, self.b_lat, -batch_threshold(pre, st.target_l0, view))
        if resample_due(st, view):
            self.resample_dead(x, (x - x_hat).pow(2).sum(1), view)

    # ---- resampling
    def latent_params(self) -> list[torch.Tensor]:
        """The parameters with one row (dim 0) per latent: what a resampled latent reinitialises."""
        return [self.W_enc, self.b_lat, self.W_dec]

    @torch.no_grad()
    def reinit_rows(self, ids: torch.Tensor, dirs: torch.Tensor, enc_norm: torch.Tensor):
        """Latents ids [m] start again from unit directions dirs [m, d] (module docstring)."""
        self.W_dec[ids] = dirs.to(self.W_dec.dtype)
        self.W_enc[ids] = (dirs * (RESAMPLE_ENCODER_SCALE * enc_norm)).to(self.W_enc.dtype)
        self.b_lat[ids] = 0

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor, err: torch.Tensor, view: TrainView) -> torch.Tensor:
        """Reinitialise the latents silent for dormant_tokens towards rows of x [B, d] drawn with
        probability err**2 (err [B]: each row's squared error), reset their optimizer state and their
        silence count. Under torchrun each rank draws every W-th latent's row from its own rows and the
        ranks sum them, so all hold the same weights. Returns the latents reinitialised [m]."""
        from pipeline import dist
        from pipeline.loader import derive_seed

        dead = view.since_fired >= view.settings.dormant_tokens
        ids = dead.nonzero().squeeze(1)
        m = ids.numel()
        if m == 0:
            return ids
        rank, world = dist.rank_world()
        mine = torch.arange(m) % world == rank
        weights = err.double().pow(2).cpu()
        if not weights.sum() > 0:  # a perfect (or empty) batch: every row alike
            weights = torch.ones_like(weights)
        g = torch.Generator().manual_seed(derive_seed(view.step, rank, 0x5AE))
        count = int(mine.sum())
        rows = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
        if count:  # distinct rows while the batch has enough, so no two latents restart alike
            picks = torch.multinomial(weights, count, replacement=count > weights.numel(), generator=g)
            rows[mine.to(x.device)] = x[picks.to(x.device)] - self.b_pre
        rows = view.global_sum(rows)
        dirs = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        live = self.W_enc[~dead]
        enc_norm = live.norm(dim=1).mean() if live.shape[0] else self.W_enc.new_tensor(1.0)
        self.reinit_rows(ids, dirs, enc_norm)
        reset_optimizer_rows(view.optimizer, self.latent_params(), ids)
        view.since_fired[ids] = 0  # a new latent: silent from now on, not since its old self went quiet
        return ids

    def export_extras(self, fmt: str) -> tuple[dict, dict]:
        return {}, {}
