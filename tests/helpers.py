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


def make_model(arch: str, folder: Path, n_layers: int = 4, d_model: int = 32):
    """A tiny randomly initialised model of the given family, saved with a tokenizer."""
    import torch
    import transformers as tf

    folder = Path(folder)
    tok = _bert_tokenizer(folder) if arch == "bert" else make_tokenizer(folder)
    vocab = len(tok)
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=256, n_embd=d_model, n_layer=n_layers, n_head=4,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                             num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                               num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=256,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=4, intermediate_size=2 * d_model, max_position_embeddings=256)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(arch)
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
