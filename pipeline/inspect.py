"""Live inspection: which latents of the trained SAEs fire on a prompt, token by token.

    saepipe inspect CONFIG --prompt "def read(path):" [--layers 3,6] [--top 5] [--latent 17] [--html page.html]

The model runs once over the prompt, stopped after the deepest chosen layer
(pipeline.model.ActivationCapture), and each chosen layer's activations go through its
trained SAE the way collate's did: rounded to the store's dtype (what the store holds is
what collate encoded) and encoded in one batch (pipeline.collate.windows.encode_rows). So a
window of the store, inspected, gives exactly the activations its records show.

The prompt is cut as the store's windows were (pipeline.steer.prompt_ids: the tokenizer's
encoding without special tokens, after the BOS the store put first, as the SAE's cfg.json
records). Collate leaves position 0 out of its records when it holds that BOS and
collate.exclude_bos (pipeline.loader.excludes_bos's rule): the position is shown, marked `*`,
but picks no latent for the page and sets no scale.

Which SAEs: each (layer, hook) of --layers (default: collate's layers, else train's, else
harvest's: Config.targets) and of --hook (default: every hook of those); --member picks a
train.sweep member or a KL fine-tuned copy, as steer's --member does.

What it shows, per SAE:

    table   (default) one row per token: position, token, its top --top latents as
            latent:activation, wrapped at 100 columns; then, when explain has run on these
            very weights, each latent of the table with its N2G F1 and explanation
            (pipeline.collate.explain: explanations.json beside the records)
    follow  (--latent I) latent I's activation at every token, with a bar
    page    (--html OUT) one self-contained HTML file (no script, no server): per latent
            shown, a heatmap over the prompt's tokens, its explanation and scores, and a
            link to its page in the records' viewer (viewer.html#I, relative to OUT)

Limits. A prompt longer than the model's positions (pipeline.model.max_positions) is refused:
cut, it would show another text's activations and say nothing of it. One longer than the
store's windows is inspected with a note: the SAE never saw those positions.

    plan   check what is cheap (prompt, --top, SAEs, --latent), load the model, cut the prompt
    run    one forward, each SAE's code, then the table, the follow view, the page
"""

from __future__ import annotations

import html
import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from torch import nn

from pipeline import fsio
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.paths import leaf, records_dir, sae_dir
from pipeline.saes import Dictionary, load_sae, saved_marker, trained

WIDTH = 100  # columns of the text output
TOKEN_WIDTH = 18  # a token's column at most; a longer token is cut, with …
BAR = 40  # --latent's bar, in characters, at the prompt's largest activation
PAGE_LATENTS = 200  # latents per SAE on the page at most, the strongest first
EIGHTHS = " ▏▎▍▌▋▊▉"


@dataclass
class Target:
    """One SAE inspected, with what the records and explain say of it."""
    layer: int
    hook: str
    member: str | None
    sae: Dictionary
    dtype: torch.dtype  # the store's dtype for (layer, hook): activations are rounded to it first
    explanations: dict[int, dict]  # latent -> its explanations.json entry, made from these very weights
    viewer: Path | None  # the records' viewer page; None without records
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"layer {self.layer} {leaf(self.hook, self.member)}"


@dataclass
class Plan:
    model: nn.Module
    tokenizer: object
    targets: list[Target]
    ids: list[int]  # the prompt's token ids, BOS first when the store's windows opened with it
    strings: list[str]  # each token's text (collate's TokenText: they concatenate back to the text)
    skip_first: bool  # position 0 is the BOS collate leaves out
    top: int
    latent: int | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Codes:
    """One SAE's code of the prompt: position t's latents idx[t] with activations vals[t] (0: off)."""
    target: Target
    idx: torch.Tensor  # [T, w] int64, on the CPU
    vals: torch.Tensor  # [T, w] float32

    def dense(self, latents: Sequence[int]) -> np.ndarray:
        """[T, len(latents)]: those latents' activations at every position."""
        col = np.full(self.target.sae.n_latents, -1, dtype=np.int64)
        col[np.asarray(latents, dtype=np.int64)] = np.arange(len(latents))
        idx, vals = self.idx.numpy(), self.vals.numpy()
        at = col[idx]
        on = (at >= 0) & (vals != 0)
        out = np.zeros((len(idx), len(latents)), dtype=np.float32)
        np.add.at(out, (np.nonzero(on)[0], at[on]), vals[on])
        return out

    def top(self, n: int) -> list[list[tuple[int, float]]]:
        """Per position, its n strongest latents that fire, as (latent, activation); ties by latent id."""
        idx, vals = self.idx.numpy(), self.vals.numpy()
        out = []
        for i, v in zip(idx, vals):
            order = np.lexsort((i, -v))
            out.append([(int(i[j]), float(v[j])) for j in order[:n] if v[j] > 0])
        return out


