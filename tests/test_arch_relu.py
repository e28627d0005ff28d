"""The ReLU (L1) SAE, pipeline/saes/relu.py: its training forward and loss against plain dense
autograd, dead-latent resampling, the target_l0 controller through `saepipe train`, its folder and
its SAELens export."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pipeline import saes
from pipeline.config import config_from_dict
from pipeline.errors import UserError
from pipeline.optim import ScheduleFreeSign
from pipeline.saes import TrainView, load_sae
from pipeline.saes import relu as relu_module
from pipeline.saes.relu import ReluSAE, ReluSettings
from tests.test_train import cli, planted_store, random_store, sae_folder, write_config
from tests.test_train import config as train_config


def settings(cls=ReluSettings, **kw):
    """A resolved train.sae section (n_latents 24, batches of 16 rows)."""
    return cls(**kw).resolve(6, 24, 16, "", "n_latents = 24")


def small(cls=ReluSAE, **kw) -> ReluSAE:
    """A float64 SAE with every parameter away from its init, so no term vanishes by symmetry."""
    torch.manual_seed(0)
    sae = cls(6, 24, backend="torch", **kw).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return sae


def dense_loss(sae: ReluSAE, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, f): FVU + lam * mean_rows sum_i f_i |W_dec[i]| / rms with dense [B, n] latents, plain autograd."""
    f = torch.relu((x - sae.b_pre) @ sae.W_enc.T + sae.b_lat)
    x_hat = f @ sae.W_dec + sae.b_pre
    var = (x - x.mean(0)).pow(2).sum()
    fvu = (x - x_hat).pow(2).sum() / var
    rms = (var / x.shape[0]).sqrt()
    return fvu + lam * (f * sae.W_dec.norm(dim=1)).sum(1).mean() / rms, f


