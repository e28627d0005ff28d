"""Tiny offline models, tokenizers and corpora for the tests (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders find features in the residual stream.",
    "Return the number of items in a container.",
    "A fresh cache keeps every stage rerunnable on its own.",
    "Open the file and read its lines one at a time.",
    "Zarr stores chunked, compressed arrays on disk.",
    "def add(a, b): return a + b  # adds two numbers",
    "Tokens are concatenated with a separator and cut into windows.",
]


def write_corpus(path: Path, n_docs: int = 200, column: str = "text") -> Path:
    """jsonl of deterministic pseudo-documents built from CORPUS."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n_docs):
            words = " ".join(CORPUS[(i * 3 + j) % len(CORPUS)] for j in range(1 + i % 4))
            f.write(json.dumps({column: f"Doc {i}: {words}"}) + "\n")
    return path


def make_tokenizer(folder: Path, vocab_size: int = 320, bos: str = "<|bos|>", sep: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer trained on CORPUS, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [s for s in (bos, sep) if s]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos or None, eos_token=sep or None)
    folder = Path(folder)
    fast.save_pretrained(folder)
    return fast


# The causal-LM families make_model builds (and "bert", an encoder).
CAUSAL = ("llama", "gpt2", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "neox", "falcon", "gptj",
          "stablelm", "olmo", "olmo2", "opt", "phi", "mamba")


def _family_config(arch: str, vocab: int, n_layers: int, d: int, bos: int, eos: int):
    """(config, causal-LM class) of a tiny `arch`: 4 heads, MLP width 2d, 256 positions."""
    import transformers as tf

    ids = {"vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos}
    common = {"hidden_size": d, "intermediate_size": 2 * d, "num_hidden_layers": n_layers, "num_attention_heads": 4,
            "max_position_embeddings": 256, **ids}
    if arch == "gpt2":
        return tf.GPT2Config(n_positions=256, n_embd=d, n_layer=n_layers, n_head=4, **ids), tf.GPT2LMHeadModel
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common), tf.Qwen2ForCausalLM
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=d // 4, **common), tf.Qwen3ForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, head_dim=d // 4, sliding_window=8, **common), \
            tf.MistralForCausalLM
    if arch == "gemma2":  # softcapped logits (30 by default) and a sliding window on every other layer
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=d // 4, sliding_window=8, **common), \
            tf.Gemma2ForCausalLM
    if arch == "gemma3":  # the text-only model
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=d // 4, sliding_window=8, **common), \
            tf.Gemma3ForCausalLM
    if arch == "phi3":
        # Its default pad id, 32000, is past our vocabulary.
        return tf.Phi3Config(num_key_value_heads=2, original_max_position_embeddings=256, pad_token_id=eos,
                             **common), tf.Phi3ForCausalLM
    if arch == "neox":
        return tf.GPTNeoXConfig(**common), tf.GPTNeoXForCausalLM
    if arch == "falcon":  # multi-query attention, attention and MLP in parallel
        return tf.FalconConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=4,
                               ffn_hidden_size=2 * d, max_position_embeddings=256, **ids), tf.FalconForCausalLM
    if arch == "gptj":  # attention and MLP in parallel, a bias on the LM head
        return tf.GPTJConfig(n_embd=d, n_layer=n_layers, n_head=4, n_inner=2 * d, rotary_dim=4, n_positions=256,
                             **ids), tf.GPTJForCausalLM
    if arch == "stablelm":
        return tf.StableLmConfig(num_key_value_heads=2, **common), tf.StableLmForCausalLM
    if arch == "olmo":  # LayerNorms without parameters
        return tf.OlmoConfig(**common), tf.OlmoForCausalLM
    if arch == "olmo2":  # each sublayer's output normalised before the residual add
        return tf.Olmo2Config(**common), tf.Olmo2ForCausalLM
    if arch == "opt":  # the MLP is fc1/fc2 on flattened tokens, no module of its own
        return tf.OPTConfig(hidden_size=d, num_hidden_layers=n_layers, ffn_dim=2 * d, num_attention_heads=4,
                            word_embed_proj_dim=d, max_position_embeddings=256, **ids), tf.OPTForCausalLM
    if arch == "phi":  # attention and MLP in parallel
        return tf.PhiConfig(**common), tf.PhiForCausalLM
    if arch == "mamba":  # no attention and no MLP: a state-space mixer per block
        return tf.MambaConfig(hidden_size=d, num_hidden_layers=n_layers, state_size=4, expand=2, **ids), \
            tf.MambaForCausalLM
    raise ValueError(arch)


