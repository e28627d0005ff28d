"""Neuron-to-Graph (N2G): a latent's activating examples boiled down to token patterns,
kept in a trie that predicts the latent's activation on any text.

After Foote et al. 2023 ("Neuron to Graph"), as OpenAI's sparse_autoencoder uses it.
For one building example (a stored window, a position p in it, the latent's activation
a there, recomputed from the window's tokens t[0..p]):

    1. minimal suffix   the shortest suffix t[s..p] that, read as a text of its own,
                        still gives the latent >= a/2 at its last token: s* = the
                        largest such s among the max_suffix starts nearest p. An
                        example no such suffix explains is left unexplained.
    2. start check      prefix + pad + suffix: when the activation falls below a/2,
                        the suffix fires because it *opens* a text, and the pattern
                        is anchored at the start (^)
    3. importance       each suffix token in turn replaced by the pad token: a token
                        whose loss lowers the suffix's own activation a_s by less than
                        importance_threshold * a_s, (a_s - a_j) / a_s < threshold,
                        becomes a wildcard (*); the pad token itself, which no
                        replacement blanks out, stays. Against a_s, not a: the suffix may
                        keep just over a/2, and measured against a almost any token
                        would look important, the patterns too specific to recall
                        the latent's weaker firings
    4. the pattern      read backwards from the activating token: token ids and
                        WILDCARDs, then START when anchored. It goes into the
                        latent's trie, whose end node keeps the activations of every
                        example that reached it.

"A text of its own" follows the store's BOS rule: when its windows start with BOS,
every truncated input does too (`prefix` = (BOS,)), so BOS sits at position 0 and the
suffix from position 1 on, as a window's text does; otherwise prefix = () and the
suffix starts at position 0. The pad token is data.pad_id's.

predict(tokens) gives at each position the mean activation of the deepest pattern
matching the text that ends there, 0 where none does (the mean of the examples that
reached it, not their max: a prediction of the typical activation, which the scores'
correlation compares with the real one). Deepest = the most elements
(tokens, wildcards and ^), so the most specific; among equally deep matches, the
largest mean. A wildcard stands for one token of the text; ^ matches where the text
starts (after BOS, or at position 0 without one), so a pattern never reaches into BOS.

The same definition three times: Trie.predict walks the trie backwards from each
position (the readable one), reference_predict checks every pattern at every
position in plain Python (the test oracle), and PatternSet matches thousands of
latents' patterns over a batch of windows at once (what scoring uses): an inverted
index from a pattern's activating token (or wildcard) to the patterns ending with it,
each group compared against only the positions holding that token.

What makes steps 1-3 cheap is that one forward serves every latent and every query
it contains. A query is a token row whose answer is the SAE code at its last token;
the model is causal, so a query that is a prefix of another is answered by the
longer row's forward at the query's last position. LatentProbe.codes forwards only
the rows no other query extends: for a window, the suffix queries of every example
(every latent's) collapse to one row per start s, prefix + t[s..e_s] with e_s the
furthest example position that needs s, and the importance queries of examples
sharing a suffix start collapse likewise. Rows are left-aligned and padded on the
right, which a causal model never attends to, so every position sees exactly the
row's tokens before it at the positions a fresh text gives them: no attention mask
or position ids are needed. The forward stops at the hooked block (ActivationCapture),
activations go through the store's dtype (so a full-context query reproduces the
stored activation's rounding), and the SAE encodes each needed position once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.collate.windows import encode_rows

# Pattern elements besides token ids (ids are >= 0).
WILDCARD = -1  # any one token of the text
START = -2  # the start of the text: the token before it is BOS, or nothing
# PatternSet internals: past a pattern's end; before the start of the text.
_UNUSED, _OUTSIDE = -3, -4


# ---------------------------------------------------------------------------
# One latent's trie


class _Node:
    __slots__ = ("children", "acts")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.acts: list[float] = []  # the examples whose pattern ends here


class Trie:
    """Patterns keyed from the activating token backwards (token ids, WILDCARD, START last)."""

    def __init__(self):
        self.root = _Node()

    def insert(self, key: tuple[int, ...], activation: float):
        node = self.root
        for element in key:
            node = node.children.setdefault(int(element), _Node())
        node.acts.append(float(activation))

    def patterns(self) -> list[tuple[tuple[int, ...], float, int]]:
        """(key, mean activation, count) of every pattern, most examples first, then the
        strongest, then by key: a fixed order."""
        out, stack = [], [(self.root, ())]
        while stack:
            node, key = stack.pop()
            if node.acts:
                out.append((key, _mean(node.acts), len(node.acts)))
            stack.extend((child, key + (e,)) for e, child in node.children.items())
        return sorted(out, key=lambda r: (-r[2], -r[1], r[0]))

    def predict(self, tokens, first: int = 0) -> np.ndarray:
        """float [T]: at each position t >= first, the mean of the deepest matching pattern
        ending at t (largest mean among equally deep ones); 0 elsewhere. `first`: the
        position where the text starts (1 after a BOS, else 0)."""
        tokens = [int(x) for x in tokens]
        out = np.zeros(len(tokens))
        for t in range(first, len(tokens)):
            best = (0, 0.0)
            stack = [(self.root, 0)]  # (node, elements matched so far)
            while stack:
                node, depth = stack.pop()
                if node.acts:
                    best = max(best, (depth, _mean(node.acts)))
                j = t - depth  # the position the next element reads
                if j >= first:
                    steps = (tokens[j], WILDCARD)
                elif j == first - 1:
                    steps = (START,)
                else:
                    steps = ()
                stack.extend((node.children[e], depth + 1) for e in steps if e in node.children)
            out[t] = best[1]
        return out


def _mean(acts: list[float]) -> float:
    return sum(acts) / len(acts)


def reference_predict(patterns: list[tuple[tuple[int, ...], float]], tokens, first: int = 0) -> list[float]:
    """The oracle of Trie.predict and PatternSet.predict: every pattern (key, value) at
    every position, checked element by element."""
    tokens = [int(x) for x in tokens]
    out = []
    for t in range(len(tokens)):
        best = None
        for key, value in patterns:
            if t >= first and _matches_at(key, tokens, t, first):
                if best is None or (len(key), value) > best:
                    best = (len(key), value)
        out.append(best[1] if best else 0.0)
    return out


def _matches_at(key, tokens: list[int], t: int, first: int) -> bool:
    for i, element in enumerate(key):
        j = t - i
        if element == START:
            if j != first - 1:
                return False
        elif j < first:
            return False
        elif element != WILDCARD and element != tokens[j]:
            return False
    return True


# ---------------------------------------------------------------------------
# Every latent's patterns at once (scoring)


class PatternSet:
    """Patterns of many latents, matched over a batch of windows in one go.

    `latents[i]`, `keys[i]`, `values[i]`: pattern i's latent, key and value (its mean).
    Patterns are grouped by their first element (the activating token, or WILDCARD); a
    group is compared only with the positions holding its token (all text positions for
    WILDCARD), all its patterns against all those positions in one vectorised test."""

    BLOCK = 1 << 22  # booleans per comparison block: bounds the memory of a group's test

    def __init__(self, latents, keys: list[tuple[int, ...]], values):
        n = len(keys)
        self.depth_max = max((len(k) for k in keys), default=1)
        self.elements = np.full((n, self.depth_max), _UNUSED, dtype=np.int64)
        for i, key in enumerate(keys):
            self.elements[i, :len(key)] = key
        self.depth = np.array([len(k) for k in keys], dtype=np.int64)
        self.latent = np.asarray(latents, dtype=np.int64).reshape(n)
        self.value = np.asarray(values, dtype=np.float64).reshape(n)
        heads = self.elements[:, 0] if n else np.zeros(0, np.int64)
        order = np.argsort(heads, kind="stable")
        uniq, starts = np.unique(heads[order], return_index=True)
        bounds = np.append(starts, n)
        self.groups = {int(h): order[bounds[g]:bounds[g + 1]] for g, h in enumerate(uniq)}

    def context(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """int64 [B * T, depth_max]: for each position, the elements a pattern of it would
        read: the tokens backwards, START just before the text, _OUTSIDE before that."""
        B, T = tokens.shape
        t = np.arange(T)[:, None] - np.arange(self.depth_max)[None, :]  # [T, D] positions read
        read = tokens[:, np.clip(t, 0, T - 1)].astype(np.int64)  # [B, T, D]
        read = np.where(t >= first, read, np.where(t == first - 1, START, _OUTSIDE))
        return read.reshape(B * T, self.depth_max)

    def predict(self, tokens: np.ndarray, first: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over windows tokens [B, T]: (position, latent, value) for every (position, latent)
        some pattern of the latent matches; position is b * T + t; value the deepest match's
        (largest value among equally deep ones). Sorted by (latent, position)."""
        tokens = np.asarray(tokens)
        B, T = tokens.shape
        ctx = self.context(tokens, first)
        text = (np.arange(B * T) % T) >= first
        flat = tokens.reshape(-1).astype(np.int64)
        where = np.flatnonzero(text)
        order = where[np.argsort(flat[where], kind="stable")]  # the inverted index: positions by token
        sorted_tokens = flat[order]
        found = []  # (pattern, position) pairs, per group
        for head, pats in self.groups.items():
            if head == WILDCARD:
                cand = where
            else:
                lo, hi = np.searchsorted(sorted_tokens, [head, head + 1])
                cand = order[lo:hi]
            if len(cand) == 0:
                continue
            E, C = self.elements[pats], ctx[cand]
            step = max(1, self.BLOCK // max(1, len(cand) * self.depth_max))
            for lo in range(0, len(pats), step):
                e = E[lo:lo + step, None, :]
                ok = ((e == _UNUSED) | (e == C[None]) | ((e == WILDCARD) & (C[None] >= 0))).all(-1)
                pi, ci = np.nonzero(ok)
                found.append((pats[lo:lo + step][pi], cand[ci]))
        if not found:
            empty = np.zeros(0, np.int64)
            return empty, empty.copy(), np.zeros(0)
        pat = np.concatenate([f[0] for f in found])
        pos = np.concatenate([f[1] for f in found])
        lat, depth, value = self.latent[pat], self.depth[pat], self.value[pat]
        # Per (latent, position) the deepest match, then the largest value: the first after this sort.
        order = np.lexsort((-value, -depth, pos, lat))
        lat, pos, value = lat[order], pos[order], value[order]
        first_of = np.ones(len(lat), dtype=bool)
        first_of[1:] = (lat[1:] != lat[:-1]) | (pos[1:] != pos[:-1])
        return pos[first_of], lat[first_of], value[first_of]


# ---------------------------------------------------------------------------
# The model up to the hooked block, and the SAE: codes of token rows


class LatentProbe:
    """The SAE code at the last token of each query (a tuple of token ids).

    `capture` runs the model up to the hooked block (pipeline.model.ActivationCapture);
    `dtype` is the store's logical dtype, which every activation passes through before
    the SAE (`sae`) sees it. `on_tokens(n)` hears of every forward (a progress bar)."""

    def __init__(self, capture, point: tuple[int, str], sae, dtype: torch.dtype, pad: int, batch_tokens: int,
                 on_tokens=None):
        self.capture, self.point, self.sae = capture, point, sae
        self.dtype, self.pad, self.batch_tokens = dtype, int(pad), int(batch_tokens)
        self.device = next(sae.parameters()).device
        self.on_tokens = on_tokens or (lambda n: None)
        self.tokens_forwarded = 0

    def codes(self, queries: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """(idx [Q, w] int64, vals [Q, w] float32): query q's code is idx[q], vals[q] (idx -1
        where a code is shorter than w). Each row no other query extends is forwarded once."""
        row_of, rows = rows_for(queries)
        # Each row's needed positions, numbered: (row, position) -> slot of the codes.
        slot_of: dict[tuple[int, int], int] = {}
        query_slot = np.array([slot_of.setdefault((r, len(q) - 1), len(slot_of)) for q, r in zip(queries, row_of)],
                              dtype=np.int64)
        needs: list[list[tuple[int, int]]] = [[] for _ in rows]  # per row: (position, slot)
        for (r, pos), slot in slot_of.items():
            needs[r].append((pos, slot))
        idx_parts, val_parts, slot_parts = [], [], []
        for batch in self._batches(rows):
            idx, vals, slots = self._forward([rows[r] for r in batch], [needs[r] for r in batch])
            idx_parts.append(idx)
            val_parts.append(vals)
            slot_parts.append(slots)
        width = max((p.shape[1] for p in idx_parts), default=1)
        idx = np.full((len(slot_of), width), -1, dtype=np.int64)
        vals = np.zeros((len(slot_of), width), dtype=np.float32)
        for i, v, s in zip(idx_parts, val_parts, slot_parts):
            idx[s, :i.shape[1]] = i
            vals[s, :v.shape[1]] = v
        return idx[query_slot], vals[query_slot]

    def _batches(self, rows: list[tuple[int, ...]]):
        """Row indices in batches of at most batch_tokens (padded) tokens, longest rows first,
        so little of a batch is padding; a fixed order, so the same rows give the same batches."""
        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), rows[r]))
        batch, width = [], 0
        for r in order:
            width = width or len(rows[r])
            if batch and (len(batch) + 1) * width > self.batch_tokens:
                yield batch
                batch, width = [], len(rows[r])
            batch.append(r)
        if batch:
            yield batch

    @torch.inference_mode()
    def _forward(self, rows, needs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = len(rows[0])
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
        acts = self.capture.run(ids.to(self.device))[self.point]  # [B, T, d]
        n_real = sum(len(r) for r in rows)
        self.tokens_forwarded += n_real
        self.on_tokens(n_real)
        b = torch.tensor([i for i, need in enumerate(needs) for _ in need], device=acts.device)
        pos = torch.tensor([p for need in needs for p, _ in need], device=acts.device)
        slots = np.array([s for need in needs for _, s in need], dtype=np.int64)
        x = acts[b, pos].to(self.dtype)  # what the store would hold, encoded as collate encodes it
        idx, vals = encode_rows(self.sae, x, len(x), x.device)
        return idx.cpu().numpy(), vals.float().cpu().numpy(), slots


def rows_for(queries: list[tuple[int, ...]]) -> tuple[list[int], list[tuple[int, ...]]]:
    """(row of each query, the rows): the queries no other query extends, each other query
    mapped to a row it is a prefix of. In lexicographic order a query that is a prefix of
    any other is a prefix of the one right after it, so one backwards pass finds them."""
    order = sorted(range(len(queries)), key=queries.__getitem__)
    row_of = [0] * len(queries)
    rows: list[tuple[int, ...]] = []
    after, after_row = None, -1
    for i in reversed(order):
        q = queries[i]
        if after is not None and after[:len(q)] == q:
            row_of[i] = after_row
        else:
            row_of[i] = len(rows)
            rows.append(q)
        after, after_row = q, row_of[i]
    return row_of, rows


def latent_acts(idx: np.ndarray, vals: np.ndarray, latents) -> np.ndarray:
    """float64 [Q]: latent latents[q] in code q (0 where it did not fire)."""
    latents = np.asarray(latents, dtype=np.int64)
    return (vals * (idx == latents[:, None])).sum(1, dtype=np.float64)


# ---------------------------------------------------------------------------
# Steps 1-4 for a batch of examples


@dataclass(frozen=True)
class Settings:
    max_suffix: int  # the longest suffix searched, in tokens
    threshold: float  # importance below it: a wildcard
    prefix: tuple[int, ...]  # (BOS,) when the store's windows open with it, else ()
    pad: int  # the token that blanks one out (data.pad_id)


def suffix_starts(p: int, first: int, max_suffix: int) -> range:
    """The starts s of the suffixes t[s..p] searched, shortest suffix first."""
    return range(p, max(first, p - max_suffix + 1) - 1, -1)


def minimal_start(acts_by_start: list[tuple[int, float]], a: float) -> int | None:
    """s*: the largest start whose suffix keeps >= a / 2, from (s, activation) pairs; None
    when none does (or a is not positive)."""
    if not a > 0:
        return None
    passing = [s for s, act in acts_by_start if act >= a / 2]
    return max(passing) if passing else None


def start_query(window, s: int, p: int, st: Settings) -> tuple[int, ...]:
    """The start check's input: prefix + pad + t[s..p]."""
    return st.prefix + (st.pad,) + tuple(int(x) for x in window[s:p + 1])


def importance_queries(window, s: int, p: int, st: Settings) -> list[tuple[int, ...]]:
    """prefix + t[s..p] with token j blanked (the pad token), for j = s..p."""
    suffix = tuple(int(x) for x in window[s:p + 1])
    return [st.prefix + suffix[:j] + (st.pad,) + suffix[j + 1:] for j in range(len(suffix))]


def pattern_key(window, s: int, p: int, important: list[bool], anchored: bool) -> tuple[int, ...]:
    """The trie key of suffix t[s..p]: backwards from p, each token or WILDCARD (important[j]
    is about t[s + j]), then START when anchored."""
    key = tuple(int(window[p - i]) if important[p - i - s] else WILDCARD for i in range(p - s + 1))
    return key + ((START,) if anchored else ())


def explain_examples(probe: LatentProbe, tokens: np.ndarray, window, position, latent,
                     st: Settings) -> tuple[np.ndarray, list[tuple[int, ...] | None]]:
    """Steps 1-4 for examples (window, position, latent) over windows `tokens` [W, ctx]:
    (each example's activation a in its full context, float64 [E]; its pattern key, or None
    when it has none: a <= 0, or no suffix of at most max_suffix tokens keeps a / 2)."""
    window, position, latent = (np.asarray(v, dtype=np.int64) for v in (window, position, latent))
    E, first = len(window), len(st.prefix)

    # 1. Full contexts and suffixes: queries per distinct (window, position), shared by its latents.
    ask = _Queries()
    full_q = np.empty(E, dtype=np.int64)
    suffix_q: list[list[tuple[int, int]]] = []  # per example: (s, query)
    per_place: dict[tuple[int, int], tuple[int, list[tuple[int, int]]]] = {}
    for e in range(E):
        w, p = int(window[e]), int(position[e])
        if (w, p) not in per_place:
            row = [int(x) for x in tokens[w, :p + 1]]
            per_place[(w, p)] = (ask(tuple(row)), [(s, ask(st.prefix + tuple(row[s:])))
                                                  for s in suffix_starts(p, first, st.max_suffix)])
        full_q[e], pairs = per_place[(w, p)]
        suffix_q.append(pairs)
    idx, vals = probe.codes(ask.queries)
    a = latent_acts(idx[full_q], vals[full_q], latent)
    flat_q = np.array([q for pairs in suffix_q for _, q in pairs], dtype=np.int64)
    flat_lat = np.repeat(latent, [len(pairs) for pairs in suffix_q])
    suffix_acts = latent_acts(idx[flat_q], vals[flat_q], flat_lat)
    starts: list[int | None] = []
    a_suffix = np.zeros(E)  # the activation of each example's minimal suffix, read alone
    at = 0
    for e, pairs in enumerate(suffix_q):
        by_start = {s: v for (s, _), v in zip(pairs, suffix_acts[at: at + len(pairs)].tolist())}
        at += len(pairs)
        starts.append(minimal_start(list(by_start.items()), float(a[e])))
        if starts[-1] is not None:
            a_suffix[e] = by_start[starts[-1]]

    # 2-3. Start check and importance: queries per distinct (window, position, s*).
    keys: list[tuple[int, ...] | None] = [None] * E
    kept = [e for e in range(E) if starts[e] is not None]
    if not kept:
        return a, keys
    ask = _Queries()
    per_suffix: dict[tuple[int, int, int], tuple[int, list[int]]] = {}
    for e in kept:
        w, p, s = int(window[e]), int(position[e]), starts[e]
        if (w, p, s) not in per_suffix:
            per_suffix[(w, p, s)] = (ask(start_query(tokens[w], s, p, st)),
                                     [ask(q) for q in importance_queries(tokens[w], s, p, st)])
    mine = [per_suffix[(int(window[e]), int(position[e]), starts[e])] for e in kept]
    idx, vals = probe.codes(ask.queries)
    a_kept = a[kept]
    a_pad = latent_acts(*_rows(idx, vals, [m[0] for m in mine]), latent[kept])
    lengths = [len(m[1]) for m in mine]
    a_blank = latent_acts(*_rows(idx, vals, [q for m in mine for q in m[1]]), np.repeat(latent[kept], lengths))
    ref = np.repeat(a_suffix[kept], lengths)
    # The pad token itself cannot be blanked out (its blanked query is the suffix): it stays.
    is_pad = np.concatenate([tokens[int(window[e]), starts[e]:int(position[e]) + 1] == st.pad for e in kept])
    important = (((ref - a_blank) / ref >= st.threshold) | is_pad).tolist()
    at = 0
    for i, e in enumerate(kept):
        n = lengths[i]
        keys[e] = pattern_key(tokens[int(window[e])], starts[e], int(position[e]), important[at: at + n],
                              bool(a_pad[i] < a_kept[i] / 2))
        at += n
    return a, keys


class _Queries:
    """Distinct queries in the order first asked; calling it with a query gives its number."""

    def __init__(self):
        self.queries: list[tuple[int, ...]] = []
        self.number: dict[tuple[int, ...], int] = {}

    def __call__(self, q: tuple[int, ...]) -> int:
        got = self.number.get(q)
        if got is None:
            got = self.number[q] = len(self.queries)
            self.queries.append(q)
        return got


def _rows(idx: np.ndarray, vals: np.ndarray, which) -> tuple[np.ndarray, np.ndarray]:
    which = np.asarray(which, dtype=np.int64)
    return idx[which], vals[which]
