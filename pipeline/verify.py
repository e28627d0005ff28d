"""Check a whole activation store quickly, without decompressing anything.

For each array (`tokens` and every `layers/<L>/<hook>`):
- every chunk that should exist is present: a missing chunk would read as zeros;
- its checksum holds: zarr's Crc32cCodec ends each chunk with the 4-byte
  little-endian crc32c of the bytes before it, so the raw file is checked as
  is, and a truncated or overwritten chunk is found;
- the flags agree: a complete array has every chunk in its progress logs, and
  complete layers sit over complete tokens;
- its zarr.json reads: arrays are found through their folders and progress
  logs too, so one whose metadata is lost or damaged is reported, not skipped.

An array still being harvested is checked over the chunks logged so far (the
others will be written anyway). Arrays made before checksums are reported as
unchecksummed: only their presence can be checked.

Every finished SAE of the run (`saes/<L>/<hook>/`) is checked against the
sha256 its `done` marker recorded (pipeline.saes owns that rule).

`plan()` lists what to check, `run()` reads the chunk files with a small thread
pool and returns a Report (its lines, and the one error line when something is
wrong); stages/verify.py prints it. `bad_chunks` is what `saepipe harvest
--repair` uses to find its work.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zarr

from pipeline.saes import verify_saved
from pipeline.store import (REPAIR_HINT, ActivationStore, MetadataError, ProgressLog, array_name, chunk_problem,
                            has_crc, n_chunks_of)


@dataclass
class ArrayCheck:
    name: str  # path in the store: tokens, layers/3/resid_post
    arr: zarr.Array | None  # None when its metadata is missing or unreadable
    complete: bool
    logged: set[int] | None  # chunks in the progress logs; None for tokens, which have none
    chunks: list[int]  # what to check
    meta_problem: str | None = None

    @property
    def n_chunks(self) -> int:
        return n_chunks_of(self.arr) if self.arr is not None else 0


@dataclass
class ArrayReport:
    check: ArrayCheck
    bad: dict[int, str] = field(default_factory=dict)  # chunk -> "missing" / "corrupt (...)"
    errors: list[str] = field(default_factory=list)  # metadata or flags that disagree

    @property
    def sound(self) -> bool:
        return not self.bad and not self.errors


@dataclass
class Plan:
    store: ActivationStore
    arrays: list[ArrayCheck]
    saes: list[Path]  # finished SAE folders


@dataclass
class Report:
    store: ActivationStore
    arrays: list[ArrayReport]
    saes: list[tuple[Path, str | None]]  # (folder, problem or None)

    @property
    def n_chunks(self) -> int:
        """Chunks checked."""
        return sum(len(r.check.chunks) for r in self.arrays)

    def lines(self) -> list[str]:
        """One line per array (dtype, shape, chunks, checksum kind, state) and per SAE."""
        run_dir = self.store.run_dir
        return _summary(self.store, self.arrays) + [
            f"  {folder.relative_to(run_dir)}  {'BAD: ' + problem if problem else 'ok (sha256)'}"
            for folder, problem in self.saes]

    def problem(self) -> str | None:
        """The one error line when the store or an SAE is damaged (both, when both are: each needs
        its own fix), None when all is sound."""
        parts = [_store_problems(self.store, self.arrays)]
        bad = [problem for _, problem in self.saes if problem]
        if bad:
            parts.append(bad[0] + (f" (and {len(bad) - 1} more SAEs)" if len(bad) > 1 else ""))
        return "; also ".join(p for p in parts if p) or None


def plan(where) -> Plan:
    """`where`: a run_dir, or a Location (a store elsewhere, e.g. on S3)."""
    store = ActivationStore(where)
    run_dir = store.run_dir
    checks = []
    for name in _array_names(store, run_dir):
        try:
            arr = store.node(name)
        except MetadataError:
            checks.append(ArrayCheck(name, None, False, None, [], "metadata (zarr.json) unreadable"))
            continue
        logged = None
        if name != "tokens":
            _, layer, hook = name.split("/", 2)
            logged = ProgressLog(run_dir, int(layer), hook).done()
        if arr is None:
            checks.append(ArrayCheck(name, None, False, logged, [], "metadata (zarr.json) missing"))
            continue
        complete = bool(arr.attrs.get("complete", False))
        n = n_chunks_of(arr)
        chunks = list(range(n)) if complete else sorted(c for c in (logged or ()) if c < n)
        checks.append(ArrayCheck(name, arr, complete, logged, chunks))
    return Plan(store, checks, _sae_folders(run_dir))


def run(where, threads: int = 4) -> Report:
    p = plan(where)
    return Report(p.store, _check_arrays(p.arrays, threads), [(f, verify_saved(f)) for f in p.saes])


def _array_names(store: ActivationStore, run_dir: Path) -> list[str]:
    """Every array the store should hold: what zarr lists, the store's folders (or prefixes) and
    the progress logs, so an array whose zarr.json is lost or damaged is still seen."""
    names = set()
    try:
        with warnings.catch_warnings():  # zarr warns about a folder without zarr.json: reported below
            warnings.simplefilter("ignore")
            names |= {array_name(layer, hook) for layer, hook in store.entries(complete_only=False)}
    except Exception:  # noqa: BLE001 - a damaged zarr.json below; the listings below still name it
        pass
    names |= {f"layers/{layer}/{hook}" for layer in store.list_dir("layers") if layer.isdigit()
              for hook in store.list_dir(f"layers/{layer}") if hook != "zarr.json"}
    for log in (run_dir / "progress").glob("*.rank*.log"):
        layer, _, hook = log.name.rsplit(".rank", 1)[0].partition(".")
        if layer.isdigit():
            names.add(array_name(int(layer), hook))
    if names or "tokens" in store.list_dir("") or _has_node(store, "tokens"):
        names.add("tokens")
    layers = sorted((int(n.split("/")[1]), n) for n in names if n != "tokens")
    return (["tokens"] if "tokens" in names else []) + [n for _, n in layers]


def _has_node(store: ActivationStore, name: str) -> bool:
    try:
        return store.node(name) is not None
    except MetadataError:
        return True


def bad_chunks(arr: zarr.Array, chunks, threads: int = 4, decode: bool = False) -> dict[int, str]:
    """{chunk: problem} over `chunks`: missing, checksum mismatch, or (`decode`, for arrays
    without checksums) not decodable."""
    chunks = list(chunks)
    with ThreadPoolExecutor(threads) as pool:
        return {c: p for c, p in zip(chunks, pool.map(lambda c: chunk_problem(arr, c, decode), chunks)) if p}


def _check_arrays(checks: list[ArrayCheck], threads: int) -> list[ArrayReport]:
    jobs = [(i, c) for i, chk in enumerate(checks) for c in chk.chunks]
    reports = [ArrayReport(chk, errors=[chk.meta_problem] if chk.meta_problem else []) for chk in checks]
    with ThreadPoolExecutor(threads) as pool:
        for (i, c), problem in zip(jobs, pool.map(lambda job: chunk_problem(checks[job[0]].arr, job[1]), jobs)):
            if problem:
                reports[i].bad[c] = problem
    tokens_ok = any(chk.name == "tokens" and chk.complete for chk in checks)
    for rep in reports:
        chk = rep.check
        if chk.complete and chk.logged is not None:
            unlogged = sorted(set(range(chk.n_chunks)) - chk.logged)
            if unlogged:
                rep.errors.append(f"marked complete but chunks {_numbers(unlogged)} are not in its progress logs")
        if chk.complete and chk.logged is not None and not tokens_ok:
            rep.errors.append("marked complete over tokens that are missing or incomplete")
    return reports


def _summary(store: ActivationStore, reports: list[ArrayReport]) -> list[str]:
    lines = [f"verify: {store.path}"]
    width = max((len(r.check.name) for r in reports), default=0)
    for rep in reports:
        chk = rep.check
        if chk.arr is None:
            lines.append(f"  {chk.name:<{width}}  BAD: {chk.meta_problem}")
            continue
        dtype = chk.arr.attrs.get("logical_dtype", str(chk.arr.dtype))
        crc = "crc32c" if has_crc(chk.arr) else "unchecksummed"
        if not rep.sound:
            state = "BAD: " + "; ".join([*(f"chunk {c} {p}" for c, p in sorted(rep.bad.items())[:4]),
                                         *(["..."] if len(rep.bad) > 4 else []), *rep.errors])
        elif chk.complete:
            state = "ok" if has_crc(chk.arr) else "ok (presence only: made before checksums)"
        elif chk.logged is None:
            state = "incomplete (a harvest is writing it, or was stopped: rerun harvest)"
        else:
            state = f"partial: {len(chk.chunks)} of {chk.n_chunks} chunks written, those ok (rerun harvest to finish)"
        lines.append(f"  {chk.name:<{width}}  {dtype:<8}  {str(list(chk.arr.shape)):<14} "
                     f"{chk.n_chunks:>6} chunks  {crc:<13}  {state}")
    if not reports:
        lines.append("  (no arrays)")
    return lines


def _store_problems(store: ActivationStore, reports: list[ArrayReport], limit: int = 8) -> str | None:
    items = [f"{r.check.name} chunk {c} {p}" for r in reports for c, p in sorted(r.bad.items())]
    items += [f"{r.check.name} {e}" for r in reports for e in r.errors]
    if not items:
        return None
    return f"{store.path} is damaged: {describe(items, limit)}; {REPAIR_HINT}"


def describe(items: list[str], limit: int = 8) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def _numbers(xs: list[int], limit: int = 8) -> str:
    return describe([str(x) for x in xs], limit)


def _sae_folders(run_dir) -> list[Path]:
    """Every SAE folder under <run_dir>/saes/<L>/<hook>/; work folders (`.partial`) and swap
    leftovers (`.old`) are not finished SAEs."""
    root = Path(run_dir) / "saes"
    return sorted(h for layer in root.glob("*") if layer.is_dir() for h in layer.iterdir()
                  if h.is_dir() and not h.name.endswith((".partial", ".old")))
