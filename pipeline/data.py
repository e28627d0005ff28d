"""Text in, fixed windows of token ids out.

Documents are concatenated in dataset order with the tokenizer's separator
after each, then cut into windows of `context_size` tokens, BOS first when
the model uses one. Nothing here is random, so a later run on a new layer
re-creates exactly the same windows and can check them against the store.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.errors import UserError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_LOCAL_BUILDERS = {"json", "parquet", "text", "csv", "arrow"}
_TEXT_SUFFIXES = {".json", ".jsonl", ".txt", ".csv"}


def load_texts(data: DataConfig) -> Iterator[str]:
    """The text column of the configured dataset, in order (checked before the first row)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    from pipeline.fsio import disk_error_message
    from pipeline.model import hub_unreachable, quiet_hf

    quiet_hf()
    path, files = data.path, data.data_files
    local = Path(path).exists()
    if local and Path(path).is_file():
        builder = _BUILDERS.get(Path(path).suffix)
        if builder is None:
            raise UserError(f"data.path {path}: unknown file type; use .jsonl, .json, .parquet, .txt or .csv")
        path, files = builder, str(path)
    named = [Path(f) for f in ([files] if isinstance(files, str) else (files or []))] if path in _LOCAL_BUILDERS else []
    if path in _LOCAL_BUILDERS:
        for f in named:
            if not f.exists():
                raise UserError(f"data.data_files: {f} does not exist")
        if not named:
            raise UserError(f"data.path is the {path} builder, so data.data_files must name the files")
    for f in named:
        _check_not_empty(f)

    # A hub id: without network, datasets retries for ~25 s before looking in its cache.
    # When the hub cannot answer, go to the cache at once (datasets' own offline mode).
    hub_id = not local and path not in _LOCAL_BUILDERS and (path.count("/") <= 1 or path.startswith("hf://"))
    down = hub_unreachable() if hub_id else None
    try:
        with _datasets_offline(down is not None):
            ds = load_dataset(path, data.name, data_files=files, split=data.split, streaming=data.streaming)
    except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub"
        if down is None:
            raise UserError(f"cannot reach the Hugging Face hub for dataset {data.path!r}: {_first_line(e)}") from None
        raise UserError(
            f"dataset {data.path!r} is not in the local Hugging Face cache and the hub is unreachable ({down}); "
            "download it once with network access, or point data.path at a local .jsonl/.parquet/.txt/.csv file"
        ) from None
    except (DatasetsError, ValueError, OSError) as e:
        if isinstance(e, OSError) and disk_error_message(e) is not None:
            raise
        raise _load_error(data, named, e) from None
    columns = ds.column_names
    if columns is not None and data.text_column not in columns:
        raise UserError(
            f"data.text_column {data.text_column!r} is not in dataset {data.path!r}; "
            f"its columns are: {', '.join(columns)}"
        )
    return _column(ds, data, named)


def _column(ds, data: DataConfig, files: list[Path]) -> Iterator[str]:
    from datasets.exceptions import DatasetsError

    col = data.text_column
    rows = iter(ds)
    i = 0
    while True:
        try:  # a streamed file is parsed as it is read, so its errors surface here
            row = next(rows)
        except StopIteration:
            return
        except (DatasetsError, ValueError) as e:
            raise _load_error(data, files, e) from None
        text = row.get(col)
        if not isinstance(text, str):
            what = "null (or missing)" if text is None else f"{type(text).__name__} {_clip(repr(text))}"
            raise UserError(f"row {i} (counting from 0) of data.text_column {col!r} in {data.path!r} is {what}; "
                            "every row must be a string")
        yield text
        i += 1


def _check_not_empty(f: Path):
    if f.is_dir():
        return
    if f.stat().st_size == 0:
        raise UserError(f"data file {f} is empty (0 bytes); point data.path at a file that holds text")
    if f.suffix in _TEXT_SUFFIXES:
        with f.open("rb") as fh:  # stops at the first non-blank byte: cheap on a real corpus
            while block := fh.read(1 << 16):
                if block.strip():
                    return
        raise UserError(f"data file {f} holds only blank lines; point data.path at a file that holds text")


