"""The optimizers `train.optimizer` names, and their learning-rate rules.

    adam        torch's Adam (tiny eps) under the lr schedule of pipeline.train
                (warmup, then a cosine to 0 by default).
    signum_sf   schedule-free sign descent: the gradient is taken at y, a point
                between the fast iterate z and the running average x, and z
                moves by lr * sign(grad). x, the uniform average of the z's, is
                what eval sees and what gets saved.

Schedule-free (Defazio et al. 2024, "The Road Less Scheduled") with beta the
interpolation weight and c_t the averaging weight (1/t under a constant lr):

    y_t     = (1 - beta) z_t + beta x_t          the weights the step sees
    z_t+1   = z_t - lr_t sign(g(y_t))
    x_t+1   = (1 - c_t+1) x_t + c_t+1 z_t+1      c_t+1 = lr_t^2 / sum_i<=t lr_i^2

Only y and z are stored (x = (y - (1 - beta) z) / beta), so the state is
one tensor per parameter, as with signum, half of Adam's.

Learning-rate rules (`default_lr`), so that a user never sweeps: each is
proportional to 1/sqrt(n_latents) (sparsify's form: wider SAEs see each
latent's gradient less often, and larger steps kill latents), with the base
measured by bench/quality.py (docs/recipe.md):

    adam       2.4e-3 * sqrt(2**14 / n_latents) * sqrt(768 / d_model), at most 1e-2
    signum_sf  2.5e-3 * sqrt(2**14 / n_latents)

Adam's step moves every weight by about lr whatever its gradient's size, so a
pre-activation, a sum over d_model inputs, moves by about lr * sqrt(d_model):
hence Adam's second factor. Measured: MiniLM (d 384, n 3072) is best near 8e-3
(FVU 0.107; 6.5e-3 gives 0.109, 5e-3 0.114), SmolLM2 block 15 (d 576, n 4608)
leaves 21% dead latents at 6.6e-3 and 13% at 5.3e-3 (sparsify: 14%); the
1/sqrt(n) rule alone cannot give both, the two factors give 7.8e-3 and 5.2e-3.
sparsify's Adam rule, 2e-4/sqrt(n / 2**14), is 17x too timid (FVU 0.195 vs
0.107). signum_sf is sparsify's 5e-3 halved (2.4% dead latents instead of 11%
at the same FVU).
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adam", "signum_sf")

# lr at n_latents = 2**14 (and, for adam, d_model = 768); the rule scales it by 1/sqrt(n / 2**14)
BASE_LR = {"adam": 2.4e-3, "signum_sf": 2.5e-3}
# whose rule also scales by 1/sqrt(d_model / 768)
PER_D_MODEL = {"adam"}


# ... and caps it: below ~2000 latents the rule would give Adam steps that leave latents dead
# (a planted dictionary of 128 atoms: 12% dead at the rule's 0.04, 3% at 0.01)
MAX_LR = {"adam": 1e-2, "signum_sf": math.inf}


def default_lr(optimizer: str, n_latents: int, d_model: int) -> float:
    lr = BASE_LR[optimizer] / math.sqrt(n_latents / 2**14)
    if optimizer in PER_D_MODEL:
        lr /= math.sqrt(d_model / 768)
    return min(MAX_LR[optimizer], lr)


def make(name: str, params, lr: float, adam_betas=(0.9, 0.999), adam_eps: float = 6.25e-10,
         sf_beta: float = 0.95) -> torch.optim.Optimizer:
    if name == "adam":
        params = list(params)
        # fused: one pass over each tensor instead of ~6 (10x faster on CPU at 2x16384x768 weights)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
        return torch.optim.Adam(params, lr=lr, betas=tuple(adam_betas), eps=adam_eps, fused=fused)
    if name == "signum_sf":
        return ScheduleFreeSign(params, lr=lr, beta=sf_beta)
    raise ValueError(f"unknown optimizer {name!r}")


SCHEDULE_FREE = {"signum_sf"}  # these only warm up: their running average does a decay's work


def is_schedule_free(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, ScheduleFreeSign)


class ScheduleFreeSign(torch.optim.Optimizer):
    """Schedule-free sign descent on params that hold y; see the module docstring.

    `averaged()` gives x for every param (eval and save); `state_dict` holds z
    and the running sum of lr^2, so a resumed run continues bit for bit.
    """

    def __init__(self, params, lr: float, beta: float = 0.95):
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        super().__init__(params, {"lr": lr, "beta": beta, "lr_sq_sum": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            lr, beta = group["lr"], group["beta"]  # a warmup lowers lr, and with it the weight of early z's
            group["lr_sq_sum"] += lr * lr
            c = lr * lr / group["lr_sq_sum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                z = state["z"]
                # y_t+1 = (1 - c) y_t + c z_t - lr (1 - beta (1 - c)) sign(g);  z_t+1 = z_t - lr sign(g)
                s = p.grad.sign()
                p.lerp_(z, c)
                p.add_(s, alpha=-lr * (1 - beta * (1 - c)))
                z.add_(s, alpha=-lr)

    @torch.no_grad()
    def averaged(self, p: torch.Tensor) -> torch.Tensor:
        """x for param p: the average the eval and the saved SAE use."""
        z = self.state[p].get("z")
        if z is None:  # no step yet: x = y = z
            return p.detach().clone()
        beta = self._group(p)["beta"]
        return (p - (1 - beta) * z) / beta

    def _group(self, p):
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("param not in this optimizer")
