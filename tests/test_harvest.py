"""Stage 1: stored activations against independent references, resume after
SIGKILL, reruns on new layers, locking, and every bad input's one-line error."""

from __future__ import annotations

import fcntl
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_model, write_corpus
from pipeline.config import config_from_dict
from pipeline.errors import UserError
from pipeline.store import ActivationStore, ProgressLog, from_storage, to_storage
from pipeline import harvest
from stages.cli import main as cli

ARCHS = ["gpt2", "llama", "neox", "bert"]
SAEPIPE = str(Path(sys.executable).parent / "saepipe")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: (make_model(arch, root / arch), root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def raw_config(model_dir, corpus, run_dir, **harvest):
    return harvest_config(model_dir, corpus, run_dir, **{"layers": [1, 2], **harvest})


def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def reference(model, tokens, layer, hook="resid_post"):
    """Full forward (no early stop); resid_post from output_hidden_states, sublayers from a hook."""
    ids = torch.as_tensor(tokens).long()
    with torch.no_grad():
        if hook == "resid_post":
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            assert layer + 1 < len(hs) - 1, "the last entry has the final norm applied; test an inner layer"
            return hs[layer + 1].reshape(-1, hs[0].shape[-1])
        from pipeline.model import find_blocks, hook_module

        got = {}
        mod = hook_module(find_blocks(model)[layer], hook, layer)

        def keep(_m, _i, o):
            got["x"] = o[0] if isinstance(o, tuple) else o

        h = mod.register_forward_hook(keep)
        model(input_ids=ids)
        h.remove()
        return got["x"].reshape(-1, got["x"].shape[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_activations_match_reference(arch, models, corpus, tmp_path):
    model, folder = models[arch]
    hooks = ["resid_post", "attn_out", "mlp_out"] if arch in ("gpt2", "llama") else ["resid_post"]
    cfg = config_from_dict(raw_config(folder, corpus, tmp_path / "run", hooks=hooks))
    harvest.run(cfg, progress=False)
    store = ActivationStore(tmp_path / "run")
    tokens = store.read_tokens(0, 24)
    assert tokens.shape == (24, 16) and tokens.dtype == np.int32
    for layer in (1, 2):
        for hook in hooks:
            got = store.read_rows(layer, hook, 0, store.n_rows(layer, hook))
            want = reference(model, tokens, layer, hook)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Attributes make the store self-describing.
    attrs = store.attrs
    assert attrs["model"] == str(folder) and attrs["context_size"] == 16 and attrs["n_sequences"] == 24
    assert store.array(1, "resid_post").attrs["logical_dtype"] == "float32"


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_tokens_decode_back_to_corpus(arch, models, corpus, tmp_path):
    from transformers import AutoTokenizer

    _, folder = models[arch]
    cfg = config_from_dict(raw_config(folder, corpus, tmp_path / "run", layers=[0]))
    harvest.run(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = ActivationStore(tmp_path / "run").read_tokens(0, 24)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    assert (tokens[:, 0] == bos).all(), "each window opens with BOS (CLS for BERT)"
    body = tokens[:, 1:].reshape(-1).tolist()
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    expect = []
    for d in docs:
        expect += tok(d, add_special_tokens=False).input_ids + [sep]
        if len(expect) >= len(body):
            break
    assert body == expect[: len(body)]
    if arch == "gpt2":  # byte-level BPE is lossless: the text itself comes back
        first_doc = tok.decode(body[: body.index(sep)])
        assert first_doc == docs[0]


def test_bfloat16_round_trip_bit_exact(models, corpus, tmp_path):
    x = torch.randn(1000, 7) * torch.logspace(-30, 30, 7)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    b = x.to(torch.bfloat16)
    back = from_storage(to_storage(b, "bfloat16"), "bfloat16")
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), b.view(torch.int16))
    # Through a harvest: the bf16 store equals the fp32 store cast to bf16, bit for bit.
    _, folder = models["gpt2"]
    for dtype in ("float32", "bfloat16"):
        harvest.run(config_from_dict(raw_config(folder, corpus, tmp_path / dtype, storage_dtype=dtype)),
                    progress=False)
    f32 = ActivationStore(tmp_path / "float32").read_rows(1, "resid_post", 0, 384)
    bf = ActivationStore(tmp_path / "bfloat16").read_rows(1, "resid_post", 0, 384)
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf.view(torch.int16), f32.to(torch.bfloat16).view(torch.int16))


def test_new_layer_rerun_aligns_and_finished_layer_is_noop(models, corpus, tmp_path, capsys):
    model, folder = models["llama"]
    raw = raw_config(folder, corpus, tmp_path / "run", layers=[1])
    harvest.run(config_from_dict(raw), progress=False)
    store_dir = tmp_path / "run" / "activations.zarr"
    tokens_before = ActivationStore(tmp_path / "run").read_tokens(0, 24)
    chunk_files = sorted((store_dir / "layers" / "1" / "resid_post").rglob("c/*"))
    mtimes = [p.stat().st_mtime_ns for p in chunk_files]

    out = harvest.run(config_from_dict(raw), layers=[2], progress=False)
    assert out["harvested"] == [(2, "resid_post")]
    store = ActivationStore(tmp_path / "run")
    assert np.array_equal(store.read_tokens(0, 24), tokens_before)
    torch.testing.assert_close(store.read_rows(2, "resid_post", 0, 384), reference(model, tokens_before, 2),
                               rtol=1e-4, atol=1e-5)
    assert [p.stat().st_mtime_ns for p in chunk_files] == mtimes, "layer 1 was rewritten"

    capsys.readouterr()
    assert harvest.run(config_from_dict(raw), layers=[1], progress=False)["harvested"] == []
    assert "already harvested" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in chunk_files] == mtimes

    # A changed dataset cannot be added to this run: the tokens would not line up.
    other = write_corpus(tmp_path / "other.jsonl", n_docs=300)
    lines = other.read_text().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n")
    bad = dict(raw, data={"path": str(other)})
    with pytest.raises(UserError) as err:
        harvest.run(config_from_dict(bad), layers=[3], progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{store_dir} was harvested with other settings: "
                                               f"data.path: {str(corpus)!r} there, {str(other)!r} now; data.sha256: ")
    assert msg.endswith("so use a new run_dir for the new settings, or restore the old ones")
    assert not ActivationStore(tmp_path / "run").has(3, "resid_post")


