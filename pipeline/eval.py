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

A finished eval (eval.json naming the same SAE sha256) is skipped unless force.
With train.sweep, every member's SAE (<hook>@<member>, pipeline.paths) is one more
SAE of the same pass: its own spliced and zero-ablated runs, its own eval.json.
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

from pipeline import viewer
from pipeline.config import Config, EvalConfig
from pipeline.data import load_texts, make_windows
from pipeline.errors import UserError
from pipeline.fsio import target_locks, write_atomic
from pipeline.model import (ActivationCapture, check_context_size, load_causal_lm, record_block_outputs,
                            resume_after_block, splice)
from pipeline.paths import EVAL_FILE, leaf, sae_dir
from pipeline.sae import LN_EPS, TopKSAE, saved_cfg, saved_marker
from pipeline.store import ActivationStore, Location

KEYS = ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "ce_recovered", "kl", "fvu", "l0", "dead_frac", "n_tokens")


# ---------------------------------------------------------------------------
# Plan: what to do, every input checked before anything is written


@dataclass
class Target:
    layer: int
    hook: str
    folder: Path  # the SAE folder; eval.json goes in it
    sha256: str  # of the SAE's weights
    done: dict | None  # eval.json of a finished eval of these very weights
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
    saes: dict  # Target.key -> TopKSAE on the device, taking raw activations
    pass_through: dict  # Target.key -> whether position 0 (BOS) passes through unchanged