# ---------------------------------------------------------------------------
# Plan


def plan(cfg: Config, prompt: str | Sequence[int], layers: list[int] | None = None, hook: str | None = None,
         member: str | None = None, top: int = 5, latent: int | None = None, loaded=None) -> Plan:
    """Everything run() needs. `prompt` is text, or token ids used as they are (a window of the
    store: no BOS is added); `loaded` an already loaded (model, tokenizer) of the config's model."""
    from pipeline.collate.windows import TokenText
    from pipeline.data import special_ids
    from pipeline.model import load_model, max_positions
    from pipeline.steer import _member, prompt_ids

    is_text = isinstance(prompt, str)
    if is_text and not prompt.strip():
        raise UserError("--prompt is empty; give the text whose latents to show")
    if not is_text and len(prompt) == 0:
        raise UserError("no token ids to inspect; give at least one")
    if top < 1:
        raise UserError(f"--top {top} must be at least 1")
    member = _member(cfg, member)
    pairs = cfg.targets("collate", layers)
    if hook is not None:
        pairs = [(layer, hook) for layer in dict.fromkeys(layer for layer, _ in pairs)]
    found = []
    for layer, h in pairs:  # every SAE's cheap check before the model's slow load
        folder = sae_dir(cfg.run_path, layer, h, member)
        _, sae_cfg = trained(folder, layer, leaf(h, member))
        n = int(sae_cfg["n_latents"])
        if latent is not None and not 0 <= latent < n:
            raise UserError(f"--latent {latent} is out of range: the SAE of layer {layer} hook {leaf(h, member)} has "
                            f"latents 0..{n - 1}")
        found.append((layer, h, folder))

    model, tokenizer = loaded or load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    device = next(model.parameters()).device
    store_dtype = _store_dtypes(cfg)
    targets = [_target(cfg, layer, h, member, folder, device, store_dtype(layer, h)) for layer, h, folder in found]

    prepend = targets[0].sae.cfg.get("prepend_bos")  # train copies the store's; one store, one answer
    if is_text:
        ids, bos = prompt_ids(tokenizer, prompt, prepend)
    else:
        ids = [int(i) for i in prompt]
        vocab = model.get_input_embeddings().num_embeddings
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is not in the model's vocabulary (ids 0..{vocab - 1})")
        bos = bool(prepend) and ids[0] == special_ids(tokenizer, True)[1]
    if len(ids) == bos:
        raise UserError("--prompt encodes to no tokens; give the text whose latents to show")
    limit = max_positions(model)
    if limit is not None and len(ids) > limit[0]:
        after = " after the BOS the store's windows open with" if bos else ""
        raise UserError(f"--prompt is {len(ids) - bos} tokens{after}, more than {type(model).__name__}'s {limit[0]} "
                        f"positions ({limit[1]}); shorten it to at most {limit[0] - bos} tokens")
    notes = []
    ctx = targets[0].sae.cfg.get("context_size")
    if isinstance(ctx, int) and len(ids) > ctx:
        notes.append(f"inspect: the prompt's {len(ids)} tokens pass the store's windows of {ctx}: the SAEs never "
                     f"saw positions {ctx} and later")
    # collate's rule (pipeline.loader.excludes_bos), on the prompt's own BOS
    skip_first = bos and cfg.collate.exclude_bos
    return Plan(model, tokenizer, targets, ids, TokenText(tokenizer).strings(ids), skip_first, top, latent, notes)


def _store_dtypes(cfg: Config):
    """(layer, hook) -> the dtype the store rounds its activations to: the store's own when it is
    at hand, else the config's harvest.storage_dtype."""
    from pipeline import dtypes
    from pipeline.store import ActivationStore, Location

    where = Location.of(cfg)
    store = ActivationStore(where) if where.exists() else None

    def dtype(layer: int, hook: str) -> torch.dtype:
        if store is not None:
            try:
                return store.dtype(layer, hook)
            except UserError:  # (layer, hook) is not in it
                pass
        return dtypes.torch_dtype(cfg.harvest.storage_dtype)

    return dtype


