"""Benchmark: `saepipe inspect` on a finished run (the demo's by default), once the model is loaded.

    python bench/inspect_prompt.py                                  # configs/smollm2.yaml, layers 3 and 6
    python bench/inspect_prompt.py --layers 3 --tokens 128 --runs 9

Needs the run's store and trained SAEs (`make demo`); records and explanations are used
when there. The prompt is the text of the store's first window, cut to --tokens tokens
(BOS included when the store has one), so it is a real 64-token prompt of the corpus. The
model is loaded once; each run is then what the command does after that load: load the SAEs
(their sha256 checked), read the records' markers and explanations, one forward up to the
deepest layer, each SAE's code, the table and the HTML page. Prints each run's seconds and
their median; the issue's budget: <= 3 s for a 64-token prompt.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
# Run as a script, bench/ leads sys.path, and this file would shadow the standard library's
# `inspect` (which torch imports): bench/ goes before anything else is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "smollm2.yaml"))
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: the config's collate layers")
    ap.add_argument("--tokens", type=int, default=64, help="prompt length in tokens, BOS included")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from pipeline import inspect
    from pipeline.config import load_config
    from pipeline.model import load_model
    from pipeline.store import ActivationStore, Location

    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    load = time.perf_counter() - t0

    store = ActivationStore(Location.of(cfg))
    ids = store.read_tokens(0, 1)[0].tolist()
    bos = bool(store.attrs.get("prepend_bos"))
    text = tokenizer.decode(ids[bos:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    body = tokenizer(text, add_special_tokens=False).input_ids[: args.tokens - bos]
    prompt = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    times, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            lines.clear()
            t0 = time.perf_counter()
            codes = inspect.run(cfg, prompt, args.layers, top=args.top, html_out=Path(tmp) / "inspect.html",
                                echo=lines.append, loaded=(model, tokenizer))
            times.append(time.perf_counter() - t0)
        size = (Path(tmp) / "inspect.html").stat().st_size
    n = len(codes[0].idx)
    layers = ", ".join(c.target.name for c in codes)
    device = next(model.parameters()).device
    print(f"inspect on {cfg.run_dir} ({layers}), {n}-token prompt, top {args.top}, {device}; model loaded once in "
          f"{load:.1f} s")
    print(f"  runs (s): {', '.join(f'{t:.3f}' for t in times)}")
    median = statistics.median(times)
    print(f"  median {median:.3f} s (budget 3 s: {'ok' if median <= 3 else 'OVER'}); {len(lines)} lines printed, "
          f"a {size / 1024:.0f} KiB page")


if __name__ == "__main__":
    main()
