"""The offline default, end to end: `configs/demo.yaml` with a small budget
runs harvest -> train -> collate through the CLI on the real MiniLM weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.demo_corpus import build
from pipeline.store import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
SAEPIPE = str(Path(sys.executable).parent / "saepipe")


def test_demo_config_end_to_end(tmp_path):
    corpus = tmp_path / "docstrings.jsonl"
    assert build(corpus, min_chars=150_000) > 100
    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"data.path={corpus}", "harvest.n_tokens=8192",
            "train.n_tokens=16384", "train.batch_size=1024", "train.expansion_factor=2",
            "train.eval_every=8", "train.checkpoint_every=8", "train.dormant_tokens=4096",
            "collate.n_top=5", "collate.n_random=3"]
    args = [a for s in sets for a in ("--set", s)]
    outputs = {}
    for stage in ("harvest", "train", "collate"):
        res = subprocess.run([SAEPIPE, stage, str(ROOT / "configs" / "demo.yaml"), *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, f"{stage} failed:\n{res.stderr[-3000:]}"
        outputs[stage] = res.stdout

    store = ActivationStore(run)
    assert store.entries() == [(2, "resid_post"), (3, "resid_post")]
    assert store.tokens.shape == (128, 64)
    x = store.read_rows(3, "resid_post", 0, 640).float()
    assert x.shape == (640, 384) and np.isfinite(x.numpy()).all() and x.std() > 0.01
    for layer in (2, 3):
        sae_dir = run / "saes" / str(layer) / "resid_post"
        cfg = json.loads((sae_dir / "cfg.json").read_text())
        assert cfg["d_in"] == 384 and cfg["n_latents"] == 768 and cfg["k"] == 32
        rec_dir = run / "records" / str(layer) / "resid_post"
        assert len(list((rec_dir / "features").glob("*.json"))) == 768
        feature = json.loads((rec_dir / "features" / "0.json").read_text())
        assert {"density", "mean_act", "top", "random", "hist"} <= feature.keys()
    # The demo ends by pointing at the viewer page, which exists.
    viewers = [w for line in outputs["collate"].splitlines() for w in line.split() if w.endswith(".html")]
    assert viewers and all(Path(v).exists() for v in viewers), outputs["collate"]
