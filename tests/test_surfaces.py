"""The edges of steer, stores, export and verify (issue 23): a prompt past the model's
positions, non-finite or repeated strengths, a store that cannot outlive the process or
sits where a file is, an --out that cannot be made, and a run damaged in two places.
Each is one line and exit 2 (or one note and a sound result), with nothing left behind."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_tokenizer, write_corpus
from pipeline import fsio, steer
from pipeline.config import config_from_dict
from pipeline.errors import UserError
from pipeline.paths import sae_dir
from pipeline.saes.topk import TopKSAE
from pipeline.store import write_synthetic
from stages.cli import main as cli

LAYERS, D, POSITIONS = 3, 32, 32
PHRASE = "The quick brown fox jumps over the lazy dog. "


def invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def one_line(res, *fragments) -> str:
    """The one error line on stderr (verify also prints its report on stdout)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), res.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- steer: the model's positions, strengths

def tiny_lm(arch: str, folder: Path, positions: int = POSITIONS):
    """A tiny random causal LM with few positions: gpt2 learns them (a table that ends), llama rotates them."""
    import transformers as tf

    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=D,
                                                 n_layer=LAYERS, n_head=4, **ids))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=2 * D,
                                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=positions, **ids))
    model.eval().save_pretrained(folder)
    return tok


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tmp_path_factory):
    """(arch, a config path, its Config, the tokenizer) with a saved SAE at layer 2 resid_post."""
    root = tmp_path_factory.mktemp(request.param)
    tok = tiny_lm(request.param, root / "model")
    raw = harvest_config(root / "model", write_corpus(root / "corpus.jsonl", 4), root / "run", layers=[2])
    TopKSAE(D, 16, 4).save(sae_dir(root / "run", 2, "resid_post"))
    return request.param, write_yaml(root / "c.yaml", raw), config_from_dict(raw), tok


def prompt_of(tok, n_tokens: int) -> str:
    """A prompt of exactly n_tokens tokens."""
    ids = tok(PHRASE * n_tokens).input_ids[:n_tokens]
    text = tok.decode(ids)
    assert len(tok(text).input_ids) == n_tokens
    return text


def steer_cli(path, *args):
    return invoke("steer", path, "--layer", 2, "--latent", 3, *args)


def test_a_prompt_that_fills_the_positions_is_refused(lm):
    _, path, _, tok = lm
    for n in (POSITIONS, POSITIONS + 9):
        one_line(steer_cli(path, "--strength", 4, "--prompt", prompt_of(tok, n)),
                 f"--prompt is {n} tokens", f"{POSITIONS} positions (config ",
                 f"shorten the prompt to at most {POSITIONS - 1} tokens")


def test_generation_stops_at_the_last_position_and_says_so(lm):
    # Learned positions (gpt2) used to end in an IndexError, rotary ones (llama) to run past the limit.
    arch, path, cfg, tok = lm
    n_prompt = POSITIONS - 5
    prompt = prompt_of(tok, n_prompt)
    lines = []
    rows = steer.run(cfg, 2, 3, [0.0, 20.0], prompt, max_new_tokens=200, echo=lines.append)
    assert lines[0] == (f"steer: the prompt's {n_prompt} tokens and --max-new-tokens 200 pass "
                        f"{'GPT2LMHeadModel' if arch == 'gpt2' else 'LlamaForCausalLM'}'s {POSITIONS} positions "
                        f"(config {'n_positions' if arch == 'gpt2' else 'max_position_embeddings'}); each "
                        f"continuation stops there, after 5 new tokens")
    assert "greedy, 5 new tokens" in lines[1]
    assert all(0 < len(ids) <= 5 for ids in rows.values()) and len(rows["clean"]) == 5

    res = steer_cli(path, "--strength", 4, "--prompt", prompt, "--max-new-tokens", 200)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("steer: the prompt's 27 tokens") and "after 5 new tokens" in res.output

    # What fits runs as asked, without a note.
    fits = []
    steer.run(cfg, 2, 3, [1.0], prompt, max_new_tokens=5, echo=fits.append)
    assert fits[0].startswith("steer layer 2") and "greedy, 5 new tokens" in fits[0]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_strength_is_refused(value, lm):
    _, path, cfg, _ = lm
    one_line(steer_cli(path, "--strength", 4, "--strength", value, "--prompt", "The cat", "--max-new-tokens", 3),
             f"--strength {float(value)} is not a finite number")
    with pytest.raises(UserError, match="is not a finite number"):
        steer.plan(cfg, 2, 3, [float(value)], "The cat")


def test_a_repeated_strength_gets_one_row_and_a_note(lm):
    _, path, cfg, _ = lm
    res = steer_cli(path, "--strength", 4, "--strength", "4.0", "--strength", 8, "--prompt", "The cat",
                    "--max-new-tokens", 3)
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == "steer: --strength 4 is given 2 times; one row for it (greedy is deterministic)"
    assert [line.split()[0] for line in lines[-3:]] == ["clean", "4", "8"]
    # Values that only print alike are distinct strengths: two rows, never one overwriting the other.
    rows = steer.run(cfg, 2, 3, [1.0000001, 1.0000002], "The cat", max_new_tokens=2, echo=lambda _: None)
    assert list(rows) == ["clean", "1.0000001", "1.0000002"]


# ---- stores

