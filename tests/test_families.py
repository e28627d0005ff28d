"""attn_out / mlp_out on every model family make_model builds: each resolves to the module
whose output the block adds to its residual stream, [B, T, d_model], or is refused in one line.

The reference is each block's own arithmetic, written out below per kind of block: a pre-LN
block (sequential or parallel) ends at input + attn_out + mlp_out, a post-LN block at its
norms around those sums; the input comes from a pre-hook of our own and the block's output
from output_hidden_states, not from the code under test. The logit lens per family is checked
end to end in test_examples.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import CAUSAL, harvest_config, make_model, write_corpus
from pipeline import model as M
from pipeline.errors import UserError
from stages.cli import main

# (family, config overrides) -> (attn_out's module, mlp_out's module) inside a block: the
# sublayer outputs as each family's forward adds them to the residual.
MODULES = {
    **{(f, ()): ("self_attn", "mlp") for f in ("llama", "qwen2", "qwen3", "mistral", "phi3", "stablelm", "olmo",
                                                "phi")},
    # Sandwich norms: each sublayer's output is normalised before the add.
    **{(f, ()): ("post_attention_layernorm", "post_feedforward_layernorm") for f in ("gemma2", "gemma3", "olmo2")},
    ("gpt2", ()): ("attn", "mlp"),
    ("gptj", ()): ("attn", "mlp"),
    ("neox", ()): ("attention", "mlp"),
    ("falcon", ()): ("self_attention", "mlp"),
    ("opt", ()): ("self_attn", "fc2"),  # fc2 works on [B*T, d]: viewed as [B, T, d]
    ("bert", ()): ("attention.output.dense", "output.dense"),
    # Variants: sequential NeoX, parallel StableLM, Falcon-40B's layout, a sequential Falcon, OPT-350m's post-LN.
    ("neox", (("use_parallel_residual", False),)): ("attention", "mlp"),
    ("stablelm", (("use_parallel_residual", True),)): ("self_attn", "mlp"),
    ("falcon", (("new_decoder_architecture", True), ("num_kv_heads", 2))): ("self_attention", "mlp"),
    ("falcon", (("parallel_attn", False),)): ("self_attention", "mlp"),
    ("opt", (("do_layer_norm_before", False),)): ("self_attn", "fc2"),
}
POST_LN = {("bert", ()), ("opt", (("do_layer_norm_before", False),))}
CASES = list(MODULES)
LAYER = 1  # of 3: an inner block, whose hidden_states entry has no final norm applied


def _id(case):
    family, over = case
    return family + "".join(f"-{k}={v}" for k, v in over)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            family, over = case
            folder = tmp_path_factory.mktemp(_id(case))
            make_model(family, folder, n_layers=3, d_model=32, random_norms=True, **dict(over))
            cache[case] = M.load_model(str(folder), "main", "float32", "cpu")[0], folder
        return cache[case]

    return get


@contextmanager
def _block_input(block, seen: dict):
    """seen["x"]: the block's input hidden states, as the model hands them over."""
    def keep(_mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_every_causal_family_is_covered():
    assert set(CAUSAL) - {"mamba"} <= {family for family, _ in MODULES}  # Mamba: its own test below


@torch.no_grad()
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sublayers_are_what_the_block_adds(built, case):
    model, _ = built(case)
    block = M.find_blocks(model)[LAYER]
    attn_name, mlp_name = MODULES[case]
    points = [(LAYER, "attn_out"), (LAYER, "mlp_out")]
    mods = M.resolve_hook_points(model, points)
    assert mods[points[0]] is block.get_submodule(attn_name)
    assert mods[points[1]] is block.get_submodule(mlp_name)

    ids = (torch.arange(2 * 12).view(2, 12) * 5 + 3) % model.config.vocab_size
    seen = {}
    with _block_input(block, seen):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    x, after = seen["x"], out.hidden_states[LAYER + 1]
    got = M.ActivationCapture(model, points).run(ids)
    attn, mlp = got[points[0]], got[points[1]]
    d = model.config.hidden_size
    assert attn.shape == mlp.shape == (2, 12, d)
    if case == ("bert", ()):  # post-LN: each sum goes through the sublayer's LayerNorm
        mid = block.attention.output.LayerNorm(x + attn)
        want = block.output.LayerNorm(mid + mlp)
    elif case in POST_LN:  # OPT-350m
        mid = block.self_attn_layer_norm(x + attn)
        want = block.final_layer_norm(mid + mlp)
    else:  # pre-LN, sequential or parallel, sandwich or not: the residual gets both added
        want = x + attn + mlp
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("case", [c for c in CASES if c not in POST_LN], ids=_id)
def test_splicing_mlp_out_replaces_what_the_block_adds(built, case):
    """Zeroing mlp_out through splice leaves the block's output at input + attn_out: the
    spliced function sees [B, T, d] even where the module works on flattened tokens (OPT)."""
    model, _ = built(case)
    ids = (torch.arange(2 * 12).view(2, 12) * 5 + 3) % model.config.vocab_size
    got = M.ActivationCapture(model, [(LAYER, "attn_out")]).run(ids)[(LAYER, "attn_out")]
    block, seen, shapes = M.find_blocks(model)[LAYER], {}, []

    def zero(x):
        shapes.append(tuple(x.shape))
        return torch.zeros_like(x)

    with _block_input(block, seen), M.splice(model, LAYER, "mlp_out", zero):
        after = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert shapes == [(2, 12, model.config.hidden_size)]
    torch.testing.assert_close(after.hidden_states[LAYER + 1], seen["x"] + got, rtol=1e-5, atol=1e-5)


def test_mamba_has_no_attention_or_mlp(tmp_path):
    """Its mixer is a state-space layer: attn_out and mlp_out are refused, naming why and what
    to hook instead, before anything is written; the mixer by its path still works."""
    make_model("mamba", tmp_path / "model", n_layers=2, d_model=32)
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    model, _ = M.load_model(str(tmp_path / "model"), "main", "float32", "cpu")
    for hook in ("attn_out", "mlp_out"):
        what = "attention" if hook == "attn_out" else "MLP"
        with pytest.raises(UserError, match=f"MambaBlock has no {what}, only a state-space `mixer`"):
            M.resolve_hook_points(model, [(1, hook)])
        raw = harvest_config(tmp_path / "model", corpus, tmp_path / "run", hooks=[hook])
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        res = CliRunner().invoke(main, ["harvest", str(tmp_path / "c.yaml")])
        assert res.exit_code == 2, res.output
        assert res.output.startswith("saepipe: error: ") and res.output.count("\n") == 1, res.output
        assert f"MambaBlock has no {what}" in res.output and "use resid_post" in res.output
        assert "Traceback" not in res.output
        assert not (tmp_path / "run" / "activations.zarr").exists()
    ids = torch.arange(10)[None]
    out = M.ActivationCapture(model, [(1, "mixer")]).run(ids)[(1, "mixer")]
    assert out.shape == (1, 10, 32)


@torch.no_grad()
def test_lens_of_a_post_ln_model_is_the_bare_unembedding(tmp_path):
    """OPT-350m's blocks end in a LayerNorm and it has no final norm: W_U · x is its logit lens."""
    make_model("opt", tmp_path, n_layers=2, random_norms=True, do_layer_norm_before=False)
    model, _ = M.load_causal_lm(str(tmp_path), "main", "float32", "cpu")
    norm, W_U = M.unembed(model)
    assert norm is None and W_U is model.lm_head.weight
    ids = torch.arange(9)[None]
    out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1] @ W_U.T, out.logits)


