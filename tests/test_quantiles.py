"""Collate's quantile samples against brute force over every positive activation, the
settings that turn them off, and the one-line errors of bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import make_tokenizer
from pipeline.collate import accumulators as A
from pipeline.collate import scan as S
from pipeline.config import CollateConfig, config_from_dict
from pipeline.saes import load_sae
from pipeline.viewer import read_features
from stages import collate as stage
from stages.cli import main
from test_collate import CTX, DEAD, LOUD, N_LAT, dense, make_cfg, make_run


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return folder


def final_width(a_max: float, width: float, n_bins: int) -> float:
    """The histogram's width once every act fits: the starting one doubled as often as needed."""
    while math.ceil(a_max / width) > n_bins:
        width *= 2
    return width


def brute_quantiles(a: torch.Tensor, latent: int, cfg: CollateConfig) -> list[dict]:
    """A latent's intervals from all its positive acts at once: bin each act at the final
    width, give each bin to the interval holding its midpoint, and take each interval's
    n_per_quantile smallest seeded keys."""
    rows = torch.nonzero(a > 0).flatten()
    if not len(rows) or not cfg.n_quantiles:
        return []
    acts = a[rows]
    a_max = float(acts.max())
    w = final_width(a_max, cfg.hist_bin_width, cfg.hist_max_bins)
    bins = torch.ceil(acts.double() / w).long() - 1
    keys = A.random_keys(cfg.seed, rows, torch.full_like(rows, latent))
    Q = cfg.n_quantiles
    of_bin = [min(math.floor((b + 0.5) * w * Q / a_max), Q - 1) for b in range(int(bins.max()) + 1)]
    out = []
    for q in sorted(set(of_bin)):
        mine = [b for b, i in enumerate(of_bin) if i == q]
        inside = (bins >= mine[0]) & (bins <= mine[-1])
        order = sorted(torch.nonzero(inside).flatten().tolist(), key=lambda j: int(keys[j]))
        out.append({"lo": round(mine[0] * w, 6), "hi": round((mine[-1] + 1) * w, 6), "count": int(inside.sum()),
                    "rows": [int(rows[j]) for j in order[: cfg.n_per_quantile]],
                    "acts": [float(acts[j]) for j in order[: cfg.n_per_quantile]]})
    return out


@pytest.mark.parametrize("collate", [
    {},  # the defaults: 5 intervals of 5, the histogram's 8 bins widening for LOUD
    {"batch_size": 160, "hist_max_bins": 4, "n_quantiles": 3, "n_per_quantile": 7, "seed": 11},  # widens often
    {"n_per_quantile": 0},  # bounds and counts, no examples
    {"n_quantiles": 0},  # none at all
])
def test_records_hold_the_brute_force_quantile_samples(tmp_path, tokenizer_dir, collate):
    store, acts, _ = make_run(tmp_path, tokenizer_dir)  # BOS at position 0, excluded
    cfg = config_from_dict(make_cfg(tmp_path, **collate))
    stage.run(cfg)
    c = cfg.collate

    sae = load_sae(tmp_path / "saes/0/resid_post")
    Z = dense(sae, acts, S.batch_rows_for(c, CTX))  # the scan's batches: bit-identical acts
    Z[::CTX] = 0
    features = list(read_features(tmp_path / "records/0/resid_post"))
    fewer = widened = empty_interval = 0  # the cases the rule has to get right, seen below
    for latent in range(N_LAT):
        want = brute_quantiles(Z[:, latent], latent, c)
        got = features[latent]["quantiles"]
        assert [(q["lo"], q["hi"], q["count"]) for q in got] == \
            [(pytest.approx(q["lo"], abs=1e-6), pytest.approx(q["hi"], abs=1e-6), q["count"]) for q in want], latent
        for g, w in zip(got, want):
            assert [s["doc_id"] * CTX + s["window_start"] + s["idx"] for s in g["examples"]] == w["rows"], latent
            assert [s["act"] for s in g["examples"]] == pytest.approx(w["acts"], abs=1e-5)
            assert all(g["lo"] - 1e-6 <= s["act"] <= g["hi"] + 1e-6 for s in g["examples"])
        if c.n_quantiles and want:
            assert sum(q["count"] for q in got) == features[latent]["n_positive"]  # the intervals cover (0, max]
            assert got[-1]["hi"] >= features[latent]["max_act"] - 1e-6 and got[0]["lo"] == 0
        fewer += 0 < len(want) < c.n_quantiles
        widened += features[latent]["hist_bin_width"] > c.hist_bin_width
        empty_interval += any(q["count"] == 0 for q in want)
    assert features[DEAD]["quantiles"] == []
    if c.n_quantiles:
        assert features[LOUD]["hist_bin_width"] > c.hist_bin_width and widened > 1
        assert fewer and empty_interval  # latents whose acts span few bins; a gap between acts


def test_the_sample_does_not_depend_on_batching_or_when_the_histogram_widened():
    """One latent's acts growing over the pass (each batch widens its histogram) against the
    same acts in one batch, and against brute force."""
    ctx, n_seq = 4, 40
    B = ctx * n_seq
    rows = torch.arange(B)
    vals = torch.where(rows % ctx == 0, 0.0, 0.05 * (1 + rows % 7) * 1.5 ** (rows // 16)).float()[:, None]
    idx = torch.zeros(B, 1, dtype=torch.int64)
    cfg = CollateConfig(n_top=0, n_random=0, hist_bin_width=0.1, hist_max_bins=8, n_quantiles=3, n_per_quantile=4)

    def collated(step):
        col = A.Collator(1, ctx, cfg, "cpu", skip_first=True)
        for lo in range(0, B, step):
            col.update(lo, idx[lo: lo + step], vals[lo: lo + step])
        return col.finish()

    stepwise, whole = collated(2 * ctx), collated(B)
    assert float(stepwise.stats.width[0]) > 8 * cfg.hist_bin_width  # widened many times, batch by batch
    want = brute_quantiles(vals[:, 0], 0, cfg)
    assert len(want) == 3
    for col in (stepwise, whole):
        q = col.quantiles
        assert q.present[0].tolist() == [True] * 3
        assert q.count[0].tolist() == [w["count"] for w in want]
        assert q.lo[0].tolist() == pytest.approx([w["lo"] for w in want])
        assert q.hi[0].tolist() == pytest.approx([w["hi"] for w in want])
        assert [[r for r in q.row[0, i].tolist() if r >= 0] for i in range(3)] == [w["rows"] for w in want]


@pytest.mark.parametrize("setting, value, needle", [
    ("n_quantiles", -1, "collate.n_quantiles = -1 must be >= 0"),
    ("n_per_quantile", -3, "collate.n_per_quantile = -3 must be >= 0"),
    ("n_quantiles", 9, "collate.n_quantiles = 9 must be <= collate.hist_max_bins = 8"),
])
def test_bad_settings_are_one_line(tmp_path, setting, value, needle):
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(make_cfg(tmp_path, **{setting: value})))
    result = CliRunner().invoke(main, ["collate", str(cfg_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: ") and needle in lines[0], result.output
    assert not (tmp_path / "records").exists()
