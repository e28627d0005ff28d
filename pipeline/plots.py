"""The pictures: a finished SAE folder's loss curves and feature-density histogram, and eval's
frontier of every SAE of a (layer, hook).

Drawn with matplotlib, the field's standard, as PNG (to look at) and SVG (to
zoom into). Figures go through the Agg canvas directly, never pyplot: no
display is needed and a caller's own matplotlib backend is left alone.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib import rc_context, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import fsio

FORMATS = ("png", "svg")
DPI = 120


def loss_figure(folder, rows: list[dict], title: str, space: str | None = None) -> list[Path]:
    """loss.png and loss.svg from metrics.jsonl rows (FVU measured in `space`); returns their paths."""
    return _save(draw_loss(rows, title, space), Path(folder), "loss")


def density_figure(folder, density, n_tokens: int, title: str) -> list[Path]:
    """density.png and density.svg: a histogram of log10 feature density; returns their paths.

    density[i] is the fraction of the n_tokens tokens on which latent i fired.
    """
    return _save(draw_density(density, n_tokens, title), Path(folder), "density")


def frontier_figure(folder, stem: str, points: list[dict], title: str) -> list[Path]:
    """<stem>.png and <stem>.svg in folder: draw_frontier(points); returns their paths."""
    return _save(draw_frontier(points, title), Path(folder), stem)


def draw_frontier(points: list[dict], title: str) -> Figure:
    """L0 against delta CE (left) and against FVU (right, log), one dot per SAE, labelled with its
    name and coloured by architecture: the sparsity / faithfulness trade-off of every SAE of one
    (layer, hook), architectures and sweep members side by side. points: dicts with name,
    architecture, l0, delta_ce, fvu (a missing or non-finite value leaves that dot out)."""
    fig = Figure(figsize=(11, 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    fig.suptitle(title)
    colours = {a: f"C{i}" for i, a in enumerate(sorted({p["architecture"] for p in points}))}
    for ax, key, label in ((axes[0], "delta_ce", "ΔCE (spliced − clean), nats/token"),
                           (axes[1], "fvu", "FVU (fraction of variance unexplained)")):
        shown = set()
        for p in sorted(points, key=lambda p: p["name"]):
            x, y = p.get("l0"), p.get(key)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)) or (key == "fvu" and y <= 0):
                continue
            arch = p["architecture"]
            ax.plot([x], [y], "o", color=colours[arch], label=None if arch in shown else arch)
            shown.add(arch)
            ax.annotate(p["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "fvu" and ax.lines:
            ax.set_yscale("log")
            _plain_log_labels(ax)
        ax.set_xlabel("L0 (latents firing per token)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.4)
        if ax.lines:
            ax.legend(title="architecture")
        else:
            ax.text(0.5, 0.5, "no SAE with these numbers", transform=ax.transAxes, ha="center", va="center")
    return fig


def draw_loss(rows: list[dict], title: str, space: str | None = None) -> Figure:
    """FVU (train and eval; `space`: the one it is measured in) on a log axis above; below, on its
    own axis, the share of latents dormant (silent for the last train.dormant_tokens tokens: the
    ones AuxK trains), when any was. Each logged point is marked, so a sparse log does not pass for
    a measured straight line. A series with no finite point gets neither a line nor a legend entry.
    """
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    fvu = [("train", _series(train, "fvu", positive=True), ".-"),
           ("eval (held-out)", _series(evals, "fvu", positive=True), "o-")]
    xs_d, ys_d = _series(train, "dormant_frac")
    dormant = (xs_d, [100 * y for y in ys_d]) if any(y > 0 for y in ys_d) else ([], [])

    fig = Figure(figsize=(7, 6.5 if dormant[0] else 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if dormant[0]:
        ax, ax_dormant = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        ax, ax_dormant = fig.subplots(1, 1), None
    fig.suptitle(title)

    for label, (xs, ys), style in fvu:
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=3)
    ax.set_yscale("log")
    _plain_log_labels(ax)
    ax.set_ylabel("FVU" + (f", {space} space" if space else "") + " (fraction of variance unexplained)")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    if ax.lines:
        # Down to the decade below the lowest point, so a round major tick (0.1, 0.01) is always in view.
        low = min(min(ys) for _, (xs, ys), _ in fvu if xs)
        ax.set_ylim(bottom=10 ** math.floor(math.log10(low)))
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite FVU logged", transform=ax.transAxes, ha="center", va="center")

    if ax_dormant is not None:
        ax_dormant.plot(*dormant, ".-", color="C2", markersize=3)
        ax_dormant.set_ylabel("dormant latents, %\n(what AuxK trains)")
        ax_dormant.grid(True, alpha=0.4)
        ax_dormant.set_ylim(bottom=0)
        ax_dormant.yaxis.set_major_locator(ticker.MaxNLocator(steps=[1, 2, 5, 10]))
    bottom = ax if ax_dormant is None else ax_dormant
    bottom.set_xlabel("training tokens")
    bottom.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    return fig


def draw_density(density, n_tokens: int, title: str) -> Figure:
    """Histogram of log10(density) over latents that fired; the dead count written on it."""
    d = np.asarray(density.detach().cpu() if hasattr(density, "detach") else density, dtype=np.float64)
    live = d[d > 0]
    dead = int((d == 0).sum())
    # The rarest a live latent can be is one token in n_tokens: the left edge, a whole decade.
    lo = math.floor(math.log10(1 / max(n_tokens, 1)))
    if live.size:
        lo = min(lo, math.floor(np.log10(live.min())))

    fig = Figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(np.log10(live), bins=np.linspace(lo, 0, 51), color="C0")
    ax.set_xlim(lo, 0)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel("log10(fraction of tokens the latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{dead} of {d.size} latents dead (never fired on these {n_tokens} tokens)")
    ax.grid(True, axis="y", alpha=0.4)
    return fig


def _plain_log_labels(ax):
    """Log-axis labels as plain decimals (0.1, 0.2, 0.5), and the in-between ones only when few decades show."""
    def minor(v, _):
        lo, hi = ax.get_ylim()
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 99
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        keep = (2, 3, 4, 6) if decades <= 1.2 else (2, 5) if decades <= 2.5 else ()
        return f"{v:g}" if mantissa in keep else ""

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def _series(rows, key, positive=False):
    """(tokens, values) of the rows whose value is finite (and > 0 for a log axis)."""
    pts = [(r["tokens"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and (r[key] > 0 or not positive)]
    return [x for x, _ in pts], [y for _, y in pts]


def _save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        # A fixed id salt and no date: the same figure gives the same bytes, run after run.
        # SVG text stays text (searchable, a third the size) instead of glyph outlines.
        with rc_context({"svg.hashsalt": "saepipe", "svg.fonttype": "none"}):
            fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else {"Software": None})
        path = folder / f"{stem}.{fmt}"
        fsio.write_atomic(path, buf.getvalue())
        paths.append(path)
    return paths