def _target(cfg: Config, layer: int, hook: str, member: str | None, folder: Path, device, dtype) -> Target:
    """The SAE in `folder`, loaded (its sha256 checked), with its records' viewer and explanations when
    they are of its very weights (a note when they are of others)."""
    from pipeline.collate import records
    from pipeline.collate.explain import FILE

    sae = load_sae(folder, device=device)
    sha = (saved_marker(folder) or {}).get("sha256")
    out = records_dir(cfg.run_path, layer, hook, member)
    t = Target(layer, hook, member, sae, dtype, {}, None)
    changes = records.changed_settings(out, {"sae.sha256": sha})
    if changes is None:
        t.notes.append(f"no records for {t.name} (saepipe collate CONFIG --layers {layer}): no viewer to link to")
    else:
        t.viewer = out / "viewer.html"
        if changes:
            t.notes.append(f"the records in {out} are of other weights ({changes[0]}); rerun saepipe collate "
                           f"CONFIG --layers {layer}")
    # explanations.json read once: read_explanations' view by latent id, plus the fingerprint it drops
    made = fsio.read_json(out / FILE)
    if made:
        if (made.get("fingerprint") or {}).get("sae.sha256") == sha:
            t.explanations = {int(e["latent"]): e for e in made.get("latents", [])}
        else:
            t.notes.append(f"the explanations in {out / FILE} are of other weights: not shown; rerun saepipe "
                           f"explain CONFIG --layers {layer}")
    return t


# ---------------------------------------------------------------------------
# The code of the prompt


@torch.inference_mode()
def encode(p: Plan) -> list[Codes]:
    """One forward of the prompt up to the deepest target's block, and each target's code of it."""
    from pipeline.collate.windows import encode_rows
    from pipeline.model import ActivationCapture

    device = next(p.model.parameters()).device
    points = list(dict.fromkeys((t.layer, t.hook) for t in p.targets))
    acts = ActivationCapture(p.model, points).run(torch.tensor([p.ids], device=device))
    out = []
    for t in p.targets:
        x = acts[(t.layer, t.hook)][0].to(t.dtype)  # what the store would hold, as collate reads it
        idx, vals = encode_rows(t.sae, x, len(x), x.device)
        out.append(Codes(t, idx.cpu(), vals.float().cpu()))
    return out


# ---------------------------------------------------------------------------
# Text


def _act(a: float) -> str:
    return "0" if a == 0 else f"{a:.2f}" if abs(a) >= 0.01 else f"{a:.1e}"


def _say(text: str) -> list[str]:
    """A sentence as lines of at most WIDTH columns."""
    return textwrap.wrap(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False) or [""]


def _token(s: str) -> str:
    """A token as one cell: quoted, so spaces and newlines show."""
    q = json.dumps(s, ensure_ascii=False)
    return q if len(q) <= TOKEN_WIDTH else q[:TOKEN_WIDTH - 1] + "…"


def _wrap(first: str, items: list[str], indent: int) -> list[str]:
    """`first` followed by items, space separated, continued under the first item past WIDTH columns."""
    lines, line = [], first
    for item in items:
        if len(line) + len(item) > WIDTH and len(line) > indent:
            lines.append(line.rstrip())
            line = " " * indent
        line += item + "  "
    return lines + [line.rstrip()]


def _f1(entry: dict | None) -> str:
    f1 = ((entry or {}).get("scores") or {}).get("f1")
    return f"{f1:.2f}" if isinstance(f1, (int, float)) else ""


def _scores(entry: dict | None) -> str:
    s = (entry or {}).get("scores") or {}
    shown = [f"{k} {s[k]:.2f}" for k in ("f1", "precision", "recall", "corr") if isinstance(s.get(k), (int, float))]
    return ", ".join(shown)


def _rows(p: Plan) -> tuple[list[str], int, int]:
    """(each token's cell, the token column's width, the position column's)."""
    cells = [_token(s) for s in p.strings]
    return cells, max(len("token"), *map(len, cells)), max(len("pos"), len(str(len(cells) - 1)) + 1)


def _mark(p: Plan, pos: int) -> str:
    return "*" if p.skip_first and pos == 0 else " "


def _skip_note(p: Plan) -> list[str]:
    return (_say("* position 0 is the BOS the store's windows open with: collate leaves it out of the records "
                 "(collate.exclude_bos)") if p.skip_first else [])


