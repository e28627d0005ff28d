"""The BatchTopK SAE (pipeline/saes/batchtopk.py): the training step against a dense reference,
exactly k x B kept (ties, low precision, ranks splitting the batch), the threshold estimate and
the inference rule it gives, save/load/export, the Triton backend, and `saepipe train` end to end
(held-out L0 near k, exact resume of a run that died after a checkpoint)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

import pipeline.saes.batchtopk as bt
import pipeline.saes.topk as topk_module
from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import UserError
from pipeline.loader import RowFilter
from pipeline.saes import TrainView, load_sae
from pipeline.saes.batchtopk import BatchTopKSAE, BatchTopKSettings
from pipeline.store import ActivationStore, Location
from pipeline.train import reconstruction_loss
from stages import train as stage
from test_train import cli, config, random_store, sae_folder, work_folder, write_config


# --------------------------------------------------------------------------- helpers
def tiny(cls=BatchTopKSAE, d=16, n=64, k=4, **kw) -> BatchTopKSAE:
    """A float64 SAE with nonzero biases (seed 0)."""
    torch.manual_seed(0)
    sae = cls(d, n, k, backend="torch", **kw).double()
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n, d, dtype=torch.float64))
        sae.b_lat.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.3)
    return sae


def batch(B=40, d=16, loud=(0, 7)) -> torch.Tensor:
    """x [B, d] (seed 1) with a few loud rows, which keep many more than k latents each."""
    x = torch.randn(B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[list(loud)] *= 6
    return x


def dense_batch_topk(sae, x, K=None):
    """z [B, n] and the mask [B, n] of the K = k * B largest positive relu(z) of the whole batch."""
    z = (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat
    K = K or sae.k * x.shape[0]
    flat = z.detach().relu().flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(K).indices] = True
    return z, (keep & (flat > 0)).view_as(z)


def dense_aux(sae, x, z, x_hat, dormant, k_aux):
    """TopK's AuxK written densely: the dormant latents' top k_aux per row predict the residual."""
    aux_idx = z.detach().masked_fill(~dormant, -torch.inf).topk(k_aux, dim=-1).indices
    aux_acts = torch.zeros_like(z).scatter(1, aux_idx, torch.relu(z.gather(1, aux_idx)))
    r = (x - x_hat).detach()
    return (aux_acts @ sae.W_dec - r).pow(2).sum() / r.pow(2).sum()


def kept_pairs(idx, vals) -> set:
    return {(b, int(i)) for b in range(idx.shape[0]) for i, v in zip(idx[b], vals[b]) if v > 0}


def view_for(settings, n, since=None) -> TrainView:
    return TrainView(settings, since if since is not None else torch.zeros(n, dtype=torch.long))


def train_config(run, arch="batchtopk", k=4, **train):
    """test_train's config with `sae: {architecture: arch, k: k}` in place of its flat `k`."""
    raw = config(run, **train)
    del raw["train"]["k"]
    raw["train"]["sae"] = {"architecture": arch, "k": k}
    return raw


# --------------------------------------------------------------------------- the training step
@pytest.mark.parametrize("candidates", [1, 4], ids=["c=k", "c=4k"])
@pytest.mark.parametrize("aux_dense_ratio", [0, 1000], ids=["auxk-sparse", "auxk-dense"])
def test_training_step_matches_dense_batch_topk_autograd(monkeypatch, candidates, aux_dense_ratio):
    # Rows keep 0 to 29 latents (k 4): with c = k candidates many rows run short and take
    # rounds of 4x more (4, 16, 64 = all); with c = 4k the two loud rows still do.
    monkeypatch.setattr(bt, "CANDIDATES", candidates)
    monkeypatch.setattr(topk_module, "AUX_DENSE_RATIO", aux_dense_ratio)
    sae, x = tiny(), batch()
    dormant = torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5
    st = BatchTopKSettings(k=4, aux_alpha=0.25, k_aux=8, dormant_tokens=100)
    since = torch.where(dormant, 100, 0)
    o = sae.train_forward(x, view_for(st, 64, since))
    fvu, _ = reconstruction_loss(x, o.x_hat)
    loss, aux = sae.train_loss(x, o, fvu, view_for(st, 64, since))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    z, keep = dense_batch_topk(sae, x)
    assert kept_pairs(o.idx, o.vals) == {tuple(p) for p in keep.nonzero().tolist()}
    assert int((o.vals > 0).sum()) == 4 * 40 and (keep.sum(1).max() > 3 * 4)  # per-row L0 varies
    x_hat = (z.relu() * keep) @ sae.W_dec + sae.b_pre
    ref = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum() + 0.25 * dense_aux(sae, x, z, x_hat, dormant, 8)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    assert aux > 0
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def test_the_returned_layout_is_the_contracts():
    """idx/vals [B, w], w the most a row keeps; a row's ids distinct, its unused slots vals 0."""
    sae, x = tiny(), batch()
    o = sae.train_forward(x, view_for(BatchTopKSettings(k=4, aux_alpha=0).resolve(16, 64, 40, "", ""), 64))
    per_row = (o.vals > 0).sum(1)
    assert o.idx.shape == o.vals.shape == (40, int(per_row.max()))
    assert all(len(set(r.tolist())) == o.idx.shape[1] for r in o.idx)
    assert o.vals.requires_grad and (o.vals >= 0).all()


