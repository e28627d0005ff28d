"""Collate's files: what a finished records folder holds, and how to tell whether
it was made from the inputs at hand.

    viewer_data/        the records, stored once: shards of 64 latents' FeatureInfo
                        (OpenAI sae-viewer's schema, plus stats), one JSON line each, each
                        record compact (a window number, its act's nonzero positions and
                        values) and each token window once, in windows files; the viewer
                        and viewer.read_feature(s) make them whole (pipeline.viewer has the
                        format)
    index.json          the latent list: id, density, max_act, common top tokens
    summary.json        counts over the whole store: n_tokens, dead, ultra-rare, ...;
                        `records_format` and `windows_per_file`, how the records lie;
                        `lens_quality`, `decoder_neighbors`, `cooccurrence` (below);
                        for an SAE that groups its latents (Dictionary.latent_groups),
                        `latent_groups`: each group's range and live/dead counts
    viewer.html         the static viewer (pipeline.viewer)
    done                written last: the fingerprint of what the records were made
                        from (SAE weights, output-deciding settings, the records' format)

The logit lens: each latent's decoder row W_dec[i] through the model's final norm
and unembedding, logits = W_U norm(W_dec[i]) (the norm's gain folded in, its bias
and any LM-head bias left out: they are no latent's; logits before any softcapping,
which keeps their order), gives the tokens the latent promotes and suppresses most;
each latent's record holds them under the OpenAI sae-viewer's names. The final norm
is the one model.unembed checks against the model's own logits. Skipped, with a
note in summary.json `logit_lens`, when the store's model is no causal LM or cannot
be loaded here, or more than a norm runs between its last block and its head (these
collate also prints, once), or the hook's width is not the model's.

Whether the lens is worth reading: each record's `lens_peak_z` (peak_z: how far the top
logit stands above the rest) and `lens_uninformative` (under the bar random directions
reach, lens_bar); summary.json `lens_quality` holds the bar, the count under it and
`lower_third`, a layer in the lower third of the model's blocks, where the residual
stream is still far from what the unembedding reads (the viewer says so on every page).

Related latents, 5 each (accumulators.N_RELATED), each record's
    decoder_neighbors   [{id, cos}]: largest cosine of the decoder rows (decoder_neighbors)
    cooccurring         [{id, jaccard, count}]: the latents firing on the same tokens,
                        by Jaccard index (accumulators.CoOccurrence); absent, with
                        summary.json `cooccurrence` {"skipped": ...}, for SAEs wider than
                        collate.cooccurrence_max_latents

Quantile samples (SAEDashboard's and Neuronpedia's activation intervals): each record's
`quantiles` lists up to collate.n_quantiles intervals of equal width over (0, max_act],
lowest first, as {lo, hi, count, examples}: the acts in (lo, hi], `count` of them, and
collate.n_per_quantile of them drawn uniformly with random's seeded keys (records in
random's form, smallest key first). Bounds are snapped to the latent's histogram edges
(multiples of hist_bin_width): each bin goes to the interval holding its midpoint, so a
latent whose acts span few bins has fewer intervals. pipeline.collate.accumulators computes them.

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
from pipeline.collate.accumulators import N_RELATED, Collator, best_per_row
from pipeline.config import CollateConfig, logistics
from pipeline.errors import UserError
from pipeline.paths import DONE
from pipeline.saes import saved_marker
from pipeline.collate.windows import Records, TokenText


# ---------------------------------------------------------------------------
# The logit lens

LENS_K = 10  # tokens kept each way per latent
LENS_BLOCK = 1 << 24  # logits computed at once: [latents, vocab] is never whole (131072 x 49152 would be 26 GB)
# The bar a latent's lens must clear to be worth reading: the LENS_NULL_QUANTILE quantile of the
# peak z of LENS_NULL_DIRECTIONS random directions (seeded) through the same norm and unembedding.
LENS_NULL_DIRECTIONS, LENS_NULL_QUANTILE, LENS_NULL_SEED = 256, 0.95, 0


@dataclasses.dataclass
class Lens:
    model: str  # the store's model, as named in its attributes
    norm: nn.Module | None  # the final norm, float32
    W_U: torch.Tensor  # [vocab, d] float32, rows past the tokenizer's vocabulary dropped
    n_layers: int | None = None  # the model's blocks: where a layer sits in it


@dataclasses.dataclass
class LensOut:
    """logit_lens()'s result: per latent the k largest logits (largest first) and the k smallest
    (smallest first), [n, k] each; how peaked its logits are; and the bar for that."""
    up_ids: np.ndarray
    up: np.ndarray
    down_ids: np.ndarray
    down: np.ndarray
    peak_z: np.ndarray  # [n]: (largest logit - mean) / std over the whole vocabulary
    peak_z_bar: float  # the random directions' LENS_NULL_QUANTILE quantile of peak_z
    n_layers: int | None


def load_lens(attrs: dict, device) -> Lens | str:
    """The store's model's final norm and unembedding, or why there is no lens (one line).

    Only those two are kept: the rest of the causal LM is dropped right after loading."""
    from pipeline.model import find_blocks, load_causal_lm, unembed

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
    n_layers = len(find_blocks(model))
    del model
    return Lens(name, norm.float() if norm is not None else None, W_U, n_layers)


def _lens_logits(rows: torch.Tensor, lens: Lens) -> torch.Tensor:
    """W_U norm(rows), the norm's bias left out: a LayerNorm adds it whatever the input, so
    norm(0) is it (0 for RMSNorm)."""
    if lens.norm is not None:
        rows = lens.norm(rows) - lens.norm(torch.zeros(1, rows.shape[1], device=rows.device))
    return rows @ lens.W_U.T


def peak_z(logits: torch.Tensor, largest: torch.Tensor | None = None, overwrite: bool = False) -> torch.Tensor:
    """Per row, how far its largest logit stands above the rest, in standard deviations of the
    row: (max - mean) / std over the whole vocabulary. A direction the unembedding reads as a few
    tokens scores high; one it reads as noise scores what a random direction does. 0 for a
    constant row. `largest`: each row's max when already known; `overwrite`: logits may be
    centred in place (each saves a pass over [rows, vocab]).

    Two passes, mean then the norm of the centred rows: a third of torch.std_mean's time here,
    and no cancellation where a row's mean dwarfs its spread."""
    mean = logits.mean(dim=1, keepdim=True)
    top = logits.max(dim=1).values if largest is None else largest
    centred = logits.sub_(mean) if overwrite else logits - mean
    std = torch.linalg.vector_norm(centred, dim=1) / logits.shape[1] ** 0.5
    return torch.where(std > 0, (top - mean[:, 0]) / std.clamp_min(torch.finfo(logits.dtype).tiny), 0.0)


