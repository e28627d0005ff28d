"""The static viewer: viewer.html plus its data, as JavaScript files beside it,
and one index page per run linking every layer's viewer.

Opened from disk (file://), a page cannot fetch() JSON: Chromium treats each
file as its own origin and blocks the request. A classic <script src> is still
allowed, so the data goes out as .js files that hand their payload to a
function the page defines:

    viewer.html                    the page (a copy of pipeline/viewer.html)
    viewer_data/index.js           saeViewer.index({index, summary, shard_size})
    viewer_data/features_<j>.js    saeViewer.shard(j, [FeatureInfo, ...]), records compact (below)
    viewer_data/windows_<k>.js     saeViewer.windows(k, {strings, windows}): the records' token windows
    viewer_data/search.js          saeViewer.search({words, latents})
    viewer_data/explanations.js    saeViewer.explanations({summary, latents}), written by
                                   saepipe explain (write_explanations); absent before it

Features are sharded (SHARD_SIZE latents per file) and loaded on demand, so
opening the page for a large SAE reads only the latent list, and one click
reads one small shard and the windows files its records show. The shards are
where the records live, once: the line after `saeViewer.shard(j, [` holds latent
j * SHARD_SIZE's FeatureInfo as one line of strict JSON (ended by a comma but the
last), and so on; read_feature and read_features give them back to Python.

The records on disk (summary.json `records_format` 2; RECORDS_FORMAT). A FeatureInfo's
`top`, `random` and each quantile's `examples` hold compact records, each an array

    [w, idx, at, values]          at: the window positions where the latent's act is not 0
    [w, idx, at, values, act]     (values: its acts there, 6 decimals); act: the record's act,
                                  present only where it is not the value at idx

which the page (expandFeature) and read_feature make whole, into OpenAI sae-viewer's
SequenceInfo: doc_id, window_start, tokens and token_ints are window w's; acts holds the
values at `at` and 0.0 everywhere else; act is as stored, else acts[idx]. Most of a
window's acts are 0, and many records show the same window (a sequence holds the top
acts of many latents), so each window's tokens are stored once, for all of them.

Window w (numbered over the layer in (doc_id, window_start, length) order) is entry
w % P of windows_<w // P>.js, P = summary.json `windows_per_file` (a file holds at most
WINDOW_FILE_TOKENS tokens, so a click loads little whatever the window length):

    {"strings": {"<token id>": "<its string>", ...},     the file's tokens, each once
     "windows": [[doc_id, window_start, [token ids]],
                 [doc_id, window_start, [token ids], [strings]], ...]}

A window carries strings of its own where its text reads differently from its tokens'
strings one by one: one whose UTF-8 characters span tokens (pipeline.collate.windows.
TokenText puts each character on the token that completes it).

Records written before this format (summary.json without `records_format`) hold whole
SequenceInfo objects; read_feature returns those as they are, and collate rewrites such
folders (their done marker lacks `records.format`).

search.js, loaded on the first search by text, lets a search find a latent by
the words of its top records: the word at each picked position, joined across
token boundaries (records.picked_word: [word, start, end], the picked token
being word[start:end]), each distinct one once in `words`, and per latent the
indices of its own. A query matches a latent when it occurs in one of its words
overlapping the picked token, so "Deprecated" finds a latent picked at "recated"
of "Dep" + "recated". A word shared by many latents costs one string, so the
file stays near n_latents * distinct-picks integers.

<run_dir>/records/index.html is plain HTML written from the finished records
folders' summary.json and their SAEs' cfg.json: it needs no script at all. An SAE
whose latents form groups (summary.json `latent_groups`, pipeline.collate.records) gets a
second table below the first: each group's latents and how many are live and dead.
Once `saepipe explain` has run on some layer (its explain_summary.json in the records
folder), the table gains each layer's N2G and baseline mean F1; explain rewrites the page.
"""

from __future__ import annotations

import html
import json
import math
import os
from itertools import count
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterator
from urllib.parse import quote

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.paths import DONE, EVAL_FILE, frontier_stem, leaf, records_dir, records_root, sae_dir, split_leaf
from pipeline.saes import saved_cfg, saved_marker

SHARD_SIZE = 64
DATA_DIR = "viewer_data"
RECORDS_FORMAT = 2  # compact records and windows files (above); 1, unnamed: whole SequenceInfo objects
WINDOW_FILE_TOKENS = 1 << 14  # tokens a windows file holds at most (one window more, where one is wider)


