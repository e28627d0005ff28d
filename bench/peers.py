"""Peer SAE trainers in venvs of their own, for the head-to-head benchmarks.

    python bench/peers.py             # make (or reuse) bench/.peers/<name>/ for every peer
    python bench/peers.py sparsify    # just one

Each peer gets a venv under bench/.peers/ (git-ignored) holding the CPU torch
2.13.0 wheel first, so pip never pulls CUDA wheels, then the peer at a pinned
version (torch pinned again on that line, so a peer's dependencies cannot swap
it). The benchmarks run the peer's python from there on a script that imports
only the peer; nothing of saepipe's venv is shared.
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
    # 0.1.0 pulls nnsight<0.4 (and transformers, datasets, wandb, ...); only its trainers are used.
    "dictionary_learning": ["dictionary-learning==0.1.0"],
}
# Packages removed again after a peer's install. nnsight 0.3 requires torchvision, and pip takes
# PyPI's build, made for CUDA torch: beside the CPU torch its ops fail to register, which breaks
# `import transformers` (so `import dictionary_learning`). Nothing the peer's trainers use needs it.
DROP = {"dictionary_learning": ["torchvision"]}


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
    # torch again on the peer's line: a dependency asking for another torch is refused, not obeyed
    subprocess.run([*pip, TORCH, *PEERS[name]], check=True)
    if DROP.get(name):
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", *DROP[name]], check=True)
    marker.touch()
    return py


def main():
    for name in sys.argv[1:] or PEERS:
        if name not in PEERS:
            sys.exit(f"peers: unknown peer {name!r}; one of {', '.join(PEERS)}")
        print(name, python(name))


if __name__ == "__main__":
    main()
