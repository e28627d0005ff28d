"""Explain: an N2G explanation of every live latent of each collated SAE, scored on
held-out windows against a single-token baseline.

For every (layer, hook) SAE whose records collate finished, into its records folder
<run_dir>/records/<L>/<hook>/:

    explanations.json      per live latent (one that has records): its N2G patterns,
                           their text, their scores and the baseline's (the JSON schema:
                           docs/guides/explain.md; read_explanations reads it back)
    explain_summary.json   mean, median and quartiles of F1 of N2G and of the baseline, and counts
    viewer_data/explanations.js   the same for the viewer: each latent's page, the list's
                           sort and filter by F1, the search (pipeline.viewer.write_explanations)
    explanations.partial   only while a run is under way: the examples done so far

    plan    lock every target, then check every input the work needs (the SAE, the
            records, the store's tokens, the store's model being a causal LM) before
            anything runs: a bad layer fails the whole command up front
    build   the building examples: each live latent's first n_top top and n_random
            random records and n_quantile of each quantile interval's, those in the
            held-out windows left out. A chunk of chunk_windows windows at a time goes
            through pipeline.collate.n2g's steps 1-4, which
            every latent with an example in the chunk shares; a checkpoint after each
    select  the n_select_windows windows before the scoring ones, also held out from
            building: each latent's patterns cut to each depth d (the activating token
            and the d - 1 elements before it, merged as its trie merges them) are
            scored there, and the latent keeps the cut of best F1 (the deepest among
            equals). The search makes patterns as specific as its examples; cutting
            the context that does not pay on unseen text lets them recall the latent's
            other firings (mean F1 on the demo's block 6: 0.214 uncut, 0.254 cut)
    score   the store's last n_score_windows windows, held out from building: the real
            activations are the store's cached ones through the SAE (no model forward),
            the predictions every latent's trie's (n2g.PatternSet), a batch of windows at
            a time into per-latent sums
    write   explain_summary.json, the viewer's viewer_data/explanations.js (pipeline.viewer),
            then explanations.json, each atomically; the partial goes; then the run's
            records index page, with its F1 columns

Scores, per latent, over the text positions of the held-out windows (BOS left out):
precision, recall and F1 of "fires" (prediction > 0 against real activation > 0),
corr (Pearson's, predicted against real activations), n_fires (positions where the
latent really fires) and n_positions. Each is null where it is undefined: precision
when nothing is predicted, recall and F1 when the latent never fires there, corr when
either side is constant.

The baseline, so N2G's worth shows: the latent's most frequent activating tokens among
its building examples (those seen at least BASELINE_MIN_COUNT times, at most BASELINE_MAX;
when none repeats, the BASELINE_FALLBACK strongest), each predicting the mean activation
of its examples wherever it occurs, scored the same way.

explanations.json records the fingerprint of what it was made from (the output-deciding
explain settings, the SAE's weights, the records' done marker, the model): one made from
the same is skipped unless force, one made otherwise is redone with a line saying what
changed. A killed run resumes from explanations.partial (written atomically after each
chunk, with the fingerprint it belongs to) at the next chunk, and with the same settings
finishes byte-identical to an unbroken run: a chunk's forwards are batched within the
chunk in a fixed order, so the same chunk always gives the same numbers (another
batch_tokens or chunk_windows resumes too, exact up to float rounding).

Memory: the building examples and each example's pattern (a few integers per example),
one chunk's queries and their sparse codes, and the tries; never a dense [tokens, latents]
matrix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import fsio, viewer
from pipeline.collate import n2g
from pipeline.config import Config, ExplainConfig, logistics
from pipeline.data import pad_id, special_ids
from pipeline.errors import UserError
from pipeline.harvest import diffs
from pipeline.model import ActivationCapture, is_causal_lm, load_model, resolve_device
from pipeline.paths import DONE, leaf, model_key, records_dir, sae_dir
from pipeline.saes import load_sae, trained
from pipeline.store import ActivationStore, Location
from pipeline.collate.windows import TokenText, store_tokenizer

FILE = "explanations.json"
SUMMARY = "explain_summary.json"
PARTIAL = "explanations.partial"
# Bumped when what the file holds or means changes, so every older one is redone.
FORMAT = 1
BASELINE_MIN_COUNT, BASELINE_MAX, BASELINE_FALLBACK = 2, 5, 3
# The explain settings that decide the file's content; the logistics (layers, hooks, batch_tokens,
# chunk_windows, device) change which SAEs are explained or how fast, not the explanations.
OUTPUT_KEYS = tuple(f.name for f in dataclasses.fields(ExplainConfig) if f.name not in logistics(ExplainConfig))


# ---------------------------------------------------------------------------
# Plan: what to do, every input checked


@dataclass
class Target:
    layer: int
    hook: str
    member: str | None
    sae: Path  # the SAE folder
    records: Path  # the records folder: the output goes in it
    fingerprint: dict
    changes: list[str] | None  # None: no explanations; []: made from these very inputs

    @property
    def name(self) -> str:
        return f"{self.layer}/{leaf(self.hook, self.member)}"


@dataclass
class Plan:
    cfg: ExplainConfig
    store: ActivationStore
    targets: list[Target]
    todo: list[Target]
    device: torch.device
    model: object | None = None  # None when there is nothing to do
    tokenizer: object | None = None
    prefix: tuple[int, ...] = ()  # (BOS,) when the store's windows open with it
    pad: int = 0


def records_sha256(records: Path) -> str | None:
    """Which records a folder holds: a digest of collate's `done` marker (None: no finished records)."""
    done = fsio.read_json(Path(records) / DONE)
    return hashlib.sha256(json.dumps(done, sort_keys=True).encode()).hexdigest() if done else None


