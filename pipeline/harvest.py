"""Harvest: run the model over the dataset and store chosen layers' activations
in `<run_dir>/activations.zarr` (layout and chunk-level guarantees: pipeline/store.py).

`run()` does the work in an order that makes bad input fail before anything is
written: check run_dir and the config's fingerprint against the store's, load
model and hooks (layer/hook errors), tokenize (dataset errors), then take the
run's lock and `plan()` against what the store already holds: which arrays are
new, started over (--force), resumed, repaired (--repair: chunks found missing
or corrupt) or skipped. Planning only reads; then run() writes the tokens,
creates the new arrays and forwards only the chunks the plan lists. Rank r of W
(torchrun's RANK/WORLD_SIZE, pipeline.dist) handles chunks r, r+W, ... of every
array: whole chunks, never a shared shard; rank 0 alone creates the store and
the arrays before the others start, and marks arrays complete after they finish.

What a finished harvest promises:
- The store holds data made by one config. Every setting that decides its bytes
  is recorded: the run-wide ones (model name and revision, every data.* key but
  streaming, a sha256 of local data files, n_tokens, context_size, prepend_bos)
  in the group attribute `fingerprint`, the per-array ones (storage_dtype, codec,
  model.dtype; chunk_rows is the array's own chunking) in each array's. A rerun
  whose settings differ is refused in one line listing the keys (there vs now),
  the "nothing to do" path included; per-array settings can be changed for the
  config's arrays with --force, which marks each array incomplete before
  rewriting it. Hub datasets cannot be hashed: their windows are compared with
  the stored tokens whenever the model runs.
- Chunk c always holds the same sequences, forwarded in the same batches, so a
  resumed or repaired store equals an uninterrupted run's byte for byte (same
  device and batch_size).
- The forward pass hands whole chunks to background writers (pipeline/writer.py),
  copied off the GPU through pinned memory; a chunk is logged as done only once
  its file is durable, and an array is marked complete once every chunk is logged.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import pipeline
from pipeline import dist, dtypes, verify
from pipeline.config import Config, DataConfig
from pipeline.data import load_texts, make_windows
from pipeline.errors import UserError
from pipeline.fsio import run_lock
from pipeline.model import ActivationCapture, check_context_size, load_model, resolve_hook_points
from pipeline.paths import model_key
from pipeline.store import (REPAIR_HINT, ActivationStore, MetadataError, ProgressLog, create_store,
                            Location, default_chunk_rows, missing_chunks, n_chunks_of, set_complete,
                            write_chunk)
from pipeline.writer import ChunkJob, ChunkWriter

_FORCE_HINT = "`saepipe harvest CONFIG --force` (make harvest ARGS=--force)"


@dataclass
class ArrayPlan:
    """What harvest does to one (layer, hook) array."""
    layer: int
    hook: str
    # new: create it (absent, unreadable metadata, or a partial one of other settings with nothing written)
    # restart: --force: mark it incomplete, then create it anew
    # resume: forward the chunks not yet logged (none left: only mark it complete)
    # repair: --repair found damaged chunks among those written: rewrite them (and any not yet logged)
    # skip: complete, and sound as far as was checked
    action: str
    chunks: set[int]  # to forward and write
    d_model: int
    chunk_rows: int
    bad: dict[int, str] = field(default_factory=dict)  # --repair: chunk -> what is wrong with it
    note: str | None = None  # the line harvest prints about it

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.hook


@dataclass
class Plan:
    targets: list[tuple[int, str]]
    tokens: np.ndarray  # int [n_sequences, context_size]: the windows every array is made from
    prepend_bos: bool  # whether each window opens with BOS (the config's wish, if the tokenizer has one)
    fingerprint: dict  # run_fingerprint(cfg)
    chunk_rows: int  # of new arrays; new tokens get chunk_rows // context_size sequences a chunk
    # write: create (or finish) them; rewrite: --repair, their metadata is unreadable;
    # repair: rewrite the damaged chunks `tokens_bad`; keep: they match the windows
    tokens_action: str
    tokens_bad: dict[int, str]
    arrays: list[ArrayPlan]

    @property
    def forward(self) -> list[ArrayPlan]:
        """The arrays with chunks to write: the model runs only for these."""
        return [a for a in self.arrays if a.chunks]

    def notes(self) -> list[str]:
        lines = []
        if self.tokens_action == "rewrite":
            lines.append("harvest: --repair: the tokens' metadata is unreadable; writing them again from the windows")
        if self.tokens_bad:
            lines.append(f"harvest: --repair: rewriting tokens {_chunk_list(self.tokens_bad)}")
        return lines + [a.note for a in self.arrays if a.note]


# ---- the stage

def run(cfg: Config, layers: list[int] | None = None, progress: bool = True,
        repair: bool = False, force: bool = False) -> dict:
    """Harvest `layers` (default: the config's) and return {"harvested": [(layer, hook), ...]}
    plus, when the model ran, "tokens", "seconds" and "bytes_written"."""
    hc = cfg.harvest
    rank, world = dist.rank_world()
    if world > 1 and (repair or force):
        raise UserError("--repair and --force rewrite arrays all ranks share: run them as one process, "
                        "not under torchrun")
    run_dir, where = cfg.run_path, Location.of(cfg)
    _check_writable("run_dir", run_dir)
    if not where.remote:
        _check_writable("store", where.path)
    targets = cfg.targets("harvest", layers)
    if _already_harvested(cfg, targets, run_fingerprint(cfg), quick=not (repair or force)):
        print(f"harvest: {', '.join(f'layer {l} {h}' for l, h in targets)} already harvested in "
              f"{where.path}; nothing to do")
        return {"harvested": []}

    model, tokenizer = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, cfg.model.device)
    check_context_size(model, hc.context_size)
    resolve_hook_points(model, targets)  # layer range and hook paths, before any write
    tokens, prepend_bos = _windows(cfg, tokenizer, progress)

    with run_lock(run_dir, f"harvest.rank{rank}"), dist.group():
        # Under torchrun, rank 0 alone sets the store up (tokens, new arrays); the others plan
        # after it, so they find its arrays and take their own chunks of them. Only rank 0
        # marks arrays complete, once every rank is past its last chunk.
        if rank:
            dist.barrier()
        p = plan(cfg, targets, model, tokens, prepend_bos, repair, force)
        for line in p.notes() if rank == 0 else []:
            print(line)
        store = create_store(where, _run_attrs(cfg, len(tokens), prepend_bos, p.fingerprint))
        _write_tokens(store, p)
        todo = {a.key: (_prepare_array(store, cfg, p, a), a.chunks) for a in p.arrays if a.action != "skip"}
        if rank == 0:
            dist.barrier()
        forward = {key: job for key, job in todo.items() if job[1]}
        stats = _forward_chunks(cfg, model, forward, tokens, rank, world, progress) if forward else {}
        dist.barrier()
        if rank == 0:
            _mark_complete(cfg, todo)
        dist.barrier()
        if not forward:
            what = f"rewrote {len(p.tokens_bad)} tokens chunks; the" if p.tokens_bad else "the"
            print(f"harvest: {what} layers {sorted({l for l, _ in targets})} in {where.path} are "
                  f"complete{' and sound' if repair else ''}; nothing to do")
            return {"harvested": []}
        done = sorted(forward)
        print(f"harvest: wrote {', '.join(f'layer {l} {h}' for l, h in done)} to {where.path}")
        return {"harvested": done, **stats}


def plan(cfg: Config, targets: list[tuple[int, str]], model, tokens: np.ndarray, prepend_bos: bool,
         repair: bool = False, force: bool = False) -> Plan:
    """What harvesting `targets` from `tokens` takes, given what the store holds. Reads only
    (one short forward learns each hook's width); refuses a store of other settings, and
    arrays of other settings unless `force`. Call it under the run's lock."""
    hc = cfg.harvest
    fingerprint = run_fingerprint(cfg)
    store = _existing_store(Location.of(cfg))
    if store is not None:
        _check_same_run(store, len(tokens), prepend_bos, fingerprint)
    d_models = _probe_widths(model, targets, tokens)
    # One chunk height for every new array of the run (>= 1 MiB for the narrowest), so a
    # forward batch of whole sequences fills whole chunks of each.
    chunk_rows = hc.chunk_rows or max(default_chunk_rows(d, dtypes.itemsize(hc.storage_dtype), hc.context_size)
                                      for d in d_models.values())
    tokens_action, tokens_bad = _plan_tokens(store, tokens, repair)
    n_rows = len(tokens) * hc.context_size
    arrays = [_plan_array(store, cfg, key, d_models[key], chunk_rows, n_rows, repair, force) for key in targets]
    return Plan(targets, tokens, prepend_bos, fingerprint, chunk_rows, tokens_action, tokens_bad, arrays)


# ---- fingerprints: what decides the bytes of the store

def run_fingerprint(cfg: Config) -> dict:
    """Run-wide settings, keyed by their config names. data.streaming is left out: same rows either way.
    Paths as the config spells them (Config.as_written), not as load_config made them absolute."""
    d, hc = cfg.data, cfg.harvest
    files = cfg.as_written("data.data_files")
    return {
        "model.name": cfg.as_written("model.name"), "model.revision": cfg.model.revision,
        "data.path": cfg.as_written("data.path"), "data.name": d.name, "data.data_files": files,
        "data.split": d.split, "data.text_column": d.text_column, "data.sha256": data_sha256(d, files),
        "harvest.n_tokens": hc.n_tokens, "harvest.context_size": hc.context_size,
        "harvest.prepend_bos": hc.prepend_bos,
    }


def array_fingerprint(cfg: Config) -> dict:
    hc = cfg.harvest
    return {"harvest.storage_dtype": hc.storage_dtype, "harvest.codec": hc.codec, "model.dtype": cfg.model.dtype}


def data_sha256(data: DataConfig, written_files=None) -> str | None:
    """sha256 over the local data files (name and bytes, streamed); None for a hub dataset.
    `written_files`: data.data_files as the config spells them, the names hashed for them."""
    files = _local_data_files(data, written_files)
    if not files:
        return None
    h = hashlib.sha256()
    for name, path in files:
        h.update(f"{name}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _local_data_files(data: DataConfig, written_files=None) -> list[tuple[str, Path]]:
    root = Path(data.path)
    if root.is_file():
        return [("", root)]
    if root.is_dir():
        return sorted((str(p.relative_to(root)), p) for p in root.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    def listed(files):
        return [files] if isinstance(files, str) else (files or [])

    files = listed(data.data_files)
    names = listed(written_files) if written_files is not None else files
    return [(str(name), Path(f)) for name, f in zip(names, files) if Path(f).is_file()]


def diffs(there: dict, now: dict) -> list[str]:
    """`key: old there, new now` for each key both sides know and disagree on (every fingerprint's
    way of saying what changed: the store's, its arrays', eval's)."""
    def show(v):
        return v[:12] if isinstance(v, str) and len(v) == 64 else repr(v)  # a sha256: its prefix is enough

    return [f"{k}: {show(there[k])} there, {show(v)} now" for k, v in now.items() if k in there and there[k] != v]


def _compare_run(store: ActivationStore, fingerprint: dict):
    attrs = store.attrs
    there = attrs.get("fingerprint")
    if there is None:  # a store made before fingerprints: what its attributes recorded
        ds = attrs.get("dataset") or {}
        there = {"model.name": attrs.get("model"), "model.revision": attrs.get("revision"),
                 "harvest.context_size": attrs.get("context_size"), "data.path": ds.get("path"),
                 "data.name": ds.get("name"), "data.split": ds.get("split"), "data.text_column": ds.get("column"),
                 "data.data_files": ds.get("data_files")}
    # One model named two ways (`models/x/`, `./models/x`) is the same model.
    same_model = model_key(there.get("model.name") or "") == model_key(fingerprint["model.name"])
    changed = diffs({**there, "model.name": fingerprint["model.name"]} if same_model else there, fingerprint)
    if changed:
        raise UserError(f"{store.path} was harvested with other settings: {'; '.join(changed)}; they decide every "
                        "array in it, so use a new run_dir for the new settings, or restore the old ones")


def _array_diffs(arr, cfg: Config) -> list[str]:
    attrs = arr.attrs
    there = attrs.get("fingerprint") or {"harvest.storage_dtype": attrs.get("logical_dtype"),
                                         "harvest.codec": attrs.get("codec")}
    there = {**there, "harvest.chunk_rows": arr.chunks[0]}
    now = array_fingerprint(cfg)
    if cfg.harvest.chunk_rows is not None:  # unset = whatever the array was made with
        now["harvest.chunk_rows"] = cfg.harvest.chunk_rows
    return diffs(there, now)


def _check_same_run(store: ActivationStore, n_sequences: int, prepend_bos: bool, fingerprint: dict):
    _compare_run(store, fingerprint)
    have = store.attrs
    for key, want in (("n_sequences", n_sequences), ("prepend_bos", prepend_bos)):
        if have.get(key) != want:
            raise UserError(
                f"{store.path} was harvested with {key} = {have.get(key)!r} but this config gives "
                f"{want!r}; use a new run_dir, or the config the store was made with"
            )


# ---- before the model loads

def _check_writable(key: str, folder: Path):
    """Refuse a folder harvest could not make or write, before the model loads, the lock is taken or
    anything is written: a file in its place or above it, or a place that denies writes."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        what = "it" if probe == folder else probe
        raise UserError(f"{key} {folder} is not writable: {what} is a file, not a folder; choose another {key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key} {folder} is not writable ({probe} denies writes); choose another {key}")


def _already_harvested(cfg: Config, targets, fingerprint: dict, quick: bool) -> bool:
    """Refuse a store made with other run-wide settings, before the model loads. Then, when
    `quick`: True when every target array is complete, made with these settings and all its
    chunks are present (store.missing_chunks; `saepipe verify` checks their contents too)."""
    store = _existing_store(Location.of(cfg))
    if store is None:
        return False
    _compare_run(store, fingerprint)
    if not quick or not store.has_tokens():
        return False
    arrays = [store.tokens]
    for layer, hook in targets:
        if not store.has(layer, hook):
            return False
        arr = store.array(layer, hook, require_complete=False)
        if not arr.attrs.get("complete", False):
            return False
        diffs = _array_diffs(arr, cfg)
        if diffs:
            raise UserError(f"layer {layer} {hook} in {store.path} was harvested with other settings: "
                            f"{'; '.join(diffs)}; restore them, or re-harvest it with the new ones: {_FORCE_HINT}")
        arrays.append(arr)
    missing = [f"{arr.store_path.path} chunk {c}" for arr in arrays for c in missing_chunks(arr)]
    if missing:
        raise UserError(f"{store.path} is damaged: missing {verify.describe(missing)}; {REPAIR_HINT}")
    return True


def _existing_store(where: Location) -> ActivationStore | None:
    """The run's store opened for reading; None when there is none yet (or a kill came before
    its attributes were written: create_store writes them then)."""
    if not where.exists():
        return None
    store = ActivationStore(where)
    return store if store.attrs.get("context_size") else None


def _windows(cfg: Config, tokenizer, progress: bool) -> tuple[np.ndarray, bool]:
    hc = cfg.harvest
    n_sequences = hc.n_tokens // hc.context_size
    tokens, prepend_bos = make_windows(load_texts(cfg.data), tokenizer, hc.context_size, n_sequences,
                                       hc.prepend_bos, progress=progress)
    if len(tokens) == 0:
        raise UserError(f"dataset {cfg.data.path!r} gave no text: not one window of "
                        f"{hc.context_size} tokens; check data.path, data.split and data.text_column")
    if len(tokens) < n_sequences:
        n_tok = len(tokens) * hc.context_size
        print(f"harvest: the corpus gave {n_tok} tokens ({len(tokens)} windows of {hc.context_size}), fewer than "
              f"harvest.n_tokens = {hc.n_tokens}; the store holds those {n_tok} tokens")
    return tokens, prepend_bos


# ---- planning (reads only)

def _probe_widths(model, targets, tokens) -> dict:
    """Run one short sequence to learn each hook's width (module paths may differ from d_model)."""
    device = next(model.parameters()).device
    out = ActivationCapture(model, targets).run(torch.as_tensor(tokens[:1, :8], device=device).long())
    return {key: int(t.shape[-1]) for key, t in out.items()}


def _plan_tokens(store: ActivationStore | None, tokens: np.ndarray, repair: bool) -> tuple[str, dict[int, str]]:
    """The windows are written once; later runs check them against the store (and, with
    --repair, find its damaged chunks, to rewrite from the windows)."""
    if store is None:
        return "write", {}
    try:
        have = store.has_tokens()
    except MetadataError:
        if not repair:
            raise
        return "rewrite", {}
    if not have:
        return "write", {}
    arr = store.tokens
    if tuple(arr.shape) != tokens.shape:
        raise UserError(f"{store.path} holds {arr.shape[0]} windows of {arr.shape[1]} tokens, this config makes "
                        f"{tokens.shape[0]} of {tokens.shape[1]}: the dataset or tokenizer changed since the first "
                        "harvest; use a new run_dir")
    bad = verify.bad_chunks(arr, range(n_chunks_of(arr)), decode=True) if repair else {}
    rows = arr.chunks[0]
    if bad:  # compare around the damage
        differ = sum(int((store.read_checked(arr, c * rows, (c + 1) * rows) != tokens[c * rows:(c + 1) * rows])
                         .any(axis=1).sum()) for c in range(n_chunks_of(arr)) if c not in bad)
    else:
        differ = int((store.read_tokens(0, len(tokens)) != tokens).any(axis=1).sum())
    if differ:
        raise UserError(
            f"re-tokenized windows differ from the tokens in {store.path} ({differ} sequences differ): "
            "the dataset or tokenizer changed since the first harvest; use a new run_dir"
        )
    return ("repair" if bad else "keep"), bad


def _plan_array(store: ActivationStore | None, cfg: Config, key, d_model: int, chunk_rows: int, n_rows: int,
                repair: bool, force: bool) -> ArrayPlan:
    """A new array gets all its chunks, a partial one those not logged, and with --repair
    any logged chunk that is missing or corrupt."""
    layer, hook = key
    fresh = ArrayPlan(layer, hook, "new", set(range(-(-n_rows // chunk_rows))), d_model, chunk_rows)
    try:
        exists = store is not None and store.has(layer, hook)
    except MetadataError:
        if not (repair or force):
            raise
        fresh.note = f"harvest: the metadata of layer {layer} {hook} is unreadable; harvesting it again"
        return fresh
    if not exists:
        return fresh
    arr = store.array(layer, hook, require_complete=False)
    complete = bool(arr.attrs.get("complete", False))
    diffs = _array_diffs(arr, cfg)
    if arr.shape[1] != d_model:
        diffs.append(f"width: {arr.shape[1]} there, {d_model} now")
    if force:
        fresh.action, fresh.note = "restart", f"harvest: --force: layer {layer} {hook} starts over"
        return fresh
    logged = ProgressLog(cfg.run_dir, layer, hook).done()
    if diffs and (complete or logged):
        how = "was harvested" if complete else "is partly harvested"
        raise UserError(f"layer {layer} {hook} in {store.path} {how} with other settings: {'; '.join(diffs)}; "
                        f"restore them{'' if complete else ' to finish it'}, or start it over with the new "
                        f"ones: {_FORCE_HINT}")
    if diffs:  # partial, nothing written yet: made again with these settings
        return fresh
    n = n_chunks_of(arr)
    done = set(range(n)) if complete else logged
    bad = verify.bad_chunks(arr, sorted(done), decode=True) if repair else {}
    a = ArrayPlan(layer, hook, "resume", (set(range(n)) - done) | set(bad), d_model, arr.chunks[0], bad)
    if bad:
        a.action, a.note = "repair", f"harvest: --repair: rewriting layer {layer} {hook} {_chunk_list(bad)}"
    elif complete:
        a.action, a.note = "skip", f"harvest: layer {layer} {hook} is already complete; skipping"
    return a


def _chunk_list(bad: dict[int, str]) -> str:
    return verify.describe([f"chunk {c} {problem}" for c, problem in sorted(bad.items())])


# ---- writing

def _run_attrs(cfg: Config, n_sequences: int, prepend_bos: bool, fingerprint: dict) -> dict:
    d = cfg.data
    return {
        "model": cfg.model.name, "revision": cfg.model.revision, "tokenizer": cfg.model.name,
        "dataset": {"path": d.path, "name": d.name, "split": d.split, "column": d.text_column,
                    "data_files": d.data_files},
        "context_size": cfg.harvest.context_size, "n_sequences": n_sequences,
        "n_tokens": n_sequences * cfg.harvest.context_size, "prepend_bos": prepend_bos,
        "package_version": pipeline.__version__, "fingerprint": fingerprint,
    }


def _write_tokens(store: ActivationStore, p: Plan):
    tokens = p.tokens
    if p.tokens_action in ("write", "rewrite"):
        arr = store.create_tokens(len(tokens), p.chunk_rows // tokens.shape[1], overwrite=p.tokens_action == "rewrite")
        arr[:] = tokens
        os.sync()  # one sync for the many small chunks, before `complete` says they are there
        set_complete(arr, True)
    elif p.tokens_bad:
        arr = store.tokens
        rows = arr.chunks[0]
        for c in sorted(p.tokens_bad):
            write_chunk(arr, c, tokens[c * rows:(c + 1) * rows])


def _prepare_array(store: ActivationStore, cfg: Config, p: Plan, a: ArrayPlan):
    """The zarr array to write `a.chunks` of: the existing one, or (new, restart) a new one."""
    if a.action not in ("new", "restart"):
        return store.array(a.layer, a.hook, require_complete=False)
    if a.action == "restart":
        # Before any rewrite, so nothing trains on half-new data.
        set_complete(store.array(a.layer, a.hook, require_complete=False), False)
    ProgressLog(cfg.run_dir, a.layer, a.hook).clear()
    return store.create_layer(a.layer, a.hook, a.d_model, cfg.harvest.storage_dtype, cfg.harvest.codec, a.chunk_rows, {
        "model": cfg.model.name, "revision": cfg.model.revision, "context_size": cfg.harvest.context_size,
        "prepend_bos": p.prepend_bos, "package_version": pipeline.__version__, "fingerprint": array_fingerprint(cfg),
    })


def _forward_chunks(cfg: Config, model, todo: dict, tokens, rank: int, world: int, progress: bool) -> dict:
    """Forward the pending chunks, one pass per chunk height (arrays made at different times may differ)."""
    groups: dict[int, dict] = {}
    for key, (arr, pending) in todo.items():
        groups.setdefault(arr.chunks[0], {})[key] = (arr, pending)
    stats = {"tokens": 0, "seconds": 0.0, "bytes_written": 0}
    for chunk_rows, group in sorted(groups.items()):
        for k, v in _forward_group(cfg, model, group, chunk_rows, tokens, rank, world, progress).items():
            stats[k] += v
    return stats


def _forward_group(cfg: Config, model, group: dict, chunk_rows: int, tokens, rank: int, world: int,
                   progress: bool) -> dict:
    hc = cfg.harvest
    ctx = hc.context_size
    chunk_seqs = chunk_rows // ctx
    mine = sorted(c for c in set().union(*(pending for _, pending in group.values())) if c % world == rank)
    logs = {key: ProgressLog(cfg.run_dir, *key, rank=rank) for key in group}

    capture = ActivationCapture(model, list(group))
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    # Cast on the GPU to halve the copy, except float16, whose overflow check needs the original.
    names = {key: arr.attrs["logical_dtype"] for key, (arr, _) in group.items()}
    copy_dtype = {key: None if name == "float16" else dtypes.torch_dtype(name) for key, name in names.items()}

    n_todo_tokens = sum(min(chunk_seqs, len(tokens) - c * chunk_seqs) for c in mine) * ctx
    bar = tqdm(total=n_todo_tokens, unit="tok", unit_scale=True, desc=f"harvest L{sorted({l for l, _ in group})}",
               disable=not progress, smoothing=0.1)
    writer = ChunkWriter({key: arr for key, (arr, _) in group.items()}, logs, names, hc.writer_threads,
                         hc.queue_size)
    t0 = time.perf_counter()
    try:
        for c in mine:
            s0, s1 = c * chunk_seqs, min((c + 1) * chunk_seqs, len(tokens))
            keys = [key for key, (_, pending) in group.items() if c in pending]
            parts = {key: [] for key in keys}
            for b in range(s0, s1, hc.batch_size):
                ids = torch.as_tensor(tokens[b:min(b + hc.batch_size, s1)], device=device).long()
                out = capture.run(ids)
                for key in keys:
                    t = out[key].reshape(-1, out[key].shape[-1])
                    parts[key].append(t.to(copy_dtype[key]) if (on_gpu and copy_dtype[key]) else t)
                bar.update(ids.numel())
            arrays, event = {}, None
            for key in keys:
                t = torch.cat(parts[key])
                if on_gpu:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host.copy_(t, non_blocking=True)
                    t = host
                arrays[key] = t
            if on_gpu:
                event = torch.cuda.Event()
                event.record()
            writer.put(ChunkJob(c, arrays, event))
        bar.set_postfix_str("flushing writes")
    finally:
        try:
            writer.close()
        finally:
            bar.close()
    return {"tokens": n_todo_tokens, "seconds": time.perf_counter() - t0, "bytes_written": writer.bytes_written}


def _mark_complete(cfg: Config, todo: dict):
    """`complete` on each array whose chunks are all logged (by any rank)."""
    for (layer, hook), (arr, _) in todo.items():
        if not arr.attrs.get("complete", False) and set(range(n_chunks_of(arr))) <= ProgressLog(
                cfg.run_dir, layer, hook).done():
            set_complete(arr, True)
