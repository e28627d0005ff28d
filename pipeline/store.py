"""The activation store: `<run_dir>/activations.zarr` (or the config's `store`:
another folder, or any fsspec URL such as s3://bucket/prefix), a Zarr v3 group.

    tokens                 int32 [n_sequences, context_size], written once
    layers/<L>/<hook>      [n_sequences * context_size, d_model], chunked along rows

Row r of a layer array is sequence r // context_size, position r % context_size.
bfloat16 has no zarr dtype, so its bits are stored as uint16 with the array
attribute `logical_dtype: bfloat16`; the round trip is bit-exact.

Integrity guarantees:
- Every chunk of every array is written (`write_empty_chunks=True`) and ends
  in a crc32c of its encoded bytes (zarr's Crc32cCodec, after the compressor).
- Every read goes through `read_rows` / `read_chunk` / `read_tokens`, which
  refuse, in one UserError naming the array, the chunk and its file, a chunk
  that is missing (zarr alone would return zeros) or whose checksum or
  decoding fails. `saepipe verify RUN_DIR` checks a whole store;
  `saepipe harvest CONFIG --repair` rewrites exactly the bad chunks.
  Stores made before checksums (no crc32c codec) still read; for them only
  presence and decoding can be checked. An array whose zarr.json cannot be
  read raises MetadataError (one line, same repair).
- Completion is tracked outside the arrays: a writer fsyncs a chunk's file and
  directories, then appends the chunk id to a log under `<run_dir>/progress/`
  and fsyncs the log. A chunk lost or torn by a kill or a power cut is
  therefore never counted as done, and the array attribute `complete` (its
  zarr.json fsynced) is set only once every chunk is logged.
- On an object store (`Location.remote`) the same checks read through zarr's
  FsspecStore: the checksum is of the object's bytes, and a read-only store
  finds a missing chunk from the GET itself (no HEAD before it).
  There is nothing to fsync: an object PUT is whole and durable once the call
  returns, so a chunk is logged after its PUT. Progress logs and locks stay
  in the (local) run_dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from pipeline import dtypes
from pipeline.errors import UserError
from pipeline.fsio import fsync_dir, fsync_file
from pipeline.paths import is_url

STORE_NAME = "activations.zarr"
REPAIR_HINT = "rewrite the bad chunks with `saepipe harvest CONFIG --repair` (CONFIG: this run's config)"


def store_path(run_dir) -> Path:
    return Path(run_dir) / STORE_NAME


@dataclass(frozen=True)
class Location:
    """Where a run's store lives: the run_dir (progress logs, locks) is always local; the
    store is `<run_dir>/activations.zarr` unless `url` names another folder or an fsspec URL.

    A memory:// URL is taken here, for tests and benchmarks that write and read a store in one
    process; a config's `store` refuses it (pipeline.config), since each stage is its own process."""
    run_dir: Path
    url: str | None = None
    options: dict = field(default_factory=dict)  # fsspec options of a URL (endpoint_url, anon, ...)

    @classmethod
    def of(cls, cfg) -> "Location":
        """The location a Config names (`store`, `store_options`)."""
        return cls(Path(cfg.run_dir), cfg.store, dict(cfg.store_options or {}))

    @property
    def remote(self) -> bool:
        return self.url is not None and is_url(self.url)

    @property
    def path(self) -> Path | str:
        """What messages call the store: its folder, or its URL."""
        if self.remote:
            return self.url.rstrip("/")
        return Path(self.url) if self.url else store_path(self.run_dir)

    def zarr_store(self, read_only: bool):
        if not self.remote:
            return str(self.path)
        # Listings are not cached: a cached listing would call a chunk written since "missing".
        options = {"use_listings_cache": False, **self.options}
        store = FsspecStore.from_url(self.path, storage_options=options, read_only=read_only)
        return _MissingChunksRaise(store) if read_only else store

    def exists(self) -> bool:
        """Whether the store's group metadata is there (a store to open, not create)."""
        if not self.remote:
            return (self.path / "zarr.json").exists()
        try:
            return sync(self.zarr_store(read_only=True).exists("zarr.json"))
        except Exception as e:  # noqa: BLE001 - no such bucket, refused connection, bad credentials
            raise self.unreachable(e) from None

    def unreachable(self, e: Exception) -> UserError:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UserError(f"cannot reach the store {self.path} ({type(e).__name__}: {why}); check the URL, "
                         "store_options (e.g. endpoint_url) and the credentials in the environment")


