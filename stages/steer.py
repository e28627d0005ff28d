"""Steer the model with one latent of a trained SAE.

    saepipe steer CONFIG --layer 3 --latent 17 --strength 8 --prompt "The cat" [--member k64]

The work is pipeline.steer's: the clean and the steered greedy continuations,
printed one row per strength.
"""

from __future__ import annotations

from pipeline import steer
from pipeline.config import Config


def run(cfg: Config, layer: int, latent: int, strengths: list[float], prompt: str, hook: str | None = None,
        max_new_tokens: int = 32, member: str | None = None) -> dict[str, list[int]]:
    return steer.run(cfg, layer, latent, strengths, prompt, hook, max_new_tokens, member=member)