def fingerprint(cfg: Config, sae_sha256: str, records: str) -> dict:
    """What explanations.json is made from, as flat `key: value` pairs (`records`: records_sha256)."""
    return {"format": FORMAT, **{f"explain.{k}": getattr(cfg.explain, k) for k in OUTPUT_KEYS},
            "sae.sha256": sae_sha256, "records.done.sha256": records,
            "model.name": model_key(cfg.model.name), "model.revision": cfg.model.revision,
            "model.dtype": cfg.model.dtype}


def changed_settings(out: Path, want: dict) -> list[str] | None:
    """None when `out` holds no explanations.json; else what differs from `want` ([] when nothing)."""
    have = fsio.read_json(Path(out) / FILE).get("fingerprint")
    if not isinstance(have, dict):
        return None
    return diffs(have, want) or ([] if have.get("format") == want["format"] else ["format"])


@contextmanager
def plan(cfg: Config, layers: list[int] | None = None, force: bool = False) -> Iterator[Plan]:
    """The Plan for `layers` (or the config's), valid while the `with` holds every target's lock."""
    c, run_dir = cfg.explain, cfg.run_path
    device = resolve_device(c.device, key="explain.device")
    store = ActivationStore(Location.of(cfg))
    saes = cfg.sae_targets("explain", layers)
    with fsio.target_locks(run_dir, "explain", saes):
        targets = []
        for layer, hook, member in saes:
            folder, out = sae_dir(run_dir, layer, hook, member), records_dir(run_dir, layer, hook, member)
            marker, _ = trained(folder, layer, leaf(hook, member))
            records = records_sha256(out)
            if records is None:
                raise UserError(f"no records for layer {layer} hook {leaf(hook, member)} (looked in {out}); explain "
                                f"builds on them: run `saepipe collate CONFIG --layers {layer}` first")
            want = fingerprint(cfg, marker["sha256"], records)
            targets.append(Target(layer, hook, member, folder, out, want, changed_settings(out, want)))
        todo = [t for t in targets if force or t.changes != []]
        p = Plan(c, store, targets, todo, device)
        if todo:
            n_seq = store.tokens.shape[0]  # raises when the tokens are missing
            for t in todo:
                store.array(t.layer, t.hook)
            if c.n_score_windows + c.n_select_windows >= n_seq:
                raise UserError(f"explain.n_score_windows + n_select_windows = {c.n_score_windows} + "
                                f"{c.n_select_windows} leaves no window to build explanations from: {store.path} "
                                f"holds {n_seq}; lower them")
            _check_model(cfg, store)
            p.tokenizer = store_tokenizer(store)
            prepend, bos, _ = special_ids(p.tokenizer, bool(store.attrs.get("prepend_bos")))
            p.prefix = (int(bos),) if prepend else ()
            p.pad = pad_id(p.tokenizer)
            p.model, _ = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, c.device)
        yield p


