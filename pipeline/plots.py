"""Two tiny SVG charts with no plotting library: a line plot and a histogram.

Enough to eyeball a loss curve and a feature-density histogram in a browser
or a file viewer; not a general plotting tool.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from pipeline import fsio

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def line_plot(path, series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str,
              ylabel: str, log_y: bool = False):
    """One polyline per named series of (xs, ys); non-finite (or, with log_y, non-positive) points skipped."""
    def ok(y):
        return math.isfinite(y) and (y > 0 or not log_y)

    pts = {name: [(x, math.log10(y) if log_y else y) for x, y in zip(xs, ys) if ok(y) and math.isfinite(x)]
           for name, (xs, ys) in series.items()}
    allp = [p for ps in pts.values() for p in ps]
    if not allp:
        allp = [(0.0, 0.0)]
    x0, x1 = _span([p[0] for p in allp])
    y0, y1 = _span([p[1] for p in allp])
    parts = _frame(title, xlabel, ylabel + (" (log scale)" if log_y else ""))
    parts += _axes(x0, x1, y0, y1, y_fmt=(lambda v: f"{10 ** v:.3g}") if log_y else _fmt)
    for i, (name, ps) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        if len(ps) == 1:
            x, y = _sx(ps[0][0], x0, x1), _sy(ps[0][1], y0, y1)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        elif ps:
            coords = " ".join(f"{_sx(x, x0, x1):.1f},{_sy(y, y0, y1):.1f}" for x, y in ps)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{W - RIGHT - 150}" y="{TOP + 16 + 16 * i}" fill="{color}" '
                     f'font-size="12">{escape(name)}</text>')
    _write(path, parts)


def histogram(path, values: list[float], bins: int, title: str, xlabel: str, lo: float | None = None,
              hi: float | None = None, note: str = ""):
    """Counts of `values` in `bins` equal bins over [lo, hi] (default: their range)."""
    vals = [v for v in values if math.isfinite(v)]
    lo = min(vals, default=0.0) if lo is None else lo
    hi = max(vals, default=1.0) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    counts = [0] * bins
    for v in vals:
        if lo <= v <= hi:
            counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    top = max(counts, default=0) or 1
    parts = _frame(title, xlabel, "count")
    parts += _axes(lo, hi, 0, top)
    bw = (W - LEFT - RIGHT) / bins
    for i, c in enumerate(counts):
        if c:
            y = _sy(c, 0, top)
            parts.append(f'<rect x="{LEFT + i * bw:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                         f'height="{H - BOTTOM - y:.1f}" fill="{COLORS[0]}"/>')
    if note:
        parts.append(f'<text x="{LEFT + 8}" y="{TOP + 16}" font-size="12">{escape(note)}</text>')
    _write(path, parts)


# ---- drawing helpers
def _span(vs):
    a, b = min(vs), max(vs)
    if b - a < 1e-12 * max(1.0, abs(a)):
        a, b = a - 0.5, b + 0.5
    return a, b


def _sx(x, x0, x1):
    return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)


def _sy(y, y0, y1):
    return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)


def _fmt(v):
    return f"{v:.3g}"


def _frame(title, xlabel, ylabel):
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{escape(xlabel)}</text>',
        f'<text x="16" y="{H / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {H / 2})">{escape(ylabel)}</text>',
    ]


def _axes(x0, x1, y0, y1, x_fmt=_fmt, y_fmt=_fmt, ticks=5):
    out = [f'<polyline fill="none" stroke="black" points="{LEFT},{TOP} {LEFT},{H - BOTTOM} '
           f'{W - RIGHT},{H - BOTTOM}"/>']
    for i in range(ticks + 1):
        xv, yv = x0 + (x1 - x0) * i / ticks, y0 + (y1 - y0) * i / ticks
        x, y = _sx(xv, x0, x1), _sy(yv, y0, y1)
        out.append(f'<line x1="{x:.1f}" y1="{H - BOTTOM}" x2="{x:.1f}" y2="{H - BOTTOM + 4}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 17}" text-anchor="middle" font-size="11">'
                   f'{escape(x_fmt(xv))}</text>')
        out.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 7}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                   f'{escape(y_fmt(yv))}</text>')
    return out


def _write(path, parts):
    fsio.write_atomic(Path(path), "\n".join(parts + ["</svg>"]) + "\n")