@torch.no_grad()
def logit_lens(W_dec: torch.Tensor, lens: Lens, k: int = LENS_K) -> LensOut:
    """Each latent's largest and smallest logits of W_U norm(W_dec[i]) and peak_z, in blocks of
    latents; the bar is the quantile of peak_z over random directions of the same model."""
    W_U = lens.W_U
    n, vocab = W_dec.shape[0], W_U.shape[0]
    k = min(k, vocab)
    rows = W_dec.detach().to(W_U.device, torch.float32)
    out = [np.empty((n, k), np.int64), np.empty((n, k), np.float32),
           np.empty((n, k), np.int64), np.empty((n, k), np.float32)]
    z = np.empty(n, np.float32)
    block = max(1, LENS_BLOCK // vocab)
    for lo in range(0, n, block):
        logits = _lens_logits(rows[lo: lo + block], lens)
        for j, largest in ((0, True), (2, False)):
            top = logits.topk(k, dim=1, largest=largest, sorted=True)
            out[j][lo: lo + block] = top.indices.cpu().numpy()
            out[j + 1][lo: lo + block] = top.values.cpu().numpy()
            if largest:
                biggest = top.values[:, 0]
        z[lo: lo + block] = peak_z(logits, biggest, overwrite=True).cpu().numpy()  # after both topk: it centres them
    return LensOut(*out, peak_z=z, peak_z_bar=lens_bar(lens, rows.shape[1]), n_layers=lens.n_layers)


@torch.no_grad()
def lens_bar(lens: Lens, d: int) -> float:
    """The LENS_NULL_QUANTILE quantile of peak_z over LENS_NULL_DIRECTIONS random Gaussian
    directions (seeded, so every run of a model agrees): a latent below it is no more peaked than
    a direction chosen at random, whatever the vocabulary's size and the unembedding's anisotropy
    make of one (a fixed bar would not carry from one model to the next)."""
    g = torch.Generator().manual_seed(LENS_NULL_SEED)
    null = torch.randn(LENS_NULL_DIRECTIONS, d, generator=g).to(lens.W_U.device)
    z = peak_z(_lens_logits(null, lens)).double().cpu()
    return float(torch.quantile(z, LENS_NULL_QUANTILE))


def _lens_fields(lens: LensOut, i: int, text: TokenText) -> dict:
    up_ids, up, down_ids, down = lens.up_ids[i], lens.up[i], lens.down_ids[i], lens.down[i]
    z = float(np.round(float(lens.peak_z[i]), 6))
    return {
        "top_upvote_tokens_logits": text.pieces(up_ids),
        "top_upvotes_logits": _round(up),
        "top_upvote_token_ints": up_ids.tolist(),
        "top_downvote_tokens_logits": text.pieces(down_ids),
        "top_downvotes_logits": _round(down),
        "top_downvote_token_ints": down_ids.tolist(),
        "lens_peak_z": z,
        "lens_uninformative": bool(lens.peak_z[i] < lens.peak_z_bar),
    }


def lens_quality(lens: LensOut, layer: int) -> dict:
    """summary.json `lens_quality`: the bar, how many latents fall under it, and whether the layer
    sits in the model's lower third, where the residual stream is still far from what the
    unembedding reads and the lens says little whatever the latent."""
    return {"measure": "peak_z: (largest logit - mean) / std over the vocabulary",
            "peak_z_bar": round(lens.peak_z_bar, 6), "null_directions": LENS_NULL_DIRECTIONS,
            "null_quantile": LENS_NULL_QUANTILE,
            "uninformative": int((lens.peak_z < lens.peak_z_bar).sum()),
            "n_layers": lens.n_layers,
            "lower_third": lens.n_layers is not None and 3 * (layer + 1) <= lens.n_layers}


# ---------------------------------------------------------------------------
# Related latents: decoder neighbours (co-firing partners: accumulators.CoOccurrence)

NEIGHBOR_BLOCK = 1 << 22  # cosines computed at once: [block rows, n], never [n, n]


@torch.no_grad()
def decoder_neighbors(W_dec: torch.Tensor, k: int = N_RELATED) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cos), each [n, k]: each latent's k others whose decoder rows have the largest cosine
    with its own, largest first, ties to the smaller id. A block of rows against all of W_dec at a
    time, so memory is NEIGHBOR_BLOCK floats whatever n; time n² d, as one encode of n tokens."""
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = w.shape[0]
    k = min(k, max(n - 1, 0))
    ids, cos = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    step = max(1, NEIGHBOR_BLOCK // max(n, 1))
    for lo in range(0, n, step):
        sim = w[lo: lo + step] @ w.T
        r = torch.arange(len(sim), device=sim.device)
        sim[r, lo + r] = float("-inf")  # not its own neighbour
        cols, vals = best_per_row(sim, k)
        ids[lo: lo + step], cos[lo: lo + step] = cols.cpu().numpy(), vals.cpu().numpy()
    return ids, cos


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


WORD_TOKENS = 4  # tokens a picked word may reach each side of the picked one


def picked_word(strings: list[str], idx: int) -> tuple[str, int, int]:
    """(word, start, end): the whitespace-delimited word of a window's token strings that holds
    token idx, and the picked token's characters in it, word[start:end]. The viewer's search
    looks in these, so "Deprecated" finds a latent picked at "recated" of "Dep" + "recated".
    A token opening with whitespace starts a word, one ending with it ends one; a word reaches
    at most WORD_TOKENS tokens each side of the picked one."""
    lo = hi = idx
    while (lo > 0 and idx - lo < WORD_TOKENS and not strings[lo][:1].isspace()
           and not strings[lo - 1][-1:].isspace()):
        lo -= 1
    while (hi + 1 < len(strings) and hi - idx < WORD_TOKENS and not strings[hi][-1:].isspace()
           and not strings[hi + 1][:1].isspace()):
        hi += 1
    start = sum(len(t) for t in strings[lo:idx])
    return "".join(strings[lo: hi + 1]), start, start + len(strings[idx])


@dataclasses.dataclass
class Windows:
    """The distinct windows the records show, numbered in (doc, start, length) order, the order of
    the viewer's windows files: record r shows window of_record[r] [R]; window w [n_windows each]
    is tokens start[w]:start[w] + length[w] of sequence doc[w], found in row slot[w] of
    Records.tokens."""
    of_record: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    slot: np.ndarray


def number_windows(recs: Records, ctx: int) -> Windows:
    """The windows of `recs`, each once (Windows)."""
    doc = recs.row // ctx
    # One integer per (doc, start, length) that sorts as the triple does: start < ctx, length <= ctx.
    key = (doc * (ctx + 1) + recs.start) * (ctx + 1) + recs.length
    _, first, of_record = np.unique(key, return_index=True, return_inverse=True)
    return Windows(of_record.reshape(-1), doc[first], recs.start[first], recs.length[first], recs.slot[first])


def write_windows(view: viewer.ViewerWriter, wins: Windows, recs: Records, text: TokenText,
                  ctx: int) -> tuple[list[tuple[str, int, int] | None], int]:
    """The viewer's windows files (pipeline.viewer's format): each window's token ids once, with
    its file's table of their strings. Returns (each record's picked word, picked_word's, None but
    for top records, the only ones the search reads; the windows a file holds). The words are made
    here, where each window's strings are at hand once however many records show it."""
    picked: list[tuple[str, int, int] | None] = [None] * len(recs.row)
    idx = (recs.row % ctx - recs.start).tolist()
    top = np.flatnonzero(recs.kind == 0)
    top = top[np.argsort(wins.of_record[top], kind="stable")]
    # Window w's top records: top[top_of[w]:top_of[w + 1]].
    top_of = np.searchsorted(wins.of_record[top], np.arange(len(wins.doc) + 1)).tolist()
    top = top.tolist()
    docs, starts, lengths, slots = (a.tolist() for a in (wins.doc, wins.start, wins.length, wins.slot))
    per_file = viewer.windows_per_file(recs.tokens.shape[1])
    for k, lo in enumerate(range(0, len(docs), per_file)):
        table: dict[int, str] = {}
        rows = []
        for w in range(lo, min(lo + per_file, len(docs))):
            ids = np.asarray(recs.tokens[slots[w], : lengths[w]], dtype=np.int64)
            strings, pieces, id_list = text.strings(ids), text.pieces(ids), ids.tolist()
            if strings == pieces:
                table.update(zip(id_list, pieces))
                own = ""
            else:  # a character spans tokens: the window reads in context
                own = "," + _dumps(strings)
            rows.append(f"[{docs[w]},{starts[w]},[{','.join(map(str, id_list))}]{own}]")
            words: dict[int, tuple[str, int, int]] = {}  # the latents firing on one token share its word
            for r in top[top_of[w]: top_of[w + 1]]:
                if idx[r] not in words:
                    words[idx[r]] = picked_word(strings, idx[r])
                picked[r] = words[idx[r]]
        strings_json = _dumps({str(t): table[t] for t in sorted(table)})
        view.add_windows(k, f'{{"strings":{strings_json},"windows":[\n' + ",\n".join(rows) + "\n]}")
    return picked, per_file


