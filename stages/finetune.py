"""Stage 2b: trained SAEs fine-tuned on the language model's KL.

    saepipe finetune CONFIG [--layers 15] [--force]     (every train.sweep member too)

The work is pipeline.finetune's: each trained SAE's copy trained on KL(clean || spliced)
through the frozen model, on the store's own token windows, into <hook>@kl/ (a member's
<hook>@<member>-kl/) beside it; `saepipe eval` then shows both.
"""

from __future__ import annotations

from pipeline import finetune
from pipeline.config import Config


def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True) -> list[dict]:
    return finetune.run(cfg, layers, force, progress)