def trainer_loss(sae, x, view):
    """What pipeline.train's step computes: train_forward, the FVU (one process), train_loss."""
    o = sae.train_forward(x, view)
    fvu = (x - o.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return sae.train_loss(x, o, fvu, view), o


# --------------------------------------------------------------------------- forward and loss
@pytest.mark.parametrize("dense_above", [1.0, 0.0], ids=["sparse", "dense"])
def test_loss_and_gradients_match_dense_autograd(monkeypatch, dense_above):
    """The sparse path (the firing latents only) and the dense one give the dense reference's loss
    and gradients, warm-up included (step 2 of 100 with a 10% warm-up: lam x 3/10)."""
    monkeypatch.setattr(relu_module, "DENSE_ABOVE", dense_above)
    sae = small(l1_coefficient=0.7)
    x = torch.randn(16, 6, dtype=torch.float64) * 2 + 0.5
    view = TrainView(settings(l1_coefficient=0.7, l1_warmup=0.1), torch.zeros(24, dtype=torch.long), step=2,
                     n_steps=100)
    (loss, logged), o = trainer_loss(sae, x, view)
    loss.backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    want, f = dense_loss(sae, x, 0.7 * 3 / 10)
    want.backward()
    torch.testing.assert_close(loss, want)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)
    # what the trainer counts fires from: the latents that fire, each once a row
    dense = torch.zeros_like(f).scatter_add(1, o.idx, o.vals.detach())
    torch.testing.assert_close(dense, f.detach())
    assert logged.item() == pytest.approx((loss - (x - o.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item())
    if dense_above == 1.0:
        assert o.idx.shape[1] == int((f > 0).sum(1).max())


@pytest.mark.parametrize("cls", ["relu", "gated"])
@pytest.mark.parametrize("low", [False, True], ids=["fp32-z", "bf16-z"])
def test_uneven_rows_on_virtual_rows_give_the_dense_forward_and_gradients(monkeypatch, cls, low):
    """One row firing far more than the rest fills several virtual rows (relu.fired_entries), not a padding for every
    row; latent 0 fires everywhere, so an empty slot (which points at it) that were not masked would
    count it again in each row with one, as it would with the values a bf16 z's gather recomputes."""
    from pipeline.saes.gated import GatedSAE

    monkeypatch.setattr(relu_module, "DENSE_ABOVE", 1.0)  # 24 latents: the sparse path however many fire
    sae = small(ReluSAE if cls == "relu" else GatedSAE).float()
    with torch.no_grad():
        sae.b_lat[1:] = -2.0  # few fire in an ordinary row
        sae.b_lat[0] = 5.0
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    x[3] *= 12  # fires on many more latents than the others
    view = TrainView(None, torch.zeros(24, dtype=torch.long), torch.bfloat16 if low else None)
    fired = sae.candidates(sae.center(x), sae.W_enc, sae.b_lat, view.matmul_dtype)
    E, (R, w) = fired.rows.numel(), fired.idx.shape
    assert (fired.owner == 3).sum() > 1 and R * w <= E + 16 * w and not fired.on.all()
    o = sae.train_forward(x, view)
    x_c = x - sae.b_pre
    z = x_c @ sae.W_enc.T + sae.b_lat
    chosen = (x_c.bfloat16() @ sae.W_enc.bfloat16().T + sae.b_lat.bfloat16() > 0) if low else z > 0
    if cls == "relu":
        f = torch.relu(z) * chosen
    else:
        f = (z > 0) * torch.relu(x_c @ sae.W_mag().T + sae.b_mag) * chosen
    torch.testing.assert_close(o.x_hat, f @ sae.W_dec + sae.b_pre)
    torch.testing.assert_close(torch.zeros_like(f).scatter_add(1, o.idx, o.vals), f)
    o.x_hat.pow(2).sum().backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    (f @ sae.W_dec + sae.b_pre).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        if p.grad is not None or name in got:
            torch.testing.assert_close(got[name], p.grad, msg=name, rtol=1e-4, atol=1e-4)


def test_encode_is_the_firing_latents_compacted():
    sae = small()
    x = torch.randn(9, 6, dtype=torch.float64)
    idx, vals = sae.encode(x)
    f = torch.relu((x - sae.b_pre) @ sae.W_enc.T + sae.b_lat)
    assert idx.shape == vals.shape == (9, int((f > 0).sum(1).max()))
    torch.testing.assert_close(sae.encode_dense(x), f)
    assert torch.equal((vals > 0).sum(1), (f > 0).sum(1))
    torch.testing.assert_close(sae.decode(idx, vals), f @ sae.W_dec + sae.b_pre)
    # nothing fires: one column of zeros
    with torch.no_grad():
        sae.b_lat.fill_(-100)
    idx, vals = sae.encode(x)
    assert idx.shape == (9, 1) and not vals.any()


def test_evaluation_forward_has_no_auxiliary_part():
    sae = small()
    x = torch.randn(8, 6, dtype=torch.float64)
    o = sae.train_forward(x, TrainView())
    assert o.aux_hat is None
    torch.testing.assert_close(o.x_hat, sae.decode(*sae.encode(x)))


# --------------------------------------------------------------------------- resampling
def stepped(sae, x, optimizer):
    """One real optimizer step (so the optimizer holds state for every parameter)."""
    view = TrainView(settings(resample_every=0), torch.zeros(24, dtype=torch.long), step=0, n_steps=8,
                     optimizer=optimizer)
    (loss, _), _ = trainer_loss(sae, x, view)
    loss.backward()
    optimizer.step()
    sae.after_step(view)


def resample_view(optimizer, since_fired):
    """A view at the end of step 3 of 8 with resample_every 4: resampling is due."""
    return TrainView(settings(resample_every=4, dormant_tokens=100), since_fired, step=3, n_steps=8,
                     optimizer=optimizer)


def test_a_dead_latent_is_reinitialised_towards_the_worst_row_and_its_adam_state_cleared():
    sae = small()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(16, 6, dtype=torch.float64)
    stepped(sae, x, opt)
    x[5] += torch.tensor([40.0, -30, 20, 0, 10, 5], dtype=torch.float64)  # one row far worse than the rest
    since = torch.zeros(24, dtype=torch.long)
    since[[3, 17]] = 100  # dead; the others fired recently
    view = resample_view(opt, since)
    (loss, _), _ = trainer_loss(sae, x, view)
    loss.backward()
    opt.step()
    sae.normalize_decoder()  # after_step's own first act, so the rows left alone compare equal below
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    moments = {name: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for name, p in sae.named_parameters()}
    live_norm = sae.W_enc[[i for i in range(24) if i not in (3, 17)]].norm(dim=1).mean()
    sae.after_step(view)

    # Each dead latent takes another row's direction (drawn without replacement), row 5 among them: its
    # squared error's square outweighs the others' together.
    dirs = (x - sae.b_pre) / (x - sae.b_pre).norm(dim=1, keepdim=True)
    taken = [int((dirs - sae.W_dec[i]).norm(dim=1).argmin()) for i in (3, 17)]
    assert 5 in taken and len(set(taken)) == 2
    for i, row in zip((3, 17), taken):
        torch.testing.assert_close(sae.W_dec[i], dirs[row])
        torch.testing.assert_close(sae.W_enc[i], dirs[row] * 0.2 * live_norm)
        assert sae.b_lat[i] == 0 and since[i] == 0
    keep = [i for i in range(24) if i not in (3, 17)]
    for name, p in sae.named_parameters():
        rows = keep if p.shape[0] == 24 else slice(None)
        # (W_dec: renormalising unit rows again moves them by rounding only)
        torch.testing.assert_close(p.detach()[rows], before[name][rows], rtol=0, atol=1e-15, msg=name)
        for k in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][k]
            if p.shape[0] == 24:
                assert not state[[3, 17]].any(), (name, k)
            assert torch.equal(state[rows], moments[name][k][rows]), (name, k)
    assert since[keep].eq(0).all()


def test_resampling_is_a_function_of_the_step_and_the_batch():
    """The draw is seeded from the step: the same state resamples the same way (a resumed run does);
    another step draws other rows."""
    x = torch.randn(16, 6, dtype=torch.float64)
    since = torch.full((24,), 100)
    since[:4] = 0

    def run(step):
        sae = small()
        view = dataclasses.replace(resample_view(None, since.clone()), step=step, n_steps=4 * 64)
        (loss, _), _ = trainer_loss(sae, x, view)
        sae.after_step(view)
        return sae.W_dec.detach()

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(7))


