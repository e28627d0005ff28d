"""Bad inputs before the first write: context longer than the model's positions,
broken corpora, hub ids without network, a missing device, and a token budget
far beyond the corpus. Each error is one line, exit 2, and no run_dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_model, write_corpus
from pipeline.data import make_windows
from pipeline.errors import UserError
from pipeline.model import check_context_size
from pipeline.store import ActivationStore
from stages.cli import main as cli

SAEPIPE = str(Path(sys.executable).parent / "saepipe")
COMMIT = "0" * 40  # a fake snapshot id in a hand-made Hugging Face cache


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "gpt2"
    return make_model("gpt2", folder, n_layers=2), folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def raw_config(model, data, run_dir, **harvest):
    return harvest_config(model, data, run_dir, **{"batch_size": 8, **harvest})


def error_line(stderr: str) -> str:
    """The one `saepipe: error:` line (progress bars may share stderr through carriage returns)."""
    errors = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("saepipe: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def harvest_fails(tmp_path, raw, *needles) -> str:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["harvest", str(cfg)])
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    line = error_line(res.stderr)
    for needle in needles:
        assert needle in line, line
    assert not Path(raw["run_dir"]).exists(), "a refused harvest must not write"
    return line


def saepipe_fails(tmp_path, raw, env: dict, *needles) -> str:
    """A subprocess, so the hub settings (read when huggingface_hub is imported) apply."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                              "HF_DATASETS_OFFLINE", "HF_ENDPOINT")}
    res = subprocess.run([SAEPIPE, "harvest", str(cfg)], capture_output=True, text=True, timeout=300,
                         env={**base, **env})
    assert res.returncode == 2, res.stderr
    line = error_line(res.stderr)
    # No retry chatter: the error is all that is printed.
    assert [x for x in res.stderr.splitlines() if x.strip()] == [line], res.stderr
    for needle in needles:
        assert needle in line, line
    assert not Path(raw["run_dir"]).exists()
    return line


