"""Collate's pass 2, the records' windows: which (latent, row) pairs became
records, the tokens and this latent's acts around each, and the tokens as text.

    pick         flatten the Collator's top, random and quantile lists into Records
    cut_windows  re-read only the picked sequences, encode them again, and cut
                 each record's window out of them
    TokenText    per-token strings that concatenate back to the decoded text

Positions left out of the statistics (BOS with exclude_bos) get act 0 in the
windows too, so the viewer never draws BOS as a record's brightest token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.collate.accumulators import Collator
from pipeline.config import CollateConfig
from pipeline.errors import UserError
from pipeline.loader import excludes_bos
from pipeline.saes import Dictionary
from pipeline.collate.scan import Codes, batch_rows_for, one_cpu_thread, read_ahead
from pipeline.store import ActivationStore


# ---------------------------------------------------------------------------
# Which records, and where their windows go


@dataclass
class Records:
    """Every picked (latent, row), ordered by (latent, kind, rank).

    Latent i's records are offsets[i]:offsets[i+1]. Record r's window is row
    slot[r] of acts/tokens [R, W] (W = the widest window), valid up to length[r];
    slots follow the order pass 2 fills them in, so its writes are sequential.
    The two arrays may be memory-mapped scratch files.
    """

    latent: np.ndarray
    kind: np.ndarray  # 0 = top, 1 = random, 2 + q = quantile interval q
    row: np.ndarray
    act: np.ndarray
    start: np.ndarray  # window start, a position in the sequence
    length: np.ndarray
    offsets: np.ndarray
    slot: np.ndarray
    acts: np.ndarray
    tokens: np.ndarray


def _scratch(path: Path, shape, dtype):
    """A disk-backed array, so the records never need to fit in RAM (mmap can't be empty)."""
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def pick(col: Collator, cfg: CollateConfig, context_size: int, scratch: Path) -> Records:
    """Flatten the top, random and quantile lists into Records with their windows laid out."""
    q = col.quantiles
    rows = torch.cat([col.top.row, col.random.row, q.row.flatten(1)], 1).cpu().numpy()
    acts = torch.cat([col.top.act, col.random.act, q.act.flatten(1)], 1).cpu().numpy()
    n_quantiles, per_quantile = q.row.shape[1:]
    kinds = np.concatenate([np.zeros(col.top.size), np.ones(col.random.size),
                            np.repeat(2 + np.arange(n_quantiles), per_quantile)]).astype(np.int32)
    n = rows.shape[0]
    valid = rows >= 0
    latent = np.broadcast_to(np.arange(n)[:, None], rows.shape)[valid]
    kind = np.broadcast_to(kinds[None, :], rows.shape)[valid]
    row, act = rows[valid], acts[valid]
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))])
    pos = row % context_size
    if cfg.window is None:
        start, length, W = np.zeros_like(pos), np.full_like(pos, context_size), context_size
    else:
        start = np.maximum(pos - cfg.window, 0)
        length = np.minimum(pos + cfg.window + 1, context_size) - start
        W = min(2 * cfg.window + 1, context_size)
    scratch.mkdir(parents=True, exist_ok=True)
    R = len(row)
    return Records(latent, kind, row, act, start, length, offsets, np.zeros(R, dtype=np.int64),
                   _scratch(scratch / "acts.npy", (R, W), np.float32),
                   _scratch(scratch / "tokens.npy", (R, W), np.int32))


