"""Stage 3: per-latent activation records for each trained SAE.

    saepipe collate CONFIG [--layers 3,4] [--force]    (every train.sweep member too)

The work is pipeline.collate's; this prints where to look when it is done.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import collate
from pipeline.config import Config
from pipeline.viewer import index_page


def run(cfg: Config, layers: list[int] | None = None, force: bool = False) -> list[Path]:
    viewers = collate.run(cfg, layers, force)
    print(f"all layers: {index_page(cfg.run_path).resolve()}")
    for page in viewers:
        print(f"viewer: {page.resolve()}")
    return viewers
