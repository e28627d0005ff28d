"""The Gated SAE, pipeline/saes/gated.py: its training forward and loss against plain dense
autograd (the auxiliary loss through a frozen decoder), resampling of its extra parameters, the
target_l0 controller through `saepipe train`, its folder and its SAELens export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.saes import TrainView, load_sae
from pipeline.saes import relu as relu_module
from pipeline.saes.gated import GatedSAE, GatedSettings
from tests.test_arch_relu import held_out_l0, relu_config, resample_view, settings, small, stepped, trainer_loss
from tests.test_train import cli, planted_store, sae_folder, write_config


def dense_parts(sae: GatedSAE, x: torch.Tensor):
    """(pi, f) [B, n] written out densely: the gate's pre-activations and the latents."""
    x_c = x - sae.b_pre
    pi = x_c @ sae.W_enc.T + sae.b_lat
    mag = x_c @ (sae.W_enc * sae.r_mag.exp()[:, None]).T + sae.b_mag
    return pi, (pi > 0).to(x.dtype) * torch.relu(mag)


def dense_loss(sae: GatedSAE, x: torch.Tensor, lam: float) -> torch.Tensor:
    """FVU + lam * sum relu(pi)|W_dec| / (B rms) + |x - x_hat_frozen|^2 / var, plain autograd; the frozen
    reconstruction through detached W_dec and b_pre."""
    pi, f = dense_parts(sae, x)
    var = (x - x.mean(0)).pow(2).sum()
    fvu = (x - (f @ sae.W_dec + sae.b_pre)).pow(2).sum() / var
    gate = torch.relu(pi)
    penalty = (gate * sae.W_dec.norm(dim=1)).sum(1).mean() / (var / x.shape[0]).sqrt()
    aux = (x - (gate @ sae.W_dec.detach() + sae.b_pre.detach())).pow(2).sum() / var
    return fvu + lam * penalty + aux