def _check_model(cfg: Config, store: ActivationStore):
    """The store's activations must be the config's model's, and that model causal: a suffix cut
    from a text is read as the text read it only when no token sees the tokens after it."""
    there = store.attrs.get("model")
    if not there or model_key(there) != model_key(cfg.model.name):
        raise UserError(f"{store.path} was harvested from model {there!r}, not model.name {cfg.model.name!r}; "
                        "explain reruns the store's model on its tokens: use the config the store was made with")
    if not is_causal_lm(cfg.model.name, cfg.model.revision):
        raise UserError(f"model {cfg.model.name!r} is not a causal language model (an encoder?); explain needs one: "
                        "it reads suffixes of a text, which give the activations the text did only when no token "
                        "sees the ones after it")


# ---------------------------------------------------------------------------
# Building examples


@dataclass
class Examples:
    """Building examples sorted by (window, position, latent)."""
    latent: np.ndarray
    window: np.ndarray
    position: np.ndarray


def building_examples(records: Path, n_top: int, n_random: int, held_out_from: int,
                      first: int, n_quantile: int = 0) -> tuple[list[int], Examples]:
    """(the live latents, their building examples) from a records folder: each latent's first
    n_top top and n_random random records and the first n_quantile of each quantile interval's
    (one example per (window, position)), those in windows >= held_out_from or at a position
    before the text (BOS) left out."""
    live, rows = [], []
    for f in viewer.read_features(records):
        if not (f.get("n_positive") or f["top"]):
            continue  # dead: never fired
        i = int(f["index"])
        live.append(i)
        seen = set()
        spread = [r for q in f.get("quantiles") or [] for r in q["examples"][:n_quantile]]
        for r in f["top"][:n_top] + f["random"][:n_random] + spread:
            place = (int(r["doc_id"]), int(r.get("window_start", 0)) + int(r["idx"]))
            if place[0] < held_out_from and place[1] >= first and place not in seen:
                seen.add(place)
                rows.append((place[0], place[1], i))
    rows.sort()
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return live, Examples(latent=arr[:, 2], window=arr[:, 0], position=arr[:, 1])


@dataclass
class Built:
    """Per building example, in Examples order: the token it activates on, its activation a in
    full context, and its pattern key (None: unexplained)."""
    token: list[int]
    act: list[float]
    keys: list[tuple[int, ...] | None]


def _suffix_rows_tokens(positions, first: int, max_suffix: int, prefix_len: int) -> int:
    """About how many tokens step 1 forwards for one window with examples at `positions`:
    one row per suffix start, to the furthest position that needs it, plus the full context."""
    furthest: dict[int, int] = {}
    for p in positions:
        for s in n2g.suffix_starts(int(p), first, max_suffix):
            furthest[s] = max(furthest.get(s, -1), int(p))
    return sum(prefix_len + e - s + 1 for s, e in furthest.items()) + int(max(positions)) + 1


