"""The offline demos, end to end through the CLI on the real weights with a small
budget: `configs/smollm2.yaml` (the causal LM `make demo` runs: harvest -> train
-> eval -> collate) and `configs/demo.yaml` (the MiniLM encoder example, which
has no LM head, so no eval)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo_corpus import build
from pipeline.store import ActivationStore
from pipeline.viewer import read_feature, read_features

ROOT = Path(__file__).resolve().parents[1]
SAEPIPE = str(Path(sys.executable).parent / "saepipe")
# (config, stages, layers, d_model, expansion_factor used here)
DEMOS = {
    "smollm2": (("harvest", "train", "eval", "collate"), (3, 6), 576, 1),
    "demo": (("harvest", "train", "collate"), (2, 3), 384, 2),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docstrings.jsonl"
    assert build(path, min_chars=150_000) > 100
    return path


@pytest.mark.parametrize("name", DEMOS)
def test_demo_config_end_to_end(tmp_path, corpus, name):
    stages, layers, d_model, expansion = DEMOS[name]
    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"data.path={corpus}", "harvest.n_tokens=4096",
            "train.n_tokens=8192", "train.batch_size=1024", f"train.expansion_factor={expansion}",
            "train.eval_every=4", "train.checkpoint_every=4", "train.dormant_tokens=4096",
            "collate.n_top=5", "collate.n_random=3"]
    if "eval" in stages:
        sets += ["eval.n_tokens=256"]
    args = [a for s in sets for a in ("--set", s)]
    outputs = {}
    for stage in stages:
        res = subprocess.run([SAEPIPE, stage, str(ROOT / "configs" / f"{name}.yaml"), *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, f"{stage} failed:\n{res.stderr[-3000:]}"
        outputs[stage] = res.stdout

    store = ActivationStore(run)
    assert store.entries() == [(layer, "resid_post") for layer in layers]
    assert store.tokens.shape == (64, 64)
    x = store.read_rows(layers[-1], "resid_post", 0, 640).float()
    assert x.shape == (640, d_model) and np.isfinite(x.numpy()).all() and x.std() > 0.01
    n_latents = d_model * expansion
    for layer in layers:
        sae_dir = run / "saes" / str(layer) / "resid_post"
        cfg = json.loads((sae_dir / "cfg.json").read_text())
        assert cfg["d_in"] == d_model and cfg["n_latents"] == n_latents and cfg["k"] == 32
        rec_dir = run / "records" / str(layer) / "resid_post"
        assert [f["index"] for f in read_features(rec_dir)] == list(range(n_latents))
        feature = read_feature(rec_dir, 0)
        assert {"density", "mean_act", "top", "random", "hist"} <= feature.keys()
        if "eval" in stages:
            ev = json.loads((sae_dir / "eval.json").read_text())
            assert ev["n_tokens"] == 256
            # A real LM on English-like text: far below the uniform log(vocab) = 10.8 nats;
            # zero-ablating an early residual stream destroys it.
            assert ev["ce_clean"] < 5.0 and ev["ce_zero"] > ev["ce_clean"] + 1.0, ev
            assert ev["ce_clean"] <= ev["ce_spliced"] + 1e-3 and math.isfinite(ev["kl"]), ev
    if "eval" in stages:
        table = outputs["eval"].strip().splitlines()
        assert table[0].split()[:4] == ["layer", "hook", "architecture", "ce_clean"] and len(table) == 1 + len(layers)
    # The demo ends by pointing at the viewer page, which exists.
    viewers = [w for line in outputs["collate"].splitlines() for w in line.split() if w.endswith(".html")]
    assert viewers and all(Path(v).exists() for v in viewers), outputs["collate"]