def windows_per_file(width: int) -> int:
    """Windows a windows file holds, for windows at most `width` tokens long."""
    return max(1, WINDOW_FILE_TOKENS // max(width, 1))


def template(name: str = "viewer.html") -> str:
    return resources.files("pipeline").joinpath(name).read_text(encoding="utf-8")


def _js_call(fn: str, *args) -> str:
    return f"saeViewer.{fn}({', '.join(args)});\n"


def _json(obj) -> str:
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------
# One layer's viewer


class ViewerWriter:
    """Collects feature JSON in latent order and writes shards as they fill.

    `write(path, text)` does the writing (collate passes its temp-and-rename
    writer, so a killed run never leaves a torn file).
    """

    def __init__(self, out: Path, write, shard_size: int = SHARD_SIZE):
        self.out = Path(out)
        self.data = self.out / DATA_DIR
        self.data.mkdir(parents=True, exist_ok=True)
        self.write = write
        self.shard_size = shard_size
        self.shard = 0
        self.buf: list[str] = []
        self.words: dict[tuple[str, int, int], int] = {}  # picked word -> its index in search.js `words`
        self.search: list[list[int]] = []  # per latent: its top records' distinct picked words

    def add(self, i: int, feature_json: str, picked_words: list[tuple[str, int, int]]):
        """Latent i's FeatureInfo and its top records' picked words (records.picked_word)."""
        assert i == self.shard * self.shard_size + len(self.buf), "features must come in latent order"
        self.buf.append(feature_json)
        own = dict.fromkeys(self.words.setdefault(w, len(self.words)) for w in picked_words)
        self.search.append(list(own))
        if len(self.buf) == self.shard_size:
            self._flush()

    def _flush(self):
        body = ",\n".join(self.buf)
        self.write(self.data / f"features_{self.shard}.js", _js_call("shard", str(self.shard), f"[\n{body}\n]"))
        self.shard += 1
        self.buf = []

    def add_windows(self, k: int, payload_json: str):
        """windows_<k>.js, its payload ({strings, windows}) already JSON."""
        self.write(self.data / f"windows_{k}.js", _js_call("windows", str(k), payload_json))

    def finish(self, index: dict, summary: dict) -> Path:
        """Write the last shard, the search data, the index and the page; returns the page's path."""
        if self.buf:
            self._flush()
        self.write(self.data / "search.js", _js_call("search", _json({"words": list(self.words),
                                                                       "latents": self.search})))
        payload = _json({"index": index, "summary": summary, "shard_size": self.shard_size})
        self.write(self.data / "index.js", _js_call("index", payload))
        page = self.out / "viewer.html"
        self.write(page, template())
        return page


def write_explanations(folder, latents: list[dict], summary: dict) -> Path | None:
    """viewer_data/explanations.js, written atomically, from saepipe explain's entries (its
    explanations.json `latents`) and its summary: per explained latent what its page shows (the
    patterns, their text, N2G's and the baseline's scores) and what the list sorts, filters and
    searches by. Written by explain, so collate's files stay collate's; a records folder without
    it shows no explanations. None (nothing written) for records made before the viewer had data
    files."""
    data = Path(folder) / DATA_DIR
    if not data.is_dir():
        return None
    slim = [{"latent": e["latent"], "text": e["text"], "n_examples": e["n_examples"], "n_explained": e["n_explained"],
             "depth": e.get("depth"),
             "patterns": [{k: p[k] for k in ("tokens", "ids", "activation", "count")} for p in e["patterns"]],
             "scores": e["scores"],
             "baseline": {k: e["baseline"][k] for k in ("tokens", "activations", "scores")}} for e in latents]
    shown = {k: v for k, v in summary.items() if k != "fingerprint"}
    path = data / "explanations.js"
    fsio.write_atomic(path, _js_call("explanations", _json({"summary": shown, "latents": slim})))
    return path


def _strict_json(line: str):
    def refuse(name):  # NaN and Infinity are no JSON: a record holding one is a bug to hear about
        raise ValueError(f"a record holds the non-JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _shard_lines(path: Path) -> list[str]:
    # JSON escapes every newline inside a string, so each feature is exactly one line.
    lines = path.read_text(encoding="utf-8").split("\n")
    return [line.removesuffix(",") for line in lines[1:-2]]


def _rerun(folder) -> str:
    return f"(rerun saepipe collate --force on the config that wrote {folder})"


class _Records:
    """Makes a records folder's compact records whole (the module docstring's format), reading
    each windows file on first need and keeping the last KEPT_FILES of them: read_features over a
    large SAE visits every file many times, but never holds the whole table."""

    KEPT_FILES = 256

    def __init__(self, folder):
        self.folder = Path(folder)
        self.per_file: int | None = None
        self.files: dict[int, list[tuple[int, int, list[int], list[str]]]] = {}

    def feature(self, f: dict) -> dict:
        """FeatureInfo `f` with every record a whole SequenceInfo (format-1 records stay as they are)."""
        for key in ("top", "random"):
            f[key] = [self.record(r) for r in f.get(key, [])]
        for q in f.get("quantiles") or []:
            q["examples"] = [self.record(r) for r in q["examples"]]
        return f

    def record(self, r) -> dict:
        if isinstance(r, dict):
            return r
        w, idx, at, values = r[:4]
        doc, start, ids, strings = self.window(w)
        n = len(ids)
        if len(at) != len(values) or not all(0 <= p < n for p in at) or not 0 <= idx < n:
            raise UserError(f"{self.folder}: a record of window {w} does not fit it (positions {at}, {len(values)} "
                            f"values, idx {idx}; {n} tokens) {_rerun(self.folder)}")
        acts = [0.0] * n
        for p, v in zip(at, values):
            acts[p] = v
        return {"doc_id": doc, "idx": idx, "act": r[4] if len(r) > 4 else acts[idx], "acts": acts,
                "tokens": list(strings), "token_ints": list(ids), "window_start": start}

    def window(self, w: int) -> tuple[int, int, list[int], list[str]]:
        if self.per_file is None:
            per = fsio.read_json(self.folder / "summary.json").get("windows_per_file")
            if not isinstance(per, int) or per < 1:
                raise UserError(f"{self.folder}: its records name token windows, but its summary.json gives no "
                                f"windows_per_file {_rerun(self.folder)}")
            self.per_file = per
        k, at = divmod(w, self.per_file)
        got = self.files.get(k)
        if got is None:
            got = self.files[k] = self._read(k)
            if len(self.files) > self.KEPT_FILES:
                del self.files[next(iter(self.files))]
        if not 0 <= at < len(got):
            raise UserError(f"{self.folder}: a record shows window {w}, which {DATA_DIR}/windows_{k}.js does not "
                            f"hold {_rerun(self.folder)}")
        return got[at]

    def _read(self, k: int) -> list[tuple[int, int, list[int], list[str]]]:
        path = self.folder / DATA_DIR / f"windows_{k}.js"
        head, tail = f"saeViewer.windows({k}, ", ");\n"
        try:
            text = path.read_text(encoding="utf-8")
            if not (text.startswith(head) and text.endswith(tail)):
                raise ValueError("not a windows file")
            data = _strict_json(text[len(head): -len(tail)])
            table = {int(t): s for t, s in data["strings"].items()}
            return [(doc, start, ids, own[0] if own else [table[t] for t in ids])
                    for doc, start, ids, *own in data["windows"]]
        except FileNotFoundError:
            raise UserError(f"{self.folder}: {DATA_DIR}/windows_{k}.js is missing: the records were only partly "
                            f"copied {_rerun(self.folder)}") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.folder}: {DATA_DIR}/windows_{k}.js is unreadable ({type(e).__name__}: {e}) "
                            f"{_rerun(self.folder)}") from None


