"""Collate's files: what a finished records folder holds, and how to tell whether
it was made from the inputs at hand.

    viewer_data/        the records, stored once: shards of 64 latents' FeatureInfo
                        (OpenAI sae-viewer's schema, plus stats), one JSON line each,
                        which the viewer loads and viewer.read_feature(s) reads
    index.json          the latent list: id, density, max_act, common top tokens
    summary.json        counts over the whole store: n_tokens, dead, ultra-rare, ...;
                        for an SAE that groups its latents (Dictionary.latent_groups),
                        `latent_groups`: each group's range and live/dead counts
    viewer.html         the static viewer (pipeline.viewer)
    done                written last: the fingerprint of what the records were made
                        from (SAE weights, output-deciding settings)

The logit lens: each latent's decoder row W_dec[i] through the model's final norm
and unembedding, logits = W_U norm(W_dec[i]) (the norm's gain folded in, its bias
and any LM-head bias left out: they are no latent's; logits before any softcapping,
which keeps their order), gives the tokens the latent promotes and suppresses most;
each latent's record holds them under the OpenAI sae-viewer's names. The final norm
is the one model.unembed checks against the model's own logits. Skipped, with a
note in summary.json `logit_lens`, when the store's model is no causal LM or cannot
be loaded here, or more than a norm runs between its last block and its head (these
collate also prints, once), or the hook's width is not the model's.

"dead" means never fired on the whole store (the tokens the statistics counted,
BOS excluded with exclude_bos): summary.json `dead`, and the viewer's word.

Latent groups (an architecture's Dictionary.latent_groups(), e.g. nested prefixes) are
contiguous runs of latents, so summary.json holds them once, not per latent:

    "latent_groups": {"name": "prefix group",
                      "groups": [{"first": 0, "last": 1, "live": 2, "dead": 0}, ...]}

group g is groups[g]: latents first..last (both included), how many fired and how many
never did. Absent for an SAE whose latents form no groups.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import fsio, plots, viewer
from pipeline.accumulators import Collator
from pipeline.config import CollateConfig, logistics
from pipeline.errors import UserError
from pipeline.paths import DONE
from pipeline.saes import saved_marker
from pipeline.windows import Records, TokenText


# ---------------------------------------------------------------------------
# The logit lens

LENS_K = 10  # tokens kept each way per latent
LENS_BLOCK = 1 << 24  # logits computed at once: [latents, vocab] is never whole (131072 x 49152 would be 26 GB)


@dataclasses.dataclass
class Lens:
    model: str  # the store's model, as named in its attributes
    norm: nn.Module | None  # the final norm, float32
    W_U: torch.Tensor  # [vocab, d] float32, rows past the tokenizer's vocabulary dropped


def load_lens(attrs: dict, device) -> Lens | str:
    """The store's model's final norm and unembedding, or why there is no lens (one line).

    Only those two are kept: the rest of the causal LM is dropped right after loading."""
    from pipeline.model import load_causal_lm, unembed

    name, revision = attrs.get("model"), attrs.get("revision")
    if not name or revision in (None, "none"):  # write_synthetic's stores: no model made them
        return "the store names no model it was harvested from"
    try:
        model, tokenizer = load_causal_lm(name, revision, "float32", str(device))
        norm, W_U = unembed(model)
    except UserError as e:
        return str(e)
    except (ValueError, KeyError, RuntimeError) as e:  # an architecture this transformers cannot build
        return f"cannot load {name!r} as a causal LM ({type(e).__name__}: {str(e).strip().splitlines()[0]})"
    W_U = W_U.detach()[: len(tokenizer)].float()
    del model
    return Lens(name, norm.float() if norm is not None else None, W_U)


@torch.no_grad()
def logit_lens(W_dec: torch.Tensor, lens: Lens, k: int = LENS_K) -> tuple[np.ndarray, ...]:
    """(up_ids, up_logits, down_ids, down_logits), each [n_latents, k]: the largest logits of
    W_U norm(W_dec[i]), largest first, and the smallest, smallest first; in blocks of latents."""
    W_U = lens.W_U
    n, vocab = W_dec.shape[0], W_U.shape[0]
    k = min(k, vocab)
    rows = W_dec.detach().to(W_U.device, torch.float32)
    # A LayerNorm's bias is added whatever the input: norm(0) is it (0 for RMSNorm)
    bias = lens.norm(torch.zeros(1, rows.shape[1], device=W_U.device)) if lens.norm is not None else 0.0
    out = [np.empty((n, k), np.int64), np.empty((n, k), np.float32),
           np.empty((n, k), np.int64), np.empty((n, k), np.float32)]
    block = max(1, LENS_BLOCK // vocab)
    for lo in range(0, n, block):
        h = rows[lo: lo + block]
        if lens.norm is not None:
            h = lens.norm(h) - bias
        logits = h @ W_U.T
        for j, largest in ((0, True), (2, False)):
            top = logits.topk(k, dim=1, largest=largest, sorted=True)
            out[j][lo: lo + block] = top.indices.cpu().numpy()
            out[j + 1][lo: lo + block] = top.values.cpu().numpy()
    return tuple(out)


def _lens_fields(lens: tuple[np.ndarray, ...], i: int, text: TokenText) -> dict:
    up_ids, up, down_ids, down = (a[i] for a in lens)
    return {
        "top_upvote_tokens_logits": text.pieces(up_ids),
        "top_upvotes_logits": _round(up),
        "top_upvote_token_ints": up_ids.tolist(),
        "top_downvote_tokens_logits": text.pieces(down_ids),
        "top_downvotes_logits": _round(down),
        "top_downvote_token_ints": down_ids.tolist(),
    }


# ---------------------------------------------------------------------------
# The records


def write_atomic(path: Path, text: str):
    """Temp name, then rename: a killed run never leaves a torn file. No fsync per file
    (100k latents would take minutes): everything here is written inside `.partial/`,
    which swap_dir syncs once before it takes the final name."""
    fsio.write_atomic(path, text, durable=False)


def _dumps(obj) -> str:
    # allow_nan=False: strict JSON, which JavaScript's JSON.parse and other tools accept.
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _round(values: np.ndarray) -> list[float]:
    # 6 decimals: far below any visible difference, and halves the size of the files.
    # rint(x * 1e6) / 1e6 is the double nearest the decimal, so it prints short.
    return np.round(values.astype(np.float64), 6).tolist()


def json_number_arrays(values: np.ndarray, lengths: np.ndarray, piece: int = 1 << 16) -> list[str]:
    """Row r of values [R, W], its first lengths[r] entries, as a JSON array of the numbers
    rounded to 6 decimals: text that parses to np.round(values, 6) exactly.

    Formatting floats one by one is what made writing records Python-bound, so the
    characters of many rows (about `piece` numbers) are laid out at once from tables, a
    mask keeps the ones each number shows, and one buffer is cut into rows. A row holding
    a number of 1000 or more (or one not finite) goes through json instead."""
    W = values.shape[1]
    step = max(1, piece // max(W, 1))
    out: list[str] = []
    for lo in range(0, values.shape[0], step):
        out += _number_rows(values[lo: lo + step], lengths[lo: lo + step])
    return out


# A number below 1000 in millionths, m = 10^6 * ip + fp, as 16 bytes (two little-endian words):
#   "-" i i i "." f f f | f f f "," - - - -
# with a keep mask beside them: the sign when negative, the integer digits without leading zeros
# (at least one), the decimals without trailing zeros (at least one), the comma between numbers.
# Each word is one table lookup (ip < 1000, fp < 10^6), so a number costs a handful of
# vectorised operations whatever its digits. Built on first use (about 40 MB).
_TABLES: dict[str, np.ndarray] = {}


def _tables() -> dict[str, np.ndarray]:
    if not _TABLES:
        def word(parts):  # [(byte position, uint64 array)] -> one word per entry
            return sum(a.astype(np.uint64) << np.uint64(8 * at) for at, a in parts)

        f = np.arange(10**6, dtype=np.int64)
        place = [10**5, 10**4, 10**3, 10**2, 10, 1]
        digit = [f // p % 10 + ord("0") for p in place]
        shown = [(f % (10 * p) != 0) | (p == 10**5) for p in place]  # no trailing zeros, at least one
        _TABLES["frac0"] = word(zip((5, 6, 7), digit[:3]))
        _TABLES["frac1"] = word([*zip((0, 1, 2), digit[3:]), (3, np.full(len(f), ord(",")))])
        _TABLES["frac0_keep"] = word(zip((5, 6, 7), shown[:3]))
        _TABLES["frac1_keep"] = word(zip((0, 1, 2), shown[3:]))
        i = np.arange(1000, dtype=np.int64)
        one = np.ones(1000, np.int64)
        _TABLES["int"] = word([(0, ord("-") * one), (1, i // 100 + ord("0")), (2, i // 10 % 10 + ord("0")),
                               (3, i % 10 + ord("0")), (4, ord(".") * one)])
        _TABLES["int_keep"] = word([(1, i >= 100), (2, i >= 10), (3, one), (4, one)])
    return _TABLES


def _number_rows(values: np.ndarray, lengths: np.ndarray) -> list[str]:
    R, W = values.shape
    t = _tables()
    m = np.rint(values.astype(np.float64) * 1e6)
    small = (np.abs(m) < 1e9).all(axis=1)  # rows of numbers below 1000; the others go through json
    m = np.where(small[:, None], m, 0).astype(np.int64)
    mag = np.abs(m)
    ip, fp = mag // 10**6, mag % 10**6
    words = np.empty((R, W, 2), "<u8")
    keep = np.empty((R, W, 2), "<u8")
    words[..., 0] = t["int"][ip] | t["frac0"][fp]
    words[..., 1] = t["frac1"][fp]
    keep[..., 0] = t["int_keep"][ip] | t["frac0_keep"][fp] | (m < 0)
    col = np.arange(W)[None, :]
    keep[..., 1] = t["frac1_keep"][fp] | ((col < lengths[:, None] - 1).astype(np.uint64) << np.uint64(24))
    keep *= (col < lengths[:, None])[..., None].astype(np.uint64)
    keep_bytes = keep.view(np.uint8).reshape(R, W * 16).view(bool)
    buf = words.view(np.uint8).reshape(R, W * 16)[keep_bytes].tobytes().decode("ascii")
    out, start = [], 0
    for r, end in enumerate(np.cumsum(keep_bytes.sum(1)).tolist()):
        out.append("[" + buf[start:end] + "]" if small[r] else _dumps(_round(values[r, :lengths[r]])))
        start = end
    return out


class _RecordText:
    """The JSON of records (OpenAI sae-viewer's SequenceInfo), a block of records at a time.

    Many records share a window (a sequence holds the top acts of several latents), so its
    tokens' JSON is made once and kept, up to WINDOWS_KEPT windows."""

    WINDOWS_KEPT = 1 << 16

    def __init__(self, recs: Records, text: TokenText, ctx: int):
        self.recs, self.text, self.ctx = recs, text, ctx
        self.windows: dict[tuple[int, int, int], tuple[list[str], str, str]] = {}

    def _window(self, doc: int, start: int, length: int, slot: int) -> tuple[list[str], str, str]:
        """(token strings, their JSON, the ids' JSON) of a record's window."""
        key = (doc, start, length)
        got = self.windows.get(key)
        if got is None:
            ids = self.recs.tokens[slot, :length]
            strings = self.text.strings(ids)
            got = (strings, _dumps(strings), "[" + ",".join(map(str, ids.tolist())) + "]")
            if len(self.windows) >= self.WINDOWS_KEPT:
                self.windows.clear()
            self.windows[key] = got
        return got

    def block(self, lo: int, hi: int) -> tuple[list[str], list[str], list[float], list[int]]:
        """For records lo:hi: (each one's JSON, the token at its picked position, its act as
        written, its kind). The acts of all of them are formatted at once (json_number_arrays)."""
        recs, ctx = self.recs, self.ctx
        slots, lengths = recs.slot[lo:hi], recs.length[lo:hi]
        acts = json_number_arrays(np.asarray(recs.acts[slots]).reshape(len(slots), recs.acts.shape[1]), lengths)
        act = recs.act[lo:hi, None]
        act_text = json_number_arrays(act, np.ones(len(act), np.int64))
        rows, starts = recs.row[lo:hi], recs.start[lo:hi]
        docs, idxs = (rows // ctx).tolist(), (rows % ctx - starts).tolist()
        blobs, picked = [], []
        for j, (doc, idx, start, length, slot) in enumerate(zip(docs, idxs, starts.tolist(), lengths.tolist(),
                                                                slots.tolist())):
            strings, tokens, ints = self._window(doc, start, length, slot)
            blobs.append(f'{{"doc_id":{doc},"idx":{idx},"act":{act_text[j][1:-1]},"acts":{acts[j]},'
                         f'"tokens":{tokens},"token_ints":{ints},"window_start":{start}}}')
            picked.append(strings[idx])
        return blobs, picked, np.round(act[:, 0].astype(np.float64), 6).tolist(), recs.kind[lo:hi].tolist()


def _top_tokens(picked: list[str], n: int = 3, limit: int = 48) -> str:
    """The most common picked tokens, quoted: the latent list's one-line hint."""
    common = Counter(picked).most_common(n)
    out = " ".join(json.dumps(t, ensure_ascii=False) for t, _ in common)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _density_histogram(density: np.ndarray, bin_width: float = 0.25) -> dict:
    live = density[density > 0]
    if not len(live):
        return {"log10_bin_width": bin_width, "lower_edges": [], "counts": []}
    b = np.floor(np.log10(live) / bin_width).astype(np.int64)
    lo = int(b.min())
    counts = np.bincount(b - lo)
    return {"log10_bin_width": bin_width,
            "lower_edges": [round((lo + i) * bin_width, 6) for i in range(len(counts))],
            "counts": counts.tolist()}


def latent_groups(groups: tuple[str, torch.Tensor | np.ndarray] | None, count: np.ndarray) -> dict | None:
    """summary.json's `latent_groups` from Dictionary.latent_groups() and each latent's count of
    positive activations: {"name", "groups": [{"first", "last", "live", "dead"}, ...]}, group g
    at index g; None when the SAE has no groups."""
    if groups is None:
        return None
    name, of = groups
    of = np.asarray(of.cpu() if isinstance(of, torch.Tensor) else of, dtype=np.int64)
    if of.shape != count.shape or (len(of) and (of[0] != 0 or not np.isin(np.diff(of), (0, 1)).all())):
        raise ValueError(f"latent_groups() must number the {len(count)} latents' groups 0, 1, ... in latent "
                         "order, each group a contiguous run")
    out = []
    for g in range(int(of[-1]) + 1 if len(of) else 0):
        first, last = int(np.searchsorted(of, g, "left")), int(np.searchsorted(of, g, "right")) - 1
        live = int((count[first: last + 1] > 0).sum())
        out.append({"first": first, "last": last, "live": live, "dead": last - first + 1 - live})
    return {"name": str(name), "groups": out}


def write_records(out: Path, col: Collator, recs: Records, text: TokenText, cfg: CollateConfig,
                  meta: dict, lens: tuple[np.ndarray, ...] | None = None, lens_note: dict | None = None,
                  groups: tuple[str, torch.Tensor] | None = None) -> dict:
    """Every latent's record (into the viewer's shards), index.json, summary.json and the viewer.
    `lens` is logit_lens()'s result (None: no lens, `lens_note` says why); `groups` the SAE's
    latent_groups() (None: its latents form no groups)."""
    ctx = col.ctx
    n_tok = max(col.n_tokens, 1)
    count = col.stats.count.cpu().numpy()
    sums = col.stats.sums.cpu().numpy().T / n_tok
    width = col.stats.width.cpu().numpy()
    hist = col.stats.hist.cpu().numpy()
    density = count / n_tok
    n = len(count)
    grouped = latent_groups(groups, count)  # first: an architecture's bad groups fail before any writing

    view = viewer.ViewerWriter(out, write_atomic)
    rec_text = _RecordText(recs, text, ctx)
    latents = []
    block = 256  # latents whose records are made at once
    for i in tqdm(range(n), unit="latent", desc=f"write {meta['layer']}/{meta['hook']}", mininterval=1.0):
        if i % block == 0:
            lo = int(recs.offsets[i])
            blobs, tokens, acts, kinds = rec_text.block(lo, int(recs.offsets[min(n, i + block)]))
        mine = range(int(recs.offsets[i]) - lo, int(recs.offsets[i + 1]) - lo)
        top = [j for j in mine if kinds[j] == 0]  # best first
        random = [j for j in mine if kinds[j] == 1]
        picked = [tokens[j] for j in top]
        max_act = acts[top[0]] if top else 0.0
        m1, m2, m3, m4 = (float(s) for s in sums[:, i])
        bins = np.flatnonzero(hist[i])
        head = {
            "index": i,
            "layer": meta["layer"],
            "hook": meta["hook"],
            "density": float(density[i]),
            "mean_act": m1,
            "mean_act_squared": m2,
            # Undefined for a dead latent; null rather than NaN keeps the JSON strict.
            "skew": m3 / m2 ** 1.5 if m2 > 0 else None,
            "kurtosis": m4 / m2 ** 2 if m2 > 0 else None,
            "max_act": max_act,
            "n_positive": int(count[i]),
            "hist_bin_width": float(width[i]),
            "hist": {str(int(b) + 1): int(hist[i, b]) for b in bins},
        }
        tail = "," + _dumps(_lens_fields(lens, i, text))[1:] if lens is not None else "}"
        blob = (f'{_dumps(head)[:-1]},"top":[{",".join(blobs[j] for j in top)}],'
                f'"random":[{",".join(blobs[j] for j in random)}]{tail}')
        view.add(i, blob, picked)
        latents.append({"id": i, "density": head["density"], "max_act": max_act, "top_tokens": _top_tokens(picked)})

    summary = {
        **meta,
        "context_size": ctx,  # tokens per stored window: a record's doc_id counts these
        "n_latents": n,
        "n_tokens": col.n_tokens,
        "exclude_bos": col.skip_first,
        # Sequence positions left out of the statistics; their acts in the records are 0.
        "excluded_positions": [0] if col.skip_first else [],
        "dead": int((count == 0).sum()),  # never fired on any of the n_tokens
        "ultra_rare": int(((density > 0) & (density < cfg.ultra_rare_density)).sum()),
        "ultra_rare_below": cfg.ultra_rare_density,
        "density_histogram": _density_histogram(density),
        "n_top": cfg.n_top,
        "n_random": cfg.n_random,
        "seed": cfg.seed,
        "window": cfg.window,
        "logit_lens": lens_note,
    }
    if grouped is not None:
        summary["latent_groups"] = grouped
    # The largest count of tokens any report has: train's density.png saw only its held-out rows.
    plots.density_figure(out, density, col.n_tokens,
                         f"layer {meta['layer']} {meta['hook']}: feature density on the whole store")
    summary["density_png"] = "density.png"
    index = {"layer": meta["layer"], "hook": meta["hook"], "n_latents": n, "n_tokens": col.n_tokens,
             "latents": latents}
    write_atomic(out / "index.json", _dumps(index))
    write_atomic(out / "summary.json", json.dumps(summary, allow_nan=False, ensure_ascii=False, indent=1))
    view.finish(index, summary)
    return summary


# ---------------------------------------------------------------------------
# The done marker and its fingerprint


# Collate settings that decide the bytes of the records: all but the ones marked logistics in
# pipeline/config.py (layers, hooks, batch_size, device, reader_threads), which change only which
# records are made or how fast, so changing them redoes nothing.
OUTPUT_KEYS = tuple(f.name for f in dataclasses.fields(CollateConfig) if f.name not in logistics(CollateConfig))


def fingerprint(cfg: CollateConfig, sae_folder: Path) -> dict:
    """What the records were made from, as flat `key: value` pairs named like the config."""
    marker = saved_marker(sae_folder) or {}
    return {**{f"collate.{k}": getattr(cfg, k) for k in OUTPUT_KEYS}, "logit_lens.k": LENS_K,
            "sae.sha256": marker.get("sha256")}


def changed_settings(out: Path, want: dict) -> list[str] | None:
    """None when `out` holds no finished records; else what differs from `want`
    (an empty list: finished, and made from exactly `want`)."""
    try:
        done = json.loads((Path(out) / DONE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    have = done.get("fingerprint") if isinstance(done, dict) else None
    if not isinstance(have, dict):
        return ["the records predate settings fingerprints"]
    changes = []
    for key, value in want.items():
        if key == "sae.sha256":
            if have.get(key) != value:
                changes.append("the SAE was retrained (its weights' sha256 differs)")
        elif key not in have:
            changes.append(f"{key} (not recorded; now {value!r})")
        elif have[key] != value:
            changes.append(f"{key} {have[key]!r} -> {value!r}")
    return changes


def finished(out: Path, want: dict) -> bool:
    return changed_settings(out, want) == []


def write_done(out: Path, layer: int, hook: str, n_latents: int, n_tokens: int, want: dict):
    """The marker, written last into a complete folder: it makes the folder finished."""
    write_atomic(out / DONE, _dumps({"layer": layer, "hook": hook, "n_latents": n_latents, "n_tokens": n_tokens,
                                     "fingerprint": want}))
