"""Stage 3: per-latent activation records for each trained SAE.

    saepipe collate CONFIG [--layers 3,4] [--force]

For every (layer, hook): one streaming pass over the stored activations through
<run_dir>/saes/<L>/<hook>/, written to <run_dir>/records/<L>/<hook>/ with a
static viewer. A folder whose `done` marker records the same SAE weights and
the same output-deciding collate settings is skipped unless force; one made
from anything else is redone, with a line saying what changed. Every input is
checked before anything is written, so a bad layer fails the whole command up
front, and each (layer, hook) is locked so two collates never share a folder.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from pipeline.collate import changed_settings, collate_sae, fingerprint, load_tokenizer, records_dir, sae_dir
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.fsio import recover_swap, run_lock
from pipeline.model import resolve_device
from pipeline.sae import TopKSAE
from pipeline.store import ActivationStore


def _check_sae(folder: Path, layer: int, hook: str, d_model: int):
    if not folder.exists():
        raise UserError(f"no trained SAE for layer {layer} hook {hook} (looked in {folder}); "
                        f"run `make train LAYERS={layer}` first")
    # A full load checks the weights against their `done` marker: a truncated or
    # corrupt file is refused here, before any layer's records are written.
    d_in = TopKSAE.load(folder).d_in
    if d_in != d_model:
        raise UserError(f"the SAE in {folder} takes d_in = {d_in}, but layer {layer} hook {hook} in the "
                        f"store has d_model = {d_model}; retrain it: make train LAYERS={layer} FORCE=1")


def run(cfg: Config, layers: list[int] | None = None, force: bool = False) -> list[Path]:
    c = cfg.collate
    layers = layers or c.layers or cfg.train.layers or cfg.harvest.layers
    hooks = c.hooks or cfg.train.hooks or cfg.harvest.hooks
    run_dir = cfg.run_path
    device = resolve_device(c.device, key="collate.device")
    store = ActivationStore(run_dir)
    pairs = [(layer, hook) for layer in layers for hook in hooks]

    with ExitStack() as locks:
        # Every lock before any work: a concurrent collate is refused now, not halfway.
        for layer, hook in pairs:
            locks.enter_context(run_lock(run_dir, f"collate.{layer}.{hook}", f"layer {layer} hook {hook} of {run_dir}"))

        todo = []
        for layer, hook in pairs:
            out = records_dir(run_dir, layer, hook)
            recover_swap(out)
            changes = changed_settings(out, fingerprint(c, sae_dir(run_dir, layer, hook)))
            if changes == [] and not force:
                print(f"collate {layer}/{hook}: already done in {out} (--force to redo)")
                continue
            if changes:
                print(f"collate {layer}/{hook}: redoing {out}, made from other inputs: {'; '.join(changes)}")
            todo.append((layer, hook))

        tokenizer = None
        if todo:
            store.tokens  # raises when the tokens are missing
            for layer, hook in todo:
                store.array(layer, hook)
                _check_sae(sae_dir(run_dir, layer, hook), layer, hook, store.d_model(layer, hook))
            tokenizer = load_tokenizer(store)

        for layer, hook in todo:
            folder = sae_dir(run_dir, layer, hook)
            sae = TopKSAE.load(folder, device=device)
            collate_sae(store, layer, hook, sae, folder, tokenizer, c, records_dir(run_dir, layer, hook), device)
            del sae
            if device.type == "cuda":
                torch.cuda.empty_cache()

    viewers = [records_dir(run_dir, layer, hook) / "viewer.html" for layer, hook in pairs]
    for page in viewers:
        print(f"viewer: {page.resolve()}")
    return viewers
