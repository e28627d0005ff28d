"""Eval: what each trained SAE does to the language model's loss.

For every (layer, hook) with a trained SAE, held-out windows (the harvest's
corpus, cut the same way, continuing past the windows the store holds: never a
token the SAE was trained on) go through the causal LM three times per batch:

    clean     the model as it is
    spliced   the hooked activation x replaced by the SAE's reconstruction x_hat
    zero      the hooked activation replaced by zeros

Positions the SAE was not trained on (BOS, when the SAE's exclude_bos and the
store prepended it) pass through unchanged in both the spliced and the zero run,
so the two runs differ from the clean one at the same positions. The clean run
is shared by every SAE and its log-softmax serves both CE and KL, so N SAEs
cost 1 + 2N forwards per batch.

Reported per SAE, into saes/<L>/<hook>/eval.json (strict JSON, atomic), with the
standard next-token shift (window position t predicts token t + 1):

    ce_clean, ce_spliced, ce_zero   mean next-token cross-entropy, nats
    delta_ce                        ce_spliced - ce_clean
    ce_recovered                    (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    kl                              mean over predicted positions of KL(clean || spliced), nats
    fvu                             fraction of the variance of x the reconstruction misses
    l0                              latents firing per token
    dead_frac                       latents that never fired on these tokens
    n_tokens                        tokens forwarded (windows x context_size)
    sae_sha256                      the SAE weights these numbers belong to
    fingerprint                     everything the numbers depend on (fingerprint())

A finished eval is skipped unless force, while its fingerprint still holds: the
SAE's weights, layer, hook and whether BOS passes through; the model's name
(a local path normalised), revision and dtype; the corpus (data.* and a sha256
of local data files); the windows (context_size, prepend_bos, how many were
harvested) and eval.n_tokens. Any change redoes it, saying which keys changed.
Before the model loads, the corpus is checked against the one harvested (the
store's fingerprint, or the SAE's record of it once the store is gone), and with
a store the last harvested window is cut again and compared with the stored one:
another corpus would hand eval training tokens as "held out". A hook whose
output is not the residual shape is left out with one line; the others go on.
With train.sweep, every member's SAE (<hook>@<member>, pipeline.paths) is one more
SAE of the same pass: its own spliced and zero-ablated runs, its own eval.json.

A transcoder (train.transcode, its folder named after its input hook) is spliced where it
writes: its target hook's activation (the MLP's output) is replaced by its prediction from
the input hook's activation in the same forward, and zero-ablated there; fvu is of the target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import fsio, plots, viewer
from pipeline.config import Config, EvalConfig
from pipeline.data import load_texts, make_windows
from pipeline.errors import UserError
from pipeline.fsio import target_locks, write_atomic
from pipeline.harvest import diffs, run_fingerprint
from pipeline.metrics import ReconStats
from pipeline.model import (ActivationCapture, check_context_size, load_causal_lm, record_block_outputs,
                            resume_after_block, splice)
from pipeline.paths import EVAL_FILE, frontier_stem, leaf, model_key, sae_dir, split_leaf
from pipeline.saes import DEFAULT, Dictionary, load_sae, saved_cfg, saved_marker, trained
from pipeline.store import ActivationStore, Location

KEYS = ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "ce_recovered", "kl", "fvu", "l0", "dead_frac", "n_tokens")


# ---------------------------------------------------------------------------
# Plan: what to do, every input checked before anything is written

# Bumped when what the numbers mean changes, so every older eval.json is redone.
FORMAT = 2


@dataclass
class Target:
    layer: int
    hook: str
    folder: Path  # the SAE folder; eval.json goes in it
    fingerprint: dict  # everything its numbers depend on (fingerprint())
    done: dict | None  # eval.json of a finished eval with this very fingerprint
    stale: list[str]  # why an existing eval.json was not reused (`key: there, now`)
    member: str | None = None  # the train.sweep member; None: the plain SAE

    @property
    def key(self) -> tuple[int, str, str | None]:
        return self.layer, self.hook, self.member


@dataclass
class Plan:
    cfg: EvalConfig
    targets: list[Target]
    todo: list[Target]
    model: object | None  # None when there is nothing to do
    windows: np.ndarray | None  # int32 [n, context_size]: the held-out windows
    saes: dict  # Target.key -> Dictionary on the device, taking raw activations
    pass_through: dict  # Target.key -> whether position 0 (BOS) passes through unchanged


@dataclass
class Windows:
    """How the held-out windows are cut: exactly as the harvested ones, starting where they stop."""
    context_size: int
    prepend_bos: bool | None
    skip: int  # harvested windows: the held-out ones start after them
    store: ActivationStore | None  # the run's store, to check the corpus against; None when gone
    unchecked: bool = False  # neither the store nor the SAEs record the corpus to check it against


def fingerprint(cfg: Config, w: Windows, corpus: dict, sae_sha256: str, sae_cfg: dict, layer: int,
                hook: str) -> dict:
    """What an eval's numbers depend on: the SAE's weights, the model that runs, the corpus and
    the windows cut from it, and which positions the SAE replaces. A change to any of them
    redoes the eval. (Batch size and device change only rounding.)"""
    return {
        "format": FORMAT, "sae_sha256": sae_sha256, "layer": layer, "hook": hook,
        "model.name": model_key(cfg.model.name), "model.revision": cfg.model.revision,
        "model.dtype": cfg.model.dtype, **corpus,
        "context_size": w.context_size, "prepend_bos": w.prepend_bos, "held_out_after": w.skip,
        "eval.n_tokens": cfg.eval.n_tokens, "pass_bos": passes_bos(sae_cfg),
        **({"target_hook": sae_cfg["target_hook"]} if sae_cfg.get("target_hook") else {}),
    }


def splice_point(hook: str, sae: Dictionary) -> tuple[str, str | None]:
    """(the hook whose activation is replaced, the hook the SAE reads when it is another one)."""
    target = sae.cfg.get("target_hook") if sae.transcoder else None
    return (target, hook) if target else (hook, None)


def passes_bos(sae_cfg: dict) -> bool:
    """Position 0 is left alone when the SAE never saw it (exclude_bos, and a BOS was there)."""
    return bool(sae_cfg.get("exclude_bos")) and bool(sae_cfg.get("prepend_bos"))


def read_done(folder: Path, fp: dict) -> tuple[dict | None, list[str]]:
    """(eval.json of `folder` when it was made with fingerprint `fp`, else None; and why not, when
    there is an eval.json made otherwise)."""
    try:
        row = json.loads((folder / EVAL_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, []
    if not isinstance(row, dict) or not all(k in row for k in KEYS):
        return None, ["eval.json is incomplete"]
    there = row.get("fingerprint")
    if not isinstance(there, dict):  # made before fingerprints: it vouches for nothing but the weights
        return None, ["eval.json records no fingerprint (an older saepipe)"]
    # A key new to the fingerprint comes with a new FORMAT, which differs.
    changed = diffs(there, fp)
    return (row, []) if not changed else (None, changed)


@contextmanager
def plan(cfg: Config, layers: list[int] | None = None, force: bool = False,
         progress: bool = True) -> Iterator[Plan]:
    """The Plan, valid while the `with` holds every (layer, hook)'s eval lock."""
    c, run_dir = cfg.eval, cfg.run_path
    saes = cfg.sae_targets("eval", layers)
    with target_locks(run_dir, "eval", saes):
        found = []
        for layer, hook, member in saes:
            folder = sae_dir(run_dir, layer, hook, member)
            marker, sae_cfg = trained(folder, layer, leaf(hook, member))
            found.append((layer, hook, member, folder, marker["sha256"], sae_cfg))
        w = _windows(cfg, found[0][5])
        corpus = corpus_fingerprint(cfg)
        targets = []
        for layer, hook, member, folder, sha, sae_cfg in found:
            fp = fingerprint(cfg, w, corpus, sha, sae_cfg, layer, hook)
            done, stale = read_done(folder, fp)
            targets.append(Target(layer, hook, folder, fp, done, stale, member))
        todo = [t for t in targets if force or t.done is None]
        if not todo:
            yield Plan(c, targets, [], None, None, {}, {})
            return

        for t in todo:  # numbers from another model's activations would mean nothing
            trained_on = (saved_cfg(t.folder) or {}).get("model")
            if trained_on is not None and model_key(trained_on) != model_key(cfg.model.name):
                raise UserError(f"the SAE in {t.folder} was trained on model {trained_on!r}, but model.name is "
                                f"{cfg.model.name!r}; evaluate it with the config it was trained with")
        _check_corpus(cfg, w, found, corpus)
        model, tokenizer = load_causal_lm(cfg.model.name, cfg.model.revision, cfg.model.dtype, c.device)
        device = next(model.parameters()).device
        saes, pass_through = {}, {}
        for t in todo:
            sae = load_sae(t.folder, device=device)
            saes[t.key] = sae
            pass_through[t.key] = passes_bos(sae.cfg)
        check_context_size(model, w.context_size)
        todo = _splicable(model, todo, saes, w.context_size)
        windows = held_out_windows(cfg, tokenizer, w, progress)
        yield Plan(c, targets, todo, model, windows, saes, pass_through)


