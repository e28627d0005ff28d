"""Durable files: the one owner of atomic writes, fsync, folder swaps, run locks
and deferred Ctrl-C.

A file is durable only once it and its directory are fsynced; a rename makes
it visible, not durable. So every result a stage publishes goes

    write tmp -> fsync tmp -> rename over the final name -> fsync the directory

and a killed or crashed process leaves either the old file or the new one,
never a torn one. Folders are published the same way (`swap_dir`): the new
folder is complete (its `done` marker inside) before it takes the name, and
the old one keeps its name until then.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pipeline.errors import UserError
from pipeline.paths import leaf


def fsync_dir(path) -> None:
    """Make the names in a directory (renames, new files) durable."""
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data: str | bytes, durable: bool = True) -> None:
    """Replace `path` with `data`: a kill leaves the old content or the new, never part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def publish(tmp, path) -> None:
    """Rename a finished temp file over `path` durably (for files written by other libraries)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def old_name(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def swap_dir(new, final) -> None:
    """Make the complete folder `new` take the name `final`, then delete the old one.

    The old folder is renamed aside, not deleted, until the new one holds the
    name; `recover_swap` finishes or undoes a swap a kill interrupted.
    """
    new, final = Path(new), Path(final)
    # One sync for the whole tree: fsync of each of 100k record files would take minutes.
    os.sync()
    old = old_name(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_swap(final) -> None:
    """After a kill inside `swap_dir`: the old folder aside and no new one in place
    means the new never took the name, so the old gets it back."""
    final = Path(final)
    old = old_name(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)  # the swap finished; only the cleanup was cut short
        else:
            os.replace(old, final)
            fsync_dir(final.parent)


@contextmanager
def run_lock(run_dir, stage: str, what: str | None = None):
    """An exclusive flock on `<run_dir>/.<stage>.lock`, refused at once (one line) when
    another process holds it. The kernel drops it when the holder dies, so a killed
    run never leaves a stale lock; a run that ends, finished or failed, removes the file."""
    run_dir = Path(run_dir)
    make_dirs(run_dir, "run_dir", run_dir)
    path = run_dir / f".{stage}.lock"
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"another `saepipe {stage.split('.')[0]}` is working on {what or run_dir} right now; wait "
                            "for it to finish (or stop it) and rerun") from None
        # The holder before us may have removed the file between our open and our flock: a lock on
        # that orphan guards nothing, so lock whatever file holds the name now.
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        # Removed while still held: whoever opened it meanwhile finds it orphaned (above) and retries.
        path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextmanager
def target_locks(run_dir, stage: str, targets):
    """One `run_lock` per (layer, hook) or (layer, hook, member) a stage will work on, all taken
    before any work, so a second process on any of them is refused up front, not halfway. A member
    None is the plain (layer, hook): the lock follows the folder (pipeline.paths.leaf)."""
    with ExitStack() as stack:
        for layer, hook, *member in targets:
            name = leaf(hook, *member)
            stack.enter_context(run_lock(run_dir, f"{stage}.{layer}.{name}", f"layer {layer} hook {name} of {run_dir}"))
        yield


@contextmanager
def no_interrupt():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it.

    For short writes that must not be cut in half by an exception raised inside
    a library (torch.save turns KeyboardInterrupt into RuntimeError). A kill
    cannot be held; the temp-then-rename protocol covers that.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if got:
            raise KeyboardInterrupt


# errno -> what the user can do about it
_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_error_message(e: OSError) -> str | None:
    """One line for an OSError the user can fix (disk full, read-only), else None."""
    why = _DISK_ERRORS.get(e.errno)
    if why is None:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    return (f"{why}{where}; free space or fix permissions (or choose another run_dir) and rerun the same command: "
            "finished results are intact and interrupted work resumes")


def make_dirs(path, key: str, value) -> Path | None:
    """`mkdir -p path`, or one UserError saying why the setting `key` (= `value`) cannot be used: a
    file in the way, or a place that takes no new folders. Returns the topmost folder it made (None
    when `path` was there), so a caller that fails later can remove exactly what it made."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        there = next(p for p in (path, *path.parents) if p.exists())
        if not there.is_dir():
            why = f"{there} is a file, not a folder"
        else:
            why = f"cannot create a folder in {there} ({_DISK_ERRORS.get(e.errno) or e.strerror or type(e).__name__})"
        raise UserError(f"{key} {value}: {why}; choose another {key}") from None
    return made[-1] if made else None


def read_json(path) -> dict:
    """A JSON object from a file, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def tree_size(folder) -> int:
    """Bytes in the files under `folder` (what a stage reports it left on disk)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
