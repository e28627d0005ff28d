"""Related latents against brute force: decoder neighbours against the whole cosine matrix,
co-firing counts and partners against a count over the dense codes of a tiny store, and the
ranking rule they share (ties to the smaller id)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import CORPUS, make_tokenizer
from pipeline.collate import accumulators as A
from pipeline.collate import records
from pipeline.config import config_from_dict
from pipeline.paths import records_dir
from pipeline.saes.topk import TopKSAE
from pipeline.store import write_synthetic
from pipeline.viewer import read_features
from stages import collate as stage

CTX, N_SEQ, D, N_LAT, K = 16, 20, 12, 40, 6
ALWAYS, DEAD = 0, 1


def brute_best(score: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's k largest finite scores, ties to the smaller column, by plain sorting."""
    ids, vals = [], []
    for row in score:
        ranked = sorted((-v, j) for j, v in enumerate(row.tolist()) if v > -np.inf)[:k]
        ids.append([j for _, j in ranked])
        vals.append([-v for v, _ in ranked])
    return ids, vals


def test_best_per_row_breaks_ties_to_the_smaller_column():
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0],
                          [0.5, -np.inf, -np.inf, -np.inf, -np.inf],
                          [-np.inf] * 5,
                          [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    cols, vals = A.best_per_row(score, 3)
    assert cols.tolist() == [[1, 2, 4], [0, -1, -1], [-1, -1, -1], [0, 1, 2]]
    assert vals[0].tolist() == [3.0, 3.0, 3.0] and vals[1, 0] == 0.5 and vals[1, 1] == -np.inf
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (50, 30), generator=g).double()  # many ties
    score[score == 0] = -np.inf
    cols, vals = A.best_per_row(score, 5)
    ids, want = brute_best(score.numpy(), 5)
    assert [[c for c in row if c >= 0] for row in cols.tolist()] == ids
    assert [[v for v in row if v > -np.inf] for row in vals.tolist()] == want


def test_decoder_neighbors_match_the_whole_cosine_matrix(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(150, 24, generator=g) * torch.rand(150, 1, generator=g)  # rows of any norm
    W[7] = W[3] * 2.5 + 0.01 * torch.randn(24, generator=g)  # nearly one direction: each other's nearest
    monkeypatch.setattr(records, "NEIGHBOR_BLOCK", 150 * 16)  # blocks of 16 rows, the last one short
    ids, cos = records.decoder_neighbors(W, 5)
    w = W.double().numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    full = w @ w.T
    np.fill_diagonal(full, -np.inf)
    want_ids, want_cos = brute_best(full, 5)
    assert ids.tolist() == want_ids
    np.testing.assert_allclose(cos, np.array(want_cos), atol=1e-6)
    assert ids[3, 0] == 7 and ids[7, 0] == 3 and cos[3, 0] > 0.99


def test_cooccurrence_table_counts_every_pair_exactly(monkeypatch):
    """Random sparse codes with unfired entries and rows of no latent, fed in slices of a few
    tokens: the table against a count over the dense indicator matrix."""
    n, B, w = 23, 300, 7
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=g)[:w] for _ in range(B)])
    fired = torch.rand(B, w, generator=g) > 0.3
    fired[:10] = False
    monkeypatch.setattr(A.CoOccurrence, "PAIRS_AT_ONCE", 40)  # 40 // 21 pairs: slices of one token
    pairs = A.CoOccurrence(n, "cpu")
    pairs.add(idx[:120], fired[:120])
    pairs.add(idx[120:], fired[120:])
    F = np.zeros((B, n), np.int64)
    for b in range(B):
        F[b, idx[b][fired[b]].numpy()] = 1
    C = F.T @ F
    assert pairs.count.tolist() == np.triu(C, 1).tolist()  # each pair once, at (i, j > i)

    ids, jac, cnt = pairs.partners(torch.from_numpy(F.sum(0)), 5)
    ids_w, jac_w, cnt_w = brute_partners(F, 5)
    assert ids.tolist() == ids_w and cnt.tolist() == cnt_w
    np.testing.assert_allclose(jac.numpy(), jac_w, atol=1e-12)


