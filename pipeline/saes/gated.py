"""The Gated SAE (Rajamanoharan et al., 2024, arXiv 2404.16014; SAELens `gated`).

One set of encoder directions decides which latents fire (the gate) and, rescaled per latent,
how strongly (the magnitude):

    x_c    = x - b_pre                                       [B, d]
    pi     = W_enc x_c + b_lat            (pi_gate; b_lat is b_gate)          [B, n]
    mag    = (exp(r_mag) * W_enc) x_c + b_mag   (W_mag: row i of W_enc times exp(r_mag[i]))
    f      = 1[pi > 0] * relu(mag)                           [B, n]
    x_hat  = sum_i f_i W_dec[i] + b_pre
    loss   = FVU + lam * S(relu(pi)) + A
             S: the L1 of relu(pi) weighted by the decoder rows' norms, over the batch's rms (relu.py)
             A = sum |x - x_hat_frozen|^2 / (the FVU's denominator),
                 x_hat_frozen = sum_i relu(pi_i) W_dec[i] + b_pre through a detached copy of the
                 decoder (W_dec and b_pre), as dictionary_learning does: A trains the gate to
                 reconstruct on its own, without pulling the decoder towards the gate's scale.

The step 1[pi > 0] passes no gradient: b_gate learns from S and A only, b_mag and r_mag from the
reconstruction, the shared W_enc from all three. lam's warm-up, the target_l0 controller, dead-latent resampling
(which also zeroes the latent's b_mag and r_mag) and the unit decoder rows are relu.py's.

Training keeps the entries whose gate is open (in relu.fired_entries' virtual rows): S and A
need relu(pi) there and nowhere else, and f is 0 elsewhere, so the sparse products are exact.

Its settings in cfg.json: `l1_coefficient`, `target_l0` (what it was trained with). Export:
SAELens `gated` (W_enc, b_gate, r_mag, b_mag, W_dec, b_dec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import setting
from pipeline.saes import register
from pipeline.saes.base import TrainOutput, TrainView
from pipeline.saes.relu import ReluSAE, ReluSettings, batch_stats, penalty_weight, sparsity


@dataclass
class GatedSettings(ReluSettings):
    """`train.sae` of a Gated SAE: relu's settings (its penalty applies to relu(pi_gate))."""
    architecture: str = setting("gated", "the dictionary: gated (this table), a Gated SAE: a gate and a "
                                         "per-latent magnitude rescale of the same directions (SAELens `gated`)")


