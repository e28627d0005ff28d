"""Where each stage keeps its results under run_dir: the one owner of the layout.

    <run_dir>/activations.zarr                  harvest (pipeline.store)
    <run_dir>/saes/<layer>/<hook>/              train: one SAE, `done` marker last
    <run_dir>/saes/<layer>/<hook>@<member>/     train: a named member of train.sweep, the same files
    <run_dir>/saes/<layer>/frontier-<hook>.png  eval: L0 against delta CE and FVU of every SAE there
    <run_dir>/saes/<layer>/ce_zero-<hook>-<key>.json  eval: the zero-ablated CE there, shared by its SAEs
    <run_dir>/records/<layer>/<hook>/           collate: records and viewer, `done` marker last
    <run_dir>/records/<layer>/<hook>@<member>/  collate: a sweep member's records
    <run_dir>/records/index.html                collate: links every layer's (and member's) viewer

A sweep member without a name (the `{}` entry: the plain config) uses the plain
folder, so it is the SAE a train without the sweep makes and finds.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def zero_ablation_file(run_dir, layer: int, hook: str, key: str) -> Path:
    """saepipe eval's cached zero-ablated CE of (layer, hook) for one cache key (pipeline.eval.ZeroCache):
    <run_dir>/saes/<layer>/ce_zero-<hook>-<key>.json, a file beside the SAE folders, as the frontier is."""
    return Path(run_dir) / "saes" / str(layer) / f"ce_zero-{hook}-{key}.json"


def records_dir(run_dir, layer: int, hook: str, member: str | None = None) -> Path:
    return records_root(run_dir) / str(layer) / leaf(hook, member)


def records_root(run_dir) -> Path:
    """Every layer's records; holds the index page linking their viewers."""
    return Path(run_dir) / "records"


def leaf(hook: str, member: str | None = None) -> str:
    """The folder name of a hook's SAE (or records): `<hook>`, or `<hook>@<member>` for a named member."""
    return hook if member is None else f"{hook}{MEMBER_MARK}{member}"


def finetuned(member: str | None) -> str:
    """The member name of a KL fine-tuned SAE (pipeline.finetune): `kl` for the plain SAE's, `<member>-kl`
    for a train.sweep member's, so it sits beside its base as `<hook>@kl` / `<hook>@<member>-kl`."""
    return f"{member}-{FINETUNED}" if member else FINETUNED


FINETUNED = "kl"


def member_folder(plain, member: str | None) -> Path:
    """A sweep member's folder beside the plain one (`saes/3/resid_post` -> `saes/3/resid_post@k64`)."""
    plain = Path(plain)
    return plain if member is None else plain.with_name(leaf(plain.name, member))


def split_leaf(name: str) -> tuple[str, str | None]:
    """leaf()'s inverse: (hook, member or None)."""
    hook, mark, member = name.partition(MEMBER_MARK)
    return hook, (member if mark else None)


# --------------------------------------------------------------------------- relative paths in a config file
# What marks the top folder of a project: a config's relative paths are read from there.
PROJECT_MARKERS = ("pyproject.toml", ".git")
# data.path names a builder, not a path, when it is one of these (pipeline.data); then data.data_files are paths.
DATA_BUILDERS = ("json", "parquet", "text", "csv", "arrow")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv", ".arrow")


def project_folder(config_file) -> tuple[Path, str]:
    """The folder a config file's relative paths are read from, and why it is that one (for messages).

    The rule: the nearest folder, from the config's own folder upwards, that holds a project marker
    (PROJECT_MARKERS: pyproject.toml or .git); the config's own folder when none does.

    Why this rule and not "the config's folder": this repository's configs live in configs/ and say
    `run_dir: runs/smollm2` and `data.path: data/stdlib_docstrings.jsonl`, meaning the repository's
    top folder, where `make` runs them; read from configs/ they would name configs/runs/... (a new,
    empty run) and a corpus that is not there. Why not "the nearest folder above that holds the path's
    first part": run_dir and store name outputs, absent before the first harvest (runs/ is not even in
    a fresh checkout), so a rule that looks for them decides nothing when it matters most. A marker
    is there before anything runs, so every path of one config is read from one folder, whatever
    exists yet: a researcher's project keeps its configs anywhere inside it and writes paths from its
    top, as here; a config kept in a folder of its own, in no project, reads them from that folder.
    """
    folder = Path(os.path.abspath(config_file)).parent
    for candidate in (folder, *folder.parents):
        for marker in PROJECT_MARKERS:
            if (candidate / marker).exists():
                return candidate, f"the nearest folder holding {marker} at or above the config's folder {folder}"
    return folder, f"the config's own folder: none at or above it holds {' or '.join(PROJECT_MARKERS)}"