def build(p: Plan, t: Target, ex: Examples, probe: n2g.LatentProbe, desc: str) -> Built:
    """n2g.explain_examples over every chunk of windows, resuming after the windows a killed run
    checkpointed in explanations.partial, checkpointing after each new chunk."""
    c = p.cfg
    st = n2g.Settings(c.max_suffix, c.importance_threshold, p.prefix, p.pad)
    windows, first_example = np.unique(ex.window, return_index=True)
    bounds = np.append(first_example, len(ex.window))  # window j's examples: bounds[j]:bounds[j + 1]
    partial = t.records / PARTIAL
    meta = {"fingerprint": t.fingerprint, "examples": len(ex.window)}
    built, done = _resume(partial, meta, desc)
    if done:
        print(f"{desc}: resuming after {done} of {len(windows)} windows from {partial}")
    # Chunks of the windows left; with the same chunk_windows, the very chunks of an unbroken run.
    chunks = [range(j, min(j + c.chunk_windows, len(windows))) for j in range(done, len(windows), c.chunk_windows)]

    # The bar counts forwarded tokens; its total is step 1's estimate times the ratio seen so far.
    estimate = [sum(_suffix_rows_tokens(ex.position[bounds[j]:bounds[j + 1]], len(p.prefix), c.max_suffix,
                                        len(p.prefix)) for j in chunk) for chunk in chunks]
    bar = tqdm(total=int(2 * sum(estimate)), unit="tok", unit_scale=True, desc=desc, smoothing=0.1, mininterval=1.0)
    probe.on_tokens = bar.update
    try:
        for ci, chunk in enumerate(chunks):
            lo, hi = int(windows[chunk[0]]), int(windows[chunk[-1]]) + 1
            tokens = p.store.read_tokens(lo, hi)
            sel = slice(int(bounds[chunk[0]]), int(bounds[chunk[-1] + 1]))
            w, pos = ex.window[sel] - lo, ex.position[sel]
            a, keys = n2g.explain_examples(probe, tokens, w, pos, ex.latent[sel], st)
            built.token += tokens[w, pos].tolist()
            built.act += a.tolist()
            built.keys += keys
            _checkpoint(partial, {**meta, "windows_done": chunk[-1] + 1}, built)
            ratio = bar.n / max(1, sum(estimate[: ci + 1]))
            bar.total = max(bar.n, int(bar.n + ratio * sum(estimate[ci + 1:])))
            bar.refresh()
    finally:
        bar.close()
    return built


def _checkpoint(path: Path, meta: dict, built: Built):
    lengths = np.array([-1 if k is None else len(k) for k in built.keys], dtype=np.int64)
    flat = np.array([e for k in built.keys if k is not None for e in k], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
             token=np.array(built.token, dtype=np.int64), act=np.array(built.act, dtype=np.float64),
             key_length=lengths, key=flat)
    fsio.write_atomic(path, buf.getvalue())


def _resume(path: Path, meta: dict, desc: str) -> tuple[Built, int]:
    """(what a killed run checkpointed, after how many windows) when it was made from the same
    inputs and settings; else nothing."""
    empty = Built([], [], [])
    try:
        z = np.load(io.BytesIO(path.read_bytes()))
        have = json.loads(z["meta"].tobytes())
        token, act, lengths, flat = z["token"], z["act"], z["key_length"], z["key"]
    except FileNotFoundError:
        return empty, 0
    except Exception:  # noqa: BLE001 - unreadable: an older format, or damage; the work is redone
        print(f"{desc}: {path} is unreadable; starting over")
        return empty, 0
    done = have.pop("windows_done", 0)
    if have != meta:
        print(f"{desc}: {path} was made from other inputs or settings; starting over")
        return empty, 0
    keys, at = [], 0
    for n in lengths.tolist():
        keys.append(None if n < 0 else tuple(flat[at: at + n].tolist()))
        at += max(n, 0)
    return Built(token.tolist(), act.tolist(), keys), int(done)


# ---------------------------------------------------------------------------
# Tries, baselines and scores


