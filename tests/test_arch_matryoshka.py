"""The Matryoshka BatchTopK SAE (pipeline/saes/matryoshka.py): the nested-prefix loss and its
gradients against a dense autograd formulation, the prefix settings and their one-line refusals,
each latent's group on disk, and `saepipe train` end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch

import pipeline.saes.batchtopk as bt
from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import UserError
from pipeline.saes import TrainView, load_sae
from pipeline.saes.batchtopk import BatchTopKSAE
from pipeline.saes.matryoshka import MatryoshkaSAE, MatryoshkaSettings
from pipeline.train import reconstruction_loss
from test_arch_batchtopk import batch, dense_aux, dense_batch_topk, kept_pairs, tiny, train_config
from test_train import cli, random_store, sae_folder, write_config

DEFAULT = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0]
SIZES = [2, 4, 8, 16, 32, 48, 64]  # DEFAULT of 64 latents


def dense_matryoshka(sae, x, dormant, k_aux, aux_alpha, weights):
    """sum_i w_i ||x - x_hat_i||^2 / ||x - mean||^2 + aux_alpha AuxK, with dense [B, n] latents:
    x_hat_i decodes the kept latents j < m_i."""
    z, keep = dense_batch_topk(sae, x)
    acts = z.relu() * keep
    var = (x - x.mean(0)).pow(2).sum()
    hats = [acts[:, :m] @ sae.W_dec[:m] + sae.b_pre for m in SIZES]
    loss = sum(w * (x - h).pow(2).sum() / var for w, h in zip(weights, hats))
    return loss + aux_alpha * dense_aux(sae, x, z, hats[-1], dormant, k_aux), hats, keep


@pytest.mark.parametrize("weights", [None, [0.5, 0.0, 2.0, 1.0, 3.0, 0.0, 1.5]], ids=["equal", "weighted"])
@pytest.mark.parametrize("candidates", [1, 4], ids=["c=k", "c=4k"])
def test_nested_prefix_loss_and_gradients_match_dense_autograd(monkeypatch, weights, candidates):
    monkeypatch.setattr(bt, "CANDIDATES", candidates)
    sae, x = tiny(MatryoshkaSAE), batch()
    assert sae.prefix_sizes == SIZES
    dormant = torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5
    st = MatryoshkaSettings(k=4, aux_alpha=0.25, k_aux=8, dormant_tokens=100, prefix_weights=weights)
    view = TrainView(st, torch.where(dormant, 100, 0))
    o = sae.train_forward(x, view)
    fvu, _ = reconstruction_loss(x, o.x_hat)  # the trainer's, as pipeline.train's step takes it
    loss, aux = sae.train_loss(x, o, fvu, view)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    ref, hats, keep = dense_matryoshka(sae, x, dormant, 8, 0.25, weights or [1.0] * len(SIZES))
    assert kept_pairs(o.idx, o.vals) == {tuple(p) for p in keep.nonzero().tolist()}
    for i, h in enumerate(hats):
        torch.testing.assert_close(o.prefix_hats[:, i], h, msg=f"prefix {i}")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    assert aux > 0
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def test_inference_is_batchtopks_threshold_rule():
    m, b, x = tiny(MatryoshkaSAE), tiny(BatchTopKSAE), batch()
    for sae in (m, b):
        sae.forward_train(x, estimate=True)
    assert m.threshold == b.threshold
    torch.testing.assert_close(m.encode_dense(x), b.encode_dense(x))
    o = m.train_forward(x, TrainView())  # evaluation: no prefixes, the threshold
    assert type(o).__name__ == "TrainOutput"
    torch.testing.assert_close(o.x_hat, b.decode(*b.encode(x)))


def test_each_latents_group_is_saved_and_loaded(tmp_path):
    sae = tiny(MatryoshkaSAE).float()
    groups = sae.groups()
    assert torch.bincount(groups).tolist() == [2, 2, 4, 8, 16, 16, 16] and groups[1] == 0 and groups[2] == 1
    sae.forward_train(batch().float(), estimate=True)
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "matryoshka" and cfg["prefix_sizes"] == SIZES
    assert cfg["prefixes"] == DEFAULT
    back = load_sae(tmp_path / "sae")
    assert type(back) is MatryoshkaSAE and torch.equal(back.groups(), groups)
    assert back.threshold.item() == pytest.approx(sae.threshold.item())
    x = batch().float()
    torch.testing.assert_close(back.encode_dense(x), sae.encode_dense(x))
    # Exported as BatchTopK is: SAELens' jumprelu with the threshold
    code, out = cli("export", tmp_path / "sae", "--format", "saelens", "--out", tmp_path / "lens")
    assert code == 0 and json.loads((tmp_path / "lens" / "cfg.json").read_text())["architecture"] == "jumprelu"


BASE = {"run_dir": "r", "model": {"name": "m"}, "data": {"path": "d"}, "harvest": {"layers": [1], "n_tokens": 512}}


def _sae(**sae):
    return config_from_dict({**BASE, "train": {"sae": {"architecture": "matryoshka", **sae}}}).train.sae


def test_prefix_settings():
    st = _sae(k=8)
    assert st.prefixes == DEFAULT and st.prefix_weights is None
    assert st.model_keys() == ("k", "prefixes")
    assert _sae(prefixes=[0.25, 0.5, 1], prefix_weights=[1, 0, 2]).prefix_weights == [1.0, 0.0, 2.0]


@pytest.mark.parametrize("sae, message", [
    ({"prefixes": [0.5, 0.25, 1]}, "train.sae.prefixes = [0.5, 0.25, 1.0] must be increasing fractions in (0, 1], "
                                   "the last 1"),
    ({"prefixes": [0.25, 0.5]}, "the last 1"),
    ({"prefixes": [0, 1]}, "must be increasing fractions"),
    ({"prefixes": []}, "must be increasing fractions"),
    ({"prefix_weights": [1, 1]}, "train.sae.prefix_weights = [1.0, 1.0] must be 7 weights >= 0"),
    ({"prefix_weights": [1, 1, -1, 1, 1, 1, 1]}, "must be 7 weights >= 0"),
    ({"prefix_weights": [0] * 7}, "not all 0"),
])
def test_bad_prefixes_are_one_line(sae, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        _sae(**sae)
    assert "\n" not in str(e.value)


def test_prefixes_too_fine_for_the_width_are_refused_when_it_is_known():
    with pytest.raises(UserError, match=re.escape("train.sae.prefixes = [0.03125, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0] "
                                                  "of n_latents = 16 give prefix sizes [0, 1, 2, 4, 8, 12, 16]")):
        MatryoshkaSettings().resolve(8, 16, 256, "", "n_latents = 16")
    assert MatryoshkaSettings(k=4).resolve(8, 64, 256, "", "w").prefixes[0] == 1 / 32


def test_saepipe_train_end_to_end(tmp_path):
    random_store(tmp_path / "run")
    raw = train_config(tmp_path / "run", arch="matryoshka", n_tokens=256 * 100, eval_every=50, log_every=20)
    code, out = cli("train", write_config(tmp_path / "c.yaml", raw))
    assert code == 0, out
    assert "matryoshka: k 4, prefixes [0.03125, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]" in out
    folder = sae_folder(tmp_path / "run")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["prefix_sizes"] == [8, 16, 32, 64, 128, 192, 256] and cfg["eval"]["fvu"] < 0.7
    assert 0.8 * 4 <= cfg["eval"]["l0"] <= 1.2 * 4, cfg["eval"]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    train = [r for r in rows if r["split"] == "train"]
    # the loss adds the six smaller prefixes' FVUs (each >= the whole dictionary's) to the logged fvu
    assert all(r["loss"] > 2 * r["fvu"] for r in train)
    assert type(load_sae(folder)) is MatryoshkaSAE


def test_collate_records_each_latents_prefix_group(tmp_path, capsys):
    """summary.json's latent_groups: each prefix group's latents and its live/dead counts, against
    prefix sizes worked out here and the records' own counts; nothing per latent."""
    from helpers import make_tokenizer
    from pipeline.viewer import read_features
    from stages import collate as stage
    from test_collate import make_cfg, make_run

    n, prefixes = 48, [0.1, 0.35, 0.6, 1.0]
    sizes = [5, 17, 29, 48]  # round(f * 48) of 4.8, 16.8, 28.8, 48
    assert sizes == [int(f * n + 0.5) for f in prefixes]
    sae = tiny(MatryoshkaSAE, n=n, prefixes=prefixes).float()
    dead = [3, 20, 21]  # rigged never to fire: one in group 0, two in group 2
    with torch.no_grad():
        sae.b_lat[dead] = -100.0
        sae.threshold.fill_(0.5)
    make_tokenizer(tmp_path / "tok")
    make_run(tmp_path, tmp_path / "tok", sae=sae)
    [page] = stage.run(config_from_dict(make_cfg(tmp_path)))
    out = page.parent
    summary = json.loads((out / "summary.json").read_text())
    features = list(read_features(out))
    assert len(features) == n and all("group" not in f and "latent_groups" not in f for f in features)

    grouped = summary["latent_groups"]
    assert grouped["name"] == "prefix group"
    ranges = [(r["first"], r["last"]) for r in grouped["groups"]]
    assert ranges == [(0, 4), (5, 16), (17, 28), (29, 47)]
    for j in range(n):  # the group holding each latent, against the prefix sizes
        want = sum(j >= m for m in sizes[:-1])
        assert [g for g, (a, b) in enumerate(ranges) if a <= j <= b] == [want], j
    for g, r in enumerate(grouped["groups"]):
        mine = features[r["first"]: r["last"] + 1]
        assert r["dead"] == sum(f["n_positive"] == 0 for f in mine), g
        assert r["live"] == sum(f["n_positive"] > 0 for f in mine) and r["live"] + r["dead"] == len(mine)
        assert r["dead"] >= sum(r["first"] <= d <= r["last"] for d in dead) and r["live"] > 0
    assert sum(r["dead"] for r in grouped["groups"]) == summary["dead"] >= len(dead)
    assert summary["prefix_sizes"] == sizes  # the SAE's settings, as for every architecture
    line = ", ".join(f"{g}: {r['live']}/{r['dead']}" for g, r in enumerate(grouped["groups"]))
    assert f"live/dead latents per prefix group: {line}" in capsys.readouterr().out


def test_latent_groups_must_be_contiguous_runs_in_order():
    import numpy as np

    from pipeline.collate.records import latent_groups

    count = np.array([1, 0, 2, 0, 0])
    assert latent_groups(None, count) is None
    got = latent_groups(("g", torch.tensor([0, 0, 1, 1, 2])), count)
    assert got == {"name": "g", "groups": [{"first": 0, "last": 1, "live": 1, "dead": 1},
                                           {"first": 2, "last": 3, "live": 1, "dead": 1},
                                           {"first": 4, "last": 4, "live": 0, "dead": 1}]}
    for bad in ([0, 1, 0, 1, 2], [1, 1, 2, 2, 2], [0, 0, 2, 2, 2], [0, 0, 1]):
        with pytest.raises(ValueError, match="contiguous run"):
            latent_groups(("g", torch.tensor(bad)), count)
