"""The Matryoshka BatchTopK sparse autoencoder (Bussmann et al., 2025, arXiv 2503.17547).

One BatchTopK encoder (batchtopk.py: training keeps the batch's k * B largest activations,
inference the ones above the learnt threshold); the dictionary is read as nested prefixes
[0, m_1) in [0, m_2) in ... in [0, m_P = n), and the loss asks every prefix to reconstruct
the batch on its own:

    x_hat_i = sum over the kept latents j < m_i of f_j W_dec[j] + b_pre     [B, d], i = 1..P
    loss    = sum_i w_i FVU(x, x_hat_i) + aux_alpha * AuxK                  w_i = 1 by default

each FVU with the whole batch's denominator (pipeline.train.reconstruction_loss, what the
trainer's FVU of the whole dictionary, x_hat_P, already is). So the first latents learn the
most general directions and later groups refine them, rather than splitting them up.

The kept entries are packed into virtual rows by (batch row, prefix group) (batchtopk.py), so
one decode gives every row's per-group reconstructions parts [B, P, d] and the prefixes are
their running sums: the P reconstructions cost one sparse decode, not P.

Settings: `prefixes`, fractions of the width (default 1/32, 1/16, 1/8, 1/4, 1/2, 3/4, 1: each
prefix twice the one before, then the second half in two), rounded to latent counts
m_i = round(f_i n). cfg.json records `prefixes` and `prefix_sizes` (the m_i); `groups()` gives
each latent's group (0 = the first prefix), for the viewer. Exported to SAELens as BatchTopK's
(a jumprelu with the threshold): the prefixes only shape training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.saes import register
from pipeline.saes.base import TrainOutput, TrainView
from pipeline.saes.batchtopk import BatchTopKSAE, BatchTopKSettings

# Why these: on SmolLM2 block 15 (seed 0, 4608 latents, one epoch, bench/RESULTS.md) they cost delta
# CE 0.0947 against 0.1048 for 1/32, 3/32, 7/32, 15/32, 1 (the example: group sizes doubling)
# and 0.1110 for 1/16, 1/4, 1: measured, not derived, more and finer prefixes toward the whole
# width cost the whole dictionary's reconstruction less than fewer, coarser ones.
PREFIXES = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0]


def prefix_sizes(prefixes: list[float], n_latents: int) -> list[int]:
    """The latent count of each prefix, m_i = round(f_i * n_latents)."""
    return [round(f * n_latents) for f in prefixes]


def _check_sizes(prefixes: list[float], n_latents: int) -> str | None:
    """Why these prefixes cannot split n_latents latents, or None."""
    sizes = prefix_sizes(prefixes, n_latents)
    if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        return f"give prefix sizes {sizes}, and each prefix must hold at least one latent more than the one before"
    return None


@dataclass
class MatryoshkaSettings(BatchTopKSettings):
    """`train.sae` of a Matryoshka SAE: BatchTopK's settings and the nested prefixes."""
    architecture: str = setting("matryoshka", "the dictionary: matryoshka (this table)")
    prefixes: list[float] = setting(PREFIXES, "the nested prefixes of the dictionary as fractions of n_latents, "
                                              "increasing, the last 1: each one's reconstruction error is a "
                                              "term of the loss")
    prefix_weights: list[float] | None = setting(None, "each prefix's weight in the loss (one per prefix, >= 0); "
                                                       "null = 1 each")

    def validate(self, where):
        from pipeline.config import ConfigError

        super().validate(where)
        p = self.prefixes
        if not p or any(not 0 < f <= 1 for f in p) or any(b <= a for a, b in zip(p, p[1:])) or p[-1] != 1:
            raise ConfigError(f"{where}: train.sae.prefixes = {p} must be increasing fractions in (0, 1], the last 1")
        w = self.prefix_weights
        if w is not None and (len(w) != len(p) or any(not v >= 0 for v in w) or not sum(w) > 0):
            raise ConfigError(f"{where}: train.sae.prefix_weights = {w} must be {len(p)} weights >= 0 (one per "
                              "prefix), not all 0")

    def model_keys(self) -> tuple[str, ...]:
        return ("k", "prefixes")

    def resolve(self, d_model: int, n_latents: int, batch_size: int, at: str, width: str) -> "MatryoshkaSettings":
        why = _check_sizes(self.prefixes, n_latents)
        if why:
            raise UserError(f"{at}train.sae.prefixes = {self.prefixes} of {width} {why}; use fewer prefixes or "
                            "raise n_latents")
        return super().resolve(d_model, n_latents, batch_size, at, width)


