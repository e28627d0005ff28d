"""Benchmark: `saepipe explain` on a finished run (the demo's by default), per layer.

    python bench/explain.py                                   # configs/smollm2.yaml, layers 3 and 6
    python bench/explain.py --layers 3 --set explain.max_suffix=6
    python bench/explain.py --config configs/smollm2.yaml --set explain.n_score_windows=1016   # a smoke run

Needs the run's store and collate's records (`make demo`). Each layer is explained from
scratch (--force) in a fresh child process, so its peak RSS (ru_maxrss) is its own. Per
layer it prints the wall time (and how much of it the building forwards took), the tokens
forwarded and their rate, the peak memory, and the F1 distribution (mean, quartiles) of N2G
against the single-token baseline over the latents that fire in the held-out windows, plus
the mean correlation. The issue's budget: a whole demo layer (4608 latents, context 64,
~65k tokens) in <= 15 minutes on 2 CPU cores.

It overwrites the layer's explanations.json and explain_summary.json in the run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
# Run as a script, bench/ leads sys.path, where a script named like a package (bench/kernels.py
# once shadowed the `kernels` transformers imports; tests/test_bench_names.py)
# would win (in the spawned children too, which import this file first).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(REPO))


def _child(config: str, overrides: list[str], layer: int) -> dict:
    """One layer explained from scratch in this (fresh) process; its summary and peak RSS."""
    from pipeline.collate import explain
    from pipeline.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    [result] = explain.run(cfg, [layer], force=True)
    result["wall"] = time.perf_counter() - t0  # with the model's load, which explain_sae's seconds leave out
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result["path"] = str(result["path"])
    return result


def _quartiles(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return f"mean {statistics.fmean(xs):.3f}  q1 {q[0]:.3f}  median {q[1]:.3f}  q3 {q[2]:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "smollm2.yaml"))
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: the config's collate layers")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from pipeline.collate import explain
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    layers = args.layers or list(dict.fromkeys(layer for layer, _ in cfg.targets("explain")))
    c = cfg.explain
    print(f"explain on {cfg.run_dir}: n_top {c.n_top}, n_random {c.n_random}, max_suffix {c.max_suffix}, "
          f"importance_threshold {c.importance_threshold}, n_select_windows {c.n_select_windows}, "
          f"n_score_windows {c.n_score_windows}, "
          f"batch_tokens {c.batch_tokens}")
    for layer in layers:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:  # a child's error reaches us
            result = pool.submit(_child, args.config, args.overrides, layer).result()
        entries = explain.read_explanations(Path(result["path"]).parent).values()
        fired = [e for e in entries if e["scores"]["n_fires"] > 0]
        n2g_f1 = [e["scores"]["f1"] for e in fired]
        base_f1 = [e["baseline"]["scores"]["f1"] for e in fired]
        corr = [e["scores"]["corr"] for e in fired if e["scores"]["corr"] is not None]
        base_corr = [e["baseline"]["scores"]["corr"] for e in fired if e["baseline"]["scores"]["corr"] is not None]
        better = sum(a > b for a, b in zip(n2g_f1, base_f1))
        worse = sum(a < b for a, b in zip(n2g_f1, base_f1))
        print(f"\nlayer {layer}: {result['wall']:.0f} s wall ({result['seconds']:.0f} s once the model was loaded, "
              f"{result['build_seconds']:.0f} s of it building), "
              f"{result['tokens_forwarded']:,} tokens forwarded "
              f"({result['tokens_forwarded'] / max(result['build_seconds'], 1e-9):,.0f} tok/s while building), "
              f"peak RSS {result['peak_rss_mb']:,.0f} MiB")
        print(f"  {result['n_live']} live latents, {result['n_explained']:,} of {result['n_examples']:,} building "
              f"examples explained; {len(fired)} latents fire in the held-out windows")
        print(f"  F1 N2G       {_quartiles(n2g_f1)}")
        print(f"  F1 baseline  {_quartiles(base_f1)}")
        print(f"  N2G F1 above the baseline's on {better} latents, below on {worse}")
        print("  depth kept (latents): " + ", ".join(f"{d}: {n}" for d, n in result["depths"].items()))
        for key in ("precision", "recall"):
            mine = [e["scores"][key] for e in fired if e["scores"][key] is not None]
            base = [e["baseline"]["scores"][key] for e in fired if e["baseline"]["scores"][key] is not None]
            print(f"  {key} N2G mean {statistics.fmean(mine) if mine else float('nan'):.3f} ({len(mine)} latents), "
                  f"baseline mean {statistics.fmean(base) if base else float('nan'):.3f} ({len(base)} latents)")
        print(f"  corr N2G mean {statistics.fmean(corr):.3f}, baseline mean {statistics.fmean(base_corr):.3f}"
              if corr and base_corr else "  corr: n/a")


if __name__ == "__main__":
    main()