def cut_patterns(keyed: dict[int, list[tuple[tuple[int, ...], float]]],
                 depth: int) -> dict[int, list[tuple[tuple[int, ...], float, int]]]:
    """Each latent's patterns (Trie.patterns) from its examples' keys cut to their first `depth`
    elements: the activating token and the depth - 1 elements before it."""
    out = {}
    for i, pairs in keyed.items():
        trie = n2g.Trie()
        for key, a in pairs:
            trie.insert(key[:depth], a)
        out[i] = trie.patterns()
    return out


def select_depths(store: ActivationStore, t: Target, sae, windows: range, first: int,
                  keyed: dict[int, list[tuple[tuple[int, ...], float]]], batch_tokens: int,
                  device) -> tuple[dict[int, int], dict[int, list[tuple[tuple[int, ...], float, int]]]]:
    """(each latent's depth, its patterns cut to it): the depth whose patterns have the best F1
    on `windows` (the selection windows, apart from building's and scoring's), the deepest among
    equals, so a latent that never fires there keeps its whole patterns. No windows: no cut."""
    deepest = max((len(key) for pairs in keyed.values() for key, _ in pairs), default=1)
    cuts = {d: cut_patterns(keyed, d) for d in range(1, deepest + 1)}
    if not len(windows):
        return {i: max((len(key) for key, _ in pairs), default=0) for i, pairs in keyed.items()}, cuts[deepest]
    sums = score(store, t.layer, t.hook, sae, windows, first, {str(d): pattern_set(cuts[d]) for d in cuts},
                 batch_tokens, device)
    depth = {}
    for i in keyed:
        f1 = {d: sums[str(d)].scores(i)["f1"] for d in cuts}
        best = max(cuts, key=lambda d: (-1.0 if f1[d] is None else f1[d], d))
        depth[i] = min(best, max((len(key) for key, _ in keyed[i]), default=0))
    return depth, {i: cuts[max(1, depth[i])][i] for i in keyed}


def pattern_set(table: dict[int, list[tuple[tuple[int, ...], float, int]]]) -> n2g.PatternSet:
    """Every latent's (key, value, count) patterns as one n2g.PatternSet."""
    rows = [(i, key, value) for i, pats in table.items() for key, value, _ in pats]
    return n2g.PatternSet(*map(list, zip(*rows))) if rows else n2g.PatternSet([], [], [])


def baseline_tokens(tokens: list[int], acts: list[float]) -> list[tuple[int, float, int]]:
    """(token, mean activation, count) of a latent's baseline explanation, from its examples'
    activating tokens and activations (only positive ones count)."""
    seen: dict[int, list[float]] = {}
    for tok, a in zip(tokens, acts):
        if a > 0:
            seen.setdefault(tok, []).append(a)
    ranked = sorted(((tok, sum(v) / len(v), len(v)) for tok, v in seen.items()), key=lambda r: (-r[2], -r[1], r[0]))
    repeated = [r for r in ranked if r[2] >= BASELINE_MIN_COUNT][:BASELINE_MAX]
    return repeated or ranked[:BASELINE_FALLBACK]


