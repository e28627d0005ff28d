"""Stage 2: train one TopK SAE per harvested (layer, hook).

    saepipe train configs/demo.yaml --layers 5

The work is pipeline.train's: every (layer, hook) is planned and checked
before any is trained, every SAE's lock taken before any is trained, finished
SAEs skipped unless --force, interrupted ones resumed from their checkpoint.
With train.sweep, the members of each (layer, hook) train from one pass over its batches.
Output: <run_dir>/saes/<layer>/<hook>/ and <hook>@<member>/ (see pipeline/train.py).
"""

from __future__ import annotations

from pipeline import train as trainer
from pipeline.config import Config


def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True) -> dict:
    return trainer.run(cfg, layers, force, progress)
