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
is shared by every SAE. The zero run uses nothing of the SAE: one serves every SAE
of its (layer, hook, BOS rule), and its CE is kept in the run (ZeroCache) for every
later eval of that layer and hook on the same model and windows. So N SAEs of one
(layer, hook) cost 1 + N forwards per batch, and one more the first time: less where
zeroing leaves every window the same logits (resid_post), which two windows' forward
shows and then stands for all (_SharedZero). The
spliced and zero runs start from the clean run's output of the block before the
hooked one (of the hooked block itself for resid_post), and every run's LM head
covers only the positions scored.

CE and KL come from each row's logsumexp and the logits themselves, a few rows at
a time (no [N, vocab] log-softmax is written): CE = logsumexp - logit of the
target, and log p - log q = (clean - spliced logits) - (their logsumexps' difference).

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

The zero-ablated CE is cached in saes/<L>/ce_zero-<hook>-<key>.json (ZeroCache, atomic,
checksummed), keyed by everything it depends on: eval's fingerprint less the SAE, plus a
digest of the loaded weights, a sha256 of the very windows, the device type and the batch
size. A file of another key, or one that fails its checksum, is never used; force
recomputes and rewrites it.

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

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import fsio, plots, viewer
from pipeline.config import Config, EvalConfig
from pipeline.data import load_texts, make_windows
from pipeline.errors import UserError
from pipeline.fsio import target_locks, write_atomic
from pipeline.harvest import diffs, run_fingerprint
from pipeline.metrics import ReconStats
from pipeline.model import (ActivationCapture, check_context_size, load_causal_lm, model_digest, record_block_outputs,
                            replace_hidden, resume_after_block, scored_logits, splice)
from pipeline.paths import EVAL_FILE, frontier_stem, leaf, model_key, sae_dir, split_leaf, zero_ablation_file
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
    zero: ZeroCache | None = None  # where zero-ablated CEs are reused from and kept; None: computed every time


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


def zero_key(cfg: Config, w: Windows, corpus: dict, model, windows: np.ndarray) -> dict:
    """What a zero-ablated CE depends on besides (layer, hook, BOS rule), for ZeroCache: eval's
    fingerprint less the SAE, and what that fingerprint takes on trust, since one cache file
    serves many SAEs and runs: a digest of the weights loaded (a model folder replaced under
    the same name) and a sha256 of the windows int [n, context_size] themselves (a hub dataset
    or tokenizer that changed). Device type and batch size change only rounding, but they are
    in the key too, so a reused CE is the one this eval would compute."""
    ids = np.ascontiguousarray(windows, dtype=np.int64)
    return {
        "format": FORMAT, "model.name": model_key(cfg.model.name), "model.revision": cfg.model.revision,
        "model.dtype": cfg.model.dtype, "model.digest": model_digest(model), **corpus,
        "context_size": w.context_size, "prepend_bos": w.prepend_bos, "held_out_after": w.skip,
        "eval.n_tokens": cfg.eval.n_tokens,
        "windows.sha256": hashlib.sha256(repr(ids.shape).encode() + ids.tobytes()).hexdigest(),
        "device": next(model.parameters()).device.type, "eval.batch_size": cfg.eval.batch_size,
    }


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class ZeroCache:
    """The zero-ablated CE of each (layer, hook, BOS rule) on one run's held-out windows, kept in
    the run (pipeline.paths.zero_ablation_file) for every SAE spliced there, in this eval and later
    ones: zeroing the activation uses nothing of the SAE.

    An entry's key is `key` (zero_key) with the layer, the hook zeroed and whether BOS passes
    through; the file is named by a digest of it and holds the key, the CE and a sha256 of both.
    It is used only when all three agree: a file of another key, a torn or edited one, is
    recomputed and rewritten (written atomically, so a kill leaves the old file or the new)."""
    run_dir: Path
    key: dict
    force: bool = False  # recompute every entry this eval needs (and rewrite it)

    def entry(self, layer: int, hook: str, pass_bos: bool) -> dict:
        """The entry's whole key, as JSON gives it back (a tuple in it reads back as a list)."""
        return json.loads(_canonical({**self.key, "layer": layer, "hook": hook, "pass_bos": pass_bos}))

    def path(self, layer: int, hook: str, pass_bos: bool) -> Path:
        digest = hashlib.sha256(_canonical(self.entry(layer, hook, pass_bos))).hexdigest()[:16]
        return zero_ablation_file(self.run_dir, layer, hook, digest)

    def read(self, layer: int, hook: str, pass_bos: bool) -> float | None:
        """The CE kept for this entry; None when there is none to trust (a file there that is not
        trusted is named, with why, in one line)."""
        if self.force:
            return None
        path = self.path(layer, hook, pass_bos)
        try:
            row = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            row, why = None, f"unreadable: {type(e).__name__}"
        else:
            why = _untrusted(row, self.entry(layer, hook, pass_bos))
        if why:
            print(f"eval: layer {layer} hook {hook}: not using {path} ({why}); computing the zero-ablated CE again")
            return None
        return row["ce_zero"]

    def write(self, layer: int, hook: str, pass_bos: bool, ce_zero: float) -> None:
        """Keep ce_zero (finite) for this entry. A failed write costs only a recomputation later, so
        it is one line, not an error."""
        row = {"ce_zero": ce_zero, "key": self.entry(layer, hook, pass_bos)}
        row["sha256"] = hashlib.sha256(_canonical(row)).hexdigest()
        path = self.path(layer, hook, pass_bos)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(row, indent=2, sort_keys=True, allow_nan=False) + "\n")
        except OSError as e:
            print(f"eval: could not keep the zero-ablated CE in {path} ({e.strerror or type(e).__name__}); "
                  "the next eval computes it again")