def _windows(cfg: Config, sae_cfg: dict) -> Windows:
    """The store's window shape (context_size, prepend_bos, windows harvested); without a store,
    what the SAE recorded, then the config's harvest section."""
    loc = Location.of(cfg)
    store = ActivationStore(loc) if loc.exists() else None
    attrs = store.attrs if store is not None else {}
    context_size = attrs.get("context_size") or sae_cfg.get("context_size") or cfg.harvest.context_size
    prepend_bos = attrs.get("prepend_bos", sae_cfg.get("prepend_bos", cfg.harvest.prepend_bos))
    skip = attrs.get("n_sequences") or sae_cfg.get("store_sequences") or cfg.harvest.n_tokens // context_size
    return Windows(int(context_size), prepend_bos, int(skip), store)


def corpus_fingerprint(cfg: Config) -> dict:
    """The data.* keys of harvest's fingerprint (a sha256 of local data files among them)."""
    return {k: v for k, v in run_fingerprint(cfg).items() if k.startswith("data.")}


def _check_corpus(cfg: Config, w: Windows, found: list, now: dict):
    """Refuse a corpus other than the one harvested: its "held-out" windows would be training
    tokens, or another text. The store's fingerprint is checked first (it holds a sha256 of local
    data files); without a store, each SAE's record of it."""
    if w.store is not None:
        sources = [(w.store.path, w.store.attrs.get("fingerprint"))]
    else:
        sources = [(folder, sae_cfg.get("store_fingerprint")) for *_, folder, _, sae_cfg in found]
        w.unchecked = not any(fp for _, fp in sources)
    for where, there in sources:
        changed = diffs(there, now) if isinstance(there, dict) else []
        if changed:
            raise UserError(f"the corpus differs from the one {where} was harvested from ({'; '.join(changed)}), so "
                            "eval's held-out windows could be training tokens; restore the harvested data, or "
                            "harvest and train again on the new corpus in a new run_dir")