def test_a_low_precision_z_still_keeps_exactly_k_per_row_on_average():
    """bf16 z (the GPU default) ties many values at the batch threshold: ties are kept until K."""
    torch.manual_seed(0)
    sae = BatchTopKSAE(32, 256, 8, backend="torch")
    x = torch.randn(256, 32)
    rows, cols, pre, *_, low = sae.batch_top(x - sae.b_pre, None, matmul_dtype=torch.bfloat16)
    assert low and rows.numel() == 8 * 256 and len(set(zip(rows.tolist(), cols.tolist()))) == 8 * 256
    z = torch.addmm(sae.b_lat.bfloat16(), (x - sae.b_pre).bfloat16(), sae.W_enc.bfloat16().T)
    t = z.flatten().topk(8 * 256).values.min()
    assert (z > t).sum() < 8 * 256 < (z >= t).sum()  # the case being tested: ties straddle K
    assert bool((pre >= t).all()) and int((pre > t).sum()) == int((z > t).sum())
    # The step itself: bf16 picks the latents, their values are recomputed in full precision.
    o = sae.forward_train(x, matmul_dtype=torch.bfloat16)[0]
    mask = torch.zeros(256, 256, dtype=torch.bool)
    mask[rows, cols] = True
    exact = torch.addmm(sae.b_lat, x - sae.b_pre, sae.W_enc.T)
    torch.testing.assert_close(o.x_hat, (exact.relu() * mask) @ sae.W_dec + sae.b_pre)
    assert kept_pairs(o.idx, o.vals) == {tuple(p) for p in (mask & (exact > 0)).nonzero().tolist()}


class FakeRanks:
    """Two ranks as two threads: all_gather / all_reduce_ exchange through a barrier."""

    def __init__(self, world: int):
        self.world, self.local, self.slots = world, threading.local(), [None] * world
        self.barrier = threading.Barrier(world)

    def rank_world(self):
        return self.local.rank, self.world

    def all_gather(self, t, group=None):
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        out = [s.clone() for s in self.slots]
        self.barrier.wait()
        return out

    def all_reduce_(self, t, group=None):
        return t.copy_(sum(self.all_gather(t)))


def test_ranks_splitting_the_batch_keep_the_whole_batchs_top_k(monkeypatch):
    sae, x = tiny(), batch()
    one = sae.forward_train(x, estimate=True)[0]
    theta = sae.threshold.clone()
    fake = FakeRanks(2)
    monkeypatch.setattr(bt, "dist", fake)
    results, copies = {}, [tiny(), tiny()]  # built here: the threads would share torch's global RNG

    def rank(r):
        fake.local.rank = r
        mine = copies[r]
        results[r] = (mine.forward_train(x[r::2], split=True, estimate=True)[0], mine.threshold.clone())

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [0, 1]
    kept = set()
    for r, (o, th) in results.items():
        kept |= {(2 * b + r, i) for b, i in kept_pairs(o.idx, o.vals)}
        assert th == theta  # every rank's estimate is the one-process one
        torch.testing.assert_close(o.x_hat, one.x_hat[r::2])
    assert kept == kept_pairs(one.idx, one.vals)


# --------------------------------------------------------------------------- the threshold
def test_the_threshold_is_seeded_then_a_bias_corrected_running_average():
    sae = tiny()
    assert sae.threshold.item() == -1 and sae.threshold.dtype == torch.float64
    ms = []
    for seed in range(3):
        x = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        z, keep = dense_batch_topk(sae, x)
        ms.append(z[keep].min().item())  # the batch's smallest kept activation
        sae.forward_train(x, estimate=True)
    # weights 1, then 0.99 / 0.01 of the weight so far: theta is a normalised weighted mean of the m's
    w1 = 0.01
    w2 = 0.99 * w1 + 0.01
    want = (0.99 * w2 * ((0.99 * w1 * ms[0] + 0.01 * ms[1]) / w2) + 0.01 * ms[2]) / (0.99 * w2 + 0.01)
    assert sae.threshold.item() == pytest.approx(want, rel=1e-12)
    assert sae.threshold_weight.item() == pytest.approx(0.99 * w2 + 0.01, rel=1e-12)
    with torch.no_grad():  # a batch that keeps nothing leaves it as it is
        sae.b_lat.fill_(-1e3)
    before = sae.threshold.clone()
    sae.forward_train(torch.randn(40, 16, dtype=torch.float64), estimate=True)
    assert torch.equal(sae.threshold, before)