@register
class GatedSAE(ReluSAE):
    architecture = "gated"
    Settings = GatedSettings
    exports = {"saelens": "gated"}

    def __init__(self, d_in: int, n_latents: int, l1_coefficient: float = GatedSettings.l1_coefficient,
                 target_l0: float | None = None, normalize: str = "none", backend: str = "auto"):
        super().__init__(d_in, n_latents, l1_coefficient, target_l0, normalize, backend)
        self._gate = None  # this step's relu(pi) at the kept latents [B, w], from train_forward to train_loss

    def add_parameters(self):
        self.b_mag = nn.Parameter(torch.zeros(self.n_latents))
        self.r_mag = nn.Parameter(torch.zeros(self.n_latents))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """relu's init (unit decoder rows, encoder the same directions at norm min(1, d / n)); magnitudes
        start equal to the gate's pre-activations: r_mag = 0, b_mag = 0."""
        super().reset_parameters(generator)
        self.b_mag.zero_()
        self.r_mag.zero_()

    def W_mag(self) -> torch.Tensor:
        """exp(r_mag) * W_enc, row-wise [n, d]."""
        return self.W_enc * self.r_mag.exp().unsqueeze(1)

    # ---- inference
    def dense_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """f = 1[pi > 0] * relu(mag) [B, n] for centred, preprocessed x_c [B, d]."""
        pi = x_c @ self.W_enc.T + self.b_lat
        return (pi > 0).to(x_c.dtype) * torch.relu(x_c @ self.W_mag().T + self.b_mag)

    # ---- training
    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput:
        """(x_hat, idx [B, w], vals [B, w], aux_hat) for a training-space batch x [B, d]: idx the latents
        whose gate is open in each row (padded with closed ones, whose vals are 0); aux_hat the gate's
        frozen-decoder reconstruction when training (view.settings set), else None."""
        from pipeline.kernels import encode_gather

        training = view.settings is not None
        if training:
            view.n_dormant = int((view.since_fired >= view.settings.dormant_tokens).sum())
        B = x.shape[0]
        x_c = self.center(x)
        fired = self.candidates(x_c, self.W_enc, self.b_lat, view.matmul_dtype)
        W_mag = self.W_mag()
        if fired is None:
            pi = x_c @ self.W_enc.T + self.b_lat
            vals = (pi.detach() > 0).to(x.dtype) * torch.relu(x_c @ W_mag.T + self.b_mag)
            idx = torch.arange(self.n_latents, device=x.device).expand(B, -1)
            x_hat = vals @ self.W_dec + self.b_pre
        else:  # on relu's virtual rows (relu.fired_entries); empty slots masked, as relu's
            b_pre, x_v = self.gather_b_pre(x), fired.inputs(x_c)
            pi = encode_gather(x_v, self.W_enc, self.b_lat, fired.idx, backend=self.backend, pre=fired.pre,
                               b_pre=b_pre)
            mag = encode_gather(x_v, W_mag, self.b_mag, fired.idx, backend=self.backend, b_pre=b_pre)
            vals = (pi.detach() > 0).to(x.dtype) * torch.relu(mag) * fired.on
            x_hat = fired.decode(vals, self.W_dec, B, self.backend) + self.b_pre
        if not training:
            return TrainOutput(x_hat, *((idx, vals) if fired is None else fired.compact(vals, B)), None)
        # A copy, not W_dec.detach(): the trainer's Adam may step W_dec in place inside the backward
        # before this product's backward has read it.
        frozen = self.W_dec.detach().clone()
        if fired is None:
            gate = torch.relu(pi)
            aux_hat = gate @ frozen
        else:
            gate = torch.relu(pi) * fired.on
            aux_hat = fired.decode(gate, frozen, B, self.backend)
            idx, both = fired.compact(torch.stack([vals, gate], -1), B)
            vals, gate = both.unbind(-1)
        self._gate = gate
        return TrainOutput(x_hat, idx, vals, aux_hat)

    def train_loss(self, x: torch.Tensor, o: TrainOutput, fvu: torch.Tensor,
                   view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
        """FVU + lam * S(relu(pi)) + A (module docstring); returns (loss, lam * S + A for the log)."""
        st, gate, self._gate = view.settings, self._gate, None
        rows, var = batch_stats(x, view)
        penalty = penalty_weight(self, st, view) * sparsity(o.idx, gate, self.W_dec, rows, var)
        aux = (x - self.b_pre.detach() - o.aux_hat).pow(2).sum() / var
        self.keep_batch(x, o, rows, view)
        extra = penalty + aux
        return fvu + extra, extra.detach()

    # ---- resampling
    def latent_params(self) -> list[torch.Tensor]:
        return [self.W_enc, self.b_lat, self.W_dec, self.b_mag, self.r_mag]

    @torch.no_grad()
    def reinit_rows(self, ids: torch.Tensor, dirs: torch.Tensor, enc_norm: torch.Tensor):
        super().reinit_rows(ids, dirs, enc_norm)
        self.b_mag[ids] = 0
        self.r_mag[ids] = 0

    def export_extras(self, fmt: str) -> tuple[dict, dict]:
        """SAELens' gated SAE: b_gate (our b_lat), b_mag, r_mag beside W_enc, W_dec, b_dec, and no b_enc
        (its GatedSAE has none, and loads its weights strictly)."""
        return {"b_enc": None, "b_gate": self.b_lat, "b_mag": self.b_mag, "r_mag": self.r_mag}, {}
