"""Transcoders (train.transcode): a dictionary that reads a block's mlp_in and predicts its mlp_out.

Checked against references written here, not the code under test: the mlp_in hook against the
block's own MLP (mlp(mlp_in) is mlp_out), the folded transcoder against the arithmetic of its
saved tensors, eval's splice against a model whose MLP output is replaced by hand, sparsify's
transcoder formula against our reconstruction; and every stage on a tiny harvested Llama.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import harvested_llama, make_model, run_cli
from pipeline import model as M
from pipeline.config import load_config
from pipeline.paths import sae_dir
from pipeline.saes import build_sae, load_sae
from pipeline.store import ActivationStore, Location
from stages.cli import main

D, LAYER = 32, 1


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A tiny Llama harvested at mlp_in and mlp_out, and a transcoder config for it."""
    root = tmp_path_factory.mktemp("transcoder")
    raw = harvested_llama(root, ["mlp_in", "mlp_out"], normalize="scalar", hooks=["mlp_in"],
                          transcode={"mlp_in": "mlp_out"}, skip_connection=True)
    return root, raw


_cli = run_cli


def _rows(root, hook):
    store = ActivationStore(Location.of(load_config(root / "cfg.yaml")))
    return torch.cat([store.read_chunk(LAYER, hook, c) for c in range(store.n_chunks(LAYER, hook))]).float()


def test_mlp_in_is_what_the_mlp_reads(tmp_path):
    """(every family: tests/test_families.py)"""
    model = make_model("llama", tmp_path / "m", n_layers=3, d_model=D, random_norms=True)
    ids = torch.randint(0, 300, (2, 7))
    out = M.ActivationCapture(model, [(LAYER, "mlp_in"), (LAYER, "mlp_out")]).run(ids)
    mlp = M.find_blocks(model)[LAYER].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(out[(LAYER, "mlp_in")]), out[(LAYER, "mlp_out")])
    assert out[(LAYER, "mlp_in")].shape == (2, 7, D)


def test_splice_with_a_source_replaces_the_output_by_a_function_of_the_input(tmp_path):
    """Splicing the block's own MLP as a 'transcoder' changes nothing; a scaled one changes what
    a hand-made hook would."""
    model = make_model("llama", tmp_path / "m", n_layers=3, d_model=D)
    ids = torch.randint(0, 300, (2, 7))
    mlp = M.find_blocks(model)[LAYER].mlp
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with M.splice(model, LAYER, "mlp_out", lambda out, src: mlp.forward(src), source="mlp_in"):
            same = model(input_ids=ids).logits
        torch.testing.assert_close(same, clean)
        with M.splice(model, LAYER, "mlp_out", lambda out, src: 0.5 * mlp.forward(src) + 1.0, source="mlp_in"):
            ours = model(input_ids=ids).logits
        handle = mlp.register_forward_hook(lambda _m, _i, out: 0.5 * out + 1.0)
        try:
            ref = model(input_ids=ids).logits
        finally:
            handle.remove()
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(ours, clean)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_folded_transcoder_predicts_from_raw_input(arch):
    """folded(s, t): a transcoder trained on x * s predicting y * t becomes one that takes raw x and
    predicts raw y; the saved tensors compute relu-pre-activations without b_pre and add W_skip."""
    torch.manual_seed(0)
    sae = build_sae(arch, D, 64, {}, "none", "torch").make_transcoder(skip=True)
    with torch.no_grad():
        for t in sae.parameters():
            t.add_(0.1 * torch.randn_like(t))
    x = torch.randn(40, D) * 3
    s, t = 0.25, 4.0
    y_scaled, idx, vals = sae.reconstruct_raw(x * s)  # prediction of y * t from x * s
    folded = sae.folded(s, t)
    y_raw, idx2, vals2 = folded.reconstruct_raw(x)
    torch.testing.assert_close(y_raw, y_scaled / t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.encode_dense(x), sae.encode_dense(x * s), rtol=1e-4, atol=1e-5)
    if arch == "relu":  # written out: relu(W_enc x + b_lat) W_dec + b_pre + W_skip x
        f = torch.relu(x @ folded.W_enc.T + folded.b_lat)
        torch.testing.assert_close(y_raw, f @ folded.W_dec + folded.b_pre + x @ folded.W_skip.T, rtol=1e-4, atol=1e-4)


