"""How well a dictionary reconstructs its activations: the one definition of FVU, normalised
MSE, L0 and dead latents that train's eval rows, cfg.json, eval.json and the tables report.

    fvu        sum ||x - x_hat||^2 / sum ||x - mean(x)||^2     over every row seen
    nmse       mean over rows of ||x - x_hat||^2 / ||x||^2     (OpenAI's per-token normalised MSE)
    l0         latents firing (activation > 0) per row
    dead_frac  latents that never fired on these rows
    density    per latent, the fraction of rows it fired on

Sums are float64 and taken a batch at a time, so a stream of any length costs O(d + n) memory.

Every report says which space and which tokens its numbers are of (docs/results.md):

    fvu_raw    FVU of the activations as the model holds them (the field's FVU; `saepipe eval`'s
               `fvu` is this one, on its own held-out windows)
    fvu        train's: in the SAE's training space, which differs from the raw one when it
               normalises (normalize: layer_norm divides each row by its spread, so tokens of huge
               norm stop dominating the sum)
    dead_frac  over the tokens of that report: train's held-out store tokens, eval's windows;
               collate's `dead` counts over the whole store
"""

from __future__ import annotations

import torch


class ReconStats:
    def __init__(self, d: int, n_latents: int, device):
        f64 = {"dtype": torch.float64, "device": device}
        self.sum_x = torch.zeros(d, **f64)
        self.sum_x2 = torch.zeros((), **f64)
        self.se = torch.zeros((), **f64)
        self.nmse = torch.zeros((), **f64)
        self.fired = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.active = torch.zeros((), dtype=torch.long, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor):
        """x, x_hat [B, d] in one space; idx, vals [B, w] the latents encode() kept (vals > 0: fired)."""
        xd, ed = x.double(), (x.double() - x_hat.double())
        self.sum_x += xd.sum(0)
        self.sum_x2 += xd.pow(2).sum()
        err = ed.pow(2).sum(1)
        self.se += err.sum()
        self.nmse += (err / xd.pow(2).sum(1).clamp_min(1e-30)).sum()
        on = vals > 0
        self.active += on.sum()
        self.fired.scatter_add_(0, idx.reshape(-1), on.long().reshape(-1))
        self.rows += x.shape[0]

    def density(self) -> torch.Tensor:
        return self.fired.double().cpu() / max(self.rows, 1)

    def result(self) -> dict:
        """fvu, nmse, explained_variance, l0, dead_frac (NaN for the ratios before any row)."""
        n = self.rows
        if n == 0:
            nan = float("nan")
            return {"fvu": nan, "nmse": nan, "explained_variance": nan, "l0": 0.0, "dead_frac": nan}
        var = (self.sum_x2 - self.sum_x.pow(2).sum() / n).item()
        fvu = self.se.item() / max(var, 1e-30)
        return {"fvu": fvu, "nmse": self.nmse.item() / n, "explained_variance": 1 - fvu,
                "l0": self.active.item() / n, "dead_frac": (self.fired == 0).float().mean().item()}


def fvu_space(sae) -> str:
    """What train's `fvu` of this Dictionary is measured in: "layer-normed" when it normalises its
    input (a transcoder's target never is), else "raw" (input_scale cancels in the ratio)."""
    return "layer-normed" if sae.normalize == "layer_norm" and not sae.transcoder else "raw"


def describe(ev: dict, space: str) -> str:
    """Train's final held-out numbers in one phrase that names their space and their tokens:
    "held-out FVU 0.1787 layer-normed, 0.0199 raw; dead 1.2%; on 18,900 held-out store tokens"."""
    fvu = f"held-out FVU {ev['fvu']:.4f} {space}"
    if space != "raw" and ev.get("fvu_raw") is not None:
        fvu += f", {ev['fvu_raw']:.4f} raw"
    return f"{fvu}; dead {ev['dead_frac']:.1%}; on {ev['eval_tokens']:,} held-out store tokens"
