"""Store integrity: damaged chunks are refused on read, found by `saepipe verify` and
rewritten by `harvest --repair` to the unbroken bytes; stale configs are refused;
--force starts arrays over; chunks are durable before they are logged; a full disk
stops with one line and resumes to the same store; a small corpus says so."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner
from zarr.codecs import ZstdCodec

from helpers import harvest_config, make_model, write_corpus
from pipeline.config import config_from_dict
from pipeline.errors import UserError
from pipeline.store import ActivationStore, ProgressLog, chunk_file
from pipeline import harvest
from stages.cli import main as cli

SAEPIPE = str(Path(sys.executable).parent / "saepipe")
LAYER = "layers/1/resid_post"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    return make_model("gpt2", folder), folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")




def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    errors = [line for line in re.split(r"[\r\n]", res.stderr) if line.startswith("saepipe: error:")]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    return res, errors


def files(store_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store_dir)): p.read_bytes() for p in sorted(store_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(gpt2, corpus, tmp_path_factory):
    """An unbroken run: 24 windows of 16 tokens in 6 chunks of 4 sequences (tokens and layer 1)."""
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    harvest.run(config_from_dict(harvest_config(gpt2[1], corpus, run_dir)), progress=False)
    return run_dir


def copy_run(clean: Path, tmp_path: Path, gpt2, corpus, **harvest_keys):
    run_dir = tmp_path / "run"
    shutil.copytree(clean, run_dir)
    return run_dir, write_yaml(tmp_path / "c.yaml", harvest_config(gpt2[1], corpus, run_dir, **harvest_keys))


def damage(path: Path, how: str):
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # garbage of the same size
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


@pytest.mark.parametrize("array", [LAYER, "tokens"])
@pytest.mark.parametrize("how", ["delete", "truncate", "garbage"])
def test_damaged_chunk_refused_verified_and_repaired(how, array, clean, gpt2, corpus, tmp_path):
    run_dir, cfg_path = copy_run(clean, tmp_path, gpt2, corpus)
    store_dir = run_dir / "activations.zarr"
    chunk = store_dir / array / "c" / "2" / "0"
    assert chunk.is_file()
    damage(chunk, how)
    problem = "missing" if how == "delete" else "corrupt (checksum mismatch"

    # Train-style reads refuse the chunk in one line naming array, chunk, file and the repair.
    store = ActivationStore(run_dir)
    read = (lambda: store.read_chunk(1, "resid_post", 2)) if array == LAYER else (lambda: store.read_tokens(8, 12))
    with pytest.raises(UserError) as err:
        read()
    msg = str(err.value)
    assert "\n" not in msg and f"array {array} chunk 2 is {problem}" in msg
    assert str(chunk) in msg and "saepipe harvest CONFIG --repair" in msg
    with pytest.raises(UserError, match=f"chunk 2 is {re.escape(problem)}"):
        store.read_rows(1, "resid_post", 0, 384) if array == LAYER else store.read_tokens(0, 24)
    assert store.read_chunk(1, "resid_post", 1).shape == (64, 32)  # the sound chunks still read

    res, errors = invoke("verify", run_dir)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert f"{array} chunk 2 {problem}" in errors[0] and "--repair" in errors[0]
    if how == "delete":  # the quick path of a plain rerun notices, instead of "nothing to do"
        res, errors = invoke("harvest", cfg_path)
        assert res.exit_code == 2 and len(errors) == 1 and f"missing {array} chunk 2" in errors[0], res.output

    res, errors = invoke("harvest", cfg_path, "--repair")
    assert res.exit_code == 0, res.output
    assert "--repair: rewriting" in res.stdout
    res, errors = invoke("verify", run_dir)
    assert res.exit_code == 0 and "sound" in res.stdout, res.output
    assert files(store_dir) == files(clean / "activations.zarr")


@pytest.mark.parametrize("array", [LAYER, "tokens"])
def test_damaged_metadata_refused_and_repaired(array, clean, gpt2, corpus, tmp_path):
    run_dir, cfg_path = copy_run(clean, tmp_path, gpt2, corpus)
    meta = run_dir / "activations.zarr" / array / "zarr.json"
    damage(meta, "truncate")
    res, errors = invoke("verify", run_dir)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert f"{array} metadata (zarr.json) unreadable" in errors[0]
    res, errors = invoke("harvest", cfg_path)
    assert res.exit_code == 2 and len(errors) == 1 and f"the metadata of {array} ({meta}) cannot be read" in errors[0]
    res, errors = invoke("harvest", cfg_path, "--repair")
    assert res.exit_code == 0, res.output
    assert files(run_dir / "activations.zarr") == files(clean / "activations.zarr")
    meta.unlink()  # lost outright: verify still sees the array through its folder and logs
    res, errors = invoke("verify", run_dir)
    assert res.exit_code == 2 and f"{array} metadata (zarr.json) missing" in errors[0], res.output


def test_every_chunk_logged_but_not_marked_complete_is_finished(clean, gpt2, corpus, tmp_path):
    # A kill after the last chunk's log line, before `complete` was set: a rerun only marks it.
    run_dir, cfg_path = copy_run(clean, tmp_path, gpt2, corpus)
    ActivationStore(run_dir, mode="a").group[LAYER].attrs["complete"] = False
    res, errors = invoke("harvest", cfg_path)
    assert res.exit_code == 0 and "are complete; nothing to do" in res.stdout, res.output
    assert ActivationStore(run_dir).array(1, "resid_post").attrs["complete"] is True
    assert files(run_dir / "activations.zarr") == files(clean / "activations.zarr")


def test_verify_flags_and_stores_without_checksums(clean, gpt2, corpus, tmp_path):
    run_dir, _ = copy_run(clean, tmp_path, gpt2, corpus)
    res, _ = invoke("verify", run_dir)
    assert res.exit_code == 0 and re.search(rf"{LAYER} +float32 +\[384, 32\] +6 chunks +crc32c +ok", res.stdout)

    # A complete array must have every chunk logged as written.
    log = next((run_dir / "progress").glob("1.resid_post.rank*.log"))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(line for line in lines if line != "3;") + "\n")
    res, errors = invoke("verify", run_dir)
    assert res.exit_code == 2 and len(errors) == 1
    assert f"{LAYER} marked complete but chunks 3 are not in its progress logs" in errors[0]
    # The same array while being harvested: only its logged chunks are checked.
    ActivationStore(run_dir, mode="a").group[LAYER].attrs["complete"] = False
    (run_dir / "activations.zarr" / LAYER / "c" / "3" / "0").unlink()
    res, _ = invoke("verify", run_dir)
    assert res.exit_code == 0 and "partial: 5 of 6 chunks written" in res.stdout, res.output

    # A store made before checksums: reads work, verify says what it cannot check.
    old = tmp_path / "old"
    group = zarr.open_group(str(old / "activations.zarr"), mode="w")
    group.attrs.update({"context_size": 16, "prepend_bos": False, "model": "m"})
    toks = group.create_array("tokens", shape=(8, 16), chunks=(4, 16), dtype="int32",
                              compressors=ZstdCodec(level=3), config={"write_empty_chunks": True})
    toks[:] = np.arange(128, dtype=np.int32).reshape(8, 16)
    toks.attrs["complete"] = True
    acts = torch.randn(128, 8)
    arr = group.create_array(LAYER, shape=(128, 8), chunks=(64, 8), dtype="float32", compressors=ZstdCodec(level=3),
                             config={"write_empty_chunks": True},
                             attributes={"logical_dtype": "float32", "codec": "zstd", "complete": True})
    arr[:] = acts.numpy()
    for c in (0, 1):
        ProgressLog(old, 1, "resid_post").add(c)
    store = ActivationStore(old)
    assert torch.equal(store.read_chunk(1, "resid_post", 1), acts[64:])
    res, _ = invoke("verify", old)
    assert res.exit_code == 0 and res.stdout.count("unchecksummed") == 2, res.output
    damage(chunk_file(arr, 1), "garbage")
    with pytest.raises(UserError, match=f"array {LAYER} chunk 1 is corrupt \\(cannot decode"):
        store.read_rows(1, "resid_post", 0, 128)
    chunk_file(arr, 1).unlink()
    res, errors = invoke("verify", old)
    assert res.exit_code == 2 and f"{LAYER} chunk 1 missing" in errors[0]


@pytest.mark.parametrize("key, value, needle", [
    ("harvest.n_tokens", 16 * 20, "harvest.n_tokens: 384 there, 320 now"),
    ("harvest.context_size", 8, "harvest.context_size: 16 there, 8 now"),
    ("harvest.prepend_bos", False, "harvest.prepend_bos: None there, False now"),
    ("data.text_column", "body", "data.text_column: 'text' there, 'body' now"),
    ("data.contents", None, "data.sha256: "),
    ("harvest.storage_dtype", "bfloat16", "harvest.storage_dtype: 'float32' there, 'bfloat16' now"),
    ("harvest.codec", "lz4", "harvest.codec: 'zstd' there, 'lz4' now"),
    ("harvest.chunk_rows", 32, "harvest.chunk_rows: 64 there, 32 now"),
    ("model.dtype", "bfloat16", "model.dtype: 'float32' there, 'bfloat16' now"),
])
def test_changed_config_refused(key, value, needle, clean, gpt2, corpus, tmp_path):
    if key == "data.contents":  # same path, other bytes: needs a corpus of its own
        own = write_corpus(tmp_path / "own.jsonl")
        run_dir = tmp_path / "run"
        raw = harvest_config(gpt2[1], own, run_dir)
        harvest.run(config_from_dict(raw), progress=False)
        own.write_text(own.read_text().replace("Doc 3:", "Doc three:"))
    else:
        run_dir, _ = copy_run(clean, tmp_path, gpt2, corpus)
        raw = harvest_config(gpt2[1], corpus, run_dir)
        section, name = key.split(".")
        raw[section][name] = value
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    res, errors = invoke("harvest", write_yaml(tmp_path / "changed.yaml", raw))
    assert res.exit_code == 2 and len(errors) == 1 and needle in errors[0], res.output
    per_array = key in ("harvest.storage_dtype", "harvest.codec", "harvest.chunk_rows", "model.dtype")
    assert ("--force" in errors[0]) == per_array
    assert ("new run_dir" in errors[0]) != per_array
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()} == before


def test_force_restarts_an_array_and_new_layers_may_differ(clean, gpt2, corpus, tmp_path):
    run_dir, _ = copy_run(clean, tmp_path, gpt2, corpus)
    # A new layer is a new array: its own storage_dtype is fine without --force.
    bf16 = harvest_config(gpt2[1], corpus, run_dir, storage_dtype="bfloat16", layers=[1, 2])
    cfg_path = write_yaml(tmp_path / "bf16.yaml", bf16)
    res, errors = invoke("harvest", cfg_path, "--layers", "2")
    assert res.exit_code == 0, res.output
    res, errors = invoke("harvest", cfg_path, "--force")
    assert res.exit_code == 0 and "--force: layer 1 resid_post starts over" in res.stdout, res.output
    ref = tmp_path / "ref"
    harvest.run(config_from_dict(dict(bf16, run_dir=str(ref))), progress=False)
    assert files(run_dir / "activations.zarr") == files(ref / "activations.zarr")


def test_float16_overflow_then_force(gpt2, tmp_path):
    model, folder = gpt2
    loud = tmp_path / "loud"
    shutil.copytree(folder, loud)
    with torch.no_grad():
        w = model.transformer.wte.weight
        saved = w[33].clone()  # token 33 is "@", found only in the corpus's later documents
        w[33] *= 1e8
        model.save_pretrained(loud)
        w[33] = saved
    data = write_corpus(tmp_path / "at.jsonl", n_docs=4)
    with data.open("a") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"Doc {i}: the quick @ brown @ fox"}) + "\n")
    raw = harvest_config(loud, data, tmp_path / "run", layers=[0], storage_dtype="float16", writer_threads=1)
    res, errors = invoke("harvest", write_yaml(tmp_path / "c.yaml", raw))
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "float16 overflow" in errors[0] and "bfloat16" in errors[0] and "harvest CONFIG --force" in errors[0]
    logged = ProgressLog(tmp_path / "run", 0, "resid_post").done()
    assert 0 < len(logged) < 6, "the overflow should come after some chunks were written"

    raw["harvest"]["storage_dtype"] = "bfloat16"
    cfg_path = write_yaml(tmp_path / "c.yaml", raw)
    res, errors = invoke("harvest", cfg_path)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "is partly harvested with other settings: harvest.storage_dtype: 'float16' there" in errors[0]
    assert "make harvest ARGS=--force" in errors[0]
    res, errors = invoke("harvest", cfg_path, "--force")
    assert res.exit_code == 0, res.output
    harvest.run(config_from_dict(dict(raw, run_dir=str(tmp_path / "ref"))), progress=False)
    assert files(tmp_path / "run" / "activations.zarr") == files(tmp_path / "ref" / "activations.zarr")


def test_chunks_durable_before_logged(gpt2, corpus, tmp_path, monkeypatch):
    events = []
    real_fsync, real_add = os.fsync, ProgressLog.add

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def add(self, chunk):
        events.append(("log", str(self.path), chunk))
        real_add(self, chunk)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ProgressLog, "add", add)
    run_dir = tmp_path / "run"
    harvest.run(config_from_dict(harvest_config(gpt2[1], corpus, run_dir, layers=[1, 2], writer_threads=1)),
                progress=False)
    store_dir = (run_dir / "activations.zarr").resolve()
    logs = [i for i, e in enumerate(events) if e[0] == "log"]
    assert len(logs) == 12  # 6 chunks of each of two layers
    for i in logs:
        _, log_path, c = events[i]
        array = f"layers/{Path(log_path).name.split('.')[0]}/resid_post"
        chunk = store_dir / array / "c" / str(c) / "0"
        assert events[i - 3:i] == [("fsync", str(chunk)), ("fsync", str(chunk.parent)),
                                   ("fsync", str(chunk.parent.parent))], events[i - 3:i]
        # (the first line of a new log first makes its `progress/` folder durable)
        assert ("fsync", str(Path(log_path).resolve())) in events[i + 1:i + 3]
    for layer in (1, 2):
        meta = ("fsync", str(store_dir / f"layers/{layer}/resid_post/zarr.json"))
        assert meta in events[logs[-1]:], "`complete` must be made durable after the last chunk"


def test_disk_full_stops_in_one_line_and_resumes(gpt2, corpus, tmp_path):
    raw = harvest_config(gpt2[1], corpus, tmp_path / "run", layers=[1, 2])
    harvest.run(config_from_dict(dict(raw, harvest={**raw["harvest"], "layers": [1]})), progress=False)
    layer1 = files(tmp_path / "run" / "activations.zarr" / "layers" / "1")
    cfg_path = write_yaml(tmp_path / "c.yaml", raw)
    limit = 4096  # below one zstd chunk of layer 2 (64 x 32 float32), above every metadata file

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run([SAEPIPE, "harvest", str(cfg_path)], capture_output=True, text=True, preexec_fn=small_files)
    errors = [line for line in re.split(r"[\r\n]", full.stderr) if line.startswith("saepipe: error:")]
    assert full.returncode == 2 and len(errors) == 1, full.stderr
    assert "file size limit was reached writing" in errors[0] and "activations.zarr/layers/2" in errors[0]
    assert "Traceback" not in full.stderr
    assert files(tmp_path / "run" / "activations.zarr" / "layers" / "1") == layer1

    rerun = subprocess.run([SAEPIPE, "harvest", str(cfg_path)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    harvest.run(config_from_dict(dict(raw, run_dir=str(tmp_path / "ref"))), progress=False)
    assert files(tmp_path / "run" / "activations.zarr") == files(tmp_path / "ref" / "activations.zarr")


def test_small_corpus_says_how_many_tokens(gpt2, corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2[1])
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    total = sum(len(tok(d, add_special_tokens=False).input_ids) + 1 for d in docs)  # + separator
    windows = total // 15  # BOS + 15 corpus tokens each
    harvest.run(config_from_dict(harvest_config(gpt2[1], corpus, tmp_path / "run", n_tokens=10**6)), progress=False)
    n = windows * 16
    lines = [line for line in capsys.readouterr().out.splitlines() if "the corpus gave" in line]
    assert lines == [f"harvest: the corpus gave {n} tokens ({windows} windows of 16), fewer than "
                     f"harvest.n_tokens = 1000000; the store holds those {n} tokens"]
    store = ActivationStore(tmp_path / "run")
    assert store.tokens.shape == (windows, 16) and store.attrs["n_tokens"] == n
    assert store.n_rows(1, "resid_post") == n



def test_verify_checks_trained_saes_against_their_marker(clean, gpt2, corpus, tmp_path):
    from pipeline.paths import sae_dir
    from pipeline.saes.topk import TopKSAE

    run_dir, _ = copy_run(clean, tmp_path, gpt2, corpus)
    folder = sae_dir(run_dir, 1, "resid_post")
    TopKSAE(32, 64, 4).save(folder)
    TopKSAE(32, 64, 4).save(folder.with_name("resid_post.partial"))  # work in progress: not checked
    res, _ = invoke("verify", run_dir)
    assert res.exit_code == 0, res.output
    assert re.search(r"saes/1/resid_post +ok \(sha256\)", res.stdout) and "partial" not in res.stdout
    assert "1 SAEs checked" in res.stdout

    # One flipped bit in the weights: same size, so only the hash can tell.
    weights = folder / "sae.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x10
    weights.write_bytes(bytes(blob))
    res, errors = invoke("verify", run_dir)
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert str(weights) in errors[0] and "--force" in errors[0]


def test_an_all_zero_chunk_rewritten_through_a_reopened_array_is_written(tmp_path):
    # write_empty_chunks is not stored in zarr.json: through an array reopened from disk (a resumed
    # or repaired harvest), zarr would delete a chunk equal to the fill value instead of writing it,
    # and the chunk would then read as missing.
    from pipeline.store import write_chunk, write_synthetic

    write_synthetic(tmp_path, torch.randn(64, 4), np.zeros((4, 16), dtype=np.int32), layer=0, chunk_rows=16)
    arr = ActivationStore(tmp_path, mode="a").array(0, "resid_post")
    chunk_file(arr, 1).unlink()
    write_chunk(arr, 1, np.zeros((16, 4), dtype=np.float32))
    assert chunk_file(arr, 1).is_file()
    assert torch.equal(ActivationStore(tmp_path).read_chunk(0, "resid_post", 1), torch.zeros(16, 4))