def brute_partners(F: np.ndarray, k: int):
    """Per latent its k partners of largest Jaccard (ties to the smaller id), -1 / 0 padded."""
    C = F.T @ F
    fires = np.diag(C).copy()
    np.fill_diagonal(C, 0)
    union = fires[:, None] + fires[None, :] - C
    score = np.where(C > 0, C / np.maximum(union, 1), -np.inf)
    ids, vals = brute_best(score, k)
    pad = lambda rows, fill: [r + [fill] * (k - len(r)) for r in rows]  # noqa: E731
    counts = [[int(C[i, j]) for j in row] for i, row in enumerate(ids)]
    return pad(ids, -1), np.array(pad(vals, 0.0)), pad(counts, 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny store (BOS first in each window, excluded) collated with an SAE of known codes:
    (run folder, dense codes with BOS rows zeroed, the SAE)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("neighbors")
    tok_dir = root / "tok"
    make_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok.encode(" ".join(CORPUS * 8), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    tokens[:, 0] = tok.bos_token_id
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    write_synthetic(root, acts, tokens, chunk_rows=4 * CTX, attrs={"tokenizer": str(tok_dir), "prepend_bos": True})
    torch.manual_seed(3)
    sae = TopKSAE(D, N_LAT, K)
    with torch.no_grad():
        sae.b_lat[ALWAYS] = 6.0  # fires everywhere: Jaccard, not P(j | i), must keep it from topping every list
        sae.b_lat[DEAD] = -100.0
    sae.save(root / "saes/0/resid_post")
    stage.run(config_from_dict(_cfg(root)))
    Z = torch.cat([sae.encode_dense(acts[i: i + 64]) for i in range(0, len(acts), 64)]).numpy()
    Z[::CTX] = 0
    return root, Z, sae


def _cfg(root, **collate) -> dict:
    return {"run_dir": str(root), "model": {"name": "synthetic"}, "data": {"path": "synthetic"},
            "harvest": {"layers": [0], "n_tokens": N_SEQ * CTX, "context_size": CTX},
            "collate": {"batch_size": 48, "n_top": 3, "n_random": 2, **collate}}


def test_records_hold_the_brute_force_neighbours_and_partners(run):
    root, Z, sae = run
    out = records_dir(root, 0, "resid_post")
    features = list(read_features(out))
    F = (Z > 0).astype(np.int64)
    ids_w, jac_w, cnt_w = brute_partners(F, 5)
    w = sae.W_dec.detach().double().numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = w @ w.T
    np.fill_diagonal(cos, -np.inf)
    near_ids, near_cos = brute_best(cos, 5)
    assert F[:, ALWAYS].sum() == N_SEQ * (CTX - 1) and F[:, DEAD].sum() == 0
    for i, f in enumerate(features):
        assert [r["id"] for r in f["decoder_neighbors"]] == near_ids[i]
        assert [r["cos"] for r in f["decoder_neighbors"]] == pytest.approx(near_cos[i], abs=1e-5)
        got = f["cooccurring"]
        n_found = sum(j >= 0 for j in ids_w[i])
        assert [r["id"] for r in got] == ids_w[i][:n_found], i
        assert [r["count"] for r in got] == cnt_w[i][:n_found]
        assert [r["jaccard"] for r in got] == pytest.approx(jac_w[i][:n_found].tolist(), abs=1e-6)
    assert features[DEAD]["cooccurring"] == []
    # P(j | i) would rank ALWAYS first for every latent; Jaccard does not.
    assert any(f["cooccurring"] and f["cooccurring"][0]["id"] != ALWAYS for f in features)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cooccurrence"]["k"] == 5 and summary["decoder_neighbors"]["k"] == 5


def test_cooccurrence_is_skipped_above_the_limit(run, tmp_path):
    import shutil

    root, _, _ = run
    shutil.copytree(root, tmp_path / "run")
    stage.run(config_from_dict(_cfg(tmp_path / "run", cooccurrence_max_latents=N_LAT - 1)))
    out = records_dir(tmp_path / "run", 0, "resid_post")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cooccurrence"] == {"skipped": f"{N_LAT} latents > collate.cooccurrence_max_latents = {N_LAT - 1}"}
    features = list(read_features(out))
    assert all("cooccurring" not in f and len(f["decoder_neighbors"]) == 5 for f in features)
