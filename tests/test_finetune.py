"""saepipe finetune (pipeline/finetune.py): the KL loss and its gradient against a hand-written
reference on a tiny Llama, an exact SAE's zero loss and gradient, BOS left alone, the windows it
may train on, resume after a kill to identical weights, the folder eval and collate then take,
and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import finetune as ft
from pipeline.config import FinetuneConfig, config_from_dict
from pipeline.model import load_causal_lm, record_block_outputs
from pipeline.paths import sae_dir
from pipeline.saes import load_sae
from tests.helpers import harvested_llama, make_model, run_cli, write_corpus
from tests.test_eval import exact_sae, random_sae  # the same D 32 SAEs eval's tests splice

D, LAYER = 32, 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama harvested at layer 1 and a TopK SAE trained on it (root, raw config)."""
    root = tmp_path_factory.mktemp("ft")
    raw = harvested_llama(root, n_latents=64)
    raw["train"]["sae"] = {"k": 4}
    raw["finetune"] = {"n_tokens": 16 * 12, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 1, "device": "cpu"}
    res = run_cli(root, raw, "train")
    assert res.exit_code == 0, res.output
    return root, raw


@pytest.fixture(scope="module")
def trained_btk(trained, tmp_path_factory):
    """The same store with a BatchTopK SAE (train.sweep member "b", k 4) trained on it (root, raw config)."""
    import shutil

    root, raw = trained
    mine = tmp_path_factory.mktemp("ft-btk")
    shutil.copytree(root / "run" / "activations.zarr", mine / "run" / "activations.zarr")
    btk = {**raw, "run_dir": str(mine / "run"),
           "train": {**raw["train"], "sweep": [{"name": "b", "sae": {"architecture": "batchtopk", "k": 4}}]}}
    res = run_cli(mine, btk, "train")
    assert res.exit_code == 0, res.output
    return mine, btk


def ours(model, sae, ids, pass_bos=True, recon=0.0):
    """pipeline.finetune's loss terms for sae at (LAYER, resid_post) on windows ids, as its loop computes them."""
    t = ft.Target(LAYER, "resid_post", None, Path("."), Path("."), {}, sae=sae, pass_bos=pass_bos)
    before = {}
    with torch.no_grad(), record_block_outputs(model, [ft.below(t)], before):
        logp_clean = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    return ft.spliced_loss(model, t, ids, logp_clean, before, recon)


