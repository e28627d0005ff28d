"""Stage 1: run the model over the dataset and store layer activations.

    saepipe harvest configs/demo.yaml --layers 3,4
    saepipe harvest CONFIG --repair   rewrite exactly the missing or corrupt chunks
    saepipe harvest CONFIG --force    start the config's arrays over with its current settings

The work, its order and its guarantees: pipeline/harvest.py.
"""

from __future__ import annotations

from pipeline import harvest
from pipeline.config import Config


def run(cfg: Config, layers: list[int] | None = None, repair: bool = False, force: bool = False,
        progress: bool = True) -> dict:
    return harvest.run(cfg, layers, progress=progress, repair=repair, force=force)