def test_resampling_restarts_the_schedule_free_average_at_the_new_row():
    sae = small()
    opt = ScheduleFreeSign(sae.parameters(), lr=1e-2)
    x = torch.randn(16, 6, dtype=torch.float64)
    stepped(sae, x, opt)
    since = torch.zeros(24, dtype=torch.long)
    since[7] = 100
    view = resample_view(opt, since)
    trainer_loss(sae, x, view)
    sae.after_step(view)
    for p in (sae.W_enc, sae.W_dec, sae.b_lat):
        torch.testing.assert_close(opt.averaged(p)[7], p.detach()[7])


def test_resampling_waits_for_its_step_and_stops_after_resample_until():
    st = settings(resample_every=4, resample_until=0.5)
    due = [s for s in range(16) if relu_module.resample_due(st, TrainView(st, step=s, n_steps=16))]
    assert due == [3, 7]  # after steps 4 and 8; not 12 (past half of 16)
    assert [s for s in range(64) if relu_module.resample_due(settings(), TrainView(step=s, n_steps=64))] == \
        [7, 15, 23, 31]  # null: an eighth of the run, in the first half
    assert not any(relu_module.resample_due(settings(resample_every=0), TrainView(step=s, n_steps=64))
                   for s in range(64))


# --------------------------------------------------------------------------- the target_l0 controller
def test_controller_moves_lam_towards_the_target():
    lam, last = torch.tensor(0.1), torch.tensor(0.0)
    rate = relu_module.control_rate(100)
    assert rate == relu_module.L0_RATE_MAX and relu_module.control_rate(10**6) == relu_module.L0_RATE_MIN
    relu_module.control_l1(lam, last, torch.tensor(64.0), 8.0, rate, first=True)  # far too many: +rate, clamped
    assert lam.item() == pytest.approx(0.1 * math.exp(rate)) and last.item() == 1.0
    relu_module.control_l1(lam, last, torch.tensor(8.0 * math.exp(-0.5)), 8.0, rate, first=False)
    # the integral's -0.5 rate and the damping's change of error, -1.5
    assert lam.item() == pytest.approx(0.1 * math.exp(rate - 0.5 * rate - 1.5 * relu_module.L0_DAMP))
    assert last.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("cls", [ReluSAE, saes.ARCHITECTURES["gated"]])