def test_every_stage_runs_a_transcoder(tmp_path, harvested):
    src, base = harvested
    shutil.copytree(src / "run", tmp_path / "run")
    raw = {**base, "run_dir": str(tmp_path / "run")}
    raw["train"] = {**base["train"], "hooks": ["mlp_in", "mlp_out"]}  # and a TopK SAE on mlp_out beside it
    res = _cli(tmp_path, raw, "train")
    assert res.exit_code == 0, res.output
    assert "transcoder to mlp_out" in res.output
    folder = sae_dir(tmp_path / "run", LAYER, "mlp_in")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["transcoder"] is True and cfg["skip_connection"] is True and cfg["target_hook"] == "mlp_out"
    sae = load_sae(folder)
    assert sae.transcoder and sae.W_skip is not None and sae.W_skip.abs().sum() > 0  # the skip was trained

    # The saved transcoder, on raw rows, predicts mlp_out better than its mean does; train's held-out
    # FVU is of that prediction.
    x, y = _rows(tmp_path, "mlp_in"), _rows(tmp_path, "mlp_out")
    y_hat = sae.reconstruct_raw(x)[0]
    fvu = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.9 and math.isclose(fvu, cfg["eval"]["fvu"], rel_tol=0.35, abs_tol=0.1)

    res = _cli(tmp_path, raw, "eval")
    assert res.exit_code == 0, res.output
    assert "mlp_in->mlp_out" in res.output
    ev = json.loads((folder / "eval.json").read_text())
    assert ev["fingerprint"]["target_hook"] == "mlp_out" and ev["l0"] > 0
    # the transcoder is drawn beside mlp_out's SAE, where it is spliced
    assert (tmp_path / "run" / "saes" / str(LAYER) / "frontier-mlp_out.png").exists()
    assert not (tmp_path / "run" / "saes" / str(LAYER) / "frontier-mlp_in.png").exists()
    from pipeline.viewer import _frontiers  # the index page shows a transcoder's records with that picture

    assert "frontier-mlp_out.png" in _frontiers(tmp_path / "run", [(LAYER, "mlp_in", None)])

    res = _cli(tmp_path, raw, "collate")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "records" / str(LAYER) / "mlp_in" / "summary.json").read_text())
    assert summary["n_latents"] == 64

    res = _cli(tmp_path, raw, "steer", "--layer", str(LAYER), "--hook", "mlp_in", "--latent", "0", "--strength", "4",
               "--prompt", "the cat", "--max-new-tokens", "2")
    assert res.exit_code == 0, res.output
    assert "its decoder row is added at mlp_out" in res.output

    out = tmp_path / "sparsify"
    res = CliRunner().invoke(main, ["export", str(folder), "--format", "sparsify", "--out", str(out)])
    assert res.exit_code == 0, res.output
    w, c = load_file(out / "sae.safetensors"), json.loads((out / "cfg.json").read_text())
    assert c["transcode"] is True and c["skip_connection"] is True
    # sparsify's transcoder: topk(relu(encoder(x))) (no b_dec subtracted), decoded, plus W_skip x
    pre = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(c["k"], dim=-1)
    theirs = torch.einsum("bk,bkd->bd", top.values, w["W_dec"][top.indices]) + w["b_dec"] + x @ w["W_skip"].T
    torch.testing.assert_close(theirs, y_hat, rtol=1e-4, atol=1e-4)

    res = CliRunner().invoke(main, ["export", str(folder), "--format", "saelens", "--out", str(tmp_path / "sl")])
    assert res.exit_code == 2 and "cannot hold a topk transcoder; export it as sparsify" in res.output and not (tmp_path / "sl").exists()
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "cfg.yaml")])
    assert res.exit_code == 0, res.output


