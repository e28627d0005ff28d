"""dictionary_learning's trainers (bench/peer_dictionary_learning.py) write SAE folders that
pipeline.saes.load_sae reads as the matching architecture, computing exactly what the peer's own
module computes: our encode_dense and decode(encode(x)) against its encode and decode on 256 fresh
rows, within 1e-5 relative. Each trainer trains briefly (d 32, width 128, 512 tokens) on planted
sparse rows. Runs only where the peer venv exists (python bench/peers.py dictionary_learning)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.saes import load_sae

# Loaded from its file: bench/ on sys.path would shadow packages by its scripts' names (kernels).
_spec = importlib.util.spec_from_file_location("bench_dl_peers",
                                               Path(__file__).resolve().parents[1] / "bench/dl_peers.py")
dl_peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dl_peers)

pytestmark = pytest.mark.skipif(
    not dl_peers.installed(), reason="dictionary_learning is not installed (python bench/peers.py dictionary_learning)")

D, N, L0 = 32, 128, 32


def planted(m: int, seed: int) -> np.ndarray:
    """m rows of d D: sparse nonnegative mixtures of 256 fixed unit directions, noise, an offset."""
    g = np.random.default_rng(0)
    dirs = g.standard_normal((256, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    r = np.random.default_rng(seed)
    acts = (r.random((m, 256)) < 0.05) * r.exponential(1.0, (m, 256))
    return (acts @ dirs + 0.05 * r.standard_normal((m, D)) + 0.3).astype(np.float32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("trainer", sorted(dl_peers.TRAINERS))
def test_peer_folder_computes_what_the_peer_computes(trainer, tmp_path):
    # standard runs the L1 search (short probes); gdm takes a fixed coefficient
    extra = {"l1": 0.03} if trainer == "gdm" else {}
    out = tmp_path / "sae"
    info = dl_peers.train_peer(trainer, planted(4096, 1), N, L0, tokens=512, batch=64, seed=0, out=out,
                               check=planted(256, 2), check_out=tmp_path / "check.npz", timeout=600, **extra)
    assert info["trainer"] == trainer and info["seconds"] > 0 and "l0_train_last" in info

    sae = load_sae(out, backend="torch")
    assert sae.architecture == dl_peers.TRAINERS[trainer]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["peer"] == f"dictionary_learning 0.1.0 {trainer}" and cfg["train_seconds"] > 0
    assert cfg["normalize"] == "none" and cfg["d_in"] == D and cfg["n_latents"] == N

    theirs = np.load(tmp_path / "check.npz")
    acts, recon = torch.from_numpy(theirs["acts"]), torch.from_numpy(theirs["recon"])
    x = torch.from_numpy(planted(256, 2))
    with torch.no_grad():
        ours_acts = sae.encode_dense(x)
        ours_recon = sae.decode(*sae.encode(x))
    assert (acts != 0).any(), "no latent fires: the comparison would be vacuous"
    assert rel(ours_acts, acts) < 1e-5, (trainer, rel(ours_acts, acts), int(((ours_acts != 0) != (acts != 0)).sum()))
    assert rel(ours_recon, recon) < 1e-5, (trainer, rel(ours_recon, recon))