def test_the_last_steps_shift_the_bias_to_the_batch_threshold(cls):
    """In the run's last `calibrate` fraction, after_step moves b_lat (gated: the gate's bias) so that
    exactly target x B of the batch's pre-activations are positive; before it, b_lat stays."""
    sae = small(cls, target_l0=5)
    st = settings(cls.Settings, target_l0=5, calibrate=0.25, resample_every=0)
    opt = ScheduleFreeSign(sae.parameters(), lr=0.1)
    opt.state[sae.b_lat]["z"] = sae.b_lat.detach().clone()
    pre = lambda: (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat  # noqa: E731
    for step, shifts in [(74, False), (75, True), (99, True)]:
        x = torch.randn(16, 6, dtype=torch.float64)
        view = TrainView(st, torch.zeros(24, dtype=torch.long), step=step, n_steps=100, optimizer=opt)
        before, z = sae.b_lat.detach().clone(), opt.state[sae.b_lat]["z"].clone()
        (loss, _), _ = trainer_loss(sae, x, view)
        sae.after_step(view)
        moved = sae.b_lat.detach() - before
        if not shifts:
            assert torch.equal(moved, torch.zeros_like(moved))
            continue
        assert (pre() > 0).sum().item() == 5 * 16  # the batch's L0 is now the target
        assert torch.allclose(moved, moved[0].expand_as(moved)) and moved[0] != 0  # one shift for every latent
        assert torch.allclose(opt.state[sae.b_lat]["z"] - z, moved)  # schedule-free's z moved with it


def relu_config(run_dir, sae: dict, **train):
    raw = train_config(run_dir, layer=0, **train)
    raw["train"].pop("k")  # TopK's
    raw["train"]["sae"] = sae
    return raw


def held_out_l0(folder) -> float:
    """L0 of the saved SAE on the held-out chunks' rows, read from the store (not the trainer's number)."""
    from pipeline.store import ActivationStore

    sae, info = load_sae(folder), json.loads((folder / "cfg.json").read_text())
    store = ActivationStore(folder.parents[2])
    x = torch.cat([torch.as_tensor(store.read_chunk(0, "resid_post", c)).float() for c in info["eval_chunks"]])
    return (sae.encode(x)[1] > 0).sum().item() / x.shape[0]


@pytest.mark.parametrize("architecture, target", [("relu", 8), ("relu", 24)])
def test_target_l0_is_reached_on_held_out_rows(tmp_path, architecture, target):
    """`saepipe train` with only a target L0: within 20% of it on rows it never trained on."""
    planted_store(tmp_path / "run", n_rows=16 * 1024)
    raw = relu_config(tmp_path / "run", {"architecture": architecture, "target_l0": target},
                      n_latents=128, n_tokens=256 * 150, warmup_steps=10, eval_every=10_000,
                      checkpoint_every=10_000, eval_tokens=2048)
    code, out = cli("train", write_config(tmp_path / "c.yaml", raw))
    assert code == 0, out
    folder = sae_folder(tmp_path / "run", layer=0)
    l0 = held_out_l0(folder)
    info = json.loads((folder / "cfg.json").read_text())
    assert abs(l0 / target - 1) < 0.2, l0
    assert info["eval"]["l0"] == pytest.approx(l0, rel=0.1)  # the trainer's held-out L0 agrees
    assert (info["architecture"], info["target_l0"]) == (architecture, target)
    lam = load_file(folder / "sae.safetensors")["l1_lambda"].item()
    assert abs(math.log(lam / info["l1_coefficient"])) > 0.1  # the controller moved lam


# --------------------------------------------------------------------------- folder, export, bad input
def test_save_and_load_round_trip(tmp_path):
    sae = small(l1_coefficient=0.3, target_l0=12).float()
    sae.l1_lambda.fill_(0.77)
    sae.save(tmp_path / "sae", {"layer": 0, "hook": "resid_post"})
    back = load_sae(tmp_path / "sae")
    assert type(back) is ReluSAE and (back.l1_coefficient, back.target_l0) == (0.3, 12)
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert back.l1_lambda.item() == pytest.approx(0.77)
    x = torch.randn(5, 6)
    for a, b in zip(back.encode(x), sae.encode(x)):
        assert torch.equal(a, b)


def test_saelens_export_computes_our_encode(tmp_path):
    """The exported tensors, put through SAELens' `standard` formulas by hand, give our latents."""
    sae = small().float()
    sae.save(tmp_path / "sae", {"layer": 0, "hook": "resid_post"})
    assert sae.export_extras("saelens") == ({}, {})
    code, out = cli("export", tmp_path / "sae", "--format", "saelens", "--out", tmp_path / "lens")
    assert code == 0, out
    t = load_file(tmp_path / "lens" / "sae_weights.safetensors")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and set(t) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    x = torch.randn(7, 6)
    acts = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    torch.testing.assert_close(sae.encode_dense(x), acts)
    torch.testing.assert_close(acts @ t["W_dec"] + t["b_dec"], sae.decode(*sae.encode(x)))
    code, out = cli("export", tmp_path / "sae", "--format", "sparsify", "--out", tmp_path / "sp")
    assert code == 2 and out.count("\n") == 1 and "cannot hold a relu SAE" in out


@pytest.mark.parametrize("sae, message", [
    ({"architecture": "relu", "l1_coefficient": 0}, "train.sae.l1_coefficient = 0.0 must be > 0"),
    ({"architecture": "relu", "target_l0": -1}, "train.sae.target_l0 = -1.0 must be > 0"),
    ({"architecture": "relu", "l1_warmup": 2}, "train.sae.l1_warmup = 2.0 must be in [0, 1]"),
    ({"architecture": "relu", "resample_every": -1}, "train.sae.resample_every = -1 must be >= 0"),
    ({"architecture": "relu", "k": 8}, "unknown key train.sae.k"),
    ({"architecture": "relu", "target_l0": 300}, "train.sae.target_l0 = 300.0 exceeds train.n_latents = 256"),
])
def test_bad_settings_are_one_line(tmp_path, sae, message):
    random_store(tmp_path / "run", layer=0)
    code, out = cli("train", write_config(tmp_path / "c.yaml", relu_config(tmp_path / "run", sae)))
    assert code == 2 and out.count("\n") == 1 and out.startswith("saepipe: error: ") and message in out, out
    assert not sae_folder(tmp_path / "run", layer=0).exists()


def test_registered_after_the_default_and_refuses_latent_sharding(monkeypatch):
    from pipeline.shard import check

    assert list(saes.ARCHITECTURES)[0] == "topk" and {"relu", "gated"} <= set(saes.ARCHITECTURES)
    monkeypatch.setenv("WORLD_SIZE", "2")
    tc = config_from_dict(relu_config("r", {"architecture": "relu"}, shard_latents=True)).train
    with pytest.raises(UserError, match="shard_latents does not split a relu SAE's latents"):
        check(tc, "layer 0 resid_post")


# --------------------------------------------------------------------------- resume
class Killed(BaseException):
    """Stands for SIGKILL: nothing of the run's own survives it but what is on disk."""


@pytest.mark.parametrize("architecture", ["relu", "gated"])
def test_a_run_stopped_after_a_checkpoint_resumes_to_identical_weights(tmp_path, monkeypatch, architecture):
    """Killed right after its first checkpoint (step 10), then resumed: the same weights, lam and
    metrics as a run never stopped, with the controller moving lam and latents resampled on both
    sides of the kill (the resampling draw is seeded from the step; lam is a checkpointed buffer)."""
    from pipeline import fsio
    from stages import train as stage

    resampled = []
    real_resample = ReluSAE.resample_dead

    def counting(self, x, err, view):
        # Latents do not die within a few steps of so small a run: silence a few, picked by the step,
        # so both runs resample them (the trainer's counters are part of the checkpoint).
        view.since_fired[[view.step, 2 * view.step + 1, 40 + view.step]] = 10**6
        ids = real_resample(self, x, err, view)
        resampled.append((view.step, ids.numel()))
        return ids

    monkeypatch.setattr(ReluSAE, "resample_dead", counting)
    sae = {"architecture": architecture, "target_l0": 4, "resample_every": 6,
           "resample_until": 0.6, "dormant_tokens": 256}
    for name in ("ref", "killed"):
        planted_store(tmp_path / name, n_rows=4 * 1024)
    raw = relu_config(tmp_path / "killed", sae, n_latents=128, n_tokens=256 * 30, checkpoint_every=10,
                      log_every=5, eval_every=15, eval_tokens=512)
    real_publish = fsio.publish

    def publish_then_die(tmp, path):
        real_publish(tmp, path)
        if str(path).endswith("checkpoint.pt"):
            raise Killed

    monkeypatch.setattr(fsio, "publish", publish_then_die)
    with pytest.raises(Killed):
        stage.run(config_from_dict(raw), progress=False)
    monkeypatch.setattr(fsio, "publish", real_publish)
    assert [step for step, _ in resampled] == [5]
    stage.run(config_from_dict(raw), progress=False)  # resumes from step 10
    stage.run(config_from_dict({**raw, "run_dir": str(tmp_path / "ref")}), progress=False)
    assert [step for step, _ in resampled] == [5, 11, 17, 5, 11, 17] and resampled[1:3] == resampled[4:]
    assert all(m >= 3 for _, m in resampled)

    a = load_file(sae_folder(tmp_path / "killed", layer=0) / "sae.safetensors")
    b = load_file(sae_folder(tmp_path / "ref", layer=0) / "sae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the controller moved lam (and the last steps, after the kill, the bias)
    assert abs(math.log(a["l1_lambda"].item() / ReluSettings.l1_coefficient)) > 0.3

    def rows(run):
        lines = (sae_folder(tmp_path / run, layer=0) / "metrics.jsonl").read_text().splitlines()
        return [(r["split"], r["step"], r["fvu"]) for r in map(json.loads, lines)]

    assert rows("killed") == rows("ref")