class ScoreSums:
    """Per-latent sums over scored positions, from sparse predictions and real activations
    (x = predicted, y = real; zero wherever an entry is absent)."""

    def __init__(self, n_latents: int):
        self.n_latents, self.n = n_latents, 0
        self.tp, self.fp, self.fn = (np.zeros(n_latents, np.int64) for _ in range(3))
        self.sx, self.sy, self.sxx, self.syy, self.sxy = (np.zeros(n_latents) for _ in range(5))

    def add(self, n_positions: int, pred: tuple[np.ndarray, np.ndarray, np.ndarray],
            real: tuple[np.ndarray, np.ndarray, np.ndarray]):
        """`n_positions` more positions; pred and real: (position, latent, value), at most one entry
        per (position, latent), values > 0."""
        N = self.n_latents
        self.n += n_positions
        (pp, pl, pv), (rp, rl, rv) = pred, real
        count = lambda lat, w=None: np.bincount(lat, weights=w, minlength=N)  # noqa: E731
        _, ip, ir = np.intersect1d(pp * N + pl, rp * N + rl, assume_unique=True, return_indices=True)
        both = count(pl[ip]).astype(np.int64)
        self.tp += both
        self.fp += count(pl).astype(np.int64) - both
        self.fn += count(rl).astype(np.int64) - both
        self.sx += count(pl, pv)
        self.sxx += count(pl, pv * pv)
        self.sy += count(rl, rv)
        self.syy += count(rl, rv * rv)
        self.sxy += count(pl[ip], pv[ip] * rv[ir])

    def scores(self, i: int) -> dict:
        tp, fp, fn = int(self.tp[i]), int(self.fp[i]), int(self.fn[i])
        n = self.n
        vx = n * self.sxx[i] - self.sx[i] ** 2
        vy = n * self.syy[i] - self.sy[i] ** 2
        cov = n * self.sxy[i] - self.sx[i] * self.sy[i]
        # A constant side has no correlation; rounding can leave a hair of variance, hence the bars.
        ok = vx > 1e-12 * n * self.sxx[i] and vy > 1e-12 * n * self.syy[i]
        return {"precision": _num(tp / (tp + fp)) if tp + fp else None,
                "recall": _num(tp / (tp + fn)) if tp + fn else None,
                "f1": _num(2 * tp / (2 * tp + fp + fn)) if tp + fn else None,
                "corr": _num(cov / np.sqrt(vx * vy)) if ok else None,
                "n_fires": tp + fn, "n_positions": n}


def _num(x) -> float:
    return round(float(x), 6)