class MatryoshkaOutput(NamedTuple):
    """TrainOutput's fields (what the trainer reads), and every prefix's reconstruction."""
    x_hat: torch.Tensor  # [B, d] the whole dictionary's reconstruction (the last prefix's)
    idx: torch.Tensor  # [B, w]
    vals: torch.Tensor  # [B, w]
    aux_hat: torch.Tensor | None  # [B, d] or None
    prefix_hats: torch.Tensor  # [B, P, d] prefix_hats[:, i] = x_hat_i (with b_pre)


@register
class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    Settings = MatryoshkaSettings

    def __init__(self, d_in: int, n_latents: int, k: int, prefixes: list[float] = PREFIXES,
                 normalize: str = "none", backend: str = "auto"):
        why = _check_sizes(prefixes, n_latents)
        if why:
            raise UserError(f"prefixes {prefixes} of n_latents {n_latents} {why}")
        super().__init__(d_in, n_latents, k, normalize, backend)
        self.prefixes = [float(f) for f in prefixes]
        self.prefix_sizes = prefix_sizes(prefixes, n_latents)
        # Group boundaries m_1 .. m_{P-1}: latent j is in group g when m_g <= j < m_{g+1} (m_0 = 0).
        self.register_buffer("bounds", torch.tensor(self.prefix_sizes[:-1], dtype=torch.long), persistent=False)

    @property
    def n_groups(self) -> int:
        return len(self.prefix_sizes)

    @property
    def pack_width(self) -> int:
        # A row's kept latents split over P groups: narrower virtual rows waste fewer slots
        # (padding costs up to width - 1 slots per (row, group)), wider ones fewer rows.
        return max(4, self.k // 4)

    def settings(self) -> dict:
        return {"k": self.k, "prefixes": self.prefixes, "prefix_sizes": self.prefix_sizes}

    @classmethod
    def from_cfg(cls, d_in: int, n_latents: int, settings: dict, normalize: str = "none",
                 backend: str = "auto") -> "MatryoshkaSAE":
        return cls(d_in, n_latents, settings["k"], settings.get("prefixes", PREFIXES), normalize, backend)

    def group_of(self, cols: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(cols, self.bounds, right=True)

    def groups(self) -> torch.Tensor:
        """[n] int64: each latent's prefix group, 0 for the first prefix's latents (what the viewer shows)."""
        return self.group_of(torch.arange(self.n_latents, device=self.bounds.device))

    def latent_groups(self) -> tuple[str, torch.Tensor]:
        return "prefix group", self.groups()

    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput | MatryoshkaOutput:
        """BatchTopK's training forward with every prefix's reconstruction; without settings
        (evaluation) BatchTopK's threshold rule."""
        if view.settings is None:
            return super().train_forward(x, view)
        o, parts = self.train_parts(x, view)
        prefix_hats = parts.cumsum(1) + self.b_pre  # the groups' reconstructions summed up to each prefix
        return MatryoshkaOutput(prefix_hats[:, -1], o.idx, o.vals, o.aux_hat, prefix_hats)

    def train_loss(self, x: torch.Tensor, o: MatryoshkaOutput, fvu: torch.Tensor,
                   view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
        """sum_i w_i FVU(x, x_hat_i) + aux_alpha * AuxK; `fvu` (the trainer's) is the last prefix's."""
        from pipeline.train import reconstruction_loss

        st = view.settings
        w = st.prefix_weights or [1.0] * self.n_groups
        loss, aux = super().train_loss(x, o, w[-1] * fvu, view)  # TopK's: the FVU term + aux_alpha * AuxK
        for i in range(self.n_groups - 1):
            if w[i]:
                loss = loss + w[i] * reconstruction_loss(x, o.prefix_hats[:, i])[0]
        return loss, aux

