"""Harvest throughput against a bare forward pass of the same model, same batches.

    python bench/harvest.py [--sequences 256] [--context 64] [--layers 12] [--device auto]

A GPT-2-small-shaped random model (12 blocks, d_model 768). Prints tokens/s for
  - a bare full forward (AutoModel, no hooks),
  - harvest of the last block (needs the whole forward: the overhead ratio),
  - harvest of a middle block (early exit: should beat a full forward),
and MB/s written. Everything is measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import make_tokenizer, write_corpus  # noqa: E402

from pipeline.config import config_from_dict  # noqa: E402
from pipeline.model import load_model, resolve_device  # noqa: E402
from pipeline.store import ActivationStore  # noqa: E402
from pipeline import harvest  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32, help="sequences per forward")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from transformers import GPT2Config, GPT2Model

        tok = make_tokenizer(tmp / "model")
        GPT2Model(GPT2Config(vocab_size=len(tok), n_positions=max(1024, args.context), n_embd=args.d_model,
                             n_layer=args.layers, n_head=12)).save_pretrained(tmp / "model")
        corpus = write_corpus(tmp / "corpus.jsonl", n_docs=20 * args.sequences)

        def cfg(layer, run):
            return config_from_dict({
                "run_dir": str(tmp / run),
                "model": {"name": str(tmp / "model"), "device": str(device), "dtype": args.dtype},
                "data": {"path": str(corpus)},
                "harvest": {"layers": [layer], "n_tokens": args.sequences * args.context,
                            "context_size": args.context, "batch_size": args.batch,
                            "storage_dtype": "bfloat16"},
            })

        last, middle = args.layers - 1, args.layers // 2 - 1
        warm = harvest.run(cfg(last, "warmup"), progress=False)  # also gives the token windows
        store = ActivationStore(tmp / "warmup")
        tokens = torch.as_tensor(store.read_tokens(0, store.tokens_shape[0])).long()
        n_tokens = tokens.numel()

        model, _ = load_model(str(tmp / "model"), "main", args.dtype, str(device))

        def bare():
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            with torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                for b in range(0, len(tokens), args.batch):
                    model(input_ids=tokens[b:b + args.batch].to(device))
                sync()
            return time.perf_counter() - t0

        bare()  # warm-up
        t_bare = bare()
        full = harvest.run(cfg(last, "last"), progress=False)
        mid = harvest.run(cfg(middle, "middle"), progress=False)
        del warm

        rows = [
            ("bare full forward", n_tokens / t_bare, None, 1.0),
            (f"harvest block {last} (full depth)", full["tokens"] / full["seconds"],
             full["bytes_written"] / full["seconds"] / 1e6, t_bare / full["seconds"]),
            (f"harvest block {middle} (early exit)", mid["tokens"] / mid["seconds"],
             mid["bytes_written"] / mid["seconds"] / 1e6, t_bare / mid["seconds"]),
        ]
        print(f"device {device}, {args.layers} blocks, d_model {args.d_model}, {n_tokens} tokens, "
              f"context {args.context}, batch {args.batch} seqs, model {args.dtype}, store bfloat16+zstd")
        print(f"{'what':34s} {'tokens/s':>10s} {'MB/s written':>13s} {'x bare forward':>15s}")
        for name, tps, mbs, ratio in rows:
            print(f"{name:34s} {tps:10.0f} {'' if mbs is None else f'{mbs:.1f}':>13s} {ratio:15.2f}")


if __name__ == "__main__":
    main()
