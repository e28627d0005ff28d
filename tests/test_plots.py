"""The loss and density figures: valid PNG and SVG files, and the data drawn is the data given."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from pipeline import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics_rows(n_train=12, aux=True):
    """metrics.jsonl-shaped rows: train every 10 steps, eval every 40, a NaN and a zero FVU among them."""
    rows = []
    for i in range(1, n_train + 1):
        step = 10 * i
        row = {"split": "train", "step": step, "tokens": step * 512, "fvu": 0.9 * 0.8 ** i,
               "loss": 0.0, "dormant_frac": 0.0, "lr": 1e-3}
        if aux:
            row["aux_loss"] = 0.0 if i < 5 else 0.05 / i
            row["dormant_frac"] = 0.0 if i < 5 else 0.01 * i
        rows.append(row)
        if step % 40 == 0:
            rows.append({"split": "eval", "step": step, "tokens": step * 512, "fvu": 0.95 * 0.8 ** i, "l0": 8.0})
    rows[2]["fvu"] = float("nan")  # a diverged log interval: skipped, not drawn as a gap to 0
    rows[3]["fvu"] = 0.0           # no place on a log axis
    return rows


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_loss_files_are_png_and_svg(tmp_path):
    paths = plots.loss_figure(tmp_path, metrics_rows(), "L3 resid_post: loss", "layer-normed")
    assert paths == [tmp_path / "loss.png", tmp_path / "loss.svg"]
    png, svg = paths
    assert png.read_bytes().startswith(PNG_MAGIC)
    height, width, _ = imread(png).shape
    assert width > 400 and height > 300
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = "".join(root.itertext())
    assert "L3 resid_post: loss" in texts and "dormant latents" in texts and "FVU, layer-normed space" in texts
    assert {p.stat().st_mode & 0o777 for p in paths} == {0o666 & ~current_umask()}


def test_loss_figure_draws_the_rows(tmp_path):
    rows = metrics_rows()
    fig = plots.draw_loss(rows, "t")
    ax, ax_aux = fig.axes
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]

    # FVU of train and eval on a log axis, non-finite and non-positive points left out.
    assert ax.get_yscale() == "log"
    lines = lines_by_label(ax)
    assert set(lines) == {"train", "eval (held-out)"}
    kept = [r for r in train if math.isfinite(r["fvu"]) and r["fvu"] > 0]
    assert len(kept) == len(train) - 2
    np.testing.assert_array_equal(lines["train"].get_xdata(), [r["tokens"] for r in kept])
    np.testing.assert_array_equal(lines["train"].get_ydata(), [r["fvu"] for r in kept])
    np.testing.assert_array_equal(lines["eval (held-out)"].get_xdata(), [r["tokens"] for r in evals])
    np.testing.assert_array_equal(lines["eval (held-out)"].get_ydata(), [r["fvu"] for r in evals])
    assert all(line.get_marker() not in (None, "None", "") for line in ax.get_lines())  # each logged point shows

    # The dormant share (%) on its own linear axis, sharing the token axis, and only there, points marked.
    assert ax_aux is not ax and ax_aux.get_yscale() == "linear"
    (aux,) = ax_aux.get_lines()
    np.testing.assert_array_equal(aux.get_xdata(), [r["tokens"] for r in train])
    np.testing.assert_array_equal(aux.get_ydata(), [100 * r["dormant_frac"] for r in train])
    assert aux.get_marker() not in (None, "None", "")
    assert ax_aux.get_ylim()[0] == 0 and ax.get_shared_x_axes().joined(ax, ax_aux)
    assert not any(np.array_equal(line.get_ydata(), aux.get_ydata()) for line in ax.get_lines())

    # One legend entry per drawn line, no more.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "eval (held-out)"]
    assert ax_aux.get_legend() is None


def test_a_series_with_no_points_gets_no_line_and_no_legend_entry():
    rows = [r for r in metrics_rows(aux=False) if r["split"] == "train"]
    fig = plots.draw_loss(rows, "no eval yet, nothing dormant")
    (ax,) = fig.axes  # no latent was ever dormant: no empty panel
    assert set(lines_by_label(ax)) == {"train"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train"]


def test_ticks_are_round_and_nothing_is_cut_off():
    fig = plots.draw_loss(metrics_rows(), "a long title that still has to fit inside the figure, all of it")
    fig.canvas.draw()
    ax, ax_aux = fig.axes
    lo, hi = ax.get_ylim()
    # The FVU axis reaches down to a whole decade, labelled as a plain decimal.
    assert math.log10(lo) == round(math.log10(lo))
    labels = [t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()]
    assert labels and all(float(s) == float(f"{float(s):.1g}") for s in labels), labels
    for axis in (ax_aux.xaxis, ax_aux.yaxis):
        for tick in axis.get_majorticklocs():
            assert tick == pytest.approx(float(f"{tick:.2g}")), tick
    # Everything drawn (titles, labels, tick labels, legend) lies inside the saved canvas.
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= width and drawn.y1 <= height, drawn


def test_density_histogram_counts_live_latents_and_notes_the_dead(tmp_path):
    rng = np.random.default_rng(0)
    n_tokens = 5000
    density = torch.tensor(rng.integers(1, n_tokens, 300) / n_tokens, dtype=torch.float32)
    density[:7] = 0
    paths = plots.density_figure(tmp_path, density, n_tokens, "L3: feature density")
    assert paths == [tmp_path / "density.png", tmp_path / "density.svg"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)
    assert "7 of 300 latents dead" in "".join(ET.parse(paths[1]).getroot().itertext())

    fig = plots.draw_density(density, n_tokens, "L3: feature density")
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    edges = [p.get_x() for p in ax.patches] + [ax.patches[-1].get_x() + ax.patches[-1].get_width()]
    live = density[density > 0].double().numpy()
    expected, _ = np.histogram(np.log10(live), bins=np.asarray(edges))
    assert sum(heights) == 293 and heights == expected.tolist()
    # The rarest a live latent can be (1 token in 5000, 10^-3.7) lies inside the axis, which ends at 1.
    assert edges[0] <= math.log10(1 / n_tokens) and edges[-1] == pytest.approx(0)
    assert "7 of 300 latents dead" in ax.get_title()


def test_density_accepts_numpy_and_an_all_dead_sae(tmp_path):
    paths = plots.density_figure(tmp_path, np.zeros(16), 100, "untrained")
    assert all(p.stat().st_size > 0 for p in paths)
    (ax,) = plots.draw_density(np.zeros(16), 100, "untrained").axes
    assert sum(p.get_height() for p in ax.patches) == 0 and "16 of 16 latents dead" in ax.get_title()


def test_same_figure_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder in (a, b):
        plots.loss_figure(folder, metrics_rows(), "t")
    assert (a / "loss.svg").read_bytes() == (b / "loss.svg").read_bytes()
    assert (a / "loss.png").read_bytes() == (b / "loss.png").read_bytes()


def current_umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