class _RecordText:
    """The JSON of compact records (pipeline.viewer's format: [w, idx, at, values(, act)]), a
    block of records at a time, every block's numbers formatted at once (json_number_arrays)."""

    def __init__(self, recs: Records, window_of: np.ndarray, ctx: int):
        self.recs, self.window_of, self.ctx = recs, window_of, ctx

    def block(self, lo: int, hi: int) -> tuple[list[str], list[float], list[int]]:
        """For records lo:hi: (each one's JSON, its act as written, its kind)."""
        recs = self.recs
        slots, lengths = recs.slot[lo:hi], recs.length[lo:hi]
        n = len(slots)
        values = np.asarray(recs.acts[slots]).reshape(n, recs.acts.shape[1])
        # The acts that are not 0 as written (in millionths, as json_number_arrays rounds them):
        # every other one reads back as 0.0.
        m = np.rint(values.astype(np.float64) * 1e6)
        kept = (m != 0) & (np.arange(values.shape[1])[None, :] < lengths[:, None])
        count = kept.sum(1)
        rec, at = np.nonzero(kept)  # each record's positions, in order
        ends = np.cumsum(count)
        packed = np.zeros((n, int(count.max(initial=0))), values.dtype)
        packed[rec, np.arange(len(rec)) - np.repeat(ends - count, count)] = values[rec, at]
        value_text = json_number_arrays(packed, count)
        act = recs.act[lo:hi]
        act_text = json_number_arrays(act[:, None], np.ones(n, np.int64))
        idx = recs.row[lo:hi] % self.ctx - recs.start[lo:hi]
        own_act = (np.rint(act.astype(np.float64) * 1e6) != m[np.arange(n), idx]).tolist()
        at, ends = at.tolist(), ends.tolist()
        blobs = []
        for j, (w, i) in enumerate(zip(self.window_of[lo:hi].tolist(), idx.tolist())):
            positions = ",".join(map(str, at[ends[j] - int(count[j]): ends[j]]))
            tail = f",{act_text[j][1:-1]}]" if own_act[j] else "]"
            blobs.append(f"[{w},{i},[{positions}],{value_text[j]}{tail}")
        return blobs, np.round(act.astype(np.float64), 6).tolist(), recs.kind[lo:hi].tolist()


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


