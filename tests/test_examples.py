"""Every example config in configs/ runs end to end (harvest -> train -> collate).

Each runs on a tiny random model of the example's family and a tiny corpus:
only the model, the data file, run_dir and the budgets are overridden; every
other key of the example is used as written, so a key the code no longer
knows, or a value it refuses, fails here rather than in a newcomer's hands.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.viewer import read_features
from stages.cli import main
from helpers import make_model, write_corpus

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))

# The model family each example names (the real weights are too big or online-only for a test).
FAMILY = {"demo.yaml": "bert", "gpt2-small.yaml": "gpt2", "smollm2.yaml": "llama"}

# The keys a test may change: where things are, and how much work. The keys a
# test must not touch are everything else.
BUDGETS = {
    "harvest.n_tokens": 2048, "harvest.batch_size": 8,
    "train.n_tokens": 4096, "train.batch_size": 256, "train.dormant_tokens": 1024,
    "train.eval_every": 8, "train.checkpoint_every": 8,
    "collate.n_top": 4, "collate.n_random": 2, "collate.batch_size": 512,
}
# What a finished SAE folder holds.
SAE_FILES = ("metrics.jsonl", "loss.png", "loss.svg", "density.png", "density.svg", "sae.safetensors", "cfg.json",
             "done")


def test_every_example_has_a_family():
    assert {p.name for p in EXAMPLES} == set(FAMILY)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_runs_end_to_end(tmp_path, example):
    raw = yaml.safe_load(example.read_text())
    layers = raw["harvest"]["layers"]
    model = tmp_path / "model"
    make_model(FAMILY[example.name], model, n_layers=max(layers) + 1, d_model=32)
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=300, column=raw["data"].get("text_column", "text"))
    run = tmp_path / "run"
    sets = {"run_dir": run, "model.name": model, "data.path": corpus,
            # a key the example does not set stays unset: the override must not add one
            **{k: v for k, v in BUDGETS.items() if _has(raw, k)}}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    outputs = {}
    for stage in ("harvest", "train", "collate"):
        res = CliRunner().invoke(main, [stage, str(example), *args])
        assert res.exit_code == 0, f"{example.name}: {stage} failed:\n{res.output[-3000:]}"
        outputs[stage] = res.output

    hooks = raw["harvest"]["hooks"]
    expansion = raw["train"]["expansion_factor"]
    for layer in layers:
        for hook in hooks:
            sae = run / "saes" / str(layer) / hook
            cfg = json.loads((sae / "cfg.json").read_text())
            assert (cfg["layer"], cfg["hook"], cfg["d_in"]) == (layer, hook, 32)
            assert cfg["n_latents"] == 32 * expansion and cfg["k"] == raw["train"]["k"]
            assert sorted(p.name for p in sae.iterdir()) == sorted(SAE_FILES)
            # The weights readable like everything else (they were once written 0600).
            modes = {p.name: p.stat().st_mode & 0o777 for p in sae.iterdir()}
            assert set(modes.values()) == {modes["cfg.json"]}, modes
            records = run / "records" / str(layer) / hook
            assert sum(1 for _ in read_features(records)) == 32 * expansion
            assert (records / "viewer.html").exists()


def _has(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
