"""Harvest under torchrun: two gloo ranks, each forwarding its own chunks, write
the same store, byte for byte, as one process does."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as td
import yaml

from helpers import harvest_config, make_model, write_corpus
from pipeline.store import ActivationStore, ProgressLog, set_complete

pytestmark = pytest.mark.skipif(not td.is_available() or not td.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _files(run: Path) -> dict[str, bytes]:
    root = run / "activations.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _harvest(cfg_path: Path, ranks: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.cli", "harvest", str(cfg_path)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "stages.cli", "harvest", str(cfg_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])


def test_two_ranks_write_the_one_process_store(tmp_path):
    model_dir = tmp_path / "model"
    make_model("gpt2", model_dir)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    runs = {}
    for ranks in (1, 2):
        run = tmp_path / f"run{ranks}"
        raw = harvest_config(model_dir, corpus, run, layers=[1, 2])
        cfg_path = tmp_path / f"h{ranks}.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        out = _harvest(cfg_path, ranks)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[ranks] = (run, cfg_path)

    one, two = _files(runs[1][0]), _files(runs[2][0])
    assert one.keys() == two.keys() and len(one) > 10
    assert [k for k in one if one[k] != two[k]] == []
    store = ActivationStore(runs[2][0])
    n_chunks = store.n_chunks(1, "resid_post")
    assert n_chunks >= 4
    for layer in (1, 2):
        assert json.loads((runs[2][0] / f"activations.zarr/layers/{layer}/resid_post/zarr.json").read_text())[
            "attributes"]["complete"] is True
        # Each rank logged its own chunks, r, r + 2, ...: the work was split, not repeated.
        for rank in (0, 1):
            log = ProgressLog(runs[2][0], layer, "resid_post", rank=rank).path
            done = [int(line.rstrip(";")) for line in log.read_text().split()]
            assert sorted(done) == list(range(rank, n_chunks, 2))

    # A finished store: every rank says so and exits; nobody waits at a barrier.
    again = _harvest(runs[2][1], 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already harvested") == 2

    # Rank 1 killed after its first chunk (torchrun then stops rank 0, which had finished its own
    # chunks and was waiting): rank 1's later chunks are missing and no array is complete. The
    # rerun forwards just those and ends with the one-process store again.
    run = runs[2][0]
    store = ActivationStore(run, mode="a")
    for layer in (1, 2):
        ProgressLog(run, layer, "resid_post", rank=1).path.write_text("1;\n")
        for c in range(3, n_chunks, 2):
            (run / f"activations.zarr/layers/{layer}/resid_post/c/{c}/0").unlink()
        set_complete(store.array(layer, "resid_post", require_complete=False), False)
    resumed = _harvest(runs[2][1], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _files(run) == one


def test_a_rank_refused_by_its_lock_stops_the_launch(tmp_path):
    # Another harvest holds rank 1's lock: rank 1 says so in one line and torchrun stops rank 0
    # (waiting for rank 1 at the first barrier) instead of leaving it there.
    model_dir = tmp_path / "model"
    make_model("gpt2", model_dir)
    run = tmp_path / "run"
    cfg_path = tmp_path / "h.yaml"
    cfg_path.write_text(yaml.safe_dump(harvest_config(model_dir, write_corpus(tmp_path / "c.jsonl"), run)))
    run.mkdir()
    with open(run / ".harvest.rank1.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = _harvest(cfg_path, 2)
    assert out.returncode != 0
    assert "saepipe: error: another `saepipe harvest` is working on" in out.stdout + out.stderr