def hub_cache(root: Path, repo_id: str, model_dir: Path, names=None) -> Path:
    """A Hugging Face hub cache holding `repo_id` at revision main (all files, or only `names`)."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        if names is None or f.name in names:
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def windows_reference(tokenizer, docs, context_size, prepend_bos, n_sequences):
    """Documents joined with the separator, cut into rows, BOS first: written out plainly."""
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    body = context_size - 1 if prepend_bos else context_size
    rows = [stream[i:i + body] for i in range(0, len(stream) - body + 1, body)][:n_sequences]
    return np.array([([tokenizer.bos_token_id] + r) if prepend_bos else r for r in rows],
                    dtype=np.int32).reshape(-1, context_size)


# ---------------------------------------------------------------------------
# 10: context_size above the model's positions


def test_context_size_above_positions_refused(gpt2, corpus, tmp_path):
    _, folder = gpt2  # n_positions = 256
    raw = raw_config(folder, corpus, tmp_path / "run", context_size=512, n_tokens=512 * 4, chunk_rows=512)
    line = harvest_fails(tmp_path, raw, "harvest.context_size = 512", "256 positions", "lower it")
    assert "n_positions" in line


def test_check_context_size_per_family(tmp_path):
    import transformers as tf

    for arch in ("gpt2", "llama", "bert"):
        model = make_model(arch, tmp_path / arch, n_layers=1, d_model=16)  # all declare 256 positions
        check_context_size(model, 256)
        with pytest.raises(UserError, match=r"context_size = 257 exceeds .*'s 256 positions"):
            check_context_size(model, 257)
    # RoBERTa numbers positions from padding_idx + 1: a table of 34 rows holds 32.
    roberta = tf.RobertaModel(tf.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32,
                                               max_position_embeddings=34, pad_token_id=1))
    check_context_size(roberta, 32)
    with pytest.raises(UserError, match="32 positions"):
        check_context_size(roberta, 33)
    with torch.no_grad():  # the refusal is the real limit: 32 runs, 33 is past the table
        roberta(input_ids=torch.full((1, 32), 5))
        with pytest.raises((IndexError, RuntimeError)):
            roberta(input_ids=torch.full((1, 33), 5))

    class NoLimit(torch.nn.Module):  # e.g. a model whose config names no position limit
        config = tf.PretrainedConfig()

    check_context_size(NoLimit(), 1 << 20)


# ---------------------------------------------------------------------------
# 11: corpus problems


@pytest.mark.parametrize("case", ["zero_bytes", "blank_lines", "malformed_line", "null_text", "number_text"])
def test_bad_corpus_one_line(case, gpt2, tmp_path):
    _, folder = gpt2
    data = write_corpus(tmp_path / "data.jsonl", n_docs=40)
    lines = data.read_text().splitlines()
    if case == "zero_bytes":
        data.write_bytes(b"")
        needles = ["is empty (0 bytes)", str(data)]
    elif case == "blank_lines":
        data.write_text("\n  \n\n")
        needles = ["only blank lines", str(data)]
    elif case == "malformed_line":
        lines[6] = '{"text": "unterminated}'
        data.write_text("\n".join(lines) + "\n")
        needles = ["line 7 is not valid JSON", str(data)]
    elif case == "null_text":
        lines[17] = json.dumps({"text": None})
        data.write_text("\n".join(lines) + "\n")
        needles = ["row 17 ", "data.text_column 'text'", "is null", "every row must be a string"]
    else:
        lines[23] = json.dumps({"text": 12345})
        data.write_text("\n".join(lines) + "\n")
        needles = ["row 23 ", "data.text_column 'text'", "is int 12345", "every row must be a string"]
    harvest_fails(tmp_path, raw_config(folder, data, tmp_path / "run"), *needles)


def test_bad_corpus_streaming_and_txt(gpt2, tmp_path):
    """Streaming parses while reading: the same lines come out. A .txt of blank lines is empty too."""
    _, folder = gpt2
    data = write_corpus(tmp_path / "data.jsonl", n_docs=40)
    lines = data.read_text().splitlines()
    lines[30] = '{"text": "a"} trailing'
    data.write_text("\n".join(lines) + "\n")
    raw = raw_config(folder, data, tmp_path / "run")
    raw["data"]["streaming"] = True
    harvest_fails(tmp_path, raw, "line 31 is not valid JSON")
    txt = tmp_path / "blank.txt"
    txt.write_text("\n\n\n")
    harvest_fails(tmp_path, raw_config(folder, txt, tmp_path / "run"), "only blank lines")


# ---------------------------------------------------------------------------
# 12: a device that is not there


def test_missing_device_refused_before_writing(gpt2, corpus, tmp_path):
    _, folder = gpt2
    raw = raw_config(folder, corpus, tmp_path / "run")
    raw["model"]["device"] = "mps"
    harvest_fails(tmp_path, raw, "model.device = 'mps'")


# ---------------------------------------------------------------------------
# 13: a token budget far beyond the corpus


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_windows_match_reference_across_blocks(gpt2, corpus, prepend_bos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2[1])
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    for n_sequences in (1, 7, 24, 10**6):
        want = windows_reference(tok, docs, 16, prepend_bos, n_sequences)
        for block_rows in (1, 5, 4096):  # blocks end inside and at the edge of the budget
            got, used = make_windows(iter(docs), tok, 16, n_sequences, prepend_bos, batch_docs=32,
                                     block_rows=block_rows, progress=False)
            assert used == prepend_bos and got.dtype == np.int32
            assert np.array_equal(got, want), (n_sequences, block_rows)
    assert len(want) < 10**6, "the last budget exceeds the corpus"


def test_huge_budget_memory_follows_corpus(gpt2, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2[1])
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tracemalloc.start()
    try:
        got, _ = make_windows(iter(docs), tok, 16, 10**12 // 16, None, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, windows_reference(tok, docs, 16, True, 10**12))
    assert peak < 64 << 20, f"peak {peak} bytes for a {got.nbytes}-byte result"


def test_huge_budget_harvests_what_the_corpus_gives(gpt2, corpus, tmp_path):
    from transformers import AutoTokenizer

    _, folder = gpt2
    raw = raw_config(folder, corpus, tmp_path / "run", n_tokens=10**12)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(cli, ["harvest", str(cfg)])
    assert res.exit_code == 0, (res.stderr, res.exception)
    tok = AutoTokenizer.from_pretrained(folder)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    want = windows_reference(tok, docs, 16, True, 10**12)
    store = ActivationStore(tmp_path / "run")
    assert np.array_equal(store.read_tokens(0, len(want)), want)
    assert store.n_rows(1, "resid_post") == want.size
    assert str(want.size) in res.stdout, "say how many tokens the corpus gave"


# ---------------------------------------------------------------------------
# 17: hub ids without network


@pytest.mark.parametrize("case", ["offline_env", "unreachable", "weights_not_cached", "dataset"])
def test_hub_id_not_cached_fails_fast(case, gpt2, corpus, tmp_path):
    _, folder = gpt2
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = {"HF_HOME": str(hf_home)}
    if case == "offline_env":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # nothing listens on port 9 of this machine: the connection is refused at once
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    raw = raw_config("some-org/some-model", corpus, tmp_path / "run")
    needles = ["model.name 'some-org/some-model'", "local Hugging Face cache", "local model folder"]
    if case == "weights_not_cached":  # tokenizer and config cached, weights not: the model load is refused
        hub_cache(hf_home, "some-org/some-model", folder, {"config.json", "tokenizer.json", "tokenizer_config.json"})
    if case == "dataset":
        raw = raw_config(folder, "some-org/some-dataset", tmp_path / "run")
        needles = ["dataset 'some-org/some-dataset'", "local Hugging Face cache", "data.path"]
    line = saepipe_fails(tmp_path, raw, env, *needles)
    assert ("HF_HUB_OFFLINE" in line) == (case == "offline_env")


def test_cached_hub_id_loads_without_network(gpt2, corpus, tmp_path):
    _, folder = gpt2
    hf_home = hub_cache(tmp_path / "hf", "some-org/tiny-gpt2", folder)
    raw = raw_config("some-org/tiny-gpt2", corpus, tmp_path / "run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    res = subprocess.run([SAEPIPE, "harvest", str(cfg)], capture_output=True, text=True, timeout=300,
                         env={**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert res.returncode == 0, res.stderr
    store = ActivationStore(tmp_path / "run")
    assert store.attrs["model"] == "some-org/tiny-gpt2"
    assert store.array(1, "resid_post").attrs["complete"]


def test_model_path_that_does_not_exist(gpt2, corpus, tmp_path):
    raw = raw_config(tmp_path / "no" / "such" / "model", corpus, tmp_path / "run")
    harvest_fails(tmp_path, raw, "no such folder")
