"""`saepipe export`: SAELens and sparsify folder layouts, and their encoders give our latents."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.saes import load_sae, saved_marker, verify_saved
from pipeline.saes.topk import TopKSAE
from stages.cli import main

D, N, K = 24, 96, 6


def saved_sae(folder, normalize="none", decoder_scale=1.0):
    torch.manual_seed(0)
    sae = TopKSAE(D, N, K, normalize=normalize, backend="torch")
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(N, D))
        sae.W_dec.mul_(decoder_scale)
        sae.b_lat.copy_(0.1 * torch.randn(N))
        sae.b_pre.copy_(torch.randn(D))
    sae.save(folder, {"model": "tiny-model", "layer": 3, "hook": "resid_post", "context_size": 64,
                      "prepend_bos": True, "dataset": {"path": "some/dataset"}, "tokens_trained": 1000})
    return sae


def export(sae_dir, fmt, out):
    result = CliRunner().invoke(main, ["export", str(sae_dir), "--format", fmt, "--out", str(out)])
    return result.exit_code, result.output


def dense_topk(z, k):
    """Keep the k largest entries of each row, zero elsewhere."""
    top = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter_(-1, top.indices, top.values)


def saelens_layer_norm(x, eps=1e-5):
    x = x - x.mean(-1, keepdim=True)
    return x / (x.std(-1, keepdim=True) + eps)


def test_saelens_layout_and_encoding(tmp_path):
    sae = saved_sae(tmp_path / "sae")
    code, out = export(tmp_path / "sae", "saelens", tmp_path / "out")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    w = load_file(tmp_path / "out" / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D, N, K)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    meta = cfg["metadata"]
    assert meta["model_name"] == "tiny-model" and meta["hook_name"] == "blocks.3.hook_resid_post"
    assert meta["context_size"] == 64 and meta["prepend_bos"] is True and meta["dataset_path"] == "some/dataset"

    x = torch.randn(50, D) * 2
    theirs = torch.relu(dense_topk((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], cfg["k"]))
    torch.testing.assert_close(theirs, sae.encode_dense(x))
    x_hat = theirs @ w["W_dec"] + w["b_dec"]  # SAELens decode
    torch.testing.assert_close(x_hat, sae.decode_dense(sae.encode_dense(x)))


def test_sparsify_layout_and_encoding(tmp_path):
    sae = saved_sae(tmp_path / "sae")
    code, out = export(tmp_path / "sae", "sparsify", tmp_path / "out")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cfg.json", "sae.safetensors"]
    w = load_file(tmp_path / "out" / "sae.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    for key in ("activation", "expansion_factor", "num_latents", "k", "normalize_decoder", "multi_topk",
                "skip_connection", "transcode", "d_in"):
        assert key in cfg
    assert cfg["activation"] == "topk" and (cfg["num_latents"], cfg["k"], cfg["d_in"]) == (N, K, D)
    assert cfg["normalize_decoder"] is True

    x = torch.randn(50, D) * 2
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])  # sparsify's encoder
    top = pre.topk(cfg["k"], dim=-1, sorted=False)
    theirs = torch.zeros(50, N).scatter_(1, top.indices, top.values)
    torch.testing.assert_close(theirs, sae.encode_dense(x))


def test_layer_norm_sae_records_it_for_saelens_and_is_refused_by_sparsify(tmp_path):
    sae = saved_sae(tmp_path / "sae", normalize="layer_norm")
    assert export(tmp_path / "sae", "saelens", tmp_path / "lens")[0] == 0
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm"
    w = load_file(tmp_path / "lens" / "sae_weights.safetensors")
    x = torch.randn(40, D) * 3 + 1
    theirs = torch.relu(dense_topk((saelens_layer_norm(x) - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K))
    torch.testing.assert_close(theirs, sae.encode_dense(x))

    code, out = export(tmp_path / "sae", "sparsify", tmp_path / "sp")
    assert code == 2 and out.count("\n") == 1 and out.startswith("saepipe: error:") and "layer-normed" in out
    assert not (tmp_path / "sp").exists()


def test_folded_decoder_is_not_marked_unit_norm_for_sparsify(tmp_path):
    saved_sae(tmp_path / "sae", decoder_scale=0.5)
    assert export(tmp_path / "sae", "sparsify", tmp_path / "out")[0] == 0
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["normalize_decoder"] is False


def test_refuses_non_empty_out_and_missing_sae(tmp_path):
    saved_sae(tmp_path / "sae")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out = export(tmp_path / "sae", "saelens", tmp_path / "out")
    assert code == 2 and out.count("\n") == 1 and "not empty" in out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

    (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
    assert export(tmp_path / "sae", "saelens", tmp_path / "empty")[0] == 0

    code, out = export(tmp_path / "nothing", "saelens", tmp_path / "new")
    assert code == 2 and out.startswith("saepipe: error: no trained SAE") and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_round_trips_decoder_exactly(tmp_path, fmt):
    sae = saved_sae(tmp_path / "sae")
    assert export(tmp_path / "sae", fmt, tmp_path / "out")[0] == 0
    w = load_file(tmp_path / "out" / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors"))
    assert torch.equal(w["W_dec"], sae.W_dec.detach()) and torch.equal(w["b_dec"], sae.b_pre.detach())


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a weight's last bit: still parses, only the sha256 tells
    path.write_bytes(bytes(data))


BROKEN = {
    "truncated": ("sae.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "garbage of the same size": ("sae.safetensors", lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "corrupt"),
    "one bit flipped": ("sae.safetensors", _flip_one_byte, "corrupt"),
    "weights missing": ("sae.safetensors", lambda p: p.unlink(), "missing"),
    "no done marker": ("done", lambda p: p.unlink(), "no finished SAE"),
    "done marker garbage": ("done", lambda p: p.write_text("{\"sha"), "no finished SAE"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_damaged_sae_is_one_line_naming_the_file_and_how_to_retrain(tmp_path, case):
    name, damage, what = BROKEN[case]
    saved_sae(tmp_path / "sae")
    assert verify_saved(tmp_path / "sae") is None and saved_marker(tmp_path / "sae")["bytes"] > 0
    damage(tmp_path / "sae" / name)

    with pytest.raises(UserError) as e:
        load_sae(tmp_path / "sae")
    message = str(e.value)
    assert what in message and "saepipe train CONFIG --layers 3 --force" in message, message
    assert str(tmp_path / "sae" / ("sae.safetensors" if name == "sae.safetensors" else "")) in message
    assert verify_saved(tmp_path / "sae") == message

    code, out = export(tmp_path / "sae", "saelens", tmp_path / "out")
    assert code == 2 and out == f"saepipe: error: {message}\n"
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_save_writes_the_marker_last_with_size_and_sha256(tmp_path, monkeypatch):
    saved_sae(tmp_path / "sae")
    blob = (tmp_path / "sae" / "sae.safetensors").read_bytes()
    assert saved_marker(tmp_path / "sae") == {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                                              "format": 1}
    # A save over an old folder that dies half-way leaves no marker: not a finished SAE any more.
    real = fsio.write_atomic

    def dies_at_cfg(path, data, durable=True):
        if path.name == "cfg.json":
            raise KeyboardInterrupt
        real(path, data, durable)

    monkeypatch.setattr(fsio, "write_atomic", dies_at_cfg)
    with pytest.raises(KeyboardInterrupt):
        TopKSAE(D, N, K).save(tmp_path / "sae")
    assert saved_marker(tmp_path / "sae") is None and "no finished SAE" in verify_saved(tmp_path / "sae")


def test_read_only_out_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    saved_sae(tmp_path / "sae")
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and Path(file).parent.name.startswith(".out.tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    code, out = export(tmp_path / "sae", "sparsify", tmp_path / "out")
    assert code == 2 and out.count("\n") == 1 and "the file system is read-only" in out, out
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no --out, no temp folder
