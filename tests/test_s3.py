"""Stores on object storage: a run whose `store` is an s3:// URL on a local S3 server
(moto, its own process on 127.0.0.1) harvests, trains and collates to the very
bytes of a run on local disk, and the integrity rules hold there too: a missing
or corrupt chunk object is refused, found by verify and rewritten by --repair.
Any fsspec URL works the same way; memory:// is checked without a server."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_model, write_corpus
from pipeline.errors import UserError
from pipeline.paths import records_dir, sae_dir
from pipeline.store import ActivationStore, ChunkError, Location, write_synthetic
from s3server import S3Unavailable, local_s3
from stages.cli import main as cli

PREFIX = "runs/a/acts.zarr"


@pytest.fixture(scope="module")
def s3():
    try:
        with local_s3() as server:
            server.make_bucket("runs")
            yield server
    except S3Unavailable as e:
        pytest.skip(f"no local S3 server: {e}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3model")
    make_model("gpt2", root / "model")
    return root / "model", write_corpus(root / "corpus.jsonl")


def _config(tmp: Path, name: str, model, store: str | None = None, options: dict | None = None) -> Path:
    model_dir, corpus = model
    raw = harvest_config(model_dir, corpus, tmp / name)
    raw["train"] = {"n_latents": 64, "k": 4, "n_tokens": 64 * 30, "batch_size": 64, "eval_every": 10,
                    "log_every": 5, "checkpoint_every": 10, "device": "cpu", "eval_fraction": 0.2,
                    "eval_tokens": 128, "check_finite": True}
    raw["collate"] = {"n_top": 4, "n_random": 2, "device": "cpu"}
    if store:
        raw["store"], raw["store_options"] = store, options
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ok(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def _fails(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("saepipe: error: ")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


def _local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _s3_objects(s3, prefix: str = PREFIX) -> dict[str, bytes]:
    fs = s3.fs()
    return {key[len(prefix) + 1:]: fs.cat_file(key) for key in sorted(fs.find(prefix))}


def test_a_run_on_s3_is_the_run_on_local_disk(tmp_path, s3, model):
    local = _config(tmp_path, "local", model)
    remote = _config(tmp_path, "remote", model, f"s3://{PREFIX}", s3.options)
    for cfg in (local, remote):
        for stage in ("harvest", "train", "collate"):
            _ok(stage, cfg)

    # The store: every object is the local run's file, byte for byte; none landed in run_dir.
    disk, objects = _local_files(tmp_path / "local/activations.zarr"), _s3_objects(s3)
    assert len(disk) > 10 and objects == disk
    assert not (tmp_path / "remote/activations.zarr").exists()
    # The SAE and the records read from it: the same bytes.
    for folder in (sae_dir, records_dir):
        a, b = (_local_files(folder(tmp_path / name, 1, "resid_post")) for name in ("local", "remote"))
        assert a.keys() == b.keys() and len(a) > 3
        assert [k for k in a if a[k] != b[k] and k not in ("metrics.jsonl", "cfg.json", "done")] == []
    # cfg.json differs only in timing; the weights it vouches for are equal.
    sae = lambda name: (sae_dir(tmp_path / name, 1, "resid_post") / "sae.safetensors").read_bytes()  # noqa: E731
    assert sae("local") == sae("remote")

    # A rerun finds the store finished; verify through the config reads every object's checksum.
    assert "already harvested" in _ok("harvest", remote)
    out = _ok("verify", remote)
    assert f"verify: s3://{PREFIX}" in out and "sound" in out


def test_a_damaged_chunk_object_is_refused_found_and_repaired(tmp_path, s3, model):
    prefix = "runs/damaged/acts.zarr"
    cfg = _config(tmp_path, "run", model, f"s3://{prefix}", s3.options)
    _ok("harvest", cfg)
    fs, intact = s3.fs(), _s3_objects(s3, prefix)
    key = f"{prefix}/layers/1/resid_post/c"
    fs.rm_file(f"{key}/2/0")
    raw = bytearray(fs.cat_file(f"{key}/4/0"))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(f"{key}/4/0", bytes(raw))

    # A rerun of harvest lists the array's objects once and names the one that is gone.
    line = _fails("harvest", cfg)
    assert f"s3://{prefix} is damaged: missing layers/1/resid_post chunk 2;" in line and "--repair" in line
    line = _fails("train", cfg)
    assert f"chunk 2 is missing (s3://{key}/2/0)" in line and "--repair" in line
    line = _fails("verify", cfg)
    assert "chunk 2 missing" in line and "chunk 4 corrupt (checksum mismatch" in line
    _ok("harvest", cfg, "--repair")
    assert _s3_objects(s3, prefix) == intact
    assert "sound" in _ok("verify", cfg)


def test_a_store_that_cannot_be_reached_is_one_line(tmp_path, s3, model):
    # No such bucket: harvest cannot create the store, train finds none.
    cfg = _config(tmp_path, "nobucket", model, "s3://no-such-bucket/acts.zarr", s3.options)
    assert "cannot reach the store s3://no-such-bucket/acts.zarr" in _fails("harvest", cfg)
    assert "no activation store at s3://no-such-bucket/acts.zarr" in _fails("train", cfg)
    # A filesystem fsspec does not have, and options for a local store: refused at load.
    bad = _config(tmp_path, "badproto", model, "nosuchfs://x/acts.zarr")
    assert "no filesystem for nosuchfs://" in _fails("train", bad)
    raw = yaml.safe_load(bad.read_text())
    raw["store"] = str(tmp_path / "elsewhere.zarr")
    bad.write_text(yaml.safe_dump(raw))
    assert "store_options apply to a URL store only" in _fails("train", bad, "--set", "store_options={a: 1}")


def test_any_fsspec_url_reads_and_checks_its_chunks(tmp_path):
    # memory:// needs no server: the same reads, and the same refusal of a missing chunk.
    where = Location(tmp_path, "memory://saepipe-test/acts.zarr")
    acts = torch.randn(16 * 8, 12)
    tokens = np.arange(16 * 8, dtype=np.int32).reshape(8, 16)
    write_synthetic(where, acts, tokens, layer=0, chunk_rows=32)
    store = ActivationStore(where)
    assert store.path == "memory://saepipe-test/acts.zarr"
    assert torch.equal(store.read_rows(0, "resid_post", 0, 128), acts)
    assert np.array_equal(store.read_tokens(0, 8), tokens)
    assert not (tmp_path / "activations.zarr").exists()
    memory = fsspec.filesystem("memory")
    memory.rm_file("/saepipe-test/acts.zarr/layers/0/resid_post/c/1/0")
    with pytest.raises(ChunkError, match="chunk 1 is missing"):
        store.read_chunk(0, "resid_post", 1)
    with pytest.raises(UserError, match="no activation store at memory://"):
        ActivationStore(Location(tmp_path, "memory://saepipe-test/other.zarr"))
    memory.rm("/saepipe-test", recursive=True)


def test_a_store_that_fails_mid_run_is_one_line(tmp_path, monkeypatch):
    # The connection drops after the store was opened: a read names the store, a write the object,
    # each in one UserError (exit 2 at the CLI), and the write says the rerun resumes.
    from zarr.storage import FsspecStore

    from pipeline.store import write_chunk

    where = Location(tmp_path, "memory://saepipe-drop/acts.zarr")
    write_synthetic(where, torch.randn(64, 4), np.zeros((4, 16), dtype=np.int32), layer=0, chunk_rows=16)
    fresh, store = ActivationStore(where), ActivationStore(where)
    store.array(0, "resid_post")  # opened before the drop: the next read is of chunk data
    writable = ActivationStore(where, mode="a").array(0, "resid_post")

    async def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(FsspecStore, "get", refused)
    monkeypatch.setattr(FsspecStore, "set", refused)
    for s in (fresh, store):  # the array's metadata, then a chunk
        with pytest.raises(UserError, match="cannot reach the store memory://saepipe-drop/acts.zarr "
                                            r"\(ConnectionRefusedError"):
            s.read_chunk(0, "resid_post", 1)
    with pytest.raises(UserError, match="writing memory://saepipe-drop/acts.zarr/layers/0/resid_post/c/2/0 failed "
                                        r"\(ConnectionRefusedError.*rerun the same harvest"):
        write_chunk(writable, 2, np.zeros((16, 4), dtype=np.float32))
    monkeypatch.undo()
    fsspec.filesystem("memory").rm("/saepipe-drop", recursive=True)