def _header(p: Plan, c: Codes, what: str) -> list[str]:
    t = c.target
    lines = _say(f"inspect {t.name} ({t.sae.architecture}, {t.sae.n_latents} latents): {what}")
    return lines + [line for note in t.notes for line in _say(note)]


def table(p: Plan, c: Codes) -> list[str]:
    """The top-N table of one SAE: a row per token, then the explanations of its latents."""
    t = c.target
    cells, tw, pw = _rows(p)
    lines = _header(p, c, f"top {p.top} latents per token, as latent:activation")
    lines.append(f"{'pos':>{pw}}  {'token':<{tw}}  latents")
    indent = pw + 2 + tw + 2
    tops = c.top(p.top)
    items = [[f"{i}:{_act(a)}" for i, a in entries] or ["-"] for entries in tops]
    iw = max(len(item) for row in items for item in row)  # one width for all: the entries line up in columns
    for pos, (cell, row) in enumerate(zip(cells, items)):
        first = f"{pos:>{pw - 1}}{_mark(p, pos)}  {cell:<{tw}}  "
        lines += _wrap(first, [item.ljust(iw) for item in row], indent)
    lines += _skip_note(p)
    if not t.explanations:
        return lines
    shown = sorted({i for entries in tops for i, _ in entries})
    lw = max(len("latent"), *(len(str(i)) for i in shown)) if shown else len("latent")
    lines.append(f"{'latent':>{lw}}  {'F1':>4}  explanation (N2G: * any token, ^ the text's start)")
    for i in shown:
        entry = t.explanations.get(i)
        text = (entry or {}).get("text") or ""
        lines += textwrap.wrap(f"{i:>{lw}}  {_f1(entry):>4}  {text}", WIDTH, subsequent_indent=" " * (lw + 8))
    return lines


def follow(p: Plan, c: Codes, latent: int) -> list[str]:
    """Latent `latent` of one SAE over the prompt: its activation at every token, with a bar."""
    t = c.target
    acts = c.dense([latent])[:, 0]
    counted = acts[1:] if p.skip_first else acts
    most = float(counted.max(initial=0.0))
    at = int(np.argmax(counted)) + (1 if p.skip_first else 0) if most > 0 else None
    entry = t.explanations.get(latent)
    where = f"max {_act(most)} at position {at} ({json.dumps(p.strings[at], ensure_ascii=False)})" if at is not None \
        else "does not fire on this prompt"
    lines = _header(p, c, f"latent {latent}, {where}")
    if t.explanations:
        text = (entry or {}).get("text")
        lines += _say(f"explanation: {text} ({_scores(entry)})" if text else
                      "explanation: none (explain had no records of this latent to build one from)")
    cells, tw, pw = _rows(p)
    lines.append(f"{'pos':>{pw}}  {'token':<{tw}}  {'act':>8}")
    for pos, (cell, a) in enumerate(zip(cells, acts.tolist())):
        lines.append(f"{pos:>{pw - 1}}{_mark(p, pos)}  {cell:<{tw}}  {_act(a):>8}  {_bar(a, most)}".rstrip())
    return lines + _skip_note(p)


