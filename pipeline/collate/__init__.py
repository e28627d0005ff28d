"""Collate: per-latent activation records for each trained SAE, in one streaming pass.

For every (layer, hook): the stored activations through <run_dir>/saes/<L>/<hook>/,
written to <run_dir>/records/<L>/<hook>/ with a static viewer, then one index
page, <run_dir>/records/index.html, linking every finished layer's viewer. With
train.sweep, every member's SAE (<hook>@<member>, pipeline.paths) gets its own
records folder the same way; the members of one (layer, hook) share pass 1
(each batch read once, encoded by every member).

    plan   lock every (layer, hook), then decide what to do and check every
           input the work needs (store arrays, tokens, SAEs, tokenizer) before
           anything is written: a bad layer fails the whole command up front
    run    for each (layer, hook) to do, collate_sae:
             scan         pass 1: every row through the SAE (every member's, for
                          a sweep) into fixed-size per-latent state
                          (pipeline.collate.scan, pipeline.collate.accumulators)
             windows      pass 2: re-read only the picked sequences and cut the
                          records' windows (pipeline.collate.windows)
             logit lens   each decoder row through the final norm and unembedding, and how
                          peaked that is (pipeline.collate.records; the model's LM head is
                          loaded once, in plan)
             neighbours   each latent's nearest others by decoder cosine (records); its
                          co-firing partners were counted in the scan (accumulators)
             write        the files, `done` last (pipeline.collate.records, pipeline.viewer)

A folder whose `done` marker records the same SAE weights and the same
output-deciding settings is skipped unless force; one made from anything else
is redone, with a line saying what changed. Work happens in `<out>.partial/`,
which takes the final name whole (fsio.swap_dir), so an interrupted run never
looks finished and the old records keep the name until then.

Memory is O(n_latents * (n_top + n_random + hist_max_bins * n_per_quantile)), plus
n_latents² int32 co-firing counts up to collate.cooccurrence_max_latents, plus
one batch (the quantile samples keep n_per_quantile per histogram bin until the
end, when the intervals are known): never the dense [tokens, latents] matrix,
never all nonzeros.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline import viewer
from pipeline.collate import records
from pipeline.config import CollateConfig, Config
from pipeline.errors import UserError
from pipeline.fsio import recover_swap, swap_dir, target_locks, tree_size
from pipeline.metrics import fvu_space
from pipeline.model import resolve_device
from pipeline.paths import leaf, records_dir, sae_dir
from pipeline.saes import Dictionary, load_sae, saved_cfg, verify_saved
# The module, not its function: `pipeline.collate.scan` must stay the submodule for its importers.
from pipeline.collate import scan as scanning
from pipeline.store import ActivationStore, Location
from pipeline.collate.windows import TokenText, cut_windows, pick, store_tokenizer


# ---------------------------------------------------------------------------
# Plan: what to do, every input checked


@dataclass
class Target:
    layer: int
    hook: str
    sae: Path  # the SAE folder
    out: Path  # the records folder
    changes: list[str] | None  # None: no finished records; []: finished from these very inputs
    member: str | None = None  # the train.sweep member; None: the plain SAE

    @property
    def name(self) -> str:
        return f"{self.layer}/{leaf(self.hook, self.member)}"


@dataclass
class Plan:
    cfg: CollateConfig
    run_dir: Path
    device: torch.device
    store: ActivationStore
    targets: list[Target]
    todo: list[Target]  # what run() collates, in order
    tokenizer: object | None  # the store's tokenizer; None when there is nothing to do
    lens: records.Lens | str | None  # the logit lens' weights, or why there is none; None: nothing to do


def _check_sae(folder: Path, layer: int, hook: str, d_model: int, member: str | None = None):
    hook = leaf(hook, member)
    if not folder.exists():
        raise UserError(f"no trained SAE for layer {layer} hook {hook} (looked in {folder}); "
                        f"run `make train LAYERS={layer}` first")
    # The cheap check (marker present, weights of the recorded size) up front, before any
    # layer's records are written; the sha256 is checked once, by the load that does the work.
    cfg = saved_cfg(folder)
    if cfg is None:
        raise UserError(verify_saved(folder) or f"{folder} holds no finished SAE; retrain it")
    d_in = cfg.get("d_in")
    if d_in != d_model:
        raise UserError(f"the SAE in {folder} takes d_in = {d_in}, but layer {layer} hook {hook} in the "
                        f"store has d_model = {d_model}; retrain it: make train LAYERS={layer} FORCE=1")


@contextmanager
def plan(cfg: Config, layers: list[int] | None = None, force: bool = False) -> Iterator[Plan]:
    """The Plan for `layers` (or the config's), valid while the `with` holds every
    (layer, hook)'s lock: taken before any folder is looked at, so a concurrent
    collate is refused now, not halfway."""
    c, run_dir = cfg.collate, cfg.run_path
    device = resolve_device(c.device, key="collate.device")
    store = ActivationStore(Location.of(cfg))
    saes = cfg.sae_targets("collate", layers)
    with target_locks(run_dir, "collate", saes):
        targets = []
        for layer, hook, member in saes:
            out, folder = records_dir(run_dir, layer, hook, member), sae_dir(run_dir, layer, hook, member)
            recover_swap(out)  # a swap a kill interrupted: finished or undone before we look
            changes = records.changed_settings(out, records.fingerprint(c, folder))
            targets.append(Target(layer, hook, folder, out, changes, member))
        todo = [t for t in targets if force or t.changes != []]

        tokenizer = lens = None
        if todo:
            store.tokens  # raises when the tokens are missing
            for t in todo:
                store.array(t.layer, t.hook)
                _check_sae(t.sae, t.layer, t.hook, store.d_model(t.layer, t.hook), t.member)
            tokenizer = store_tokenizer(store)
            lens = records.load_lens(store.attrs, device)
            if isinstance(lens, str):
                print(f"collate: the records get no logit lens: {lens}")
        yield Plan(c, run_dir, device, store, targets, todo, tokenizer, lens)


# ---------------------------------------------------------------------------
# One SAE, start to finish


def collate_sae(store: ActivationStore, layer: int, hook: str, sae: Dictionary, sae_folder: Path, tokenizer,
                cfg: CollateConfig, out: Path, device, lens: records.Lens | str | None = None,
                member: str | None = None, col=None) -> Path:
    """Scan, cut windows and write into `<out>.partial/`, then swap it in. The caller
    holds this (layer, hook)'s lock. Returns the viewer's path. `lens`: load_lens()'s
    result (None: no model given); `member`: the train.sweep member the SAE is; `col`:
    its pass 1 when already scanned (scan_all)."""
    out = Path(out)
    want = records.fingerprint(cfg, sae_folder)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    meta = {"layer": layer, "hook": hook, "d_in": sae.d_in, "architecture": sae.architecture, **sae.settings(),
            **({"member": member} if member else {}), **_train_numbers(sae, sae_folder, out)}

    try:
        col = col if col is not None else scanning.scan(store, layer, hook, sae, cfg, device)
        recs = pick(col, cfg, store.context_size, partial / "_scratch")
        cut_windows(store, layer, hook, sae, recs, cfg, device, col.codes)
        col.codes = None  # pass 2 is done with them
    except UserError:
        # A missing or corrupt store chunk: nothing of this run is worth keeping.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    lens_out, lens_note = _logit_lens(sae, lens)
    summary = records.write_records(partial, col, recs, TokenText(tokenizer), cfg, meta, lens_out, lens_note,
                                    sae.latent_groups(), records.decoder_neighbors(sae.W_dec))
    del recs  # closes the memory maps before their files go
    shutil.rmtree(partial / "_scratch")

    records.write_done(partial, layer, hook, sae.n_latents, col.n_tokens, want)
    size = tree_size(partial)
    swap_dir(partial, out)
    print(f"collate {layer}/{leaf(hook, member)}: {summary['n_latents']} latents, {summary['dead']} dead (never fired), "
          f"{summary['ultra_rare']} ultra-rare (density < {cfg.ultra_rare_density:g}), "
          f"{col.n_tokens} tokens; {size / 2**20:.1f} MiB in {out}")
    grouped = summary.get("latent_groups")
    if grouped:
        counts = ", ".join(f"{g}: {r['live']}/{r['dead']}" for g, r in enumerate(grouped["groups"]))
        print(f"collate {layer}/{leaf(hook, member)}: live/dead latents per {grouped['name']}: {counts}")
    return out / "viewer.html"


def _train_numbers(sae: Dictionary, sae_folder: Path, out: Path) -> dict:
    """What the viewer shows of training beside collate's own numbers: train's held-out FVU (its
    space named), dead fraction and token count, and the way from the records to its loss.png."""
    ev = (sae.cfg or {}).get("eval")
    loss = Path(sae_folder) / "loss.png"
    got = {"loss_png": os.path.relpath(loss, out)} if loss.exists() else {}
    if isinstance(ev, dict):
        got["train_eval"] = {"fvu": ev.get("fvu"), "fvu_space": fvu_space(sae), "fvu_raw": ev.get("fvu_raw"),
                             "dead_frac": ev.get("dead_frac", ev.get("dead_frac_eval")),
                             "tokens": ev.get("eval_tokens")}
    return got


def _logit_lens(sae: Dictionary, lens: records.Lens | str | None):
    """(records.logit_lens of the SAE's decoder or None, the note summary.json keeps)."""
    if not isinstance(lens, records.Lens):
        return None, {"skipped": lens or "no model given"}
    d = lens.W_U.shape[1]
    if sae.d_in != d:
        return None, {"skipped": f"the SAE's d_in = {sae.d_in} is not the width of {lens.model!r}'s "
                                 f"unembedding ({d}): the hook is not on the residual stream"}
    return records.logit_lens(sae.W_dec, lens), {"model": lens.model, "k": min(records.LENS_K, lens.W_U.shape[0]),
                                                 "vocab": lens.W_U.shape[0]}


# ---------------------------------------------------------------------------
# The stage


def run(cfg: Config, layers: list[int] | None = None, force: bool = False) -> list[Path]:
    """Collate every (layer, hook) of `layers` or the config, then rewrite the index
    page (viewer.index_page); returns the viewers' paths."""
    with plan(cfg, layers, force) as p:
        for t in p.targets:
            if t not in p.todo:
                print(f"collate {t.name}: already done in {t.out} (--force to redo)")
            elif t.changes:
                print(f"collate {t.name}: redoing {t.out}, made from other inputs: {'; '.join(t.changes)}")
        for layer, hook in dict.fromkeys((t.layer, t.hook) for t in p.todo):
            group = [t for t in p.todo if (t.layer, t.hook) == (layer, hook)]
            saes = [load_sae(t.sae, device=p.device) for t in group]
            cols = [None] * len(group)
            if len(group) > 1:  # a sweep's members: one read of the store for all of them
                cols = scanning.scan_all(p.store, layer, hook, saes, p.cfg, p.device,
                                desc=f"collate {layer}/{hook} x{len(group)} SAEs")
            for i, t in enumerate(group):
                collate_sae(p.store, t.layer, t.hook, saes[i], t.sae, p.tokenizer, p.cfg, t.out, p.device, p.lens,
                            t.member, cols[i])
                saes[i] = cols[i] = None  # each member's state goes once its records are written
            if p.device.type == "cuda":
                torch.cuda.empty_cache()
    viewer.write_index_page(p.run_dir)
    return [t.out / "viewer.html" for t in p.targets]