def _related(ids: np.ndarray, values: np.ndarray, name: str, counts: np.ndarray | None = None) -> list[str]:
    """Per latent, its related latents as the JSON list a record holds: [{"id", name[, "count"]}]."""
    shown = np.round(values.astype(np.float64), 6).tolist()  # a float's str is its JSON, as json.dumps writes it
    counts_l = counts.tolist() if counts is not None else None
    out = []
    for i, row in enumerate(ids.tolist()):
        extra = [f',"count":{c}' for c in counts_l[i]] if counts_l else [""] * len(row)
        out.append("[" + ",".join(f'{{"id":{j},"{name}":{shown[i][m]}{extra[m]}}}'
                                  for m, j in enumerate(row) if j >= 0) + "]")
    return out


def write_records(out: Path, col: Collator, recs: Records, text: TokenText, cfg: CollateConfig,
                  meta: dict, lens: LensOut | None = None, lens_note: dict | None = None,
                  groups: tuple[str, torch.Tensor] | None = None,
                  neighbors: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Every latent's record (into the viewer's shards), index.json, summary.json and the viewer.
    `lens` is logit_lens()'s result (None: no lens, `lens_note` says why); `groups` the SAE's
    latent_groups() (None: its latents form no groups); `neighbors` decoder_neighbors()'s result.
    The co-firing partners come from the Collator (None there: not counted)."""
    ctx = col.ctx
    n_tok = max(col.n_tokens, 1)
    count = col.stats.count.cpu().numpy()
    sums = col.stats.sums.cpu().numpy().T / n_tok
    width = col.stats.width.cpu().numpy()
    hist = col.stats.hist.cpu().numpy()
    density = count / n_tok
    n = len(count)
    quantiles = col.quantiles
    q_lo, q_hi = (np.round(t.cpu().numpy(), 6) for t in (quantiles.lo, quantiles.hi))
    q_count, q_present = quantiles.count.cpu().numpy(), quantiles.present.cpu().numpy()
    grouped = latent_groups(groups, count)  # first: an architecture's bad groups fail before any writing
    near = _related(*neighbors, "cos") if neighbors is not None else None
    partners = None
    if col.cooccurring is not None:
        p_ids, p_jac, p_count = (t.cpu().numpy() for t in col.cooccurring)
        partners = _related(p_ids, p_jac, "jaccard", p_count)

    view = viewer.ViewerWriter(out, write_atomic)
    wins = number_windows(recs, ctx)
    picked_words, per_file = write_windows(view, wins, recs, text, ctx)
    rec_text = _RecordText(recs, wins.of_record, ctx)
    latents = []
    block = 256  # latents whose records are made at once
    for i in tqdm(range(n), unit="latent", desc=f"write {meta['layer']}/{meta['hook']}", mininterval=1.0):
        if i % block == 0:
            lo = int(recs.offsets[i])
            blobs, acts, kinds = rec_text.block(lo, int(recs.offsets[min(n, i + block)]))
        mine = range(int(recs.offsets[i]) - lo, int(recs.offsets[i + 1]) - lo)
        of_kind: dict[int, list[int]] = {}  # Records.kind -> this latent's records, best or smallest key first
        for j in mine:
            of_kind.setdefault(kinds[j], []).append(j)
        top, random = of_kind.get(0, []), of_kind.get(1, [])
        words = [picked_words[lo + j] for j in top]
        picked = [word[a:b] for word, a, b in words]
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
        intervals = [f'{_dumps({"lo": float(q_lo[i, q]), "hi": float(q_hi[i, q]), "count": int(q_count[i, q])})[:-1]},'
                     f'"examples":[{",".join(blobs[j] for j in of_kind.get(2 + q, []))}]}}'
                     for q in np.flatnonzero(q_present[i]).tolist()]
        related = (f',"decoder_neighbors":{near[i]}' if near is not None else "") + \
                  (f',"cooccurring":{partners[i]}' if partners is not None else "")
        tail = "," + _dumps(_lens_fields(lens, i, text))[1:] if lens is not None else "}"
        blob = (f'{_dumps(head)[:-1]},"top":[{",".join(blobs[j] for j in top)}],'
                f'"random":[{",".join(blobs[j] for j in random)}],"quantiles":[{",".join(intervals)}]'
                f'{related}{tail}')
        view.add(i, blob, words)
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
        "n_quantiles": cfg.n_quantiles,
        "n_per_quantile": cfg.n_per_quantile,
        "seed": cfg.seed,
        "window": cfg.window,
        "records_format": viewer.RECORDS_FORMAT,  # how the records lie on disk (pipeline.viewer)
        "windows_per_file": per_file,
        "logit_lens": lens_note,
        "decoder_neighbors": {"k": N_RELATED, "measure": "cosine of the decoder rows"} if near is not None else None,
        "cooccurrence": ({"k": N_RELATED, "measure": "jaccard: tokens both fire on / tokens either fires on"}
                         if partners is not None else
                         {"skipped": f"{n} latents > collate.cooccurrence_max_latents = {cfg.cooccurrence_max_latents}"}),
    }
    if lens is not None:
        summary["lens_quality"] = lens_quality(lens, meta["layer"])
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
            "records.format": viewer.RECORDS_FORMAT, "sae.sha256": marker.get("sha256")}


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
