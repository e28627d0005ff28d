"""Where each stage keeps its results under run_dir: the one owner of the layout.

    <run_dir>/activations.zarr                  harvest (pipeline.store)
    <run_dir>/saes/<layer>/<hook>/              train: one SAE, `done` marker last
    <run_dir>/saes/<layer>/<hook>@<member>/     train: a named member of train.sweep, the same files
    <run_dir>/saes/<layer>/frontier-<hook>.png  eval: L0 against delta CE and FVU of every SAE there
    <run_dir>/records/<layer>/<hook>/           collate: records and viewer, `done` marker last
    <run_dir>/records/<layer>/<hook>@<member>/  collate: a sweep member's records
    <run_dir>/records/index.html                collate: links every layer's (and member's) viewer

A sweep member without a name (the `{}` entry: the plain config) uses the plain
folder, so it is the SAE a train without the sweep makes and finds.
"""

from __future__ import annotations

import os
from pathlib import Path

DONE = "done"  # the marker a stage writes last into a finished folder
EVAL_FILE = "eval.json"  # saepipe eval's numbers, inside the SAE's folder
# Between a hook and a member's name in a folder name: no hook name holds it (config checks hooks).
MEMBER_MARK = "@"


def is_url(where) -> bool:
    """An fsspec URL (s3://, gs://, memory://, file://) where a store may live, as against a local path."""
    return "://" in str(where)


def model_key(name: str) -> str:
    """model.name as compared across stages: a local folder or file by its absolute, normalised
    path (so `models/x/`, `./models/x` and `/abs/models/x` are one model), anything else (a hub
    id, `pkg:...`) as written. A path counts as local when it exists or is written as one."""
    name = str(name)
    if name.startswith("pkg:") or is_url(name):
        return name
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return os.path.normpath(os.path.abspath(path))
    return name


def sae_dir(run_dir, layer: int, hook: str, member: str | None = None) -> Path:
    return Path(run_dir) / "saes" / str(layer) / leaf(hook, member)


def frontier_stem(run_dir, layer: int, hook: str) -> tuple[Path, str]:
    """(folder, stem) of saepipe eval's frontier picture of every SAE of (layer, hook):
    <run_dir>/saes/<layer>/frontier-<hook>.png and .svg (files beside the SAE folders)."""
    return Path(run_dir) / "saes" / str(layer), f"frontier-{hook}"


def records_dir(run_dir, layer: int, hook: str, member: str | None = None) -> Path:
    return records_root(run_dir) / str(layer) / leaf(hook, member)


def records_root(run_dir) -> Path:
    """Every layer's records; holds the index page linking their viewers."""
    return Path(run_dir) / "records"


def leaf(hook: str, member: str | None = None) -> str:
    """The folder name of a hook's SAE (or records): `<hook>`, or `<hook>@<member>` for a named member."""
    return hook if member is None else f"{hook}{MEMBER_MARK}{member}"


def member_folder(plain, member: str | None) -> Path:
    """A sweep member's folder beside the plain one (`saes/3/resid_post` -> `saes/3/resid_post@k64`)."""
    plain = Path(plain)
    return plain if member is None else plain.with_name(leaf(plain.name, member))


def split_leaf(name: str) -> tuple[str, str | None]:
    """leaf()'s inverse: (hook, member or None)."""
    hook, mark, member = name.partition(MEMBER_MARK)
    return hook, (member if mark else None)