def _bar(a: float, most: float) -> str:
    if a <= 0 or most <= 0:
        return ""
    eighths = round(min(a / most, 1.0) * BAR * 8)
    return "█" * (eighths // 8) + EIGHTHS[eighths % 8].strip() + ("+" if a > most else "")


# ---------------------------------------------------------------------------
# The page


def shown_latents(p: Plan, c: Codes) -> list[int]:
    """The latents one SAE's part of the page shows: --latent, else every latent among some counted
    token's top N, the strongest (largest activation on the prompt) first, at most PAGE_LATENTS."""
    if p.latent is not None:
        return [p.latent]
    tops = c.top(p.top)[1 if p.skip_first else 0:]
    latents = sorted({i for entries in tops for i, _ in entries})
    if not latents:
        return []
    most = c.dense(latents)[1 if p.skip_first else 0:].max(0)
    order = sorted(range(len(latents)), key=lambda j: (-most[j], latents[j]))
    return [latents[j] for j in order[:PAGE_LATENTS]]


_STYLE = """
body { font: 14px system-ui, sans-serif; color: #1f2328; margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.muted { color: #6b7280; }
.latent { margin: 10px 0 16px; }
.latent .head { font-size: 13px; margin-bottom: 3px; }
.latent .head .expl { font-family: ui-monospace, Menlo, Consolas, monospace; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.8;
          white-space: pre-wrap; word-break: break-word; background: #fff; border: 1px solid #d0d7de;
          border-radius: 4px; padding: 6px 8px; }
.tok { border-radius: 2px; }
.tok.skip { outline: 1px dashed #9ca3af; color: #6b7280; }
"""


def page(p: Plan, codes: list[Codes], out: Path) -> str:
    """The self-contained HTML page (see the module's doc); links are relative to `out`'s folder."""
    here = Path(os.path.abspath(out)).parent
    prompt = "".join(p.strings[1 if p.skip_first else 0:])
    parts = [f"<h1>saepipe inspect</h1>\n<p class=\"muted\">{len(p.ids)} tokens: "
             f"<code>{html.escape(json.dumps(prompt, ensure_ascii=False))}</code></p>"]
    parts += [f'<p class="muted">{html.escape(n)}</p>' for n in p.notes]
    if p.skip_first:
        parts.append('<p class="muted">The dashed first token is the BOS the store\'s windows open with: collate '
                     "leaves it out of the records (collate.exclude_bos); its activation is in its tooltip, "
                     "not its colour.</p>")
    parts.append('<p class="muted">Each row: one latent\'s activation at every token, the colour relative to its '
                 "largest on this prompt (hover a token for its position and activation).</p>")
    for c in codes:
        parts.append(_section(p, c, here))
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>saepipe inspect</title>\n"
            f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def _section(p: Plan, c: Codes, here: Path) -> str:
    t = c.target
    latents = shown_latents(p, c)
    out = [f"<h2>{html.escape(t.name)} <span class=\"muted\">({html.escape(t.sae.architecture)}, "
           f"{t.sae.n_latents} latents)</span></h2>"]
    out += [f'<p class="muted">{html.escape(n)}</p>' for n in t.notes]
    if not latents:
        return "\n".join(out + ['<p class="muted">No latent fires on this prompt.</p>'])
    acts = c.dense(latents)
    first = 1 if p.skip_first else 0
    viewer = quote(os.path.relpath(t.viewer, here)) if t.viewer is not None else None
    for j, latent in enumerate(latents):
        col = acts[:, j]
        most = float(col[first:].max(initial=0.0))
        name = f"latent {latent}"
        link = f'<a href="{html.escape(viewer)}#{latent}">{name}</a>' if viewer else name
        entry = t.explanations.get(latent)
        bits = [link, f"max {_act(most)}"]
        if entry and entry.get("text"):
            bits.append(f'<span class="expl">{html.escape(entry["text"])}</span>')
        if _scores(entry):
            bits.append(html.escape(_scores(entry)))
        cells = []
        for pos, (s, a) in enumerate(zip(p.strings, col.tolist())):
            skip = pos < first
            tip = f"{pos}: {a:.4g}" + (" (BOS, left out by collate)" if skip else "")
            shade = f' style="background:rgba(234,88,12,{min(1.0, a / most):.3f})"' if a > 0 and most > 0 \
                and not skip else ""
            cells.append(f'<span class="tok{" skip" if skip else ""}"{shade} title="{tip}">'
                         f'{html.escape(s.replace(chr(10), "↵" + chr(10)))}</span>')
        out.append(f'<div class="latent" id="latent-{latent}"><div class="head">{" · ".join(bits)}</div>'
                   f'<div class="tokens">{"".join(cells)}</div></div>')
    return "\n".join(out)


# ---------------------------------------------------------------------------
# The stage


def run(cfg: Config, prompt: str | Sequence[int], layers: list[int] | None = None, hook: str | None = None,
        member: str | None = None, top: int = 5, latent: int | None = None, html_out=None, echo=print,
        loaded=None) -> list[Codes]:
    """Print each SAE's table (or, with `latent`, its follow view), write the page to `html_out`
    when given; return each SAE's code of the prompt."""
    if html_out is not None and Path(html_out).is_dir():
        raise UserError(f"--html {html_out} is a folder; give the page's file name, e.g. "
                        f"{Path(html_out) / 'inspect.html'}")
    p = plan(cfg, prompt, layers, hook, member, top, latent, loaded)
    codes = encode(p)
    for line in (line for note in p.notes for line in _say(note)):
        echo(line)
    for j, c in enumerate(codes):
        if j:
            echo("")
        for line in (table(p, c) if latent is None else follow(p, c, latent)):
            echo(line)
    if html_out is not None:
        out = Path(html_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fsio.write_atomic(out, page(p, codes, out))
        echo(f"inspect: wrote {out}")
    return codes