def held_out_windows(cfg: Config, tokenizer, w: Windows, progress: bool = True) -> np.ndarray:
    """The eval.n_tokens // context_size windows after the harvested ones. With a store, the last
    harvested window is cut again and compared with the stored one: a hub dataset (no sha256)
    that changed, or another tokenizer, is refused rather than evaluated on training tokens."""
    n = cfg.eval.n_tokens // w.context_size
    if n == 0:
        raise UserError(f"eval.n_tokens = {cfg.eval.n_tokens} is below one window of {w.context_size} tokens; "
                        "raise it")
    check = w.store is not None and w.skip > 0 and w.store.has_tokens()
    windows, _ = make_windows(load_texts(cfg.data), tokenizer, w.context_size, n + check, w.prepend_bos,
                              progress=progress, skip_sequences=w.skip - check)
    if check:
        stored = w.store.read_tokens(w.skip - 1, w.skip)
        if len(windows) == 0 or not np.array_equal(windows[0], stored[0]):
            raise UserError(f"the corpus and tokenizer no longer give the windows stored in {w.store.path} (its "
                            f"last window, {w.skip - 1}, differs), so eval cannot tell which windows are held out; "
                            "restore the harvested data and model, or harvest again in a new run_dir")
        windows = windows[1:]
    if len(windows) == 0:
        raise UserError(f"dataset {cfg.data.path!r} has no text past the {w.skip} harvested windows of "
                        f"{w.context_size} tokens, so there is nothing held out to evaluate on; use a larger "
                        "corpus or lower harvest.n_tokens")
    if w.unchecked:
        print("eval: no store and no record of its corpus in the SAEs (trained by an older saepipe): the held-out "
              "windows follow the config's data and harvest sections, unchecked")
    if len(windows) < n:
        print(f"eval: the corpus holds only {len(windows)} windows ({len(windows) * w.context_size} tokens) past "
              f"the {w.skip} harvested ones, fewer than eval.n_tokens = {cfg.eval.n_tokens} asks for; evaluating "
              "on those")
    return windows