def test_inference_keeps_what_exceeds_the_threshold_compacted():
    sae, x = tiny(), batch()
    with torch.no_grad():
        sae.threshold.fill_(0.9)
    z = (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat
    want = z * (z > 0.9)
    idx, vals = sae.encode(x)
    assert idx.shape[1] == int((z > 0.9).sum(1).max())
    torch.testing.assert_close(sae.encode_dense(x), want)
    torch.testing.assert_close(sae.reconstruct_raw(x)[0], want @ sae.W_dec + sae.b_pre, rtol=1e-5, atol=1e-6)
    o = sae.train_forward(x, TrainView())  # evaluation: the same rule
    torch.testing.assert_close(o.x_hat, want @ sae.W_dec + sae.b_pre)
    # nothing above it: one slot a row, off
    with torch.no_grad():
        sae.threshold.fill_(1e9)
    idx, vals = sae.encode(x)
    assert idx.shape == (40, 1) and not vals.any()


def test_the_threshold_rule_with_grad_on_trains_the_encoder_too():
    """What pipeline.finetune differentiates: the evaluation view's x_hat, whose gradient reaches
    W_enc and b_lat through the kept pre-activations, against dense autograd of z 1[z > theta]."""
    sae, x = tiny(), batch()
    with torch.no_grad():
        sae.threshold.fill_(0.9)
    o = sae.train_forward(x, TrainView())
    (o.x_hat.pow(2).sum() + o.x_hat.sum()).backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    ref = tiny()
    with torch.no_grad():
        ref.threshold.fill_(0.9)
    z = (x - ref.b_pre) @ ref.W_enc.T + ref.b_lat
    x_hat = (z * (z > 0.9).detach()) @ ref.W_dec + ref.b_pre
    (x_hat.pow(2).sum() + x_hat.sum()).backward()
    assert got["W_enc"].abs().sum() > 0
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)


