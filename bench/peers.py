"""Peer SAE trainers in venvs of their own, for the head-to-head benchmarks.

    python bench/peers.py             # make (or reuse) bench/.peers/<name>/ for every peer
    python bench/peers.py sparsify    # just one

Each peer gets a venv under bench/.peers/ (git-ignored) holding the CPU torch
2.13.0 wheel first, so pip never pulls CUDA wheels, then the peer at a pinned
version. The benchmarks run the peer's python from there on a script that
imports only the peer; nothing of saepipe's venv is shared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / ".peers"
TORCH = "torch==2.13.0"
PEERS = {
    "sparsify": ["eai-sparsify==1.3.3"],
    "saelens": ["sae-lens>=6,<7"],
}


def python(name: str) -> Path:
    """The peer venv's python, made on first use."""
    venv = ROOT / name
    py = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists():
        return py
    print(f"peers: making {venv} ({' '.join(PEERS[name])}); this takes a few minutes once", file=sys.stderr)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, *PEERS[name]], check=True)
    marker.touch()
    return py


def main():
    for name in sys.argv[1:] or PEERS:
        if name not in PEERS:
            sys.exit(f"peers: unknown peer {name!r}; one of {', '.join(PEERS)}")
        print(name, python(name))


if __name__ == "__main__":
    main()
