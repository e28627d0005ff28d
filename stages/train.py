"""Stage 2: train one TopK SAE per harvested (layer, hook).

    saepipe train configs/demo.yaml --layers 5

Every (layer, hook) is planned and checked before any is trained, so a bad
layer, width, k or NaN-laden store fails before a file is written. Then the
lock of every SAE to train is taken before any is trained: a second
`saepipe train` of one of them is refused with one line. Finished SAEs are
skipped unless --force; interrupted ones resume from their last checkpoint.
Output: <run_dir>/saes/<layer>/<hook>/ (see pipeline/train.py).
"""

from __future__ import annotations

from contextlib import ExitStack

from pipeline import train as trainer
from pipeline.config import Config
from pipeline.store import ActivationStore


def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True) -> dict:
    store = ActivationStore(cfg.run_dir)
    layers = list(dict.fromkeys(layers or cfg.train.layers or cfg.harvest.layers))
    hooks = list(dict.fromkeys(cfg.train.hooks or cfg.harvest.hooks))
    plans = [trainer.plan(cfg, store, layer, hook, force) for layer in layers for hook in hooks]
    todo = []
    for p in plans:
        if p.status == "done" and p.out.exists():
            print(f"train: {p.name}: already trained in {p.out}; skipping (--force retrains it)")
        else:  # to train, or a finished SAE whose swap a kill cut short: only under its lock
            todo.append(p)
    trained = {}
    with ExitStack() as locks:
        for p in todo:
            locks.enter_context(trainer.lock(cfg.run_dir, p.layer, p.hook))
        for p in todo:
            trained[(p.layer, p.hook)] = trainer.train(store, p, progress=progress)
    return trained
