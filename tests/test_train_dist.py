"""Training under torchrun: two gloo ranks, each computing its half of every batch,
give the one-process SAE (to fp32 rounding), with one set of files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as td

from pipeline.sae import TopKSAE
from test_train import REPO, config, random_store, sae_folder, write_config

pytestmark = pytest.mark.skipif(not td.is_available() or not td.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _train(cfg: str, ranks: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.cli", "train", cfg]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "stages.cli", "train", cfg]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_two_ranks_train_the_one_process_sae(tmp_path):
    saes = {}
    for ranks in (1, 2):
        run = tmp_path / f"run{ranks}"
        random_store(run, dtype="float32")
        # AuxK on (dormant after 2 batches), so its reductions are exercised too.
        cfg = write_config(tmp_path / f"t{ranks}.yaml", config(run, dormant_tokens=512))
        out = _train(cfg, ranks)
        assert out.returncode == 0, out.stderr[-3000:]
        saes[ranks] = sae_folder(run)
    one, two = TopKSAE.load(saes[1]), TopKSAE.load(saes[2])
    for name, a in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], a, rtol=1e-4, atol=1e-5, msg=name)
    # One writer: the metrics hold each logged step once, and the eval numbers match.
    rows = [json.loads(line) for line in (saes[2] / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    ev1, ev2 = one.cfg["eval"], two.cfg["eval"]
    assert ev2["fvu"] == pytest.approx(ev1["fvu"], rel=1e-4) and ev2["dead_frac"] == ev1["dead_frac"]
    train1 = [r for r in map(json.loads, (saes[1] / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    train2 = [r for r in rows if r["split"] == "train"]
    for a, b in zip(train1, train2):
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4) and b["dormant_frac"] == a["dormant_frac"]
