"""The shuffled batch stream: coverage, held-out chunks, BOS/NaN rows, and exact resume by cursor."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.loader import (BatchLoader, Cursor, RowFilter, count_nonfinite, eval_rows, excludes_bos,
                             split_chunks, trainable_rows)
from pipeline.store import write_synthetic

CTX, CHUNK, N_CHUNKS, D = 8, 16, 20, 4


def id_store(tmp_path, prepend_bos=True, nan_rows=(), n_rows=CHUNK * N_CHUNKS):
    """A store whose row r holds r in column 0, so batches say which rows they came from."""
    x = torch.zeros(n_rows, D)
    x[:, 0] = torch.arange(n_rows, dtype=torch.float32)
    x[:, 1] = 1.0
    for r in nan_rows:
        x[r, 2] = float("nan")
    tokens = np.zeros((n_rows // CTX, CTX), dtype=np.int32)
    return write_synthetic(tmp_path / "run", x, tokens, layer=2, storage_dtype="float32", chunk_rows=CHUNK,
                           attrs={"prepend_bos": prepend_bos})


def loader(store, chunks, batch, seed=0, start=Cursor(), exclude_bos=True, skip_nonfinite=False, window=3,
           cache=False):
    rf = RowFilter(store, 2, "resid_post", exclude_bos, skip_nonfinite)
    return BatchLoader(store, 2, "resid_post", chunks, batch, seed, window, rf, torch.device("cpu"),
                       reader_threads=2, start=start, cache=cache), rf


def ids(batch):
    return batch[:, 0].long().tolist()


def test_split_chunks_is_even_disjoint_and_seed_free():
    train, held = split_chunks(100, 0.05)
    assert len(held) == 5 and not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert held == [10, 30, 50, 70, 90]
    assert split_chunks(1, 0.5) == ([0], [])  # nothing to hold out from a single chunk
    assert split_chunks(10, 0.0) == (list(range(10)), [])


def test_each_epoch_covers_every_training_row_once_without_bos_or_held_out(tmp_path):
    store = id_store(tmp_path)
    train, held = split_chunks(N_CHUNKS, 0.1)
    ld, rf = loader(store, train, batch=7)
    per_epoch = trainable_rows(store, 2, "resid_post", train, rf)
    expected = [r for c in train for r in range(c * CHUNK, (c + 1) * CHUNK) if r % CTX]
    assert per_epoch == len(expected)
    rows = []
    for batch, cur in itertools.islice(ld, -(-3 * per_epoch // 7)):
        assert batch.dtype == torch.float32 and batch.shape == (7, D)
        rows += ids(batch)
    first, second = rows[:per_epoch], rows[per_epoch:2 * per_epoch]
    assert sorted(first) == expected and sorted(second) == expected
    assert first != second  # a new order every epoch
    assert first != sorted(first)  # shuffled at row level


def test_bos_rows_kept_when_not_excluded_or_not_prepended(tmp_path):
    store = id_store(tmp_path, prepend_bos=False)
    ld, rf = loader(store, list(range(N_CHUNKS)), batch=CHUNK * N_CHUNKS)
    batch, _ = next(iter(ld))
    assert sorted(ids(batch)) == list(range(CHUNK * N_CHUNKS))
    store = id_store(tmp_path / "b", prepend_bos=True)
    ld, rf = loader(store, list(range(N_CHUNKS)), batch=CHUNK * N_CHUNKS, exclude_bos=False)
    assert sorted(ids(next(iter(ld))[0])) == list(range(CHUNK * N_CHUNKS))


def test_bos_is_excluded_only_when_the_store_prepended_it_and_the_config_asks(tmp_path):
    with_bos, without = id_store(tmp_path / "a", prepend_bos=True), id_store(tmp_path / "b", prepend_bos=False)
    assert excludes_bos(with_bos, True) and not excludes_bos(with_bos, False)
    assert not excludes_bos(without, True) and not excludes_bos(without, False)


def test_batches_are_a_function_of_seed_and_resume_from_a_cursor_exactly(tmp_path):
    store = id_store(tmp_path)
    train, _ = split_chunks(N_CHUNKS, 0.1)
    ld, _ = loader(store, train, batch=11, seed=5)
    run = [(ids(b), c) for b, c in itertools.islice(ld, 60)]
    again, _ = loader(store, train, batch=11, seed=5)
    assert [ids(b) for b, _ in itertools.islice(again, 60)] == [r for r, _ in run]
    other, _ = loader(store, train, batch=11, seed=6)
    assert [ids(b) for b, _ in itertools.islice(other, 5)] != [r for r, _ in run[:5]]
    for s in (0, 7, 23, 41):  # resume after batch s: the rest of the stream is identical
        resumed, _ = loader(store, train, batch=11, seed=5, start=run[s][1])
        assert [ids(b) for b, _ in itertools.islice(resumed, 60 - s - 1)] == [r for r, _ in run[s + 1:]]


def test_window_smaller_than_a_batch_and_partial_last_chunk(tmp_path):
    store = id_store(tmp_path, n_rows=CHUNK * 5 + 8)  # last chunk half full
    ld, rf = loader(store, list(range(6)), batch=50, window=1)
    rows = [r for b, _ in itertools.islice(ld, 3) for r in ids(b)]
    expected = [r for r in range(CHUNK * 5 + 8) if r % CTX]
    assert sorted(rows[: len(expected)]) == expected


def test_nonfinite_rows_refused_or_dropped_and_counted(tmp_path):
    store = id_store(tmp_path, nan_rows=(5, 17, 300))
    assert count_nonfinite(store, 2, "resid_post", threads=2) == 3
    ld, _ = loader(store, list(range(N_CHUNKS)), batch=8, window=N_CHUNKS)
    with pytest.raises(UserError, match="NaN/Inf"):
        next(iter(ld))
    ld, rf = loader(store, list(range(N_CHUNKS)), batch=8, skip_nonfinite=True, window=N_CHUNKS)
    rows = [r for b, _ in itertools.islice(ld, 10) for r in ids(b)]
    assert not {5, 17, 300} & set(rows) and rf.dropped_nonfinite == 3


def test_eval_rows_share_each_held_out_chunk(tmp_path):
    store = id_store(tmp_path)
    rf = RowFilter(store, 2, "resid_post", True, False)
    x = eval_rows(store, 2, "resid_post", [3, 9], 10, rf)
    assert ids(x) == [49, 50, 51, 52, 53, 145, 146, 147, 148, 149]


def test_cache_reads_each_chunk_once_and_changes_no_batch(tmp_path, monkeypatch):
    store = id_store(tmp_path, nan_rows=(21,))
    train, _ = split_chunks(N_CHUNKS, 0.1)
    reads = []
    real = store.read_chunk
    monkeypatch.setattr(store, "read_chunk", lambda *a: reads.append(a[2]) or real(*a))
    n = 3 * len(train) * CHUNK // 7  # about three epochs
    plain, rf_plain = loader(store, train, batch=7, skip_nonfinite=True)
    want = [b for b, _ in itertools.islice(plain, n)]
    assert len(reads) >= 3 * len(train)  # without the cache every epoch reads the store again
    reads.clear()
    cached, rf = loader(store, train, batch=7, skip_nonfinite=True, cache=True)
    got = [b for b, _ in itertools.islice(cached, n)]
    assert sorted(reads) == sorted(train)  # once each (the producer may run a window ahead, never a chunk twice)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert rf.nonfinite == rf_plain.nonfinite == {1: 1}  # a cached chunk's dropped row is counted once
