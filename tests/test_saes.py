"""The dictionary contract (pipeline.saes): one loader for every architecture, the registry,
the `train.sae` section, the one owner of the reconstruction statistics, and nothing outside
the package naming an architecture."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import saes
from pipeline.config import ConfigError, config_from_dict, markdown, setting
from pipeline.errors import UserError
from pipeline.metrics import ReconStats
from pipeline.saes import ARCHITECTURES, Dictionary, load_sae, register
from pipeline.saes.base import Settings
from pipeline.saes.topk import TopKSAE
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_outside_the_package_names_an_architecture():
    """What makes adding an architecture one file: train, eval, collate, steer, export and
    verify reach every one through the contract."""
    names = [n for cls in ARCHITECTURES.values() for n in (cls.__name__, cls.Settings.__name__)]
    quoted = [f'"{a}"' for a in ARCHITECTURES] + [f"'{a}'" for a in ARCHITECTURES]
    files = [p for p in (*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py"))
             if "saes" not in p.relative_to(ROOT).parts]
    assert len(files) > 20
    offenders = [f"{p.relative_to(ROOT)}: {w}" for p in files for w in names + quoted
                 if re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", p.read_text())]
    assert offenders == []


def _saved(tmp_path) -> tuple[Path, TopKSAE]:
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 3, normalize="layer_norm", backend="torch")
    folder = tmp_path / "sae"
    sae.save(folder, {"layer": 2})
    return folder, sae


def test_load_sae_reads_the_architecture_it_names(tmp_path):
    folder, sae = _saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["normalize"], cfg["layer"]) == ("topk", 3, "layer_norm", 2)
    back = load_sae(folder)
    assert type(back) is TopKSAE and back.k == 3 and back.normalize == "layer_norm"
    for name, p in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    # A folder saved before the key existed is a TopK SAE.
    del cfg["architecture"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert type(load_sae(folder)) is TopKSAE


def test_an_unknown_architecture_is_one_line(tmp_path):
    folder, _ = _saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "wavelet"}))
    with pytest.raises(UserError, match=r"architecture 'wavelet' is unknown; choose one of topk"):
        load_sae(folder)
    res = CliRunner().invoke(main, ["export", str(folder), "--format", "saelens", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "'wavelet' is unknown" in res.output
    assert not (tmp_path / "x").exists()


def test_reconstruct_raw_puts_the_layer_norm_back(tmp_path):
    """The one layer-norm inverse: x_hat = decode(encode(x)) * (std + 1e-5) + mean, by hand."""
    _, sae = _saved(tmp_path)
    x = torch.randn(5, 8) * 3 + 1
    x_hat, idx, vals = sae.reconstruct_raw(x)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    z = ((x - mean) / (std + 1e-5) - sae.b_pre) @ sae.W_enc.T + sae.b_lat
    top = z.topk(3, dim=-1)
    dense = torch.zeros_like(z).scatter(-1, top.indices, top.values.clamp_min(0))
    want = (dense @ sae.W_dec + sae.b_pre) * (std + 1e-5) + mean
    torch.testing.assert_close(x_hat, want)
    assert torch.equal(idx.sort(-1).values, top.indices.sort(-1).values)


BASE = {"run_dir": "r", "model": {"name": "m"}, "data": {"path": "d"}, "harvest": {"layers": [1], "n_tokens": 512}}


def _cfg(train: dict):
    return config_from_dict({**BASE, "train": train})


def test_the_sae_section_and_its_flat_spelling_are_one_config():
    nested = _cfg({"sae": {"architecture": "topk", "k": 8, "aux_alpha": 0.5}}).train
    flat = _cfg({"k": 8, "aux_alpha": 0.5}).train
    assert nested == flat and nested.sae.k == 8 and nested.sae.aux_alpha == 0.5
    assert nested.flat()["k"] == 8 and "architecture" not in nested.flat()  # a TopK fingerprint's old keys
    sweep = _cfg({"k": 8, "sweep": [{}, {"k": 16}, {"sae": {"k": 4}, "lr": 0.01}]}).train.members()
    assert [(name, m.sae.k) for name, m in sweep] == [(None, 8), ("k16", 16), ("k4_lr0.01", 4)]


@pytest.mark.parametrize("train, message", [
    ({"k": 8, "sae": {"k": 4}}, "train.k and train.sae.k are both given; keep train.sae.k"),
    ({"sae": {"architecture": "wavelet"}}, "train.sae.architecture = 'wavelet' is unknown; choose one of topk"),
    ({"sae": {"l1_coefficient": 1.0}}, "unknown key train.sae.l1_coefficient"),
    ({"sae": 3}, "train.sae must be a mapping"),
    ({"sweep": [{"sae": {"k": 0}}]}, "train.sweep[0]: train.sae.k = 0 must be > 0"),
])
def test_a_bad_sae_section_is_one_line(train, message):
    with pytest.raises(UserError, match=re.escape(message)):
        _cfg(train)


def test_an_architecture_is_one_registered_class(tmp_path):
    """A new architecture (here a dense ReLU dictionary, in this file) is known to the config,
    the reference tables, the loader and export's refusals by registering it, nothing else."""

    @dataclasses.dataclass
    class ReluSettings(Settings):
        architecture: str = setting("relu_test", "the dictionary")
        l1_coefficient: float = setting(1.0, "L1 penalty weight")

    class ReluSAE(Dictionary):
        architecture = "relu_test"
        Settings = ReluSettings

        def __init__(self, d_in, n_latents, l1_coefficient, normalize="none", backend="auto"):
            super().__init__(d_in, n_latents, normalize, backend)
            self.l1_coefficient = l1_coefficient
            torch.nn.init.normal_(self.W_enc)
            torch.nn.init.normal_(self.W_dec)

        def settings(self):
            return {"l1_coefficient": self.l1_coefficient}

        @classmethod
        def from_cfg(cls, d_in, n_latents, settings, normalize="none", backend="auto"):
            return cls(d_in, n_latents, settings["l1_coefficient"], normalize, backend)

        def encode(self, x):
            acts = torch.relu((self.preprocess(x) - self.b_pre) @ self.W_enc.T + self.b_lat)
            return torch.arange(self.n_latents).expand(x.shape[0], -1), acts

        def decode(self, idx, vals):
            return vals @ self.W_dec[idx[0]] + self.b_pre

    register(ReluSAE)
    try:
        assert _cfg({"sae": {"architecture": "relu_test", "l1_coefficient": 3.0}}).train.sae == ReluSettings(
            l1_coefficient=3.0)
        with pytest.raises(ConfigError, match=r"unknown key train\.sae\.k "):
            _cfg({"sae": {"architecture": "relu_test", "k": 4}})
        assert "#### `train.sae:` with `architecture: relu_test`" in markdown()
        sae = ReluSAE(6, 10, 2.0)
        sae.save(tmp_path / "relu")
        back = load_sae(tmp_path / "relu")
        x = torch.randn(4, 6)
        assert type(back) is ReluSAE and back.l1_coefficient == 2.0
        torch.testing.assert_close(back.reconstruct_raw(x)[0], sae.reconstruct_raw(x)[0])
        res = CliRunner().invoke(main, ["export", str(tmp_path / "relu"), "--format", "sparsify",
                                        "--out", str(tmp_path / "out")])
        assert res.exit_code == 2 and "--format sparsify cannot hold a relu_test SAE" in res.output
    finally:
        del saes.ARCHITECTURES["relu_test"]