def test_sigkill_resume_matches_uninterrupted(models, corpus, tmp_path):
    _, folder = models["gpt2"]
    big = write_corpus(tmp_path / "big.jsonl", n_docs=3000)
    raw = raw_config(folder, big, tmp_path / "killed", n_tokens=32 * 400, context_size=32, chunk_rows=64,
                     batch_size=2, layers=[1, 2], writer_threads=1)
    cfg_path = write_yaml(tmp_path / "killed.yaml", raw)
    proc = subprocess.Popen([SAEPIPE, "harvest", str(cfg_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = ProgressLog(tmp_path / "killed", 2, "resid_post")
    deadline = time.time() + 120
    while time.time() < deadline and len(log.done()) < 40 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_chunks = 400 // 2
    done_at_kill = len(log.done())
    assert 0 < done_at_kill < n_chunks, "the kill should land mid-run"

    rerun = subprocess.run([SAEPIPE, "harvest", str(cfg_path)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    raw_ref = dict(raw, run_dir=str(tmp_path / "clean"))
    harvest.run(config_from_dict(raw_ref), progress=False)
    a = ActivationStore(tmp_path / "killed")
    assert all(a.array(layer, "resid_post").attrs["complete"] for layer in (1, 2))

    def files(run):  # every file of the store, torn temp files included
        root = tmp_path / run / "activations.zarr"
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files("killed") == files("clean")


def test_second_harvest_refuses_while_locked(models, corpus, tmp_path):
    _, folder = models["gpt2"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg_path = write_yaml(tmp_path / "c.yaml", raw_config(folder, corpus, run_dir))
    with open(run_dir / ".harvest.rank0.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = CliRunner().invoke(cli, ["harvest", str(cfg_path)])
    assert res.exit_code == 2
    assert "another `saepipe harvest` is working on" in res.stderr
    assert not (run_dir / "activations.zarr").exists()


def _expect_error(tmp_path, raw, needle, args=()):
    cfg_path = write_yaml(tmp_path / "bad.yaml", raw)
    res = CliRunner().invoke(cli, ["harvest", str(cfg_path), *args])
    errors = [line for line in re.split(r"[\r\n]", res.stderr) if line.startswith("saepipe: error:")]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not Path(raw["run_dir"]).exists(), "a failed harvest must not write"
    return errors[0]


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_field", "below_context", "layer_range",
                                  "unknown_hook", "unknown_hook_path", "text_column", "empty", "unwritable"])
def test_bad_inputs_one_line_exit_2(case, models, corpus, tmp_path):
    _, folder = models["gpt2"]
    raw = raw_config(folder, corpus, tmp_path / "run")
    if case == "unknown_key":
        raw["harvest"]["layer"] = 3
        _expect_error(tmp_path, raw, "unknown key harvest.layer")
    elif case == "wrong_type":
        raw["harvest"]["n_tokens"] = "lots"
        _expect_error(tmp_path, raw, "harvest.n_tokens")
    elif case == "missing_field":
        del raw["model"]["name"]
        _expect_error(tmp_path, raw, "missing required key model.name")
    elif case == "below_context":
        raw["harvest"]["n_tokens"] = 10
        _expect_error(tmp_path, raw, "below one context")
    elif case == "layer_range":
        _expect_error(tmp_path, raw, "layer 7 is out of range", ["--layers", "7"])
    elif case == "unknown_hook":
        raw["harvest"]["hooks"] = ["resid-post"]
        _expect_error(tmp_path, raw, "unknown hook")
    elif case == "unknown_hook_path":
        raw["harvest"]["hooks"] = ["mlp.nonexistent"]
        _expect_error(tmp_path, raw, "has no module mlp.nonexistent")
    elif case == "text_column":
        raw["data"]["text_column"] = "body"
        _expect_error(tmp_path, raw, "data.text_column 'body'")
    elif case == "empty":
        empty = tmp_path / "empty.jsonl"
        empty.write_text(json.dumps({"text": "tiny"}) + "\n")
        raw["data"]["path"] = str(empty)
        _expect_error(tmp_path, raw, "gave no text")
    elif case == "unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        raw["run_dir"] = str(blocker / "run")
        _expect_error(tmp_path, raw, "is not writable")
