"""SAELens 6 loads every architecture we export to it and computes what we compute: its
encode against ours, and its decode(encode(x)) against our reconstruction in the activations'
own space, within 1e-5 relative on 1024 rows. Runs only where SAELens is installed (its venv,
bench/.peers/saelens, made by `python bench/peers.py saelens`; `make interop` makes it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.saes import ARCHITECTURES

# Loaded from its file: bench/ on sys.path would shadow packages by its scripts' names (kernels).
_spec = importlib.util.spec_from_file_location("bench_interop", Path(__file__).resolve().parents[1] / "bench/interop.py")
interop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interop)

pytestmark = pytest.mark.skipif(not interop.peer_python().exists(),
                                reason="SAELens is not installed (python bench/peers.py saelens)")


NAMES = sorted(n for n, cls in ARCHITECTURES.items() if "saelens" in cls.exports)
TRANSCODERS = interop.transcoders()


@pytest.fixture(scope="module", params=["layer_norm", "none"])
def compared(request, tmp_path_factory) -> dict:
    """SAELens run once per normalisation on every architecture's export."""
    rows = interop.compare(NAMES, tmp_path_factory.mktemp(request.param), request.param)
    return {r["architecture"]: r for r in rows}


@pytest.fixture(scope="module")
def compared_transcoders(tmp_path_factory) -> dict:
    """SAELens run once on every transcoder it holds (raw inputs: layer-normed ones are refused)."""
    rows = interop.compare(TRANSCODERS, tmp_path_factory.mktemp("transcoders"), "none")
    return {r["architecture"]: r for r in rows}


def _check(row):
    assert row["live"] > 0  # not vacuous: latents fire
    assert row["acts"] < 1e-5 and row["x_hat"] < 1e-5, row


@pytest.mark.parametrize("name", NAMES)
def test_saelens_computes_what_we_compute(compared, name):
    _check(compared[name])


@pytest.mark.parametrize("name", TRANSCODERS)
def test_saelens_transcoders_compute_what_ours_do(compared_transcoders, name):
    _check(compared_transcoders[name])