def read_features(folder) -> Iterator[dict]:
    """Every latent's FeatureInfo in a records folder, in latent order."""
    data = Path(folder) / DATA_DIR
    whole = _Records(folder)
    for j in count():
        path = data / f"features_{j}.js"
        if not path.is_file():
            return
        for line in _shard_lines(path):
            yield whole.feature(_strict_json(line))


def read_feature(folder, i: int) -> dict:
    """Latent i's FeatureInfo (all shards but the last hold the same number of latents)."""
    data = Path(folder) / DATA_DIR
    size = len(_shard_lines(data / "features_0.js"))
    path = data / f"features_{i // size}.js"
    lines = _shard_lines(path) if i >= 0 and path.is_file() else []
    if i % size >= len(lines):
        raise IndexError(f"latent {i} is not in {folder}")
    return _Records(folder).feature(_strict_json(lines[i % size]))


# ---------------------------------------------------------------------------
# The run's index page


def index_page(run_dir) -> Path:
    return records_root(run_dir) / "index.html"


def finished_records(run_dir) -> list[tuple[int, str, str | None]]:
    """Every (layer, hook, sweep member or None) whose records folder is finished (holds its `done` marker)."""
    root = index_page(run_dir).parent
    found = []
    for layer_dir in root.iterdir() if root.is_dir() else []:
        if not layer_dir.name.isdigit():
            continue
        for folder in layer_dir.iterdir():
            # <hook>.partial and <hook>.old are a collate or a swap under way, not records.
            if folder.name.endswith((".partial", ".old")) or not (folder / DONE).is_file():
                continue
            found.append((int(layer_dir.name), *split_leaf(folder.name)))
    return sorted(found, key=lambda t: (t[0], t[1], t[2] or ""))