def score(store: ActivationStore, layer: int, hook: str, sae, windows: range, first: int,
          sets: dict[str, n2g.PatternSet], batch_tokens: int, device) -> dict[str, ScoreSums]:
    """Each PatternSet's ScoreSums over `windows`: real activations from the store's rows through
    the SAE, a batch of windows at a time."""
    ctx = store.context_size
    sums = {name: ScoreSums(sae.n_latents) for name in sets}
    step = max(1, batch_tokens // ctx)
    for lo in range(windows.start, windows.stop, step):
        hi = min(lo + step, windows.stop)
        tokens = store.read_tokens(lo, hi)
        x = store.read_rows(layer, hook, lo * ctx, hi * ctx).to(device).float()
        with torch.inference_mode():
            idx, vals = sae.encode(x)
        idx, vals = idx.cpu().numpy(), vals.float().cpu().numpy()
        pos, col = np.nonzero((vals > 0) & ((np.arange(len(vals)) % ctx) >= first)[:, None])
        real = (pos.astype(np.int64), idx[pos, col].astype(np.int64), vals[pos, col].astype(np.float64))
        n_positions = (hi - lo) * (ctx - first)
        for name, patterns in sets.items():
            sums[name].add(n_positions, patterns.predict(tokens, first), real)
    return sums


# ---------------------------------------------------------------------------
# One SAE, start to finish


def explain_sae(p: Plan, t: Target) -> dict:
    """Build, score and write one target's explanations; returns its summary plus the seconds it
    took, those the building took (the forwards) and the tokens forwarded."""
    c, store = p.cfg, p.store
    t0 = time.perf_counter()
    desc = f"explain {t.name}"
    n_seq = store.tokens.shape[0]
    held_out = n_seq - c.n_score_windows
    select_from = held_out - c.n_select_windows
    first = len(p.prefix)
    live, ex = building_examples(t.records, c.n_top, c.n_random, select_from, first, c.n_quantile)
    sae = load_sae(t.sae, device=p.device)
    capture = ActivationCapture(p.model, [(t.layer, t.hook)])
    probe = n2g.LatentProbe(capture, (t.layer, t.hook), sae, store.dtype(t.layer, t.hook), p.pad, c.batch_tokens)
    t1 = time.perf_counter()
    built = build(p, t, ex, probe, desc)
    t_build = time.perf_counter() - t1

    # Per live latent: its trie's patterns, and the baseline from its examples' activating tokens.
    keyed: dict[int, list[tuple[tuple[int, ...], float]]] = {i: [] for i in live}
    seen: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in live}
    for lat, tok, a, key in zip(ex.latent.tolist(), built.token, built.act, built.keys):
        seen[lat][0].append(tok)
        seen[lat][1].append(a)
        if key is not None:
            keyed[lat].append((key, a))
    depth, patterns = select_depths(store, t, sae, range(select_from, held_out), first, keyed, c.batch_tokens,
                                    p.device)
    baselines = {i: [((tok,), v, n) for tok, v, n in baseline_tokens(*seen[i])] for i in live}
    sums = score(store, t.layer, t.hook, sae, range(held_out, n_seq), first,
                 {"n2g": pattern_set(patterns), "baseline": pattern_set(baselines)}, c.batch_tokens, p.device)

    text = TokenText(p.tokenizer)
    latents = []
    for i in live:
        shown = [_pattern_json(key, value, count, text) for key, value, count in patterns[i]]
        ids = [key[0] for key, _, _ in baselines[i]]
        latents.append({
            "latent": i,
            "patterns": shown,
            "text": " | ".join(render(s["tokens"]) for s in shown),
            "depth": depth[i],
            "n_examples": len(seen[i][0]),
            "n_explained": len(keyed[i]),
            "scores": sums["n2g"].scores(i),
            "baseline": {"tokens": text.pieces(ids), "ids": ids,
                         "activations": [_num(v) for _, v, _ in baselines[i]],
                         "scores": sums["baseline"].scores(i)},
        })
    head = {"format": FORMAT, "layer": t.layer, "hook": leaf(t.hook, t.member), "n_latents": sae.n_latents,
            "n_live": len(live), "prepend_bos": bool(p.prefix), "select_windows": [select_from, held_out],
            "score_windows": [held_out, n_seq],
            "n_positions": sums["n2g"].n, "wildcard_id": n2g.WILDCARD, "start_id": n2g.START,
            "fingerprint": t.fingerprint}
    if records_sha256(t.records) != t.fingerprint["records.done.sha256"]:  # a collate swapped them meanwhile
        raise UserError(f"the records in {t.records} changed while explain ran (another collate?); rerun explain")
    body = ",\n".join(_dumps(entry) for entry in latents)
    summary = summarize(head, latents)
    # explanations.json last: it is what makes a rerun skip this target, so the summary and the
    # viewer's copy are never older than it.
    fsio.write_atomic(t.records / SUMMARY, json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    viewer.write_explanations(t.records, latents, summary)
    fsio.write_atomic(t.records / FILE, f'{_dumps(head)[:-1]},"latents":[\n{body}\n]}}\n')
    (t.records / PARTIAL).unlink(missing_ok=True)
    return {**summary, "seconds": time.perf_counter() - t0, "build_seconds": t_build,
            "tokens_forwarded": probe.tokens_forwarded}


def _pattern_json(key: tuple[int, ...], value: float, count: int, text: TokenText) -> dict:
    """A trie key as the file shows it: in reading order (^ first, the activating token last)."""
    ids = list(reversed(key))
    shown = [("*" if e == n2g.WILDCARD else "^") if e < 0 else None for e in ids]
    pieces = iter(text.pieces([e for e in ids if e >= 0]))
    return {"tokens": [s if s is not None else next(pieces) for s in shown], "ids": ids, "activation": _num(value),
            "count": count}


def render(tokens: list[str]) -> str:
    """One pattern as one line: its token strings joined, newlines and tabs escaped, the
    markers * and ^ set apart by a space from a token that does not bring its own."""
    out = ""
    for i, tok in enumerate(tokens):
        marker = i > 0 and (tokens[i - 1] in ("*", "^") or tok in ("*", "^"))
        if marker and out and not out[-1].isspace() and not tok[:1].isspace():
            out += " "
        out += tok.replace("\n", "\\n").replace("\t", "\\t")
    return out


def summarize(head: dict, latents: list[dict]) -> dict:
    """explain_summary.json: F1 over the latents that fire in the held-out windows."""
    scored = [entry for entry in latents if entry["scores"]["n_fires"] > 0]

    def stats(get) -> dict:
        f1 = [get(e)["f1"] for e in scored]
        corr = [get(e)["corr"] for e in scored if get(e)["corr"] is not None]
        # Quartiles by linear interpolation between order statistics (numpy's default percentile).
        q1, q3 = np.percentile(f1, [25, 75]).tolist() if f1 else (None, None)
        return {"mean_f1": _num(statistics.fmean(f1)) if f1 else None,
                "median_f1": _num(statistics.median(f1)) if f1 else None,
                "q1_f1": _num(q1) if f1 else None, "q3_f1": _num(q3) if f1 else None,
                "mean_corr": _num(statistics.fmean(corr)) if corr else None}

    return {"layer": head["layer"], "hook": head["hook"], "n_live": head["n_live"], "n_scored": len(scored),
            "n_examples": sum(e["n_examples"] for e in latents), "n_explained": sum(e["n_explained"] for e in latents),
            "score_windows": head["score_windows"], "n_positions": head["n_positions"],
            "n2g": stats(lambda e: e["scores"]), "baseline": stats(lambda e: e["baseline"]["scores"]),
            "depths": {str(d): n for d, n in sorted(Counter(e["depth"] for e in latents).items())},
            "fingerprint": head["fingerprint"]}


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def read_explanations(records_folder) -> dict[int, dict]:
    """Every explained latent's entry of <records_folder>/explanations.json, by latent id ({} when
    the folder has none)."""
    try:
        data = json.loads((Path(records_folder) / FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {int(entry["latent"]): entry for entry in data["latents"]}


# ---------------------------------------------------------------------------
# The stage


def run(cfg: Config, layers: list[int] | None = None, force: bool = False) -> list[dict]:
    """Explain every target of `layers` or the config that is not done; a summary per target
    explained (explain_summary.json's content plus seconds and tokens forwarded)."""
    out = []
    with plan(cfg, layers, force) as p:
        for t in p.targets:
            if t not in p.todo:
                print(f"explain {t.name}: already done in {t.records / FILE} (--force to redo)")
            elif t.changes:
                print(f"explain {t.name}: redoing {t.records / FILE}, made from other inputs: {'; '.join(t.changes)}")
        for t in p.todo:
            if force:  # redo means from scratch: an interrupted run's checkpoint goes too
                (t.records / PARTIAL).unlink(missing_ok=True)
            s = explain_sae(p, t)
            n2, base = s["n2g"], s["baseline"]
            print(f"explain {t.name}: {s['n_live']} live latents, {s['n_explained']} of {s['n_examples']} examples "
                  f"explained; F1 over the {s['n_scored']} latents firing in the {cfg.explain.n_score_windows} "
                  f"held-out windows: N2G mean {_show(n2['mean_f1'])} median {_show(n2['median_f1'])}, baseline mean "
                  f"{_show(base['mean_f1'])} median {_show(base['median_f1'])}; {s['tokens_forwarded']:,} tokens "
                  f"forwarded, {s['seconds']:.0f} s; {t.records / FILE}")
            out.append({**s, "path": t.records / FILE})
            if p.device.type == "cuda":
                torch.cuda.empty_cache()
    if out:
        viewer.write_index_page(cfg.run_path)  # its F1 columns
    return out


def _show(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