def _splicable(model, todo: list[Target], saes: dict, context_size: int) -> list[Target]:
    """The targets whose hook outputs the residual shape [B, T, d_model] a spliced SAE replaces.
    Any other hook (an MLP's hidden layer, a module path of another width) is left out with one
    line each, so the config's other hooks are still evaluated; when none is left, one refusal."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d_model = getattr(cfg, "hidden_size", None)
    points = list(dict.fromkeys((t.layer, h) for t in todo for h in splice_point(t.hook, saes[t.key]) if h))
    device = next(model.parameters()).device
    ids = torch.zeros(1, min(2, context_size), dtype=torch.long, device=device)
    outs = ActivationCapture(model, points).run(ids)
    keep, skipped = [], []
    for t in todo:
        bad = [(h, tuple(outs[(t.layer, h)].shape)) for h in splice_point(t.hook, saes[t.key]) if h]
        bad = [(h, shape) for h, shape in bad if shape != (1, ids.shape[1], d_model)]
        if bad:
            hook, shape = bad[0]
            why = (f"hook {hook!r} of layer {t.layer} outputs shape {list(shape)}, not the residual shape "
                   f"[batch, tokens, {d_model}]; eval splices SAEs into resid_post, attn_out, mlp_out or mlp_in")
            skipped.append((t, why))
            continue
        d_in = saes[t.key].d_in
        if d_in != d_model:
            raise UserError(f"the SAE in {t.folder} takes d_in = {d_in}, but the model's d_model is {d_model}; "
                            f"retrain it: saepipe train CONFIG --layers {t.layer} --force")
        keep.append(t)
    if not keep:
        raise UserError("; ".join(why for _, why in skipped))
    for t, why in skipped:
        print(f"eval: layer {t.layer} hook {leaf(t.hook, t.member)}: skipped: {why}")
    return keep


# ---------------------------------------------------------------------------
# What each SAE did to the activations it replaced


def _replacer(sae: Dictionary, pass_bos: bool, stats: ReconStats | None):
    """fn(x [B, T, d], src) for splice: the SAE's reconstruction of x (a transcoder's prediction of x
    from src, the input hook's activation; stats given) or zeros, BOS kept when passed."""

    def fn(x: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        start = 1 if pass_bos else 0
        body = x[:, start:]
        if stats is None:
            new = torch.zeros_like(body)
        else:
            flat = body.reshape(-1, body.shape[-1])
            read = flat if src is None else src[:, start:].reshape(-1, src.shape[-1])
            x_hat, idx, vals = sae.reconstruct_raw(read)
            stats.add(flat, x_hat, idx, vals)
            new = x_hat.to(x.dtype).reshape(body.shape)
        return torch.cat([x[:, :start], new], dim=1) if start else new

    return fn


# ---------------------------------------------------------------------------
# Run


class _Sums:
    """Running sums of per-position CE / KL (float64) and the count of predicted positions."""

    def __init__(self, device):
        self.ce_spliced = torch.zeros((), dtype=torch.float64, device=device)
        self.ce_zero = torch.zeros((), dtype=torch.float64, device=device)
        self.kl = torch.zeros((), dtype=torch.float64, device=device)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE of logits [B, T, V] (positions 0..T-2) against targets [B, T-1]."""
    # Fused log-softmax and pick; summed in float64 like the other sums.
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none").double().sum()


def _dot(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p[..., v] * logq[..., v] for p, logq [B, T, V]: [B, T], one read of each (a batched
    matrix product; elementwise product then sum writes and reads a third [B, T, V] tensor)."""
    V = p.shape[-1]
    return torch.bmm(p.reshape(-1, 1, V), logq.reshape(-1, V, 1)).reshape(p.shape[:-1])


@torch.no_grad()
def evaluate(p: Plan, progress: bool = True) -> dict[tuple[int, str], dict]:
    """The numbers of every SAE in p.todo, all from one pass over the held-out windows."""
    model, windows = p.model, p.windows
    device = next(model.parameters()).device
    stats = {key: ReconStats(sae.d_in, sae.n_latents, device) for key, sae in p.saes.items()}
    sums = {key: _Sums(device) for key in p.saes}
    ce_clean = torch.zeros((), dtype=torch.float64, device=device)
    B, (n, T) = p.cfg.batch_size, windows.shape
    bar = tqdm(total=n * T, desc="eval", unit="tok", unit_scale=True, disable=not progress)
    try:
        for i in range(0, n, B):
            ids = torch.from_numpy(windows[i:i + B]).long().to(device)
            mask = torch.ones_like(ids)
            targets = ids[:, 1:]
            # The clean pass also records the output of the block before each hooked one, so the
            # spliced and zero-ablated passes start there instead of recomputing the same prefix.
            before = {}
            with record_block_outputs(model, sorted({key[0] - 1 for key in p.saes if key[0] > 0}), before):
                logits = model(input_ids=ids, attention_mask=mask).logits
            logp_clean = F.log_softmax(logits[:, :-1].float(), dim=-1)
            del logits
            ce_clean -= logp_clean.gather(-1, targets.unsqueeze(-1)).double().sum()
            p_clean = logp_clean.exp()
            # KL(clean || spliced) = sum_v p log p - sum_v p log q: the first sum once per batch, the
            # second one dot product per position (_dot), not two [B, T, V] temporaries per SAE.
            neg_entropy = _dot(p_clean, logp_clean)
            del logp_clean

            def forward(layer, hook, sae, fn):
                where, source = splice_point(hook, sae)
                with splice(model, layer, where, fn, source), \
                        (resume_after_block(model, layer - 1, before[layer - 1]) if layer > 0 else nullcontext()):
                    return model(input_ids=ids, attention_mask=mask).logits

            for key, sae in p.saes.items():
                (layer, hook, _), s, pass_bos = key, sums[key], p.pass_through[key]
                logits = forward(layer, hook, sae, _replacer(sae, pass_bos, stats[key]))
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                s.ce_spliced -= logp.gather(-1, targets.unsqueeze(-1)).double().sum()
                s.kl += (neg_entropy - _dot(p_clean, logp)).double().sum()
                del logits, logp
                s.ce_zero += _ce(forward(layer, hook, sae, _replacer(sae, pass_bos, None)), targets)
            bar.update(ids.numel())
    finally:
        bar.close()
    n_pred = n * (T - 1)
    out = {}
    for key in p.saes:
        s = sums[key]
        clean, spliced, zero = ce_clean.item() / n_pred, s.ce_spliced.item() / n_pred, s.ce_zero.item() / n_pred
        gap = zero - clean
        out[key] = {"ce_clean": clean, "ce_spliced": spliced, "ce_zero": zero, "delta_ce": spliced - clean,
                    "ce_recovered": (zero - spliced) / gap if gap != 0 else None,
                    "kl": s.kl.item() / n_pred, **_pick(stats[key].result(), "fvu", "l0", "dead_frac"),
                    "n_tokens": n * T}
    return out


def run(cfg: Config, layers: list[int] | None = None, force: bool = False,
        progress: bool = True) -> list[tuple[int, str, dict]]:
    """Evaluate what is not done; (layer, hook, numbers) for every target evaluated or reused
    (a sweep member's hook is its folder's name, `<hook>@<member>`); a hook eval cannot splice is
    left out with a line saying why."""
    with plan(cfg, layers, force, progress) as p:
        for t in p.targets:
            name = f"eval: layer {t.layer} hook {leaf(t.hook, t.member)}"
            if t.done is not None and t not in p.todo and not force:
                print(f"{name}: done with these settings and SAE weights; skipping (--force to redo)")
            elif t.stale:
                print(f"{name}: eval.json was made with other settings ({'; '.join(t.stale)}); redoing")
        results = evaluate(p, progress) if p.todo else {}
        rows = []
        pictures = {}
        for t in p.targets:
            sae_cfg = saved_cfg(t.folder) or {}
            arch, target = sae_cfg.get("architecture", DEFAULT), sae_cfg.get("target_hook")
            pictures[(t.layer, target or t.hook)] = True
            if t in p.todo:
                row = {**_finite(results[t.key]), "architecture": arch, "sae_sha256": t.fingerprint["sae_sha256"],
                       "fingerprint": t.fingerprint}
                write_atomic(t.folder / EVAL_FILE, json.dumps(row, indent=2, allow_nan=False) + "\n")
            elif t.done is not None and not force:
                row = {"architecture": arch, **t.done}
            else:
                continue  # a hook eval cannot splice
            rows.append((t.layer, leaf(t.hook, t.member) + (f"->{target}" if target else ""), row))
        for layer, hook in pictures:  # a transcoder is drawn where it is spliced, beside that hook's SAEs
            draw_frontier(cfg.run_path, layer, hook)
        if viewer.index_page(cfg.run_path).exists():  # collate's index page shows these numbers and pictures
            viewer.write_index_page(cfg.run_path)
        return rows


def frontier_points(run_dir, layer: int, hook: str) -> list[dict]:
    """Every SAE of (layer, hook) in run_dir with a current eval.json (the plain folder and each
    sweep member's, whatever the config now lists), and every transcoder that predicts (layer, hook):
    name, architecture, l0, delta_ce, fvu."""
    points = []
    parent = sae_dir(run_dir, layer, hook).parent
    for folder in sorted(parent.iterdir()) if parent.is_dir() else []:
        name, member = split_leaf(folder.name)
        if not folder.is_dir() or folder.name.endswith((".partial", ".old")):
            continue
        marker, cfg = saved_marker(folder), saved_cfg(folder)
        if cfg is None or (cfg.get("target_hook") or name) != hook:
            continue
        row = fsio.read_json(folder / EVAL_FILE)
        if marker is None or row.get("sae_sha256") != marker["sha256"]:
            continue  # no eval, or one of other weights
        to = f" (transcoder from {name})" if cfg.get("target_hook") else ""
        points.append({"name": folder.name + to, "architecture": cfg.get("architecture", DEFAULT),
                       **{k: row.get(k) for k in ("l0", "delta_ce", "fvu")}})
    return points


def draw_frontier(run_dir, layer: int, hook: str) -> list[Path]:
    """saes/<layer>/frontier-<hook>.png and .svg (pipeline.paths.frontier_stem); none without points."""
    points = frontier_points(run_dir, layer, hook)
    if not points:
        return []
    folder, stem = frontier_stem(run_dir, layer, hook)
    return plots.frontier_figure(folder, stem, points, f"layer {layer} {hook}: every SAE evaluated "
                                 "(held-out windows; lower is better)")


def _pick(row: dict, *keys: str) -> dict:
    return {k: row[k] for k in keys}


def _finite(row: dict) -> dict:
    """Strict JSON has no NaN/Inf: a number that is not finite is written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