def test_a_memory_store_is_refused_by_every_stage(tmp_path):
    # memory:// lives in one process: harvest's store would be gone before train could read it.
    raw = harvest_config(tmp_path / "model", tmp_path / "corpus.jsonl", tmp_path / "run")
    path = write_yaml(tmp_path / "c.yaml", {**raw, "store": "memory://acts.zarr"})
    for stage in ("harvest", "train", "collate", "eval", "verify"):
        one_line(invoke(stage, path), "store = 'memory://acts.zarr' lives in one process's memory",
                 "give a folder or a lasting URL")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from helpers import make_model

    folder = tmp_path_factory.mktemp("gpt2")
    make_model("gpt2", folder, n_layers=3, d_model=D)
    return folder


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_store_where_a_file_is_is_one_line_and_leaves_nothing(where, gpt2_dir, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    store = blocker if where == "file" else blocker / "acts.zarr"
    raw = {**harvest_config(gpt2_dir, write_corpus(tmp_path / "corpus.jsonl", 40), tmp_path / "run"),
           "store": str(store)}
    line = one_line(invoke("harvest", write_yaml(tmp_path / "c.yaml", raw)), f"store {store} is not writable: ",
                    "is a file, not a folder; choose another store")
    assert (": it is a file" if where == "file" else f": {blocker} is a file") in line
    assert not (tmp_path / "run").exists(), "no run_dir, so no lock left in it"
    assert blocker.read_text() == "mine"


def test_harvest_leaves_no_lock_behind(gpt2_dir, tmp_path):
    from pipeline import harvest

    corpus = write_corpus(tmp_path / "corpus.jsonl", 40)
    run_dir = tmp_path / "run"
    harvest.run(config_from_dict(harvest_config(gpt2_dir, corpus, run_dir)), progress=False)
    assert not list(run_dir.glob(".*.lock"))
    # Refused under the lock (--repair plans against the array, made with another storage_dtype): no lock either.
    other = config_from_dict(harvest_config(gpt2_dir, corpus, run_dir, storage_dtype="float16"))
    with pytest.raises(UserError, match="harvest.storage_dtype: 'float32' there, 'float16' now"):
        harvest.run(other, progress=False, repair=True)
    assert not list(run_dir.glob(".*.lock"))


def test_run_lock_removes_its_file_and_never_locks_an_orphan(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        with fsio.run_lock(tmp_path, "stage"):
            assert (tmp_path / ".stage.lock").exists()
            raise RuntimeError("the stage failed")
    assert not (tmp_path / ".stage.lock").exists()

    # Another process's lock file is its own: refused, and left where it is.
    with open(tmp_path / ".stage.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `saepipe stage` is working on"):
            with fsio.run_lock(tmp_path, "stage"):
                pass
        assert (tmp_path / ".stage.lock").exists()
    os.unlink(tmp_path / ".stage.lock")

    # The holder before us finishes between our open and our flock: the file we opened is gone,
    # a lock on it would guard nothing, so the lock is taken on the file that has the name now.
    real = fcntl.flock
    raced = []

    def finish_first(f, op):
        if not raced and op & fcntl.LOCK_EX:
            raced.append(os.fstat(f.fileno()).st_ino)
            os.unlink(tmp_path / ".stage.lock")
            (tmp_path / ".stage.lock").write_text("")
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", finish_first)
    with fsio.run_lock(tmp_path, "stage"):
        monkeypatch.setattr(fcntl, "flock", real)
        assert os.stat(tmp_path / ".stage.lock").st_ino != raced[0]
        with open(tmp_path / ".stage.lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- export --out

@pytest.fixture
def saved(tmp_path):
    TopKSAE(8, 16, 2).save(tmp_path / "sae")
    return tmp_path / "sae"


def test_export_out_under_a_file_is_one_line(saved, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "sub"
    one_line(invoke("export", saved, "--format", "saelens", "--out", out),
             f"--out {out}: {tmp_path / 'notes.txt'} is a file, not a folder; choose another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sae"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc, which takes no new folders")
def test_export_out_where_no_folder_can_be_made_is_one_line(saved):
    one_line(invoke("export", saved, "--format", "saelens", "--out", "/proc/saepipe-out"),
             "--out /proc/saepipe-out: cannot create a folder in /proc (", "choose another --out")


def test_a_failed_export_removes_the_folders_it_made(saved, tmp_path, monkeypatch):
    def full(path, data, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fsio, "write_atomic", full)
    one_line(invoke("export", saved, "--format", "sparsify", "--out", tmp_path / "new" / "deep" / "out"),
             "the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


# ---- verify

def test_verify_names_both_a_damaged_store_and_a_damaged_sae(tmp_path):
    store = write_synthetic(tmp_path, torch.randn(16 * 8, 12), np.zeros((8, 16), dtype=np.int32), layer=1,
                            chunk_rows=32)
    chunk = tmp_path / "activations.zarr" / "layers" / "1" / "resid_post" / "c" / "2" / "0"
    chunk.unlink()
    folder = sae_dir(tmp_path, 1, "resid_post")
    TopKSAE(12, 24, 4).save(folder)
    weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    one_line(invoke("verify", tmp_path), f"{store.path} is damaged: layers/1/resid_post chunk 2 missing",
             "saepipe harvest CONFIG --repair", f"; also {weights} is truncated or damaged",
             "retrain it: saepipe train CONFIG --layers")