def read_done(folder: Path, sha256: str | None) -> dict | None:
    """eval.json of `folder` when it belongs to the weights with `sha256`, else None."""
    try:
        row = json.loads((folder / EVAL_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(row, dict) and row.get("sae_sha256") == sha256 and all(k in row for k in KEYS)
    return row if ok else None


@contextmanager
def plan(cfg: Config, layers: list[int] | None = None, force: bool = False,
         progress: bool = True) -> Iterator[Plan]:
    """The Plan, valid while the `with` holds every (layer, hook)'s eval lock."""
    c, run_dir = cfg.eval, cfg.run_path
    saes = cfg.sae_targets("eval", layers)
    with target_locks(run_dir, "eval", saes):
        targets = []
        for layer, hook, member in saes:
            folder = sae_dir(run_dir, layer, hook, member)
            marker = saved_marker(folder)
            if marker is None or saved_cfg(folder) is None:
                raise UserError(f"no trained SAE for layer {layer} hook {leaf(hook, member)} (looked in {folder}); "
                                f"train it first: saepipe train CONFIG --layers {layer}")
            targets.append(Target(layer, hook, folder, marker["sha256"], read_done(folder, marker["sha256"]), member))
        todo = [t for t in targets if force or t.done is None]
        if not todo:
            yield Plan(c, targets, [], None, None, {}, {})
            return

        for t in todo:  # numbers from another model's activations would mean nothing
            trained_on = (saved_cfg(t.folder) or {}).get("model")
            if trained_on is not None and trained_on != cfg.model.name:
                raise UserError(f"the SAE in {t.folder} was trained on model {trained_on!r}, but model.name is "
                                f"{cfg.model.name!r}; evaluate it with the config it was trained with")
        model, tokenizer = load_causal_lm(cfg.model.name, cfg.model.revision, cfg.model.dtype, c.device)
        device = next(model.parameters()).device
        saes, pass_through = {}, {}
        for t in todo:
            sae = TopKSAE.load(t.folder, device=device)
            saes[t.key] = sae
            pass_through[t.key] = bool(sae.cfg.get("exclude_bos")) and bool(sae.cfg.get("prepend_bos"))
        context_size, prepend_bos, skip = _window_shape(cfg, next(iter(saes.values())).cfg)
        check_context_size(model, context_size)
        _check_hooks(model, todo, saes, context_size)
        windows = held_out_windows(cfg, tokenizer, context_size, prepend_bos, skip, progress)
        yield Plan(c, targets, todo, model, windows, saes, pass_through)


def _window_shape(cfg: Config, sae_cfg: dict) -> tuple[int, bool, int]:
    """(context_size, prepend_bos, windows to skip): the store's, so eval windows are cut exactly
    as the harvested ones were and start where they stop."""
    attrs = {}
    if Location.of(cfg).exists():
        attrs = ActivationStore(Location.of(cfg)).attrs
    context_size = attrs.get("context_size") or sae_cfg.get("context_size") or cfg.harvest.context_size
    prepend_bos = attrs.get("prepend_bos", sae_cfg.get("prepend_bos", cfg.harvest.prepend_bos))
    skip = attrs.get("n_sequences", cfg.harvest.n_tokens // cfg.harvest.context_size)
    return int(context_size), prepend_bos, int(skip)


def held_out_windows(cfg: Config, tokenizer, context_size: int, prepend_bos: bool | None, skip: int,
                     progress: bool = True) -> np.ndarray:
    n = cfg.eval.n_tokens // context_size
    if n == 0:
        raise UserError(f"eval.n_tokens = {cfg.eval.n_tokens} is below one window of {context_size} tokens; raise it")
    windows, _ = make_windows(load_texts(cfg.data), tokenizer, context_size, n, prepend_bos, progress=progress,
                              skip_sequences=skip)
    if len(windows) == 0:
        raise UserError(f"dataset {cfg.data.path!r} has no text past the {skip} harvested windows of {context_size} "
                        "tokens, so there is nothing held out to evaluate on; use a larger corpus or lower "
                        "harvest.n_tokens")
    return windows


def _check_hooks(model, todo: list[Target], saes: dict, context_size: int):
    """Every hook must output the residual shape [B, T, d_model] that a spliced SAE can replace."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d_model = getattr(cfg, "hidden_size", None)
    points = [(t.layer, t.hook) for t in todo]
    device = next(model.parameters()).device
    ids = torch.zeros(1, min(2, context_size), dtype=torch.long, device=device)
    outs = ActivationCapture(model, points).run(ids)
    for t in todo:
        shape = tuple(outs[(t.layer, t.hook)].shape)
        if shape != (1, ids.shape[1], d_model):
            raise UserError(f"hook {t.hook!r} of layer {t.layer} outputs shape {list(shape)}, not the residual shape "
                            f"[batch, tokens, {d_model}]; eval splices SAEs into resid_post, attn_out or mlp_out")
        d_in = saes[t.key].d_in
        if d_in != d_model:
            raise UserError(f"the SAE in {t.folder} takes d_in = {d_in}, but the model's d_model is {d_model}; "
                            f"retrain it: saepipe train CONFIG --layers {t.layer} --force")


# ---------------------------------------------------------------------------
# The SAE in the activation's own space


@torch.no_grad()
def reconstruct(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat raw [N, d], idx [N, k], vals [N, k]) for raw x [N, d]. A layer_norm SAE reconstructs the
    normalised x: its mean and scale are put back, so x_hat lives where x does."""
    xf = x.float()
    idx, vals = sae.encode(xf)
    x_hat = sae.decode(idx, vals)
    if sae.normalize == "layer_norm":
        x_hat = x_hat * (xf.std(-1, keepdim=True) + LN_EPS) + xf.mean(-1, keepdim=True)
    return x_hat, idx, vals


class SpliceStats:
    """fvu / l0 / dead over the positions an SAE replaces, gathered inside its spliced forward."""

    def __init__(self, sae: TopKSAE, device):
        d, n = sae.d_in, sae.n_latents
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
        self.se = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(n, dtype=torch.long, device=device)
        self.active = torch.zeros((), dtype=torch.long, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor):
        xd = x.double()
        self.sum_x += xd.sum(0)
        self.sum_x2 += xd.pow(2).sum()
        self.se += (xd - x_hat.double()).pow(2).sum()
        on = vals > 0
        self.active += on.sum()
        self.fired.scatter_add_(0, idx.reshape(-1), on.long().reshape(-1))
        self.rows += x.shape[0]

    def result(self) -> dict:
        N = max(self.rows, 1)
        var = (self.sum_x2 - self.sum_x.pow(2).sum() / N).item()
        return {"fvu": self.se.item() / max(var, 1e-30), "l0": self.active.item() / N,
                "dead_frac": (self.fired == 0).float().mean().item()}


def _replacer(sae: TopKSAE, pass_bos: bool, stats: SpliceStats | None):
    """fn(x [B, T, d]) for splice: the SAE's reconstruction (stats given) or zeros, BOS kept when passed."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        start = 1 if pass_bos else 0
        body = x[:, start:]
        if stats is None:
            new = torch.zeros_like(body)
        else:
            flat = body.reshape(-1, body.shape[-1])
            x_hat, idx, vals = reconstruct(sae, flat)
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


@torch.no_grad()
def evaluate(p: Plan, progress: bool = True) -> dict[tuple[int, str], dict]:
    """The numbers of every SAE in p.todo, all from one pass over the held-out windows."""
    model, windows = p.model, p.windows
    device = next(model.parameters()).device
    stats = {key: SpliceStats(sae, device) for key, sae in p.saes.items()}
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

            def forward(layer, hook, fn):
                with splice(model, layer, hook, fn), \
                        (resume_after_block(model, layer - 1, before[layer - 1]) if layer > 0 else nullcontext()):
                    return model(input_ids=ids, attention_mask=mask).logits

            for key, sae in p.saes.items():
                (layer, hook, _), s, pass_bos = key, sums[key], p.pass_through[key]
                logits = forward(layer, hook, _replacer(sae, pass_bos, stats[key]))
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                s.ce_spliced -= logp.gather(-1, targets.unsqueeze(-1)).double().sum()
                s.kl += (p_clean * (logp_clean - logp)).sum(-1).double().sum()
                del logits, logp
                s.ce_zero += _ce(forward(layer, hook, _replacer(sae, pass_bos, None)), targets)
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
                    "kl": s.kl.item() / n_pred, **stats[key].result(), "n_tokens": n * T}
    return out


def run(cfg: Config, layers: list[int] | None = None, force: bool = False,
        progress: bool = True) -> list[tuple[int, str, dict]]:
    """Evaluate what is not done; (layer, hook, numbers) for every target, skipped ones included
    (a sweep member's hook is its folder's name, `<hook>@<member>`)."""
    with plan(cfg, layers, force, progress) as p:
        for t in p.targets:
            if t not in p.todo:
                print(f"eval: layer {t.layer} hook {leaf(t.hook, t.member)}: done for these SAE weights; skipping "
                      "(--force to redo)")
        results = evaluate(p, progress) if p.todo else {}
        rows = []
        for t in p.targets:
            if t in p.todo:
                row = {**_finite(results[t.key]), "sae_sha256": t.sha256}
                write_atomic(t.folder / EVAL_FILE, json.dumps(row, indent=2, allow_nan=False) + "\n")
            else:
                row = t.done
            rows.append((t.layer, leaf(t.hook, t.member), row))
        if p.todo and viewer.index_page(cfg.run_path).exists():  # collate's index page shows these numbers
            viewer.write_index_page(cfg.run_path)
        return rows


def _finite(row: dict) -> dict:
    """Strict JSON has no NaN/Inf: a number that is not finite is written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
