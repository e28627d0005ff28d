"""dictionary_learning's trainers as peers, called from saepipe's venv (bench/architectures.py).

    from bench.dl_peers import train_peer
    info = train_peer("batch_top_k", rows, width=3072, l0=32, tokens=1_000_000, batch=2048, seed=0,
                      out=Path("runs/peers/dl_batch_top_k"))
    sae = pipeline.saes.load_sae(out)          # a saepipe SAE of the matching architecture

Runs bench/peer_dictionary_learning.py (its docstring: the recipe, the L1 search for standard and
gdm, and how each trainer's weights map onto ours) with the peer venv's python, made on first
use by bench/peers.py. TRAINERS maps each trainer to the saepipe architecture it is saved as.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "peer_dictionary_learning.py"
PEER = "dictionary_learning"
TRAINERS = {"batch_top_k": "batchtopk", "matryoshka_batch_top_k": "matryoshka", "jumprelu": "jumprelu",
            "gdm": "gated", "standard": "relu"}


def _peers():
    """bench/peers.py, loaded from its file (bench/ is not on sys.path: its script names shadow packages)."""
    spec = importlib.util.spec_from_file_location("bench_peers", HERE / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peer_python() -> Path:
    """The peer venv's python, made (a few minutes, once) when missing."""
    return _peers().python(PEER)


def installed() -> bool:
    return (HERE / ".peers" / PEER / ".installed").exists()


def train_peer(trainer: str, rows: np.ndarray, width: int, l0: int, tokens: int, batch: int, seed: int,
               out: Path, *, lr: float | None = None, l1: float | None = None, threads: int = 0,
               check: np.ndarray | None = None, check_out: Path | None = None,
               timeout: float | None = None) -> dict:
    """Train dictionary_learning's `trainer` on rows [N, d] and write a saepipe SAE folder at `out`.

    Returns the script's JSON line: {"trainer", "seconds" (the training loop's wall time),
    "l0_train_last", and for standard/gdm "l0_held_out", "l1_penalty", "search_seconds"}.
    `l1` fixes standard/gdm's coefficient (no search); `check` rows [M, d] are also run through the
    peer's own encode/decode into `check_out` (.npz: acts [M, n], recon [M, d])."""
    if trainer not in TRAINERS:
        raise ValueError(f"unknown dictionary_learning trainer {trainer!r}; one of {', '.join(TRAINERS)}")
    py = peer_python()
    with tempfile.TemporaryDirectory(prefix="dl_peer_") as tmp:
        path = Path(tmp) / "rows.npy"
        np.save(path, np.ascontiguousarray(rows, dtype=np.float32))
        cmd = [str(py), str(SCRIPT), "--rows", str(path), "--trainer", trainer, "--width", str(width),
               "--l0", str(l0), "--tokens", str(tokens), "--batch", str(batch), "--seed", str(seed),
               "--out", str(out)]
        if lr is not None:
            cmd += ["--lr", repr(float(lr))]
        if l1 is not None:
            cmd += ["--l1", repr(float(l1))]
        if threads:
            cmd += ["--threads", str(threads)]
        if check is not None:
            if check_out is None:
                raise ValueError("check rows need check_out")
            cpath = Path(tmp) / "check.npy"
            np.save(cpath, np.ascontiguousarray(check, dtype=np.float32))
            cmd += ["--check", str(cpath), "--check-out", str(check_out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"dictionary_learning {trainer} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"dictionary_learning {trainer} printed no result:\n{done.stdout[-2000:]}"
                           f"\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])