def test_calibrate_sets_the_threshold_the_rows_keep_k_above():
    """The re-fit theta against a sort of every positive pre-activation: exactly the k B largest
    lie above it, so inference on the same rows keeps k a row on average (the loud rows more)."""
    sae, x = tiny(), batch()
    with torch.no_grad():
        sae.threshold.fill_(0.9)
    got = sae.calibrate(x)
    z = (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat
    ranked = z.flatten().sort(descending=True).values
    K = sae.k * x.shape[0]
    assert got == {"before": 0.9, "after": ranked[K].item(), "rows": 40} and sae.threshold.item() == ranked[K].item()
    idx, vals = sae.encode(x)
    assert int((vals > 0).sum()) == K
    torch.testing.assert_close(sae.encode_dense(x), z * (z > ranked[K]))
    # fewer positive pre-activations than k B: every positive one is kept
    with torch.no_grad():
        sae.b_lat.sub_(4.0)
    z = (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat
    n_pos = int((z > 0).sum())
    assert 0 < n_pos < K
    sae.calibrate(x)
    assert 0 < sae.threshold.item() < z[z > 0].min().item()
    assert int((sae.encode(x)[1] > 0).sum()) == n_pos


def test_before_any_training_step_inference_falls_back_to_the_batch_rule():
    sae, x = tiny(), batch()
    _, keep = dense_batch_topk(sae, x)
    assert kept_pairs(*sae.encode(x)) == {tuple(p) for p in keep.nonzero().tolist()}


# --------------------------------------------------------------------------- disk, export
def test_save_and_load_keep_the_threshold(tmp_path):
    sae, x = tiny(), batch()
    sae.forward_train(x, estimate=True)
    sae = sae.float()
    sae.save(tmp_path / "sae", {"layer": 1, "hook": "resid_post"})
    assert set(load_file(tmp_path / "sae" / "sae.safetensors")) >= {"threshold", "threshold_weight"}
    back = load_sae(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert type(back) is BatchTopKSAE and cfg["architecture"] == "batchtopk" and cfg["k"] == 4
    assert back.threshold.dtype == torch.float64 and back.threshold.item() == pytest.approx(sae.threshold.item())
    xf = x.float()
    torch.testing.assert_close(back.encode_dense(xf), sae.encode_dense(xf))


def test_saelens_reads_it_as_jumprelu_and_sparsify_cannot_hold_it(tmp_path):
    sae = tiny().float()
    sae.forward_train(batch().float(), estimate=True)
    sae.save(tmp_path / "sae", {"layer": 1, "hook": "resid_post"})
    code, out = cli("export", tmp_path / "sae", "--format", "saelens", "--out", tmp_path / "lens")
    assert code == 0, out
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    w = load_file(tmp_path / "lens" / "sae_weights.safetensors")
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (16, 64)
    assert w["threshold"].shape == (64,) and torch.all(w["threshold"] == sae.threshold.float())
    # SAELens' JumpReLU encode: relu(z) * (z > threshold), z = (x - b_dec) W_enc + b_enc
    x = batch().float() * 0.5
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    theirs = torch.relu(z) * (z > w["threshold"])
    torch.testing.assert_close(theirs, sae.encode_dense(x))
    torch.testing.assert_close(theirs @ w["W_dec"] + w["b_dec"], sae.decode(*sae.encode(x)))

    code, out = cli("export", tmp_path / "sae", "--format", "sparsify", "--out", tmp_path / "sp")
    assert code == 2 and out.count("\n") == 1 and "cannot hold a batchtopk SAE; export it as saelens" in out
    untrained = BatchTopKSAE(16, 64, 4)
    with pytest.raises(UserError, match="no inference threshold"):
        untrained.export_extras("saelens")


# --------------------------------------------------------------------------- config
def test_settings_are_topks_with_k_a_batch_mean():
    base = {"run_dir": "r", "model": {"name": "m"}, "data": {"path": "d"}, "harvest": {"layers": [1], "n_tokens": 512}}
    st = config_from_dict({**base, "train": {"sae": {"architecture": "batchtopk", "k": 16, "aux_alpha": 0}}}).train.sae
    assert st == BatchTopKSettings(k=16, aux_alpha=0) and st.model_keys() == ("k",)
    with pytest.raises(ConfigError, match=r"train\.sae\.k = 0 must be > 0"):
        config_from_dict({**base, "train": {"sae": {"architecture": "batchtopk", "k": 0}}})
    assert not BatchTopKSAE.shards and "sparsify" not in BatchTopKSAE.exports


# --------------------------------------------------------------------------- end to end
def test_saepipe_train_gives_a_held_out_l0_near_k(tmp_path):
    random_store(tmp_path / "run")
    raw = train_config(tmp_path / "run", n_tokens=256 * 150, eval_every=50, eval_tokens=4096)
    code, out = cli("train", write_config(tmp_path / "c.yaml", raw))
    assert code == 0, out
    assert "batchtopk: k 4" in out
    folder = sae_folder(tmp_path / "run")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "batchtopk" and cfg["eval"]["fvu"] < 0.6
    # the eval rows are held-out chunks, encoded with the threshold re-fit to them at the end
    assert 0.9 * 4 <= cfg["eval"]["l0"] <= 1.1 * 4, cfg["eval"]
    sae = load_sae(folder)
    fit = cfg["threshold_fit"]
    assert sae.threshold.item() == fit["after"] > 0 and fit["before"] > 0 and fit["after"] != fit["before"]
    # theta is the (k N + 1)-th largest pre-activation of the held-out rows under the saved weights
    # (the input scale folded in), so exactly k N of them lie above it
    store = ActivationStore(Location.of(config_from_dict(raw)))
    rf = RowFilter(store, 1, "resid_post", cfg["exclude_bos"], True)
    x = torch.cat([rf(c, store.read_chunk(1, "resid_post", c)).float() for c in cfg["eval_chunks"]])
    assert fit["rows"] == x.shape[0] > 0
    with torch.no_grad():
        z = (sae.preprocess(x) - sae.b_pre) @ sae.W_enc.T + sae.b_lat
    ranked = z.flatten().sort(descending=True).values
    assert fit["after"] == pytest.approx(ranked[4 * x.shape[0]].item(), rel=1e-5)
    assert (z > sae.threshold.float()).sum(1).float().mean().item() == pytest.approx(4, abs=0.01)


def test_a_run_stopped_after_a_checkpoint_resumes_to_identical_weights_and_threshold(tmp_path, monkeypatch):
    """The threshold and its weight are training state: a run that dies after its step-30 checkpoint
    (here an exception in step 41, in process: cheaper than test_train's SIGKILL of a subprocess,
    which covers the kill itself for every architecture) resumes to the unbroken run's SAE."""
    for name in ("ref", "stopped"):
        random_store(tmp_path / name, n_rows=8 * 1024)
    raw = train_config(tmp_path / "stopped", n_tokens=256 * 80, checkpoint_every=30, log_every=10,
                       eval_every=40, dormant_tokens=1024)
    cfg = write_config(tmp_path / "c.yaml", raw)
    steps, forward = [], BatchTopKSAE.train_forward

    def dies_in_step_41(self, x, view):
        if view.settings is not None:
            steps.append(view.step)
            if view.step == 40:
                raise RuntimeError("killed")
        return forward(self, x, view)

    monkeypatch.setattr(BatchTopKSAE, "train_forward", dies_in_step_41)
    code, _ = cli("train", cfg)
    out, work = sae_folder(tmp_path / "stopped"), work_folder(tmp_path / "stopped")
    assert code != 0 and steps[-1] == 40 and (work / "checkpoint.pt").exists() and not out.exists()
    monkeypatch.setattr(BatchTopKSAE, "train_forward", forward)

    code, text = cli("train", cfg)
    assert code == 0 and "resuming from the checkpoint at step 30" in text, text
    stage.run(config_from_dict({**raw, "run_dir": str(tmp_path / "ref")}), progress=False)
    a = load_file(out / "sae.safetensors")
    b = load_file(sae_folder(tmp_path / "ref") / "sae.safetensors")
    assert "threshold" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(folder):
        return [(r["split"], r["step"], r["fvu"]) for r in map(json.loads, (folder / "metrics.jsonl").open())]

    assert rows(out) == rows(sae_folder(tmp_path / "ref"))


def test_with_ema_decay_the_saved_sae_has_the_learnt_threshold(tmp_path):
    random_store(tmp_path / "run", n_rows=8 * 1024)
    raw = train_config(tmp_path / "run", n_tokens=256 * 20, ema_decay=0.9)
    code, out = cli("train", write_config(tmp_path / "c.yaml", raw))
    assert code == 0, out
    assert load_sae(sae_folder(tmp_path / "run")).threshold.item() > 0


TRITON_STEP = """
import torch
from pipeline.saes import TrainView
from pipeline.saes.batchtopk import BatchTopKSAE, BatchTopKSettings
x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
x[:2] *= 6  # rows that need more candidates
out = {}
for backend in ("torch", "triton"):
    torch.manual_seed(0)
    sae = BatchTopKSAE(8, 32, 2, backend=backend)
    with torch.no_grad():
        sae.b_pre.normal_()
    view = TrainView(BatchTopKSettings(k=2, k_aux=4, dormant_tokens=1), torch.arange(32) % 2)
    o = sae.train_forward(x, view)
    fvu = (x - o.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss = sae.train_loss(x, o, fvu, view)[0]
    loss.backward()
    out[backend] = [loss, sae.threshold.clone(), *(p.grad for p in sae.parameters())]
for a, b in zip(*out.values()):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print("same grads")
"""


def test_training_step_on_triton_backend_under_interpreter():
    from helpers import interpreted

    done = interpreted(TRITON_STEP)
    assert done.returncode == 0 and "same grads" in done.stdout, done.stderr[-3000:]


def test_a_short_run_averages_the_threshold_over_its_tail():
    """The rate is SAELens' 0.01 in a long run and 20 / n_steps in a short one: the average spans
    about the last 5% of the run, the trainer passing the run's length through the view."""
    from pipeline.saes.base import TrainView
    from pipeline.saes.batchtopk import threshold_rate

    assert threshold_rate(10_000) == 0.01 and threshold_rate(200) == pytest.approx(0.1)
    sae = tiny()
    x1, x2 = (torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    ms = []
    for x in (x1, x2):
        z, keep = dense_batch_topk(sae, x)
        ms.append(z[keep].min().item())
        sae.forward_train(x, estimate=threshold_rate(200))
    r = 0.1
    assert sae.threshold.item() == pytest.approx(((1 - r) * r * ms[0] + r * ms[1]) / ((1 - r) * r + r), rel=1e-12)
    # through train_forward: the view's n_steps sets the rate
    from pipeline.config import sae_section

    other = tiny()
    st = sae_section({"architecture": "batchtopk", "k": other.k}, "train.sae.", "test").resolve(16, other.n_latents, 40,
                                                                                                "", "")
    view = TrainView(st, torch.zeros(other.n_latents, dtype=torch.long), None, step=0, n_steps=200)
    for x in (x1, x2):
        other.train_forward(x, view)
    assert other.threshold.item() == pytest.approx(sae.threshold.item(), rel=1e-12)