def _num(x, digits: int = 4, percent: bool = False) -> str:
    """A cell: "–" for anything missing or not finite (an eval on no tokens is NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "–"
    if percent:
        return f"{x:.2%}"
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}g}"


def _lm_eval(run_dir, layer: int, hook: str, member: str | None = None) -> dict:
    """saepipe eval's numbers (the SAE folder's eval.json) while they belong to the SAE there now."""
    sae = sae_dir(run_dir, layer, hook, member)
    now = (saved_marker(sae) or {}).get("sha256")
    lm = fsio.read_json(sae / EVAL_FILE)
    return lm if now is not None and lm.get("sae_sha256") == now else {}


_LM_HEAD = ("<th>CE clean</th><th>CE spliced</th><th>&Delta;CE</th><th>CE recovered</th><th>KL</th>"
            "<th>eval FVU raw</th><th>eval dead</th><th>eval tokens</th>")
_LM_KEYS = ("ce_clean", "ce_spliced", "delta_ce", "ce_recovered", "kl", "fvu", "dead_frac", "n_tokens")
_COLUMNS = 12  # without the LM-eval and explain columns
_EXPLAIN_HEAD = "<th>N2G mean F1</th><th>baseline mean F1</th>"


def _explain_summary(run_dir, layer: int, hook: str, member: str | None = None) -> dict:
    """saepipe explain's explain_summary.json in the records folder ({} when explain has not run
    on these records: a collate that redoes them takes it away)."""
    from pipeline.collate.explain import SUMMARY  # explain imports this module: not at the top

    return fsio.read_json(records_dir(run_dir, layer, hook, member) / SUMMARY)


def _link(href: Path | str, text: str) -> str:
    return f'<a href="{html.escape(quote(str(href)))}">{html.escape(text)}</a>'


def _row(run_dir, layer: int, hook: str, member: str | None, with_lm: bool, with_explain: bool = False) -> str:
    out, sae = records_dir(run_dir, layer, hook, member), sae_dir(run_dir, layer, hook, member)
    s = fsio.read_json(out / "summary.json")
    ev = (saved_cfg(sae) or {}).get("eval")
    ev = ev if isinstance(ev, dict) else {}
    # dead_frac_eval: its name in SAEs trained before "dead" got one meaning.
    dead_frac = ev.get("dead_frac", ev.get("dead_frac_eval"))
    fingerprint = fsio.read_json(out / DONE).get("fingerprint")
    made_from = fingerprint.get("sae.sha256") if isinstance(fingerprint, dict) else None
    now = (saved_marker(sae) or {}).get("sha256")
    note = " (its SAE is gone)" if now is None else "" if made_from == now else " (the SAE changed since: rerun collate)"
    here = f"{layer}/{leaf(hook, member)}"
    space = (s.get("train_eval") or {}).get("fvu_space")
    pictures = [_link(Path("..") / "saes" / here / "loss.png", "loss")] if (sae / "loss.png").exists() else []
    density = f"{here}/density.png" if (out / "density.png").exists() else (
        Path("..") / "saes" / here / "density.png" if (sae / "density.png").exists() else None)
    pictures += [_link(density, "density")] if density else []
    cells = [
        str(layer),
        html.escape(leaf(hook, member)),  # a sweep member shows as hook@member, its folder's name
        f'{_link(f"{here}/viewer.html", "viewer")}{html.escape(note)}',
        _num(s.get("n_latents")),
        _num(s.get("dead")),
        _num(s.get("ultra_rare")),
        _num(s.get("n_tokens")),
        _num(ev.get("fvu")) + (f" ({html.escape(space)})" if space and ev.get("fvu") is not None else ""),
        _num(ev.get("fvu_raw")),
        _num(dead_frac, percent=True),
        _num(ev.get("eval_tokens")),
        " ".join(pictures) or "–",
    ]
    if with_lm:
        lm = _lm_eval(run_dir, layer, hook, member)
        cells += [_num(lm.get(k), percent=k in ("ce_recovered", "dead_frac")) for k in _LM_KEYS]
    if with_explain:
        ex = _explain_summary(run_dir, layer, hook, member)
        cells += [_num((ex.get(side) or {}).get("mean_f1"), 3) for side in ("n2g", "baseline")]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def write_index_page(run_dir) -> Path:
    """<run_dir>/records/index.html: every finished layer/hook, its viewer and its numbers.
    Rebuilt from what is on disk, so it also lists layers an earlier collate finished."""
    page = index_page(run_dir)
    found = finished_records(run_dir)
    # The LM-eval columns appear once some listed SAE has been through `saepipe eval`.
    with_lm = any(_lm_eval(run_dir, *found_one) for found_one in found)
    # Likewise the explain columns, once explain has run on some listed records.
    with_explain = any(_explain_summary(run_dir, *found_one) for found_one in found)
    rows = "\n".join(_row(run_dir, *found_one, with_lm, with_explain) for found_one in found)
    text = Template(template("records_index.html")).substitute(
        run_dir=html.escape(str(Path(run_dir).resolve())), lm_head=_LM_HEAD if with_lm else "",
        explain_head=_EXPLAIN_HEAD if with_explain else "",
        rows=rows or f'<tr><td colspan="{_COLUMNS + len(_LM_KEYS) if with_lm else _COLUMNS}">none yet</td></tr>',
        groups=_groups(run_dir, found), frontiers=_frontiers(run_dir, found))
    fsio.write_atomic(page, text)
    for found_one in found:
        _write_eval_script(run_dir, *found_one)
    return page


def _groups(run_dir, found: list[tuple[int, str, str | None]]) -> str:
    """The table of every listed SAE's latent groups (summary.json `latent_groups`): one row per
    group with its latents and live/dead counts; "" when no listed SAE has groups."""
    rows = []
    for layer, hook, member in found:
        grouped = fsio.read_json(records_dir(run_dir, layer, hook, member) / "summary.json").get("latent_groups")
        if not isinstance(grouped, dict):
            continue
        name = html.escape(str(grouped.get("name", "group")))
        for g, r in enumerate(grouped.get("groups", [])):
            cells = [str(layer), html.escape(leaf(hook, member)), f"{name} {g}",
                     f"{_num(r.get('first'))}..{_num(r.get('last'))}", _num(r.get("live")), _num(r.get("dead"))]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    body = "\n".join(rows)
    return ('<h2>Latent groups</h2>\n<table id="groups">\n  <thead>\n    <tr><th>layer</th><th>hook</th>'
            '<th>group</th><th>latents</th><th>live</th><th>dead</th></tr>\n  </thead>\n  <tbody>\n'
            f'{body}\n  </tbody>\n</table>\n<p class="muted">For each SAE whose architecture splits its latents '
            'into groups: each group\'s latents (first..last, both included), how many fired on the stored '
            'tokens collate read (live) and how many never did (dead). Prefix group 0 is the first, smallest '
            'nested prefix; prefix group g the latents prefix g adds to prefix g &minus; 1.</p>')


def _frontiers(run_dir, found: list[tuple[int, str, str | None]]) -> str:
    """saepipe eval's frontier picture of each listed (layer, hook) that has one, linked to its SVG
    (a transcoder's is that of the hook it predicts, where eval splices it)."""
    parts = []
    spliced = [(layer, fsio.read_json(sae_dir(run_dir, layer, hook, member) / "cfg.json").get("target_hook") or hook)
               for layer, hook, member in found]
    for layer, hook in dict.fromkeys(spliced):
        folder, stem = frontier_stem(run_dir, layer, hook)
        if (folder / f"{stem}.png").is_file():
            rel = os.path.relpath(folder, index_page(run_dir).parent)
            src = html.escape(quote(f"{rel}/{stem}"))
            parts.append(f'<figure><a href="{src}.svg"><img src="{src}.png" alt="frontier of layer {layer} '
                         f'{html.escape(hook)}" width="880"></a><figcaption>layer {layer} {html.escape(hook)}: '
                         'L0 against &Delta;CE and FVU of every SAE evaluated</figcaption></figure>')
    return "\n".join(parts)


def _write_eval_script(run_dir, layer: int, hook: str, member: str | None = None):
    """viewer_data/eval.js: saepipe eval's numbers for the viewer's overview ({} when there are
    none for the SAE there now). Rewritten with the index page, after every collate and eval."""
    data = records_dir(run_dir, layer, hook, member) / "viewer_data"
    if data.is_dir():  # records from before the viewer had data files have no overview to fill
        fsio.write_atomic(data / "eval.js", _js_call("eval", _json(_lm_eval(run_dir, layer, hook, member))))