def encode_rows(sae: Dictionary, x: torch.Tensor, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """sae.encode over x [N, d] a `step` of rows at a time, as one (idx [N, w], vals [N, w] float):
    an architecture whose width varies by batch (BatchTopK's threshold) is padded to the widest with
    vals 0 (off), which every reader skips."""
    batches = (sae.encode(x[j: j + step].to(device)) for j in range(0, len(x), step))
    codes = Codes([(i, v.float()) for i, v in batches])
    return codes.idx, codes.vals


def cut_windows(store: ActivationStore, layer: int, hook: str, sae: Dictionary, recs: Records,
                cfg: CollateConfig, device, codes=None):
    """Pass 2: fill recs.acts / recs.tokens. Reads each store chunk holding a picked
    sequence once and encodes only the picked sequences, each once; with the scan's
    `codes` (scan.Codes), takes theirs and reads only the tokens."""
    if len(recs.row) == 0:
        return
    device = torch.device(device)
    ctx = store.context_size
    seq_per_chunk = store.chunk_rows(layer, hook) // ctx  # harvest keeps chunks to whole sequences
    skip_first = excludes_bos(store, cfg.exclude_bos)
    order = np.argsort(recs.row, kind="stable")  # records in row order; they get slots in this order
    needed = np.unique(recs.row // ctx)
    by_chunk = np.split(needed, np.flatnonzero(np.diff(needed // seq_per_chunk)) + 1)

    def read(seqs):
        c = int(seqs[0]) // seq_per_chunk
        first = c * seq_per_chunk
        x = None
        if codes is None:
            x = store.read_chunk(layer, hook, c)
            x = x.view(-1, ctx, x.shape[-1])[torch.from_numpy(seqs - first)]
        return seqs, x, store.read_tokens(first, first + seq_per_chunk)[seqs - first]

    step = batch_rows_for(cfg, ctx)
    lo = 0
    with tqdm(total=len(needed), unit="seq", desc=f"records {layer}/{hook}") as bar:
        for seqs, x, tok in read_ahead(read, by_chunk, cfg.reader_threads):
            if codes is None:
                idx, vals = encode_rows(sae, x.reshape(len(seqs) * ctx, -1), step, device)
            else:
                rows = (torch.from_numpy(seqs)[:, None] * ctx + torch.arange(ctx)).reshape(-1)
                idx, vals = (t.to(device) for t in codes.rows(rows))
            if skip_first:
                # Excluded from the statistics, so excluded from the records too: a BOS
                # act of 0 is drawn unshaded instead of as the record's brightest token.
                vals.view(len(seqs), ctx, -1)[:, 0] = 0
            hi = lo + int(np.searchsorted(recs.row[order[lo:]] // ctx, seqs[-1], side="right"))
            with one_cpu_thread(idx.device):
                _fill_windows(recs, order, lo, hi, seqs, idx, vals, tok, sae.n_latents, ctx)
            lo = hi
            bar.update(len(seqs))


def _fill_windows(recs: Records, order, lo: int, hi: int, seqs, idx, vals, tok, n_latents: int, ctx: int):
    """Windows of records order[lo:hi], whose sequences are `seqs`, encoded as idx/vals
    [len(seqs) * ctx, k]."""
    device = idx.device
    # The nonzeros as (sequence * n_latents + latent, position, act).
    r, j = torch.nonzero(vals > 0, as_tuple=True)
    ent_key = (r // ctx) * n_latents + idx[r, j]
    ent_pos, ent_val = r % ctx, vals[r, j]
    tok = torch.from_numpy(np.asarray(tok, dtype=np.int32)).to(device)
    span = torch.arange(recs.acts.shape[1], device=device)
    per_block = max(1, (1 << 22) // ctx)  # bounds a block's [pairs, ctx] table
    for b in range(lo, hi, per_block):
        e = min(hi, b + per_block)
        ids = order[b:e]
        recs.slot[ids] = np.arange(b, e)
        local = torch.from_numpy(np.searchsorted(seqs, recs.row[ids] // ctx)).to(device)
        lat = torch.from_numpy(recs.latent[ids]).to(device)
        # One table row per distinct (sequence, latent): the latent's act at every position.
        pairs, pair_of = torch.unique(local * n_latents + lat, return_inverse=True)
        at = torch.searchsorted(pairs, ent_key).clamp_max(len(pairs) - 1)
        hit = pairs[at] == ent_key
        table = torch.zeros(len(pairs), ctx, device=device)
        table[at[hit], ent_pos[hit]] = ent_val[hit]
        start = torch.from_numpy(recs.start[ids]).to(device)
        inside = span[None, :] < torch.from_numpy(recs.length[ids]).to(device)[:, None]
        pos = (start[:, None] + span[None, :]).clamp_max(ctx - 1)
        recs.acts[b:e] = (table[pair_of[:, None], pos] * inside).cpu().numpy()
        recs.tokens[b:e] = (tok[local[:, None], pos] * inside).cpu().numpy()


# ---------------------------------------------------------------------------
# Token text


class TokenText:
    """Per-token strings that concatenate back to the decoded text.

    Each token is decoded after a fixed anchor token, which gives it its
    in-context form (SentencePiece drops a word's leading space when it comes
    first; byte-level BPE maps bytes to printable stand-ins). A token holding only
    part of a UTF-8 character decodes to U+FFFD; windows with one are decoded
    incrementally instead, and the character goes to the token that completes it.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
        self.anchor_text = self._decode(self.anchor)
        # Lookup tables over token ids, filled on first sight: a window is one gather.
        self.text = np.empty(0, dtype=object)
        self.partial = np.zeros(0, dtype=bool)
        self.known = np.zeros(0, dtype=bool)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def piece(self, token: int) -> str:
        both = self._decode(self.anchor + [token])
        return both[len(self.anchor_text):] if both.startswith(self.anchor_text) else self._decode([token])

    def _learn(self, ids: np.ndarray):
        top = int(ids.max(initial=-1)) + 1
        if top > len(self.known):
            size = max(top, len(self.tok), 2 * len(self.known))
            grow = size - len(self.known)
            self.text = np.concatenate([self.text, np.empty(grow, dtype=object)])
            self.partial = np.concatenate([self.partial, np.zeros(grow, dtype=bool)])
            self.known = np.concatenate([self.known, np.zeros(grow, dtype=bool)])
        for t in np.unique(ids[~self.known[ids]]).tolist():
            self.text[t] = self.piece(t)
            self.partial[t] = "\ufffd" in self.text[t]
            self.known[t] = True

    def pieces(self, ids) -> list[str]:
        """Each token's own string, as unrelated tokens (a logit lens' list, not a text)."""
        ids = np.asarray(ids, dtype=np.int64)
        self._learn(ids)
        return self.text[ids].tolist()

    def strings(self, ids) -> list[str]:
        ids = np.asarray(ids, dtype=np.int64)
        self._learn(ids)
        if self.partial[ids].any():
            return self._incremental(ids.tolist())
        return self.text[ids].tolist()

    def _incremental(self, ids: list[int]) -> list[str]:
        # Decode a short span at a time: the last emitted group (context, e.g. for a
        # leading space) plus the tokens since. Text is held back while it ends in an
        # incomplete character, for at most 4 tokens (a UTF-8 character has <= 4
        # bytes), so garbage bytes cannot make this quadratic.
        out, prev, read = [], 0, 0
        for j in range(len(ids)):
            before = self._decode(ids[prev:read])
            text = self._decode(ids[prev: j + 1])
            if text.endswith("\ufffd") and j + 1 < len(ids) and j + 1 - read < 4:
                out.append("")
                continue
            same = 0
            while same < min(len(before), len(text)) and before[same] == text[same]:
                same += 1
            out.append(text[same:])
            prev, read = read, j + 1
        return out


def store_tokenizer(store: ActivationStore):
    """The tokenizer the store was harvested with (pipeline.model owns how to load one)."""
    from pipeline.model import load_tokenizer

    attrs = store.attrs
    name = attrs.get("tokenizer")
    if not name:
        raise UserError(f"{store.path} does not name its tokenizer (attribute `tokenizer`); rerun `make harvest`")
    same = name == attrs.get("model") and attrs.get("revision") not in (None, "none")
    return load_tokenizer(name, attrs["revision"] if same else "main")