def test_a_transcoder_resumes_to_the_same_weights(tmp_path, harvested):
    """Killed after a checkpoint, a transcoder resumes onto the weights an unbroken run ends on."""
    from pipeline import train

    src, base = harvested
    for name in ("a", "b"):
        shutil.copytree(src / "run", tmp_path / name / "run")
    raw = {**base, "run_dir": str(tmp_path / "a" / "run")}
    (tmp_path / "a" / "cfg.yaml").write_text(yaml.safe_dump(raw))
    train.run(load_config(tmp_path / "a" / "cfg.yaml"), progress=False)

    raw_b = {**base, "run_dir": str(tmp_path / "b" / "run")}
    (tmp_path / "b" / "cfg.yaml").write_text(yaml.safe_dump(raw_b))
    cfg_b = load_config(tmp_path / "b" / "cfg.yaml")
    real_step, calls = train.train_step, []

    def dying(state, *args, **kw):
        if state.step == 17:  # past the checkpoint at step 16
            raise KeyboardInterrupt
        calls.append(state.step)
        return real_step(state, *args, **kw)

    train.train_step = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg_b, progress=False)
    finally:
        train.train_step = real_step
    train.run(cfg_b, progress=False)
    a = load_file(sae_dir(tmp_path / "a" / "run", LAYER, "mlp_in") / "sae.safetensors")
    b = load_file(sae_dir(tmp_path / "b" / "run", LAYER, "mlp_in") / "sae.safetensors")
    assert a.keys() == b.keys() and "W_skip" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["not_harvested", "to_itself", "unknown_hook", "layer_norm_export"])
def test_bad_transcoder_input_is_one_line(tmp_path, harvested, case):
    src, base = harvested
    shutil.copytree(src / "run", tmp_path / "run")
    raw = {**base, "run_dir": str(tmp_path / "run"), "train": dict(base["train"])}
    if case == "not_harvested":
        raw["train"]["transcode"] = {"mlp_in": "attn_out"}
        res = _cli(tmp_path, raw, "train")
        assert "attn_out was not harvested" in res.output and "harvest.hooks" in res.output
    elif case == "to_itself":
        raw["train"]["transcode"] = {"mlp_in": "mlp_in"}
        res = _cli(tmp_path, raw, "train")
        assert "maps mlp_in to itself" in res.output
    elif case == "unknown_hook":
        raw["train"]["transcode"] = {"mlp_in": "mlp out"}
        res = _cli(tmp_path, raw, "train")
        assert "unknown hook 'mlp out'" in res.output
    else:
        raw["train"]["normalize"] = "layer_norm"
        assert _cli(tmp_path, raw, "train").exit_code == 0
        res = CliRunner().invoke(main, ["export", str(sae_dir(tmp_path / "run", LAYER, "mlp_in")), "--format",
                                        "sparsify", "--out", str(tmp_path / "out")])
        assert "layer-normed" in res.output and not (tmp_path / "out").exists()
    assert res.exit_code == 2 and res.output.startswith("saepipe: error: ") and len(res.output.splitlines()) == 1
    if case != "layer_norm_export":
        assert not (tmp_path / "run" / "saes").exists()  # nothing written


def test_init_takes_the_input_centre_off_through_the_encoder_bias():
    """Nothing is subtracted from a transcoder's input, so at init b_lat = -W_enc c (c the input's centre):
    each latent's pre-activation has mean 0 over the sample (b_pre_init mean), and b_pre is the target's
    mean; the decoder starts at zero (train_state.init_weights says why)."""
    from types import SimpleNamespace

    from pipeline.config import TrainConfig
    from pipeline.train_state import init_weights

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, D, generator=g) + 5.0  # a large common direction, as mlp_in has
    y = torch.randn(512, D, generator=g) * 3 - 1.0
    sae = build_sae("topk", D, 64, {"k": 4}, "none", "torch").make_transcoder()
    tc = TrainConfig(normalize="none", b_pre_init="mean", init_sample=512)
    scale, out_scale = init_weights(sae, SimpleNamespace(tc=tc), torch.cat([x, y], 1))
    assert (scale, out_scale) == (1.0, 1.0)
    with torch.no_grad():
        z = x @ sae.W_enc.T + sae.b_lat
    torch.testing.assert_close(z.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(sae.b_pre.detach(), y.mean(0))
    assert not sae.W_dec.any()  # the decoder starts at zero; the encoder does not
    assert sae.W_enc.abs().sum() > 0
