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

    if FAMILY[example.name] == "bert":  # an encoder: collate says why its records have no logit lens
        assert "collate: the records get no logit lens: " in outputs["collate"]
        assert "has no language-model head" in outputs["collate"]
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


# ---------------------------------------------------------------------------
# The logit lens on every causal family, harvest -> train -> collate

# family: (the hook harvested, the final norm's path, its math, its eps: a config key or the
# number the family's code fixes). The hooks take turns so each kind runs end to end on some
# family, the sandwich norms of Gemma and OLMo2 among them (OPT's mlp_out: test_families.py).
LENS = {
    "llama": ("resid_post", "model.norm", "rms", "rms_norm_eps"),
    "gpt2": ("attn_out", "transformer.ln_f", "ln", "layer_norm_epsilon"),
    "qwen2": ("mlp_out", "model.norm", "rms", "rms_norm_eps"),
    "qwen3": ("resid_post", "model.norm", "rms", "rms_norm_eps"),
    "gemma2": ("attn_out", "model.norm", "gemma", "rms_norm_eps"),
    "gemma3": ("mlp_out", "model.norm", "gemma", "rms_norm_eps"),
    "mistral": ("resid_post", "model.norm", "rms", "rms_norm_eps"),
    "phi3": ("attn_out", "model.norm", "rms", "rms_norm_eps"),
    "neox": ("mlp_out", "gpt_neox.final_layer_norm", "ln", "layer_norm_eps"),
    "falcon": ("mlp_out", "transformer.ln_f", "ln", "layer_norm_epsilon"),
    "gptj": ("attn_out", "transformer.ln_f", "ln", "layer_norm_epsilon"),
    "stablelm": ("resid_post", "model.norm", "ln", "layer_norm_eps"),
    "olmo": ("attn_out", "model.norm", "ln_bare", 1e-5),
    "olmo2": ("mlp_out", "model.norm", "rms", "rms_norm_eps"),
    "opt": ("resid_post", "model.decoder.final_layer_norm", "ln", 1e-5),
    "phi": ("mlp_out", "model.final_layernorm", "ln", "layer_norm_eps"),
    "mamba": ("resid_post", "backbone.norm_f", "rms", "layer_norm_epsilon"),  # no attention, no MLP
}


def _final_norm(kind: str, w, eps: float, x):
    """The family's final norm of x, its bias left out (as the lens leaves it out: no latent's)."""
    import torch

    if kind in ("rms", "gemma"):
        gain = w.weight if kind == "rms" else 1 + w.weight  # Gemma stores its gain minus one
        return gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    centred = x - x.mean(-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return normed if kind == "ln_bare" else w.weight * normed


def test_lens_table_covers_every_causal_family():
    from helpers import CAUSAL

    assert set(LENS) == set(CAUSAL)


@pytest.mark.parametrize("family", list(LENS))
def test_logit_lens_on_every_family(tmp_path, family):
    """The records' promoted and suppressed tokens are W_U · norm(W_dec[i]) with the family's
    final norm written out by hand (its gain random, so skipping it changes which tokens win)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.saes import load_sae

    hook, norm_path, kind, eps = LENS[family]
    model_dir = tmp_path / "model"
    make_model(family, model_dir, n_layers=2, d_model=32, random_norms=True)
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=60)
    run = tmp_path / "run"
    raw = {
        "run_dir": str(run),
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"path": str(corpus)},
        "harvest": {"layers": [1], "hooks": [hook], "n_tokens": 16 * 32, "context_size": 16, "batch_size": 16,
                    "storage_dtype": "float32", "chunk_rows": 64},
        "train": {"expansion_factor": 2, "k": 4, "n_tokens": 1024, "batch_size": 128, "dormant_tokens": 512,
                  "init_sample": 256, "eval_every": 8, "checkpoint_every": 8, "device": "cpu"},
        "collate": {"n_top": 2, "n_random": 1, "batch_size": 256, "device": "cpu"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    for stage in ("harvest", "train", "collate"):
        res = CliRunner().invoke(main, [stage, str(config)])
        assert res.exit_code == 0, f"{family}: {stage} failed:\n{res.output[-3000:]}"

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eps = getattr(lm.config, eps) if isinstance(eps, str) else eps
    W_dec = load_sae(run / "saes" / "1" / hook).W_dec.detach().float()
    with torch.no_grad():
        logits = _final_norm(kind, lm.get_submodule(norm_path), eps, W_dec) @ lm.get_output_embeddings().weight.T
    up, down = logits.topk(10, dim=1), logits.topk(10, dim=1, largest=False)
    records = run / "records" / "1" / hook
    features = list(read_features(records))
    assert len(features) == W_dec.shape[0] == 64
    for i, f in enumerate(features):
        assert f["top_upvote_token_ints"] == up.indices[i].tolist(), (family, i)
        assert f["top_downvote_token_ints"] == down.indices[i].tolist(), (family, i)
        assert f["top_upvotes_logits"] == pytest.approx(up.values[i].tolist(), abs=2e-5)
        assert f["top_downvotes_logits"] == pytest.approx(down.values[i].tolist(), abs=2e-5)
    summary = json.loads((records / "summary.json").read_text())
    assert summary["logit_lens"] == {"model": str(model_dir), "k": 10, "vocab": logits.shape[1]}
