"""Stage 4: what each trained SAE does to the language model's loss.

    saepipe eval CONFIG [--layers 3,4] [--force]    (every train.sweep member too)

The work is pipeline.eval's; this prints one table row per SAE (and eval draws each
(layer, hook)'s frontier: saes/<L>/frontier-<hook>.png).
"""

from __future__ import annotations

from pipeline import eval as evaluator
from pipeline.config import Config
from pipeline.viewer import index_page

_COLUMNS = ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "ce_recovered", "kl", "fvu", "l0", "dead_frac")


def table(rows: list[tuple[int, str, dict]]) -> str:
    head = ["layer", "hook", "architecture", *_COLUMNS, "n_tokens"]
    lines = [[str(layer), hook, str(r.get("architecture")), *(_num(r.get(c)) for c in _COLUMNS), str(r.get("n_tokens"))]
             for layer, hook, r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True):
    rows = evaluator.run(cfg, layers, force, progress)
    print(table(rows))
    page = index_page(cfg.run_path)
    if page.exists():
        print(f"all layers: {page.resolve()}")
    return rows