def test_recon_stats_against_numpy():
    g = np.random.default_rng(0)
    x = g.normal(size=(50, 6)) * [1, 2, 3, 4, 5, 6] + 7
    x_hat = x + g.normal(scale=0.5, size=x.shape)
    idx = g.integers(0, 9, size=(50, 3))
    vals = np.maximum(g.normal(size=(50, 3)), 0)
    stats = ReconStats(6, 12, "cpu")
    for lo in range(0, 50, 16):  # in batches, as every caller streams
        stats.add(*(torch.tensor(a[lo:lo + 16]) for a in (x, x_hat, idx, vals)))
    got = stats.result()
    err = ((x - x_hat) ** 2).sum(1)
    fired = {int(i) for i, v in zip(idx.ravel(), vals.ravel()) if v > 0}
    assert got["fvu"] == pytest.approx(err.sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-12)
    assert got["nmse"] == pytest.approx((err / (x ** 2).sum(1)).mean(), rel=1e-12)
    assert got["l0"] == pytest.approx((vals > 0).sum() / 50) and got["explained_variance"] == 1 - got["fvu"]
    assert got["dead_frac"] == pytest.approx(1 - len(fired) / 12)
    assert stats.density()[sorted(fired)[0]] > 0 and stats.density()[11] == 0


def test_active_width_is_the_most_true_entries_of_any_row():
    from pipeline.saes.base import active_width

    g = torch.Generator().manual_seed(0)
    on = torch.rand(37, 300, generator=g) < torch.rand(37, 1, generator=g)  # rows of very different counts
    assert active_width(on) == int(on.long().sum(1).max()) > 0
    assert active_width(on[:, ::3]) == int(on[:, ::3].long().sum(1).max())  # a strided view
    assert active_width(torch.zeros(4, 10, dtype=torch.bool)) == 1  # nothing fires: one padded slot
    assert active_width(torch.zeros(0, 10, dtype=torch.bool)) == 1