@dataclass(frozen=True)
class ConfigPath:
    """One path setting of a config file made absolute: what was written, where it points, and why there."""
    key: str
    written: str
    path: str
    why: str


def resolve_config_paths(values: dict, config_file, typed=()) -> dict[str, Any]:
    """Absolute paths for the path settings of a config file, read as `project_folder` says.

    `values` maps each path setting the config gives to its value: run_dir, store, model.name,
    data.path, data.data_files (a string or a list). Returns {key: ConfigPath} for a string,
    {key: [ConfigPath | None, ...]} for a list; a key (or list entry) that names no local path
    (a URL, a hub id, `pkg:...`, a builder, data_files inside a hub dataset) or is already absolute
    and spelled so is left out (None in a list). Which values are paths:
    - run_dir, store: always (a store that is a URL excepted);
    - model.name, data.path: when written as a path (`./`, `../`, `~`, more than one `/`, a `.gguf`
      or data file suffix), or when a file or folder of that name exists; otherwise a hub id;
    - data.data_files: when data.path is a builder (`json`, ...), each file or glob pattern.
    `typed`: the keys given on the command line (`--set run_dir=...`), read from the current folder,
    where they were typed. A path that names nothing in the project folder but names something from the
    current folder (how saepipe read every relative path before) is taken from the current folder, so
    runs made that way keep working; `why` says so."""
    base, why = project_folder(config_file)
    cwd = Path.cwd()
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key == "data.data_files":
            if values.get("data.path") not in DATA_BUILDERS:
                continue  # files inside a hub dataset or a data folder: load_dataset reads them there
            entries = [value] if isinstance(value, str) else value
            found = [_resolve(key, v, base, why, cwd, key in typed, always=not is_url(v)) for v in entries]
            if any(found):
                out[key] = found[0] if isinstance(value, str) else found
            continue
        if key in ("run_dir", "store"):
            always = not is_url(value)
        elif key == "model.name":
            if value.startswith("pkg:") or is_url(value):
                continue
            always = _written_as_path(value, (".gguf",))
        elif key == "data.path":
            if value in DATA_BUILDERS or is_url(value) or value.startswith("hf://"):
                continue
            always = _written_as_path(value, _DATA_SUFFIXES)
        else:
            raise KeyError(key)
        found = _resolve(key, value, base, why, cwd, key in typed, always)
        if found is not None:
            out[key] = found
    return out


def _written_as_path(value: str, suffixes: tuple[str, ...]) -> bool:
    """A model.name or data.path that can only be a local path (no hub id looks like it)."""
    return (value.startswith((".", "/", "~")) or value.count("/") > 1
            or value.lower().endswith(suffixes))


def _resolve(key: str, value: str, base: Path, why: str, cwd: Path, typed: bool, always: bool) -> ConfigPath | None:
    if not isinstance(value, str):
        return None
    if os.path.isabs(value):
        return None
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return ConfigPath(key, value, os.path.normpath(expanded), f"{key} {value} starts at the home folder")
    here, there = os.path.normpath(cwd / expanded), os.path.normpath(base / expanded)
    if typed:
        if not (always or _exists(here)):
            return None  # a hub id
        return ConfigPath(key, value, here, f"{key} {value} was given on the command line, so it is read from "
                                            f"the current folder {cwd}")
    if not _exists(there) and _exists(here) and here != there:
        return ConfigPath(key, value, here, f"{key} {value} names nothing in {base} ({why}), so it is read from "
                                            f"the current folder {cwd}, as saepipe did before")
    if always or _exists(there):
        return ConfigPath(key, value, there, f"{key} {value} is read from {base}, {why}")
    return None  # a hub id


def _exists(path: str) -> bool:
    return bool(glob.glob(path)) if glob.has_magic(path) else os.path.lexists(path)