def by_hand(model, sae, ids, recon=0.0):
    """The same loss written out: the whole model run twice, block LAYER's output replaced at positions
    1.. by TopK's dense reconstruction, KL(clean || spliced) averaged over those positions."""
    block = model.model.layers[LAYER]
    seen = {}

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        x = h[:, 1:]
        z = (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat
        top = z.topk(sae.k, dim=-1)
        acts = torch.zeros_like(z).scatter(-1, top.indices, top.values.clamp_min(0))
        x_hat = acts @ sae.W_dec + sae.b_pre
        flat, flat_hat = x.reshape(-1, D), x_hat.reshape(-1, D)
        seen["fvu"] = ((flat - flat_hat) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
        h = torch.cat([h[:, :1], x_hat], dim=1)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with torch.no_grad():
        clean = model(input_ids=ids).logits
    handle = block.register_forward_hook(hook)
    try:
        spliced = model(input_ids=ids).logits
    finally:
        handle.remove()
    kl = F.kl_div(F.log_softmax(spliced[:, 1:], -1).flatten(0, 1), F.log_softmax(clean[:, 1:], -1).flatten(0, 1),
                  log_target=True, reduction="batchmean")
    return kl + recon * seen["fvu"], kl


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_model("llama", root / "model", n_layers=3, d_model=D)
    model, _ = load_causal_lm(str(root / "model"), device="cpu")
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.parametrize("recon", [0.0, 0.5])
def test_loss_and_gradient_match_a_hand_written_reference(llama, recon):
    model, ids = llama
    sae = random_sae()
    loss, kl, _ = ours(model, sae, ids, recon=recon)
    loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    ref = random_sae()
    want, want_kl = by_hand(model, ref, ids, recon)
    want.backward()
    assert kl.item() == pytest.approx(want_kl.item(), rel=1e-5) and kl.item() > 1e-4
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for name, p in ref.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-7), name
        assert p.grad.abs().max() > 0, name


def test_an_exact_sae_has_zero_loss_and_zero_gradient(llama):
    model, ids = llama
    sae = exact_sae()
    loss, kl, fvu = ours(model, sae, ids, recon=1.0)
    loss.backward()
    assert abs(kl.item()) < 1e-6 and fvu.item() < 1e-10
    assert all(p.grad.abs().max().item() < 1e-6 for p in sae.parameters())


def test_bos_is_left_alone(llama):
    """With BOS passing, position 0 reaches the upper blocks exactly as in the clean run, and the
    rest do not (the SAE is a poor one)."""
    model, ids = llama
    sae = random_sae()
    seen = []
    handle = model.model.layers[LAYER + 1].register_forward_pre_hook(lambda m, a, kw: seen.append(
        (a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True)
    try:
        ours(model, sae, ids)  # the clean forward, then the spliced one
    finally:
        handle.remove()
    clean, spliced = seen
    assert torch.equal(clean[:, 0], spliced[:, 0])
    assert not torch.allclose(clean[:, 1:], spliced[:, 1:])


def test_only_windows_wholly_in_training_chunks(trained):
    from pipeline.store import ActivationStore, Location

    root, raw = trained
    store = ActivationStore(Location.of(config_from_dict(raw)))
    # chunks of 64 rows = 4 windows of 16 tokens; held-out chunks 2 and 5 take windows 8-11 and 20-23
    ids = ft.training_windows(store, LAYER, "resid_post", [2, 5])
    assert ids.tolist() == [i for i in range(48) if not 8 <= i < 12 and not 20 <= i < 24]
    order = ft.order(ids, 100, seed=3)
    assert len(order) == 100 and set(order[:40]) == set(ids) and set(order[40:80]) == set(ids)
    assert np.array_equal(order, ft.order(ids, 100, seed=3)) and not np.array_equal(order, ft.order(ids, 100, 4))


def test_learning_rate_warms_up_then_holds_or_decays():
    fc = FinetuneConfig(warmup=0.2, lr_schedule="cosine")
    lrs = [ft.learning_rate(fc, s, 10, 1.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    flat = [ft.learning_rate(FinetuneConfig(warmup=0.2), s, 10, 1.0) for s in range(10)]
    assert flat == [0.5] + [1.0] * 9  # constant is the default


# --------------------------------------------------------------------------- the stage
class Killed(Exception):
    pass


@pytest.mark.parametrize("member", [None, "b"], ids=["topk", "batchtopk"])
def test_a_killed_finetune_resumes_to_identical_weights(request, tmp_path, monkeypatch, member):
    """BatchTopK's too: its threshold, re-fit on every batch, is a checkpointed buffer."""
    import shutil

    root, raw = request.getfixturevalue("trained" if member is None else "trained_btk")
    for name in ("ref", "killed"):  # copies of the trained run (no fine-tune yet): each fine-tunes its own
        shutil.copytree(root / "run", tmp_path / name / "run",
                        ignore=lambda _d, names: [n for n in names if "@" in n and "kl" in n.split("@")[-1]])
    cfgs = {name: config_from_dict({**raw, "run_dir": str(tmp_path / name / "run")}) for name in ("ref", "killed")}
    real = ft.write_atomic
    writes = []

    def die_after_second(path, data, *a, **kw):
        real(path, data, *a, **kw)
        writes.append(path)
        if len(writes) == 2:
            raise Killed

    monkeypatch.setattr(ft, "write_atomic", die_after_second)
    with pytest.raises(Killed):
        ft.run(cfgs["killed"], progress=False)
    monkeypatch.setattr(ft, "write_atomic", real)
    kl = "kl" if member is None else f"{member}-kl"
    out = sae_dir(tmp_path / "killed" / "run", LAYER, "resid_post", kl)
    assert not out.exists() and (out.with_name(out.name + ".partial") / ft.CHECKPOINT).exists()
    ft.run(cfgs["killed"], progress=False)
    ft.run(cfgs["ref"], progress=False)
    a = load_sae(out)
    b = load_sae(sae_dir(tmp_path / "ref" / "run", LAYER, "resid_post", kl))
    base = load_sae(sae_dir(tmp_path / "ref" / "run", LAYER, "resid_post", member))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_enc, base.W_enc)  # it did train (the encoder too)
    assert a.cfg["finetune"]["steps"] == 3
    rows, rows_ref = ([json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                      for folder in (out, sae_dir(tmp_path / "ref" / "run", LAYER, "resid_post", kl)))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows == rows_ref


def test_the_fine_tuned_sae_is_evaluated_beside_its_base(trained):
    root, raw = trained
    res = run_cli(root, raw, "finetune")
    assert res.exit_code == 0, res.output
    out = sae_dir(root / "run", LAYER, "resid_post", "kl")
    cfg = json.loads((out / "cfg.json").read_text())
    base = json.loads((sae_dir(root / "run", LAYER, "resid_post") / "cfg.json").read_text())
    f = cfg["finetune"]
    assert (f["loss"], f["tokens"], f["steps"], f["base"]) == ("kl", 16 * 12, 3, "resid_post")
    assert cfg["eval"]["eval_tokens"] == base["eval"]["eval_tokens"] and cfg["eval"]["fvu"] != base["eval"]["fvu"]
    assert (out / "loss.png").exists() and not out.with_name(out.name + ".partial").exists()
    again = run_cli(root, raw, "finetune")
    assert again.exit_code == 0 and "skipping" in again.output
    res = run_cli(root, raw, "eval")
    assert res.exit_code == 0, res.output
    assert "resid_post@kl" in res.output and "fine-tune" in res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["l0"] == pytest.approx(4.0)  # TopK: the fine-tune keeps k
    res = run_cli(root, raw, "collate")
    assert res.exit_code == 0, res.output
    assert (root / "run" / "records" / str(LAYER) / "resid_post@kl" / "summary.json").exists()
    res = run_cli(root, raw, "steer", "--layer", str(LAYER), "--latent", "0", "--strength", "2", "--prompt", "def add",
                  "--max-new-tokens", "2", "--member", "kl")
    assert res.exit_code == 0, res.output
    res = run_cli(root, raw, "finetune", "--force")
    assert res.exit_code == 0 and "skipping" not in res.output


def test_a_threshold_sae_gets_its_threshold_re_fit_on_the_held_out_rows(trained_btk):
    """A BatchTopK SAE's encoder moves in the fine-tune; its threshold follows each batch, and the
    last re-fit puts the held-out rows at k latents a row (exactly: the k N largest lie above
    theta). finetune.calibrate false keeps the base's, and the L0 drifts."""
    tmp_path, btk = trained_btk
    res = run_cli(tmp_path, btk, "finetune")
    assert res.exit_code == 0, res.output
    base = load_sae(sae_dir(tmp_path / "run", LAYER, "resid_post", "b"))
    out = sae_dir(tmp_path / "run", LAYER, "resid_post", "b-kl")
    cfg = json.loads((out / "cfg.json").read_text())
    th = cfg["finetune"]["threshold"]
    # each batch re-fit it (the last one's is `before`), then the held-out rows did
    assert base.threshold.item() not in (th["before"], th["after"]) and th["after"] != th["before"]
    assert "threshold re-fit" in res.output
    sae = load_sae(out)
    assert sae.threshold.item() == th["after"]
    assert th["rows"] == cfg["eval"]["eval_tokens"] and cfg["eval"]["l0"] == pytest.approx(4.0, abs=1e-9)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(3))  # one batch's rule: its rows keep k
    ft.reconstruct(sae, x, calibrate=True)
    assert int((sae.encode(x)[1] > 0).sum()) == 4 * 40 and sae.threshold.item() != th["after"]
    res = run_cli(tmp_path, {**btk, "finetune": {**btk["finetune"], "calibrate": False}}, "finetune")
    assert res.exit_code == 0 and "threshold re-fit" not in res.output, res.output
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["finetune"]["threshold"] is None and load_sae(out).threshold.item() == base.threshold.item()
    assert cfg["eval"]["l0"] != pytest.approx(4.0, abs=1e-9)


def _one_line(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("saepipe: error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_input_is_one_line(trained, tmp_path):
    root, raw = trained
    _one_line(run_cli(tmp_path, {**raw, "finetune": {**raw["finetune"], "n_tokens": 0}}, "finetune"),
              "finetune.n_tokens")
    _one_line(run_cli(tmp_path, {**raw, "finetune": {**raw["finetune"], "n_tokens": 8}}, "finetune"),
              "below one window")
    relu = {**raw, "train": {**raw["train"], "sae": {"architecture": "relu", "target_l0": 4}},
            "run_dir": str(tmp_path / "run")}
    import shutil

    shutil.copytree(root / "run" / "activations.zarr", tmp_path / "run" / "activations.zarr")
    assert run_cli(tmp_path, relu, "train").exit_code == 0
    _one_line(run_cli(tmp_path, relu, "finetune"), "relu", "topk")
    _one_line(run_cli(tmp_path, {**raw, "run_dir": str(tmp_path / "none")}, "finetune"), "harvest first")


def test_an_encoder_only_models_sae_is_refused(tmp_path):
    make_model("bert", tmp_path / "model", n_layers=2, d_model=D)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    from tests.helpers import harvest_config

    raw = harvest_config(tmp_path / "model", corpus, tmp_path / "run")
    raw["train"] = {"n_latents": 64, "n_tokens": 1024, "batch_size": 128, "device": "cpu", "sae": {"k": 4}}
    raw["finetune"] = {"n_tokens": 64, "device": "cpu"}
    for stage in ("harvest", "train"):
        assert run_cli(tmp_path, raw, stage).exit_code == 0
    _one_line(run_cli(tmp_path, raw, "finetune"), "language-model head")