def test_lens_refused_when_a_projection_precedes_the_head(tmp_path):
    """OPT-350m's project_out maps d_model 32 to the embeddings' 16: no norm alone gives the
    logits, so the lens is refused in one line, which collate keeps as summary.json's reason."""
    from pipeline.collate.records import load_lens

    make_model("opt", tmp_path, n_layers=2, word_embed_proj_dim=16)
    model, _ = M.load_causal_lm(str(tmp_path), "main", "float32", "cpu")
    with pytest.raises(UserError) as e:
        M.unembed(model)
    msg = str(e.value)
    assert msg.startswith("OPTForCausalLM: head(norm(last block's output)) gives none of its logits for norm = "
                          "model.decoder.final_layer_norm, no norm") and "\n" not in msg
    assert load_lens({"model": str(tmp_path), "revision": "main"}, "cpu") == msg


def _mlp_of(block, case, src):
    """The block's MLP written out from what it reads, up to what mlp_out is (MODULES); through
    .forward, which runs no hooks (the splice's own sit on these modules)."""
    family, _ = case
    if family == "opt":
        return block.fc2.forward(block.activation_fn(block.fc1.forward(src)))
    if family == "bert":
        return block.output.dense.forward(block.intermediate.forward(src))
    out = block.mlp.forward(src)
    return block.post_feedforward_layernorm.forward(out) if MODULES[case][1] == "post_feedforward_layernorm" else out


@torch.no_grad()
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_mlp_in_is_what_the_mlp_reads(built, case):
    """A transcoder's input: mlp_out replaced by the MLP recomputed from mlp_in (splice with a
    source) leaves the model's output as it was, in every family; mlp_in is [B, T, d_model]."""
    model, _ = built(case)
    block = M.find_blocks(model)[LAYER]
    ids = (torch.arange(2 * 12).view(2, 12) * 5 + 3) % model.config.vocab_size
    mask = torch.ones_like(ids)
    got = M.ActivationCapture(model, [(LAYER, "mlp_in")]).run(ids)[(LAYER, "mlp_in")]
    assert got.shape == (2, 12, model.config.hidden_size)
    clean = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
    seen = []

    def recompute(out, src):
        seen.append(src)
        return _mlp_of(block, case, src)

    with M.splice(model, LAYER, "mlp_out", recompute, source="mlp_in"):
        spliced = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
    torch.testing.assert_close(seen[0], got)
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    with M.splice(model, LAYER, "mlp_out", lambda out, src: _mlp_of(block, case, 2 * src), source="mlp_in"):
        doubled = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
    assert not torch.allclose(doubled, clean)  # the recomputation is what the model used
