"""Stage 5: N2G explanations of every live latent, scored on held-out windows.

    saepipe explain CONFIG [--layers 3,4] [--force]    (every train.sweep member too)

The work is pipeline.collate.explain's; this says where the files are.
"""

from __future__ import annotations

from pipeline.collate import explain
from pipeline.config import Config


def run(cfg: Config, layers: list[int] | None = None, force: bool = False) -> list[dict]:
    return explain.run(cfg, layers, force)