def _load_error(data: DataConfig, files: list[Path], e: Exception) -> UserError:
    """The first bad line of a local JSON file when there is one, else the library's own first line."""
    for f in files:
        if f.is_file() and f.suffix in (".json", ".jsonl"):
            where = _json_problem(f)
            if where:
                return UserError(f"data file {f}: {where}; fix or remove it (every row a JSON object "
                                 f"such as {{\"{data.text_column}\": \"...\"}})")
    return UserError(f"cannot load dataset {data.path!r} (split {data.split}): {_first_line(e.__cause__ or e)}")


def _json_problem(f: Path) -> str | None:
    """Where a JSON or JSON-lines file stops being a list of objects (None when it does not)."""
    import json

    with f.open(encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):  # one JSON document holding a list of rows
        try:
            rows = json.loads(f.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} column {e.colno} is not valid JSON ({e.msg})"
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None) if isinstance(rows, list) else None
        return None if bad is None else f"item {bad} of the list is not a JSON object"
    with f.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return f"line {n} is not UTF-8 text"
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} is a JSON {type(row).__name__}, not an object"
    return None


@contextmanager
def _datasets_offline(on: bool):
    """datasets reads its offline switch at call time: flip it for one load."""
    import datasets.config

    if not on:
        yield
        return
    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def special_ids(tokenizer, prepend_bos: bool | None) -> tuple[bool, int | None, int | None]:
    """(prepend_bos, bos_id, sep_id); BOS falls back to CLS and SEP to the separator."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos and bos is None:
        raise UserError("harvest.prepend_bos is true but the tokenizer has no BOS or CLS token; set it to false")
    return prepend_bos, bos, sep


def pad_id(tokenizer) -> int:
    """The token that blanks another one out (explain's N2G replaces tokens by it): the
    tokenizer's pad token, else its EOS, else its UNK."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token is not None:
            return int(token)
    raise UserError("the tokenizer has no pad, EOS or UNK token to blank tokens out with")


def make_windows(texts, tokenizer, context_size: int, n_sequences: int, prepend_bos: bool | None,
                 batch_docs: int = 256, block_rows: int = 4096, progress: bool = True,
                 skip_sequences: int = 0) -> tuple[np.ndarray, bool]:
    """Token windows int32 [<= n_sequences, context_size] and the prepend_bos used.

    n_sequences is an upper bound (harvest.n_tokens may far exceed the corpus), so
    windows fill fixed blocks of `block_rows` joined at the end: memory follows
    what the corpus gives, never the budget. The first `skip_sequences` windows
    are cut and dropped: eval takes the windows that follow the harvested ones.
    """
    prepend_bos, bos, sep = special_ids(tokenizer, prepend_bos)
    body = context_size - 1 if prepend_bos else context_size
    blocks: list[np.ndarray] = []
    used = room = 0  # rows used in, and rows of, the last block
    filled = skipped = 0
    buf: list[int] = []
    bar = tqdm(total=n_sequences, desc="tokenize", unit="seq", disable=not progress, leave=False)

    def flush():
        nonlocal buf, filled, skipped, used, room
        start = 0
        while skipped < skip_sequences and len(buf) - start >= body:
            skipped += 1
            start += body
        while len(buf) - start >= body and filled < n_sequences:
            if used == room:
                room, used = min(block_rows, n_sequences - filled), 0
                blocks.append(np.empty((room, context_size), dtype=np.int32))
            row = buf[start:start + body]
            blocks[-1][used] = ([bos] + row) if prepend_bos else row
            used += 1
            filled += 1
            start += body
            bar.update(1)
        buf = buf[start:]

    batch: list[str] = []
    try:
        for text in texts:
            batch.append(text)
            if len(batch) == batch_docs:
                _extend(buf, tokenizer, batch, sep)
                batch = []
                flush()
                if filled == n_sequences:
                    break
        if batch and filled < n_sequences:
            _extend(buf, tokenizer, batch, sep)
            flush()
    finally:
        bar.close()
    if not blocks:
        return np.empty((0, context_size), dtype=np.int32), prepend_bos
    blocks[-1] = blocks[-1][:used]
    return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks)), prepend_bos


def _extend(buf: list[int], tokenizer, batch: list[str], sep: int | None):
    for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
        buf.extend(ids)
        if sep is not None:
            buf.append(sep)