def _untrusted(row, key: dict) -> str | None:
    """Why a zero-ablation cache file's content may not be used for `key`; None when it may."""
    if not isinstance(row, dict) or set(row) != {"ce_zero", "key", "sha256"}:
        return "not a zero-ablation cache file"
    try:
        digest = hashlib.sha256(_canonical({"ce_zero": row["ce_zero"], "key": row["key"]})).hexdigest()
    except (TypeError, ValueError):
        digest = None
    if digest != row["sha256"]:
        return "its checksum does not match its content"
    value = row["ce_zero"]
    if not isinstance(value, float) or not math.isfinite(value):
        return "its ce_zero is not a finite number"
    if row["key"] != key:
        changed = diffs(row["key"], key) if isinstance(row["key"], dict) else []
        return f"made for other settings: {'; '.join(changed) or 'other keys'}"
    return None


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
        zero = ZeroCache(run_dir, zero_key(cfg, w, corpus, model, windows), force)
        yield Plan(c, targets, todo, model, windows, saes, pass_through, zero)


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


def _replacer(sae: Dictionary | None, pass_bos: bool, stats: ReconStats | None):
    """fn(x [B, T, d], src) for splice: the SAE's reconstruction of x (a transcoder's prediction of x
    from src, the input hook's activation; stats given) or zeros (stats None; the SAE unused), BOS
    kept when passed."""

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
# One window's zero-ablated logits for all

# Windows the zero-ablated forward runs on first, to learn whether one window's logits stand for all
SHARED_PROBE = 2
# ... and how close (in logits, relative to their largest magnitude) the probe's windows must agree
SHARED_RTOL = 1e-5


@dataclass
class _SharedZero:
    """The zero-ablated logits of one window, when they are every window's.

    Zeroing a hook's activation (all but BOS when it passes through) leaves the forward nothing of a
    window's tokens past the hook when the blocks after it read only the residual stream: every
    window gets the same logits, and its CE differs only by its targets. Then one window's forward
    stands for all (the cold eval's third forward per batch, gone). Whether the model is such is
    not assumed: the first batch's first SHARED_PROBE windows are run and must agree, and a batch
    whose first token differs from the probe's, where BOS passes through, is run in full."""
    logits: torch.Tensor  # [T - 1, V]
    lse: torch.Tensor  # [T - 1]
    first: int | None  # the token every window must start with (BOS passed through); None: any

    @classmethod
    def find(cls, logits: torch.Tensor, ids: torch.Tensor, z: tuple) -> "_SharedZero | None":
        """From the zero-ablated logits [m * (T - 1), V] of the first m windows of ids: the shared
        logits, or None when there are fewer than two windows, their first tokens differ where BOS
        passes through, a window repeats the first, or their logits differ."""
        m = min(SHARED_PROBE, ids.shape[0])
        per = logits.view(m, -1, logits.shape[-1])
        if m < 2 or (z[2] and not (ids[:m, 0] == ids[0, 0]).all()):
            return None
        if not (ids[1:m, 1:] != ids[0, 1:]).any(dim=1).all():  # a window repeated proves nothing
            return None
        spread = (per[1:] - per[:1]).abs().amax()
        if not spread <= SHARED_RTOL * per[0].abs().amax().clamp_min(1):
            return None
        return cls(per[0].clone(), _logsumexp(per[0]), int(ids[0, 0]) if z[2] else None)

    def covers(self, ids: torch.Tensor) -> bool:
        return self.first is None or bool((ids[:, 0] == self.first).all())

    def ce_sum(self, targets: torch.Tensor) -> torch.Tensor:
        """_ce_sum over windows whose targets are targets [B, T - 1], each with these logits."""
        picked = self.logits.gather(1, targets.T).float()  # [T - 1, B]
        return (self.lse.double().unsqueeze(1) - picked.double()).sum()