class MissingChunk(KeyError):
    pass


class _MissingChunksRaise(WrapperStore):
    """A read-only remote store on which reading a chunk that is not there raises, where zarr
    alone would hand back fill values: presence is then checked by the GET itself, not by a
    HEAD before it (one request a chunk instead of two)."""

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and "/c/" in f"/{key}" and not key.endswith("zarr.json"):
            raise MissingChunk(key)
        return buf


def locate(where) -> Location:
    """A Location from itself or from a run_dir (the store at its default place)."""
    return where if isinstance(where, Location) else Location(Path(where))


def array_name(layer: int, hook: str) -> str:
    return f"layers/{layer}/{hook}"


def compressors_for(codec: str) -> list:
    """The bytes-to-bytes codecs of a new array: the compressor, then a crc32c of its output."""
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    raise ValueError(codec)


def default_chunk_rows(d_model: int, itemsize: int, context_size: int) -> int:
    """Smallest multiple of context_size whose chunk holds >= 1 MiB."""
    rows = -(-(1 << 20) // (d_model * itemsize))
    return -(-rows // context_size) * context_size


def to_storage(x: torch.Tensor, logical_dtype: str) -> np.ndarray:
    """`x` cast to the logical dtype, as the numpy array the store writes (bfloat16: its bits)."""
    dt = dtypes.lookup(logical_dtype)
    return x.to(dt.torch).contiguous().cpu().view(dt.stored).numpy()


def from_storage(a: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """What `to_storage` wrote, back as a CPU tensor of the logical dtype (bit-exact)."""
    return torch.from_numpy(np.ascontiguousarray(a)).view(dtypes.torch_dtype(logical_dtype))


# ---- chunks as the store sees them (arrays are chunked along rows only)

def n_chunks_of(arr: zarr.Array) -> int:
    return -(-arr.shape[0] // arr.chunks[0])


def chunk_key(arr: zarr.Array, c: int) -> str:
    coords = (c,) + (0,) * (arr.ndim - 1)
    return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(coords)}"


def chunk_file(arr: zarr.Array, c: int) -> Path | None:
    """The chunk's file on local disk; None for other stores."""
    store = arr.store_path.store
    return Path(store.root) / chunk_key(arr, c) if isinstance(store, LocalStore) else None


def chunk_location(arr: zarr.Array, c: int) -> str:
    """The chunk's file, or its URL on an fsspec store."""
    path = chunk_file(arr, c)
    if path is not None:
        return str(path)
    store = arr.store_path.store
    store = getattr(store, "_store", store)  # under a WrapperStore
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
        return f"{protocol}://{store.path.strip('/')}/{chunk_key(arr, c)}"
    return f"{store}/{chunk_key(arr, c)}"


def has_crc(arr: zarr.Array) -> bool:
    """Whether every chunk ends in a crc32c of the bytes before it (arrays made before checksums do not)."""
    return isinstance(arr.metadata.codecs[-1], Crc32cCodec)


def chunk_exists(arr: zarr.Array, c: int) -> bool:
    path = chunk_file(arr, c)
    if path is not None:
        return path.is_file()  # one stat; the store API costs ~0.1 ms a call
    return sync(arr.store_path.store.exists(chunk_key(arr, c)))


def missing_chunks(arr: zarr.Array) -> list[int]:
    """The chunks of `arr` that are not there: one stat each on disk; on another store one
    listing of the array's keys (a request per 1000 objects on S3), not a HEAD per chunk."""
    n = n_chunks_of(arr)
    if chunk_file(arr, 0) is not None:
        return [c for c in range(n) if not chunk_exists(arr, c)]
    want = {chunk_key(arr, c): c for c in range(n)}

    async def keys():
        return [k async for k in arr.store_path.store.list_prefix(f"{arr.store_path.path}/")]

    have = set(sync(keys()))
    return [c for key, c in want.items() if key not in have]


def read_raw_chunk(arr: zarr.Array, c: int) -> bytes | None:
    """The chunk's encoded bytes as stored, or None when it is missing."""
    path = chunk_file(arr, c)
    if path is not None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    try:
        buf = sync(arr.store_path.store.get(chunk_key(arr, c), prototype=default_buffer_prototype()))
    except MissingChunk:
        return None
    return None if buf is None else buf.to_bytes()


def crc_ok(raw: bytes) -> bool:
    """Crc32cCodec's check without decoding: the last 4 bytes are the little-endian
    crc32c of all the bytes before them."""
    if len(raw) < 4:
        return False
    body = np.frombuffer(raw, dtype=np.uint8)[:-4]  # a view: no copy of a large chunk
    return google_crc32c.value(body) == int.from_bytes(raw[-4:], "little")


def chunk_problem(arr: zarr.Array, c: int, decode: bool = False) -> str | None:
    """What is wrong with chunk c, from its raw bytes; None when it is sound. Arrays without
    checksums can only be checked for presence, or (`decode`) by decoding the chunk."""
    raw = read_raw_chunk(arr, c)
    if raw is None:
        return "missing"
    if has_crc(arr):
        return None if crc_ok(raw) else f"corrupt (checksum mismatch, {len(raw)} bytes)"
    if decode:
        rows = arr.chunks[0]
        try:
            arr[c * rows:(c + 1) * rows]
        except Exception as e:  # noqa: BLE001 - any decoder's complaint means a bad chunk
            return f"corrupt (cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def sync_chunk(arr: zarr.Array, c: int) -> None:
    """fsync a written chunk's file and the folders below the array's that name it (local
    stores only; zarr's LocalStore renames a temp file into place but never fsyncs). The
    array's own folder was made durable, `c/` in it, when the array was created."""
    path = chunk_file(arr, c)
    if path is None:
        return
    fsync_file(path)
    root = Path(arr.store_path.store.root) / arr.store_path.path
    d = path.parent
    while d != root:
        fsync_dir(d)
        d = d.parent


def _make_chunk_root(arr: zarr.Array) -> None:
    """Create the folder chunk keys start with (`c/` for zarr's default keys), so that
    syncing the new array's folder once covers it."""
    path = chunk_file(arr, 0)
    root = Path(arr.store_path.store.root) / arr.store_path.path if path is not None else None
    if path is not None and path.parent != root:
        (root / path.relative_to(root).parts[0]).mkdir(exist_ok=True)


def sync_node(node) -> None:
    """fsync a group's or array's zarr.json and the directories above it up to the run dir."""
    store = node.store_path.store
    if not isinstance(store, LocalStore):
        return
    root = Path(store.root)
    d = root / node.store_path.path if node.store_path.path else root
    fsync_file(d / "zarr.json")
    while True:
        fsync_dir(d)
        if d == root.parent:
            break
        d = d.parent


def set_complete(arr: zarr.Array, complete: bool) -> None:
    arr.attrs["complete"] = complete
    sync_node(arr)


class ChunkError(UserError):
    """A chunk that is missing or corrupt: the store is damaged."""

    def __init__(self, store_dir: Path, arr: zarr.Array, c: int, problem: str):
        super().__init__(
            f"{store_dir}: array {arr.store_path.path} chunk {c} is {problem} ({chunk_location(arr, c)}); "
            f"{REPAIR_HINT}, and check the whole store with `saepipe verify {_verify_arg(store_dir)}`"
        )


def _verify_arg(store_dir) -> str:
    """What `saepipe verify` takes for this store: its run_dir, or (a store elsewhere) the config."""
    return str(store_dir.parent) if isinstance(store_dir, Path) and store_dir.name == STORE_NAME else "CONFIG"


class MetadataError(UserError):
    """An array whose zarr.json cannot be read."""

    def __init__(self, store_dir: Path, name: str, err: Exception):
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        super().__init__(f"{store_dir}: the metadata of {name} ({store_dir}/{name}/zarr.json) cannot be read "
                         f"({why}); {REPAIR_HINT}")


class ProgressLog:
    """Append-only log of finished chunk ids for one array and one writer rank."""

    def __init__(self, run_dir, layer: int, hook: str, rank: int = 0):
        self.dir = Path(run_dir) / "progress"
        self.path = self.dir / f"{layer}.{hook}.rank{rank}.log"
        self.layer, self.hook = layer, hook

    def done(self) -> set[int]:
        """Chunks logged by any rank (a torn last line is ignored)."""
        out = set()
        for p in self.dir.glob(f"{self.layer}.{self.hook}.rank*.log"):
            for line in p.read_text().split("\n"):
                if line.endswith(";"):
                    out.add(int(line[:-1]))
        return out

    def add(self, chunk: int):
        """Log a chunk whose file is already durable; the line itself is fsynced too."""
        new = not self.path.exists()
        if new and not self.dir.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir.parent)
        # One small O_APPEND write per line: concurrent writers never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{chunk};\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.dir)

    def clear(self):
        for p in self.dir.glob(f"{self.layer}.{self.hook}.rank*.log"):
            p.unlink()
        if self.dir.exists():
            fsync_dir(self.dir)


class ActivationStore:
    """Read access to a harvested run (and the small write helpers harvest uses)."""

    def __init__(self, where, mode: str = "r"):
        """`where`: a run_dir (the store in it) or a Location."""
        self.location = locate(where)
        self.run_dir = self.location.run_dir
        self.path = self.location.path
        # Read-only, the arrays are opened once: on an object store every open is a request.
        self._nodes: dict[str, zarr.Array | None] | None = {} if mode == "r" else None
        if mode == "r" and not self.location.exists():
            raise UserError(f"no activation store at {self.path}; run `make harvest` first")
        try:
            self.group = zarr.open_group(self.location.zarr_store(read_only=mode == "r"),
                                         mode="r" if mode == "r" else "a")
        except Exception as e:  # noqa: BLE001 - a damaged zarr.json, whatever the parser says
            if self.location.remote and not isinstance(e, (ValueError, KeyError)):
                raise self.location.unreachable(e) from None
            raise UserError(f"{self.path}/zarr.json cannot be read ({str(e).splitlines()[0] if str(e) else e!r}); "
                            "the run's store is damaged beyond chunk repair: harvest into a new run_dir") from None

    # ---- metadata
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def context_size(self) -> int:
        return int(self.group.attrs["context_size"])

    def node(self, name: str) -> zarr.Array | None:
        """The array at `name`, None when there is none; MetadataError when its zarr.json is damaged."""
        if self._nodes is not None and name in self._nodes:
            return self._nodes[name]
        try:
            node = self.group[name] if name in self.group else None
        except Exception as e:  # noqa: BLE001 - a damaged zarr.json, whatever the parser says
            if self.location.remote and isinstance(e, OSError):  # no answer at all: not damage
                raise self.location.unreachable(e) from None
            raise MetadataError(self.path, name, e) from None
        if self._nodes is not None:
            self._nodes[name] = node
        return node

    def list_dir(self, prefix: str) -> list[str]:
        """The names one level below `prefix` in the store (folders and files alike), [] when none."""
        async def names():
            return [n async for n in self.group.store.list_dir(prefix)]

        try:
            return sync(names())
        except FileNotFoundError:
            return []

    def has_tokens(self) -> bool:
        arr = self.node("tokens")
        return arr is not None and bool(arr.attrs.get("complete", False))

    @property
    def tokens(self) -> zarr.Array:
        """The tokens array, for its shape and chunks; read its values with `read_tokens`."""
        if not self.has_tokens():
            raise UserError(f"{self.path} has no complete `tokens` array; rerun `make harvest`")
        return self.group["tokens"]

    def entries(self, complete_only: bool = True) -> list[tuple[int, str]]:
        """(layer, hook) pairs present in the store, sorted."""
        out = []
        if "layers" not in self.group:
            return out
        for lname, lgroup in self.group["layers"].groups():
            for hook, arr in lgroup.arrays():
                if not complete_only or arr.attrs.get("complete", False):
                    out.append((int(lname), hook))
        return sorted(out)

    def has(self, layer: int, hook: str) -> bool:
        return self.node(array_name(layer, hook)) is not None

    def array(self, layer: int, hook: str, require_complete: bool = True) -> zarr.Array:
        arr = self.node(array_name(layer, hook))
        if arr is None:
            have = ", ".join(f"{l}/{h}" for l, h in self.entries(False)) or "nothing"
            raise UserError(
                f"layer {layer} hook {hook} is not in {self.path} (it holds: {have}); "
                f"harvest it first: make harvest LAYERS={layer}"
            )
        if require_complete and not arr.attrs.get("complete", False):
            raise UserError(
                f"layer {layer} hook {hook} in {self.path} is only partly harvested; "
                f"rerun the same `make harvest` to finish it"
            )
        return arr

    def d_model(self, layer: int, hook: str) -> int:
        return int(self.array(layer, hook, False).shape[1])

    def n_rows(self, layer: int, hook: str) -> int:
        return int(self.array(layer, hook, False).shape[0])

    def chunk_rows(self, layer: int, hook: str) -> int:
        return int(self.array(layer, hook, False).chunks[0])

    def dtype(self, layer: int, hook: str) -> torch.dtype:
        """The dtype rows are read as (the logical one)."""
        return dtypes.torch_dtype(self.array(layer, hook, False).attrs["logical_dtype"])

    def row_bytes(self, layer: int, hook: str) -> int:
        """Bytes of one row once read (the logical dtype)."""
        arr = self.array(layer, hook, False)
        return int(arr.shape[1]) * dtypes.itemsize(arr.attrs["logical_dtype"])

    def n_chunks(self, layer: int, hook: str) -> int:
        return n_chunks_of(self.array(layer, hook, False))

    # ---- reads: the only way stages read the store, so every chunk is checked
    def read_rows(self, layer: int, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a CPU tensor of the logical dtype."""
        arr = self.array(layer, hook)
        return from_storage(self.read_checked(arr, start, stop), arr.attrs["logical_dtype"])

    def read_chunk(self, layer: int, hook: str, chunk: int) -> torch.Tensor:
        rows = self.chunk_rows(layer, hook)
        return self.read_rows(layer, hook, chunk * rows, (chunk + 1) * rows)

    def read_tokens(self, start_seq: int, stop_seq: int) -> np.ndarray:
        return self.read_checked(self.tokens, start_seq, stop_seq)

    def read_checked(self, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        """arr[start:stop], refusing a missing or corrupt chunk with a ChunkError."""
        rows, n = arr.chunks[0], arr.shape[0]
        start, stop = max(0, start), min(stop, n)
        chunks = range(start // rows, -(-stop // rows)) if stop > start else range(0)
        if not isinstance(arr.store_path.store, _MissingChunksRaise):  # (there, the read itself says)
            for c in chunks:
                if not chunk_exists(arr, c):
                    raise ChunkError(self.path, arr, c, "missing")
        try:
            return arr[start:stop]
        except Exception as e:
            # Find the chunk to blame: its checksum, or (without one) whether it decodes alone.
            try:
                problems = ((c, chunk_problem(arr, c, decode=True)) for c in chunks)
                c, problem = next(((c, p) for c, p in problems if p is not None), (None, None))
            except Exception:  # noqa: BLE001 - the raw reads fail too: the store, not a chunk
                if not self.location.remote:
                    raise
                raise self.location.unreachable(e) from None
            if problem is not None:
                raise ChunkError(self.path, arr, c, problem) from None
            if self.location.remote:  # sound bytes that failed to arrive: the connection
                raise self.location.unreachable(e) from None
            raise  # the bytes are as written: not damage, a bug

    # ---- writes (harvest, and tests that synthesize stores)
    def create_tokens(self, n_sequences: int, chunk_sequences: int, overwrite: bool = False) -> zarr.Array:
        ctx = self.context_size
        arr = None if overwrite else self.node("tokens")
        if arr is not None:
            if tuple(arr.shape) != (n_sequences, ctx):
                raise UserError(
                    f"{self.path} holds tokens of shape {tuple(arr.shape)}, this config makes "
                    f"{(n_sequences, ctx)}; use a new run_dir or the original config"
                )
            return arr
        arr = self.group.create_array(
            "tokens", shape=(n_sequences, ctx), chunks=(chunk_sequences, ctx), dtype="int32",
            compressors=compressors_for("zstd"), config={"write_empty_chunks": True}, overwrite=overwrite,
        )
        _make_chunk_root(arr)
        sync_node(arr)
        return arr

    def create_layer(self, layer: int, hook: str, d_model: int, logical_dtype: str, codec: str,
                     chunk_rows: int, attrs: dict) -> zarr.Array:
        """Preallocate the full [N, d] array (never appended to, so writers can't race)."""
        n_rows = self.tokens_shape[0] * self.context_size
        arr = self.group.create_array(
            array_name(layer, hook), shape=(n_rows, d_model), chunks=(chunk_rows, d_model),
            dtype=dtypes.storage_dtype(logical_dtype), compressors=compressors_for(codec),
            config={"write_empty_chunks": True}, overwrite=True,
            attributes={"layer": layer, "hook": hook, "logical_dtype": logical_dtype, "codec": codec,
                        "d_model": d_model, "complete": False, **attrs},
        )
        _make_chunk_root(arr)
        sync_node(arr)
        return arr

    @property
    def tokens_shape(self) -> tuple[int, int]:
        return tuple(self.group["tokens"].shape)


def write_chunk(arr: zarr.Array, c: int, data: np.ndarray) -> None:
    """Write the whole chunk c (the last one may be short) and make it durable."""
    path = chunk_file(arr, c)
    if path is not None and path.parent.is_dir():
        # zarr writes `<name>.<uuid>.partial` and renames it; a kill mid-write leaves one behind.
        for stray in path.parent.glob(f"{path.name}.*.partial"):
            stray.unlink()
    start = c * arr.chunks[0]
    # write_empty_chunks is a runtime setting, not stored: an array reopened from its zarr.json (a
    # resumed or repaired harvest) would delete an all-zero chunk instead of writing it.
    arr = arr if arr.config.write_empty_chunks else arr.with_config({"write_empty_chunks": True})
    try:
        arr[start:start + data.shape[0]] = data
    except OSError as e:  # a full disk: say where (a failed write() names no file)
        if path is None:  # an object store: the network, the bucket or the credentials
            raise _write_failed(arr, c, e) from None
        if e.filename is None:
            e.filename = chunk_location(arr, c)
        raise
    except Exception as e:  # noqa: BLE001 - botocore's errors are no OSError
        if path is None:
            raise _write_failed(arr, c, e) from None
        raise
    sync_chunk(arr, c)


def _write_failed(arr: zarr.Array, c: int, e: Exception) -> UserError:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"writing {chunk_location(arr, c)} failed ({type(e).__name__}: {why}); check the store's URL, "
                     "store_options and credentials, then rerun the same harvest: it resumes after the chunks "
                     "already written")


def create_store(where, attrs: dict) -> ActivationStore:
    """Open (creating if needed) the store group for writing, with group attributes.
    `where`: a run_dir (the store in it) or a Location."""
    loc = locate(where)
    if not loc.remote:
        loc.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        group = zarr.open_group(loc.zarr_store(read_only=False), mode="a")
        if not group.attrs.get("context_size"):
            group.attrs.update(attrs)
            sync_node(group)
    except Exception as e:  # noqa: BLE001 - no such bucket, refused connection, bad credentials
        if not loc.remote or isinstance(e, UserError):
            raise
        raise loc.unreachable(e) from None
    return ActivationStore(loc, mode="a")


def write_synthetic(where, acts: torch.Tensor, tokens: np.ndarray, layer: int = 0, hook: str = "resid_post",
                    storage_dtype: str = "float32", chunk_rows: int | None = None, codec: str = "lz4",
                    attrs: dict | None = None) -> ActivationStore:
    """A complete store from in-memory arrays, for tests and benchmarks (progress logged as harvest does).

    acts [n_sequences * ctx, d]; tokens int [n_sequences, ctx].
    """
    n_seq, ctx = tokens.shape
    assert acts.shape[0] == n_seq * ctx, "acts must have n_sequences * context_size rows"
    base = {"model": "synthetic", "revision": "none", "context_size": ctx, "n_sequences": n_seq,
            "n_tokens": n_seq * ctx, "prepend_bos": False, "dataset": {"path": "synthetic"},
            "tokenizer": "synthetic"}
    store = create_store(where, {**base, **(attrs or {})})
    run_dir = store.run_dir
    chunk_rows = chunk_rows or default_chunk_rows(acts.shape[1], dtypes.itemsize(storage_dtype), ctx)
    tok = store.create_tokens(n_seq, chunk_rows // ctx)
    tok[:] = tokens.astype(np.int32)
    tok.attrs["complete"] = True
    arr = store.create_layer(layer, hook, acts.shape[1], storage_dtype, codec, chunk_rows, {})
    arr[:] = to_storage(acts, storage_dtype)
    log = ProgressLog(run_dir, layer, hook)
    for c in range(n_chunks_of(arr)):
        log.add(c)
    arr.attrs["complete"] = True
    return store
