"""The optimizers of train.optimizer: schedule-free sign descent against the paper's three-sequence form,
its resume, the learning-rate rules, and a schedule-free SAE trained end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline import optim
from pipeline.config import config_from_dict
from pipeline.saes import load_sae
from stages import train as stage
from tests.test_train import config, planted_store, sae_folder


def three_sequences(w0: torch.Tensor, grads, lrs, beta):
    """Schedule-free written with x, y and z all stored (Defazio et al. 2024, eq. 1-3), sign steps."""
    x, z = w0.double().clone(), w0.double().clone()
    lr_sq = 0.0
    ys = []
    for g_fn, lr in zip(grads, lrs):
        y = (1 - beta) * z + beta * x
        ys.append(y)
        z = z - lr * g_fn(y).sign()
        lr_sq += lr * lr
        c = lr * lr / lr_sq
        x = (1 - c) * x + c * z
    return x, (1 - beta) * z + beta * x


def test_schedule_free_sign_matches_the_three_sequence_form():
    torch.manual_seed(0)
    target = torch.randn(7, 5, dtype=torch.float64)
    grads = [lambda w, t=t: (w - target) * (1 + t % 3) for t in range(30)]  # a drifting quadratic
    lrs = [0.05 * min(1, (t + 1) / 4) for t in range(30)]  # with a warmup, so the weights are not uniform
    w0 = torch.randn(7, 5, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = optim.ScheduleFreeSign([p], lr=lrs[0], beta=0.9)
    for g_fn, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = g_fn(p.detach())
        opt.step()
    x_ref, y_ref = three_sequences(w0, grads, lrs, beta=0.9)
    torch.testing.assert_close(p.detach(), y_ref)
    torch.testing.assert_close(opt.averaged(p), x_ref)


def test_schedule_free_state_resumes_bit_for_bit():
    torch.manual_seed(1)
    grads = [torch.randn(4, 3) for _ in range(12)]

    def run(resume_at=None):
        p = torch.nn.Parameter(torch.ones(4, 3))
        opt = optim.make("signum_sf", [p], lr=0.1)
        for t, g in enumerate(grads):
            if t == resume_at:  # a new process: fresh param and optimizer from the saved state
                state, w = opt.state_dict(), p.detach().clone()
                p = torch.nn.Parameter(w)
                opt = optim.make("signum_sf", [p], lr=0.1)
                opt.load_state_dict(state)
            opt.param_groups[0]["lr"] = 0.1 / (1 + t)
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.averaged(p)

    unbroken, resumed = run(), run(resume_at=5)
    assert torch.equal(unbroken[0], resumed[0]) and torch.equal(unbroken[1], resumed[1])


def test_default_learning_rates_follow_one_over_sqrt_n_and_for_adam_sqrt_d():
    assert optim.default_lr("adam", 2**14, 768) == optim.BASE_LR["adam"]
    assert optim.default_lr("adam", 2**16, 768) == pytest.approx(optim.BASE_LR["adam"] / 2)
    assert optim.default_lr("adam", 2**16, 3072) == pytest.approx(optim.BASE_LR["adam"] / 4)
    assert optim.default_lr("adam", 3072, 384) == pytest.approx(7.84e-3, rel=1e-3)  # the demo store's SAE
    assert optim.default_lr("adam", 128, 16) == optim.MAX_LR["adam"]
    assert optim.default_lr("signum_sf", 2**12, 768) == pytest.approx(optim.BASE_LR["signum_sf"] * 2)
    assert optim.default_lr("signum_sf", 2**12, 3072) == optim.default_lr("signum_sf", 2**12, 768)
    with pytest.raises(ValueError):
        optim.make("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_schedule_free_run_saves_the_average_with_unit_decoder_rows(tmp_path):
    atoms = planted_store(tmp_path / "run", n_rows=32 * 1024)
    cfg = config_from_dict(config(tmp_path / "run", layer=0, n_latents=128, k=4, n_tokens=150_000,
                                  optimizer="signum_sf", dormant_tokens=4096, eval_every=10_000,
                                  checkpoint_every=10_000, eval_tokens=4096))
    info = stage.run(cfg, progress=False)[(0, "resid_post")]
    assert info["train"]["optimizer"] == "signum_sf"
    assert info["train"]["lr"] == pytest.approx(optim.default_lr("signum_sf", 128, atoms.shape[1]))
    sae = load_sae(sae_folder(tmp_path / "run", layer=0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    best = (atoms @ sae.W_dec.T).max(1).values
    assert best.mean() > 0.8 and info["eval"]["fvu"] < 0.2
    rows = [json.loads(line) for line in (sae_folder(tmp_path / "run", layer=0) / "metrics.jsonl").open()]
    assert math.isclose(rows[-1]["fvu"], info["eval"]["fvu"])  # the saved SAE is the one evaluated last