@pytest.mark.parametrize("dense_above", [1.0, 0.0], ids=["sparse", "dense"])
def test_loss_and_gradients_match_dense_autograd(monkeypatch, dense_above):
    """Every parameter's gradient, r_mag and b_mag included: the gate learns from the penalty and the
    frozen-decoder loss only (the step passes none), the decoder not from the frozen one."""
    monkeypatch.setattr(relu_module, "DENSE_ABOVE", dense_above)
    sae = small(GatedSAE, l1_coefficient=0.4)
    x = torch.randn(16, 6, dtype=torch.float64) * 2 + 0.5
    view = TrainView(settings(GatedSettings, l1_coefficient=0.4, target_l0=5), torch.zeros(24, dtype=torch.long),
                     step=2, n_steps=100)
    (loss, logged), o = trainer_loss(sae, x, view)
    loss.backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    want = dense_loss(sae, x, 0.4)  # target_l0: no warm-up, lam the buffer
    want.backward()
    torch.testing.assert_close(loss, want)
    assert set(got) == {"W_enc", "b_lat", "W_dec", "b_pre", "b_mag", "r_mag"}
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)
    _, f = dense_parts(sae, x)
    torch.testing.assert_close(torch.zeros_like(f).scatter_add(1, o.idx, o.vals.detach()), f.detach())
    fvu = (x - o.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert logged.item() == pytest.approx((loss - fvu).item())


def test_encode_is_gate_times_magnitude_compacted():
    sae = small(GatedSAE)
    x = torch.randn(9, 6, dtype=torch.float64)
    pi, f = dense_parts(sae, x)
    assert ((pi > 0) & (f == 0)).any() and ((pi <= 0) & (f == 0)).any()  # both ways of being off
    idx, vals = sae.encode(x)
    assert idx.shape == (9, int((f > 0).sum(1).max()))
    torch.testing.assert_close(sae.encode_dense(x), f)
    torch.testing.assert_close(sae.decode(idx, vals), f @ sae.W_dec + sae.b_pre)
    o = sae.train_forward(x, TrainView())  # evaluation: no frozen-decoder part
    assert o.aux_hat is None
    torch.testing.assert_close(o.x_hat, f @ sae.W_dec + sae.b_pre)


def test_resampling_also_restarts_the_magnitude_path():
    sae = small(GatedSAE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(16, 6, dtype=torch.float64)
    stepped(sae, x, opt)
    since = torch.zeros(24, dtype=torch.long)
    since[11] = 100
    view = resample_view(opt, since)
    (loss, _), _ = trainer_loss(sae, x, view)
    loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.after_step(view)
    assert sae.b_mag[11] == 0 and sae.r_mag[11] == 0 and sae.b_lat[11] == 0
    assert torch.equal(sae.b_mag[:11], before["b_mag"][:11]) and torch.equal(sae.r_mag[12:], before["r_mag"][12:])
    for p in sae.parameters():
        if p.shape[0] == 24:
            assert not opt.state[p]["exp_avg"][11].any() and not opt.state[p]["exp_avg_sq"][11].any()


def test_target_l0_is_reached_on_held_out_rows(tmp_path):
    """`saepipe train` with only a target L0: within 20% of it on rows it never trained on."""
    planted_store(tmp_path / "run", n_rows=16 * 1024)
    raw = relu_config(tmp_path / "run", {"architecture": "gated", "target_l0": 16}, n_latents=128,
                      n_tokens=256 * 150, warmup_steps=10, eval_every=10_000, checkpoint_every=10_000,
                      eval_tokens=2048)
    code, out = cli("train", write_config(tmp_path / "c.yaml", raw))
    assert code == 0, out
    folder = sae_folder(tmp_path / "run", layer=0)
    l0 = held_out_l0(folder)
    assert abs(l0 / 16 - 1) < 0.2, l0
    info = json.loads((folder / "cfg.json").read_text())
    assert info["architecture"] == "gated" and info["eval"]["l0"] == pytest.approx(l0, rel=0.1)
    assert set(load_file(folder / "sae.safetensors")) == {"W_enc", "b_lat", "W_dec", "b_pre", "b_mag", "r_mag",
                                                         "l1_lambda", "l0_error"}


def test_save_and_load_round_trip(tmp_path):
    sae = small(GatedSAE, l1_coefficient=0.2).float()
    sae.save(tmp_path / "sae", {"layer": 0, "hook": "resid_post"})
    back = load_sae(tmp_path / "sae")
    assert type(back) is GatedSAE and back.l1_coefficient == 0.2 and back.target_l0 is None
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = torch.randn(5, 6)
    for a, b in zip(back.encode(x), sae.encode(x)):
        assert torch.equal(a, b)


def exported(tmp_path) -> tuple[GatedSAE, dict, dict]:
    sae = small(GatedSAE).float()
    sae.save(tmp_path / "sae", {"layer": 0, "hook": "resid_post"})
    code, out = cli("export", tmp_path / "sae", "--format", "saelens", "--out", tmp_path / "lens")
    assert code == 0, out
    return (sae, load_file(tmp_path / "lens" / "sae_weights.safetensors"),
            json.loads((tmp_path / "lens" / "cfg.json").read_text()))


def test_saelens_export_computes_our_encode(tmp_path):
    """The exported tensors, put through SAELens' `gated` encode by hand, give our latents."""
    sae, t, cfg = exported(tmp_path)
    tensors, keys = sae.export_extras("saelens")
    assert tensors["b_enc"] is None and set(tensors) == {"b_enc", "b_gate", "b_mag", "r_mag"} and keys == {}
    # exactly SAELens' GatedSAE parameters: it has no b_enc, and loads its state dict strictly
    assert cfg["architecture"] == "gated" and set(t) == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}
    x = torch.randn(7, 6)
    sae_in = x - t["b_dec"]
    active = (sae_in @ t["W_enc"] + t["b_gate"] > 0).float()
    acts = active * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    torch.testing.assert_close(sae.encode_dense(x), acts)
    torch.testing.assert_close(acts @ t["W_dec"] + t["b_dec"], sae.decode(*sae.encode(x)))
    code, out = cli("export", tmp_path / "sae", "--format", "sparsify", "--out", tmp_path / "sp")
    assert code == 2 and out.count("\n") == 1 and "cannot hold a gated SAE" in out
