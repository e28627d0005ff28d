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


def before_after(rows: list[tuple[int, str, dict]]) -> list[str]:
    """One line per KL fine-tuned SAE evaluated beside its base (pipeline.finetune): what it changed."""
    from pipeline.paths import FINETUNED, finetuned, split_leaf

    by_name = {(layer, hook): r for layer, hook, r in rows}
    out = []
    for (layer, name), r in by_name.items():
        hook, member = split_leaf(name)
        if member is None or not (member == FINETUNED or member.endswith("-" + FINETUNED)):
            continue
        base_member = None if member == FINETUNED else member[: -len(FINETUNED) - 1]
        base = by_name.get((layer, f"{hook}@{base_member}" if base_member else hook))
        if base is None or finetuned(base_member) != member:
            continue
        out.append(f"fine-tune: layer {layer} {name}: delta_ce {_num(base.get('delta_ce'))} -> "
                   f"{_num(r.get('delta_ce'))}, kl {_num(base.get('kl'))} -> {_num(r.get('kl'))}, "
                   f"l0 {_num(base.get('l0'))} -> {_num(r.get('l0'))}")
    return out


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True):
    rows = evaluator.run(cfg, layers, force, progress)
    print(table(rows))
    for line in before_after(rows):
        print(line)
    page = index_page(cfg.run_path)
    if page.exists():
        print(f"all layers: {page.resolve()}")
    return rows