def make_model(arch: str, folder: Path, n_layers: int = 4, d_model: int = 32, random_norms: bool = False,
               **config):
    """A tiny randomly initialised model of the given family, saved with a tokenizer.

    `config` overrides the family's config keys (a variant: OPT post-LN, NeoX sequential, ...).
    random_norms: every norm's parameters drawn at random instead of ones and zeros, so a
    computation that skips or misplaces a norm gives other numbers."""
    import torch
    import transformers as tf

    folder = Path(folder)
    tok = _bert_tokenizer(folder) if arch == "bert" else make_tokenizer(folder)
    vocab = len(tok)
    torch.manual_seed(0)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=4, intermediate_size=2 * d_model, max_position_embeddings=256)
        cls = tf.BertModel
    else:
        cfg, cls = _family_config(arch, vocab, n_layers, d_model, tok.bos_token_id, tok.eos_token_id)
    for key, value in config.items():
        setattr(cfg, key, value)
    model = cls(cfg)
    if random_norms:
        with torch.no_grad():
            for mod in model.modules():
                if "norm" in type(mod).__name__.lower():
                    for p in mod.parameters(recurse=False):
                        p.copy_(torch.rand_like(p) * 2 - 0.5)
    model.eval()
    model.save_pretrained(folder)
    return model


def _bert_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.strip(".,:#()").lower() for line in CORPUS for w in line.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)] + ["doc"] + list(".,:#()+=") + words
    vocab = list(dict.fromkeys(vocab))  # ids must be dense: drop repeats
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def harvest_config(model_dir, corpus, run_dir, **harvest) -> dict:
    """A raw config harvesting a tiny model on CPU: 24 windows of 16 tokens, chunks of 4 windows."""
    return {
        "run_dir": str(run_dir),
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"path": str(corpus)},
        "harvest": {"layers": [1], "n_tokens": 16 * 24, "context_size": 16, "batch_size": 5,
                    "storage_dtype": "float32", "chunk_rows": 64, **harvest},
    }


def topk_loss(sae, x, o, aux_alpha: float, rows: int | None = None, whole_batch: bool = False):
    """(loss, fvu, aux, nmse) of a TopK training forward `o`, as pipeline.train's step takes them:
    the trainer's reconstruction loss, then the architecture's own terms (AuxK at aux_alpha)."""
    from pipeline import dist
    from pipeline.saes import TrainView
    from pipeline.saes.topk import TopKSettings
    from pipeline.train import reconstruction_loss

    fvu, nmse = reconstruction_loss(x, o.x_hat, rows, whole_batch)
    split = dist.rank_world()[1] > 1 and not whole_batch
    view = TrainView(TopKSettings(aux_alpha=aux_alpha), global_sum=dist.all_reduce_ if split else (lambda t: t))
    loss, aux = sae.train_loss(x, o, fvu, view)
    return loss, fvu, aux, nmse


def eval_sae(d: int, seed: int = 1):
    """A random TopK SAE (4d latents, k 6, torch backend) with a small random b_pre, for the eval tests."""
    import torch

    from pipeline.saes.topk import TopKSAE

    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, 4 * d, 6, backend="torch")
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_pre.copy_(0.1 * torch.randn(d, generator=g))
    return sae


def run_cli(root, raw: dict, *args):
    """`saepipe <args[0]> <root>/cfg.yaml <args[1:]>` on the config `raw` (written there first)."""
    import yaml
    from click.testing import CliRunner

    from stages.cli import main

    path = Path(root) / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, [args[0], str(path), *args[1:]])


def harvested_llama(root, harvest_hooks: list[str] | None = None, **train) -> dict:
    """A tiny 3-block Llama (d 32) harvested at layer 1 (`harvest_hooks`, default resid_post) through the CLI, and
    its config: small train (64 latents, 32 steps; `train` adds keys), eval and collate sections."""
    root = Path(root)
    make_model("llama", root / "model", n_layers=3, d_model=32)
    corpus = write_corpus(root / "corpus.jsonl")
    raw = harvest_config(root / "model", corpus, root / "run", n_tokens=16 * 48)
    if harvest_hooks:
        raw["harvest"]["hooks"] = harvest_hooks
    raw["train"] = {"n_latents": 64, "n_tokens": 4096, "batch_size": 128, "eval_every": 8, "checkpoint_every": 8,
                    "log_every": 8, "eval_tokens": 256, "device": "cpu", **train}
    raw["eval"] = {"n_tokens": 4 * 16, "batch_size": 4, "device": "cpu"}
    raw["collate"] = {"n_top": 3, "n_random": 2, "batch_size": 256, "device": "cpu"}
    res = run_cli(root, raw, "harvest")
    assert res.exit_code == 0, res.output
    return raw


def interpreted(script: str, timeout: float = 300):
    """`python -c script` from the repository root under TRITON_INTERPRET=1 (Triton kernels on the CPU);
    the finished process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout)


def with_setting(raw: dict, dotted: str, value) -> dict:
    """A deep copy of the config dict raw with the dotted key (e.g. "eval.n_tokens") set to value."""
    out = json.loads(json.dumps(raw))
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out
