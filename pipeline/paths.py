"""Where each stage keeps its results under run_dir: the one owner of the layout.

    <run_dir>/activations.zarr            harvest (pipeline.store)
    <run_dir>/saes/<layer>/<hook>/        train: one SAE, `done` marker last
    <run_dir>/records/<layer>/<hook>/     collate: records and viewer, `done` marker last
    <run_dir>/records/index.html          collate: links every layer's viewer
"""

from __future__ import annotations

from pathlib import Path

DONE = "done"  # the marker a stage writes last into a finished folder
EVAL_FILE = "eval.json"  # saepipe eval's numbers, inside the SAE's folder


def sae_dir(run_dir, layer: int, hook: str) -> Path:
    return Path(run_dir) / "saes" / str(layer) / hook


def records_dir(run_dir, layer: int, hook: str) -> Path:
    return records_root(run_dir) / str(layer) / hook


def records_root(run_dir) -> Path:
    """Every layer's records; holds the index page linking their viewers."""
    return Path(run_dir) / "records"