# ---------------------------------------------------------------------------
# Run


class _Sums:
    """Running sums of per-position CE / KL (float64) and the count of predicted positions."""

    def __init__(self, device):
        self.ce_spliced = torch.zeros((), dtype=torch.float64, device=device)
        self.kl = torch.zeros((), dtype=torch.float64, device=device)


# Bytes of logits reduced at a time. On a CPU, about one core's L2 cache: each row is read from
# memory once and the temporaries of its reductions never leave the cache (a whole [N, vocab]
# temporary would go through memory, several times); elsewhere, a bound on those temporaries.
_CHUNK_BYTES = {"cpu": 2 << 20}
_CHUNK_BYTES_ELSEWHERE = 1 << 28


def _chunks(logits: torch.Tensor) -> Iterator[slice]:
    """Slices of the rows of logits [N, V], each a chunk of _CHUNK_BYTES (in float32)."""
    N, V = logits.shape
    rows = max(1, _CHUNK_BYTES.get(logits.device.type, _CHUNK_BYTES_ELSEWHERE) // (4 * V))
    for i in range(0, N, rows):
        yield slice(i, min(i + rows, N))


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary of each row of logits [N, V]: float32 [N]."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for rows in _chunks(logits):
        out[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
    return out


def _ce_sum(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE, float64 []: logits [N, V] with their rows' logsumexp lse [N], against
    targets [N]. CE = logsumexp - the target's logit, two float32 numbers subtracted in float64."""
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
    return (lse.double() - picked.double()).sum()


def _against_clean(clean: torch.Tensor, lse_clean: torch.Tensor,
                   spliced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of each row of spliced [N, V]: float32 [N]; KL(clean || spliced) of each row: float32 [N]),
    for clean [N, V] with its rows' logsumexp lse_clean [N]."""
    lse = torch.empty(spliced.shape[0], dtype=torch.float32, device=spliced.device)
    kl = torch.empty_like(lse)
    for rows in _chunks(spliced):
        c, s = clean[rows].float(), spliced[rows].float()
        lse_c, lse_s = lse_clean[rows].unsqueeze(1), torch.logsumexp(s, dim=-1, keepdim=True)
        p = (c - lse_c).exp_()
        # log p - log q = (c - s) - (lse_c - lse_s): differences of logits and of logsumexps, both
        # small where the SAE is good, so float32 keeps their digits. Two log-probabilities near
        # -log V, each rounded, then subtracted or dotted with p, lose them: on the SmolLM2 demo's
        # eval that way gave KL 4e-5 nats under float64's, this way 2e-9.
        kl[rows] = p.mul_((c - s).sub_(lse_c - lse_s)).sum(dim=-1)
        lse[rows] = lse_s.squeeze(1)
    return lse, kl


def _resumes_after(layer: int, where: str, source: str | None) -> int:
    """The block whose output (recorded by the clean forward) a forward spliced at (layer, where)
    starts from: the hooked block itself when what it replaces is that block's output, resid_post
    (and no transcoder's source must be read inside it); else the block before; -1: none."""
    return layer if where == "resid_post" and source is None else layer - 1


@torch.no_grad()
def evaluate(p: Plan, progress: bool = True) -> dict[tuple[int, str], dict]:
    """The numbers of every SAE in p.saes, all from one pass over the held-out windows. Per batch:
    one clean forward; one zero-ablated forward per (layer, hook zeroed, BOS rule) whose CE p.zero
    does not hold (kept there afterwards), shared by the SAEs spliced there; one spliced forward
    per SAE."""
    model, windows = p.model, p.windows
    device = next(model.parameters()).device
    stats = {key: ReconStats(sae.d_in, sae.n_latents, device) for key, sae in p.saes.items()}
    sums = {key: _Sums(device) for key in p.saes}
    where = {key: splice_point(key[1], sae) for key, sae in p.saes.items()}  # (hook replaced, transcoder's source)
    zero_of = {key: (key[0], where[key][0], p.pass_through[key]) for key in p.saes}
    ce_zero = {z: p.zero.read(*z) if p.zero is not None else None for z in dict.fromkeys(zero_of.values())}
    for (layer, hook, pass_bos), value in ce_zero.items():
        if value is not None:
            print(f"eval: layer {layer} hook {hook}: zero-ablated CE from {p.zero.path(layer, hook, pass_bos)} "
                  "(same model, windows and positions; --force computes it again)")
    zero_sums = {z: torch.zeros((), dtype=torch.float64, device=device) for z, v in ce_zero.items() if v is None}
    starts = {_resumes_after(layer, hook, None) for layer, hook, _ in zero_sums}
    starts |= {_resumes_after(key[0], *where[key]) for key in p.saes}
    shared: dict[tuple, _SharedZero | None] = {}
    ce_clean = torch.zeros((), dtype=torch.float64, device=device)
    B, (n, T) = p.cfg.batch_size, windows.shape
    bar = tqdm(total=n * T, desc="eval", unit="tok", unit_scale=True, disable=not progress)
    try:
        for i in range(0, n, B):
            ids = torch.from_numpy(windows[i:i + B]).long().to(device)
            mask = torch.ones_like(ids)
            targets = ids[:, 1:].reshape(-1)
            before = {}
            with record_block_outputs(model, sorted(b for b in starts if b >= 0), before):
                clean = scored_logits(model, ids, mask).flatten(0, 1)
            lse_clean = _logsumexp(clean)
            ce_clean += _ce_sum(clean, lse_clean, targets)

            def forward(layer, hook, source, fn, rows=slice(None)):
                after = _resumes_after(layer, hook, source)
                if after == layer:
                    with resume_after_block(model, layer, replace_hidden(before[layer][rows], fn)):
                        return scored_logits(model, ids[rows], mask[rows]).flatten(0, 1)
                with splice(model, layer, hook, fn, source), \
                        (resume_after_block(model, after, before[after][rows]) if after >= 0 else nullcontext()):
                    return scored_logits(model, ids[rows], mask[rows]).flatten(0, 1)

            for z, total in zero_sums.items():
                zero_fn = _replacer(None, z[2], None)
                if z not in shared:  # looked for once, on the first batch
                    shared[z] = _SharedZero.find(forward(*z[:2], None, zero_fn, slice(SHARED_PROBE)), ids, z)
                if shared[z] is not None and shared[z].covers(ids):
                    total += shared[z].ce_sum(targets.view(ids.shape[0], -1))
                    continue
                logits = forward(*z[:2], None, zero_fn)
                total += _ce_sum(logits, _logsumexp(logits), targets)
                del logits
            for key, sae in p.saes.items():
                s = sums[key]
                logits = forward(key[0], *where[key], _replacer(sae, p.pass_through[key], stats[key]))
                lse, kl = _against_clean(clean, lse_clean, logits)
                s.ce_spliced += _ce_sum(logits, lse, targets)
                s.kl += kl.double().sum()
                del logits
            del clean
            bar.update(ids.numel())
    finally:
        bar.close()
    n_pred = n * (T - 1)
    for z, total in zero_sums.items():
        ce_zero[z] = total.item() / n_pred
        if p.zero is not None and math.isfinite(ce_zero[z]):
            p.zero.write(*z, ce_zero[z])
    out = {}
    for key in p.saes:
        s = sums[key]
        clean, spliced, zero = ce_clean.item() / n_pred, s.ce_spliced.item() / n_pred, ce_zero[zero_of[key]]
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
