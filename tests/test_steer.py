"""saepipe steer on a tiny random Llama: strength 0 is the clean generation, a decoder row
built to raise one token's logit makes the model say it, bad input is one line."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_model, write_corpus
from pipeline import steer
from pipeline.config import config_from_dict
from pipeline.paths import sae_dir
from pipeline.saes import load_sae
from pipeline.saes.topk import TopKSAE
from stages.cli import main

LAYERS, D, N_LATENTS, NEW = 3, 32, 16, 8
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = make_model("llama", folder, n_layers=LAYERS, d_model=D)
    return folder, model


def _setup(tmp_path, model_dir, layer=LAYERS - 1, rows: dict | None = None):
    """A config on model_dir and a saved SAE at (layer, resid_post) whose decoder rows are `rows`."""
    raw = harvest_config(model_dir, write_corpus(tmp_path / "corpus.jsonl", 4), tmp_path / "run", layers=[layer])
    sae = TopKSAE(D, N_LATENTS, k=4)
    with torch.no_grad():
        for i, row in (rows or {}).items():
            sae.W_dec[i] = row
    sae.save(sae_dir(tmp_path / "run", layer, "resid_post"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config_from_dict(raw), path


def _generate(model, tokenizer, prompt=PROMPT) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_strength_zero_is_the_clean_generation(tmp_path, llama):
    from transformers import AutoTokenizer

    folder, model = llama
    cfg, _ = _setup(tmp_path, folder)
    lines = []
    rows = steer.run(cfg, LAYERS - 1, 3, [0.0, 5.0], PROMPT, max_new_tokens=NEW, echo=lines.append)
    want = _generate(model, AutoTokenizer.from_pretrained(folder))
    assert rows["clean"] == want
    assert rows["0"] == want
    assert len(lines) == 6 and lines[-2].strip().startswith("0 ") and lines[-1].strip().startswith("5 ")


def test_large_strength_along_a_token_direction_says_that_token(tmp_path, llama):
    from transformers import AutoTokenizer

    folder, model = llama
    tokenizer = AutoTokenizer.from_pretrained(folder)
    clean = _generate(model, tokenizer)
    # The residual direction that maximises token t's logit through RMSNorm and W_U is
    # g * W_U[t] (scale-invariant norm): pick a t the clean run never says, for which it wins.
    g, W_U = model.model.norm.weight.detach(), model.lm_head.weight.detach()
    target, row = None, None
    for t in W_U.norm(dim=1).argsort(descending=True).tolist():
        if t in clean or t in tokenizer.all_special_ids:
            continue
        d = g * W_U[t]
        d = d / d.norm()
        if int((W_U @ (g * d)).argmax()) == t:
            target, row = t, d
            break
    assert target is not None
    cfg, _ = _setup(tmp_path, folder, rows={5: row})
    rows = steer.run(cfg, LAYERS - 1, 5, [0.0, 1000.0], PROMPT, max_new_tokens=NEW, echo=lambda _: None)
    assert target not in rows["0"]
    assert target in rows["1000"]


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_steered_generation_matches_a_hand_written_hook(tmp_path, llama, normalize):
    """x + S * W_dec[i] at every position of block L's output (times std(x) per token for a
    layer-normed SAE), checked against generate() under a plain forward hook."""
    from transformers import AutoTokenizer

    folder, model = llama
    cfg, _ = _setup(tmp_path, folder)
    path = sae_dir(tmp_path / "run", LAYERS - 1, "resid_post")
    sae = load_sae(path)
    sae.normalize = sae.cfg["normalize"] = normalize
    sae.save(path)
    row, s = sae.W_dec[7].detach(), 6.0

    def add(_mod, _inp, out):
        x = out[0] if isinstance(out, tuple) else out
        x = x + s * row * (x.std(-1, keepdim=True) if normalize == "layer_norm" else 1.0)
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handle = model.model.layers[LAYERS - 1].register_forward_hook(add)
    try:
        want = _generate(model, AutoTokenizer.from_pretrained(folder))
    finally:
        handle.remove()
    rows = steer.run(cfg, LAYERS - 1, 7, [s], PROMPT, max_new_tokens=NEW, echo=lambda _: None)
    assert rows["6"] == want and rows["6"] != rows["clean"]


def _cli(path, *args):
    return CliRunner().invoke(main, ["steer", str(path), *args])


def _one_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_cli_prints_a_row_per_strength(tmp_path, llama):
    _, path = _setup(tmp_path, llama[0])
    result = _cli(path, "--layer", str(LAYERS - 1), "--latent", "2", "--strength", "0", "--strength", "3",
                  "--prompt", PROMPT, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    rows = result.output.strip().splitlines()[-3:]
    assert [r.split()[0] for r in rows] == ["clean", "0", "3"]
    assert rows[0].split(None, 1)[1] == rows[1].split(None, 1)[1]  # strength 0 is the clean text


def test_cli_errors(tmp_path, llama):
    _, path = _setup(tmp_path, llama[0])
    base = ["--strength", "1", "--prompt", PROMPT]
    _one_line(_cli(path, "--layer", str(LAYERS - 1), "--latent", str(N_LATENTS), *base),
              f"--latent {N_LATENTS} is out of range", f"0..{N_LATENTS - 1}")
    _one_line(_cli(path, "--layer", "0", "--latent", "1", *base), "no trained SAE for layer 0 hook resid_post")
    _one_line(_cli(path, "--layer", str(LAYERS - 1), "--latent", "1", "--strength", "1", "--prompt", "  "),
              "--prompt is empty")


def test_cli_encoder_model_is_refused(tmp_path):
    bert = tmp_path / "bert"
    make_model("bert", bert, n_layers=2, d_model=D)
    _, path = _setup(tmp_path, bert, layer=1)
    _one_line(_cli(path, "--layer", "1", "--latent", "1", "--strength", "1", "--prompt", PROMPT),
              "no language-model head")
