"""Collate against brute force over the dense activations, plus files, reruns and bad inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from helpers import CORPUS, make_tokenizer
from pipeline.collate import accumulators as A
from pipeline import collate as C
from pipeline import fsio, viewer
from pipeline.collate import records
from pipeline.collate import scan as S
from pipeline.errors import UserError
from pipeline.paths import records_dir
from pipeline.collate.windows import TokenText, cut_windows, pick
from pipeline.config import CollateConfig, config_from_dict
from pipeline.saes import load_sae
from pipeline.saes.topk import TopKSAE
from pipeline.store import write_synthetic
from stages import collate as stage
from stages.cli import main

SAEPIPE = str(Path(sys.executable).with_name("saepipe"))
CTX, N_SEQ, D, N_LAT, K = 16, 24, 16, 48, 4
DEAD, ALWAYS, LOUD = 1, 0, 2  # latents rigged below


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_sae(d=D) -> TopKSAE:
    torch.manual_seed(1)
    sae = TopKSAE(d, N_LAT, K)
    with torch.no_grad():
        sae.b_lat[ALWAYS] = 6.0  # in every token's top k: exercises "one per sequence"
        sae.b_lat[DEAD] = -100.0  # never fires
        sae.W_enc[LOUD] *= 40.0  # huge activations: its histogram has to widen
    return sae


def make_run(root: Path, tokenizer_dir: Path, prepend_bos=True, sae: TopKSAE | None = None, d=D):
    """A store of N_SEQ x CTX rows (chunks of 3 sequences) and an SAE for layer 0."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode(" ".join(CORPUS * 8), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    if prepend_bos:
        tokens[:, 0] = tok.bos_token_id
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(N_SEQ * CTX, d, generator=g)
    store = write_synthetic(root, acts, tokens, layer=0, chunk_rows=3 * CTX,
                            attrs={"tokenizer": str(tokenizer_dir), "prepend_bos": prepend_bos})
    if sae is not False:
        (sae or make_sae(d)).save(root / "saes" / "0" / "resid_post")
    return store, acts, tokens


def make_cfg(root: Path, **collate) -> dict:
    base = {"batch_size": 40, "n_top": 5, "n_random": 3, "hist_max_bins": 8}
    return {"run_dir": str(root), "model": {"name": "synthetic"}, "data": {"path": "synthetic"},
            "harvest": {"layers": [0], "n_tokens": N_SEQ * CTX, "context_size": CTX},
            "collate": {**base, **collate}}


def dense(sae: TopKSAE, acts: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """Dense activations, encoded in the scan's batches so the numbers are bit-identical."""
    return torch.cat([sae.encode_dense(acts[i: i + batch_rows]) for i in range(0, len(acts), batch_rows)])


def brute_top(a: torch.Tensor, n_top: int) -> list[tuple[int, float]]:
    """(row, act): each sequence's best token, the n_top best sequences, ties to smaller rows."""
    per_seq = a.reshape(N_SEQ, CTX)
    best, pos = per_seq.max(1)
    cands = [(-float(best[s]), s * CTX + int(pos[s])) for s in range(N_SEQ) if best[s] > 0]
    return [(row, -neg) for neg, row in sorted(cands)[:n_top]]


def reference_key(seed: int, row: int, latent: int) -> int:
    """The random sample's key, from the algorithm in pipeline/collate/accumulators.py's docstring,
    in plain Python integers (the production code splits products into 16-bit halves)."""
    m = 0xFFFFFFFF

    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m
        return h ^ (h >> 16)

    half = []
    for salt in (0x9E3779B9, 0x7F4A7C15):
        s = fmix32(fmix32((seed & m) ^ salt) ^ (seed >> 32))
        r = fmix32(fmix32((row & m) ^ s) ^ (row >> 32))
        half.append(fmix32(r ^ latent) >> 1)
    return half[0] << 31 | half[1]


def brute_random(a: torch.Tensor, latent: int, seed: int, n_random: int) -> list[int]:
    """The n_random rows where the latent fires with the smallest reference keys (ties to smaller rows)."""
    rows = torch.nonzero(a > 0).flatten().tolist()
    return sorted(rows, key=lambda r: (reference_key(seed, r, latent), r))[:n_random]


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_scan_matches_brute_force(tmp_path, tokenizer_dir, prepend_bos):
    store, acts, _ = make_run(tmp_path, tokenizer_dir, prepend_bos)
    sae = load_sae(tmp_path / "saes/0/resid_post")
    cfg = CollateConfig(**make_cfg(tmp_path)["collate"])
    col = S.scan(store, 0, "resid_post", sae, cfg, "cpu")

    Z = dense(sae, acts, S.batch_rows_for(cfg, CTX))
    if prepend_bos:
        Z[::CTX] = 0  # BOS positions are excluded from everything
    n_tok = N_SEQ * CTX - (N_SEQ if prepend_bos else 0)
    assert col.n_tokens == n_tok

    top_rows, top_acts = col.top.row.numpy(), col.top.act.numpy()
    rand_rows = col.random.row.numpy()
    for latent in range(N_LAT):
        a = Z[:, latent]
        want = brute_top(a, cfg.n_top)
        got = [(int(r), float(v)) for r, v in zip(top_rows[latent], top_acts[latent]) if r >= 0]
        assert got == want, f"top of latent {latent}"
        got_rand = [int(r) for r in rand_rows[latent] if r >= 0]
        assert got_rand == brute_random(a, latent, cfg.seed, cfg.n_random), f"random of latent {latent}"

        pos = a[a > 0].double()
        assert int(col.stats.count[latent]) == len(pos)
        for p in range(4):
            assert float(col.stats.sums[latent, p]) == pytest.approx(float((pos ** (p + 1)).sum()), rel=1e-9, abs=1e-12)
        width = float(col.stats.width[latent])
        want_hist = Counter(torch.ceil(pos / width).long().tolist())
        hist = col.stats.hist[latent]
        got_hist = {int(b) + 1: int(hist[b]) for b in torch.nonzero(hist).flatten()}
        assert got_hist == dict(want_hist), f"histogram of latent {latent}"

    # The rigged latents did what they are there for.
    assert int(col.stats.count[DEAD]) == 0
    assert len([r for r in top_rows[ALWAYS] if r >= 0]) == cfg.n_top
    assert int(col.stats.count[ALWAYS]) == n_tok  # fired everywhere, yet one record per sequence
    assert float(col.stats.width[LOUD]) > cfg.hist_bin_width  # the histogram widened
    if prepend_bos:
        assert not np.any((top_rows >= 0) & (top_rows % CTX == 0))


def test_pass_2_cuts_the_windows_from_the_scans_codes(tmp_path, tokenizer_dir, monkeypatch):
    """The scan keeps every row's codes (within CODES_BUDGET), and pass 2 cuts the records' windows
    from them, reading only the tokens: the windows encoding the picked sequences again gives.
    Over the budget none are kept, and pass 2 encodes."""
    store, _, _ = make_run(tmp_path, tokenizer_dir)
    sae = load_sae(tmp_path / "saes/0/resid_post")
    cfg = CollateConfig(**make_cfg(tmp_path)["collate"])
    col = S.scan(store, 0, "resid_post", sae, cfg, "cpu")
    assert col.codes.idx.shape == col.codes.vals.shape == (N_SEQ * CTX, K) and col.codes.idx.dtype == torch.int32
    again, kept = (pick(col, cfg, CTX, tmp_path / name) for name in ("again", "kept"))
    cut_windows(store, 0, "resid_post", sae, again, cfg, "cpu")
    monkeypatch.setattr(store, "read_chunk", lambda *a: pytest.fail("pass 2 read activations"))
    cut_windows(store, 0, "resid_post", sae, kept, cfg, "cpu", col.codes)
    assert np.array_equal(kept.tokens, again.tokens) and (again.acts > 0).sum() > N_LAT
    np.testing.assert_allclose(kept.acts, again.acts, rtol=1e-6, atol=1e-7)
    monkeypatch.undo()
    monkeypatch.setattr(S, "CODES_BUDGET", N_SEQ * CTX * K * 8 - 1)
    assert S.scan(store, 0, "resid_post", sae, cfg, "cpu").codes is None


def test_random_sample_is_uniform_over_seeds():
    """Selection counts over many seeds: chi-square against uniform, for two latents
    fed through Collator.update in uneven batches."""
    ctx, n_seq, M, seeds = 4, 12, 4, 500
    B = n_seq * ctx
    # Latent 0 fires on 30 rows, latent 1 on 17 (never at position 0).
    fires = {0: [r for r in range(B) if r % ctx and r % 4 != 3][:30],
             1: [r for r in range(B) if r % ctx and r % 3 == 1][:17]}
    idx = torch.full((B, 2), 5, dtype=torch.int64)  # latent 5 with act 0: never positive
    vals = torch.zeros(B, 2)
    for j, (lat, rows) in enumerate(fires.items()):
        idx[rows, j] = lat
        vals[rows, j] = 1.0 + torch.rand(len(rows))
    counts = {lat: Counter() for lat in fires}
    for seed in range(seeds):
        cfg = CollateConfig(n_top=0, n_random=M, seed=seed)
        col = A.Collator(8, ctx, cfg, "cpu", skip_first=True)
        for lo, hi in ((0, 8), (8, 32), (32, B)):  # uneven whole-sequence batches
            col.update(lo, idx[lo:hi], vals[lo:hi])
        col.finish()
        for lat in fires:
            picked = [int(r) for r in col.random.row[lat] if r >= 0]
            assert len(picked) == M and len(set(picked)) == M
            assert set(picked) <= set(fires[lat])
            counts[lat].update(picked)
    for lat, rows in fires.items():
        expected = seeds * M / len(rows)
        chi2 = sum((counts[lat][r] - expected) ** 2 / expected for r in rows)
        dof = len(rows) - 1
        # chi-square critical value at p = 0.001 (Wilson-Hilferty approximation)
        crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
        assert chi2 < crit, f"latent {lat}: chi2 {chi2:.1f} >= {crit:.1f}"


def test_random_keys_do_not_depend_on_batching():
    rows = torch.arange(1000, dtype=torch.int64) * 7919 + (1 << 33)
    lats = torch.arange(1000, dtype=torch.int64) % 37
    whole = A.random_keys(3, rows, lats)
    parts = torch.cat([A.random_keys(3, rows[i: i + 97], lats[i: i + 97]) for i in range(0, 1000, 97)])
    assert torch.equal(whole, parts)
    assert int(whole.min()) >= 0 and int(whole.max()) < (1 << 62)
    assert not torch.equal(whole, A.random_keys(4, rows, lats))
    assert len(set(whole.tolist())) == 1000
    # The documented keys, also for seeds and rows past 32 bits.
    big = (1 << 40) + 12345
    assert [int(k) for k in whole[::50]] == [reference_key(3, int(r), int(j)) for r, j in zip(rows[::50], lats[::50])]
    assert [int(k) for k in A.random_keys(big, rows[:20], lats[:20])] == \
        [reference_key(big, int(r), int(j)) for r, j in zip(rows[:20], lats[:20])]


def _strict(text: str):
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


@pytest.mark.parametrize("window, exclude_bos", [(None, True), (2, True), (None, False)])
def test_files_match_schema_and_brute_force(tmp_path, tokenizer_dir, tokenizer, window, exclude_bos):
    store, acts, tokens = make_run(tmp_path, tokenizer_dir)  # BOS at position 0 of every sequence
    cfg = config_from_dict(make_cfg(tmp_path, window=window, exclude_bos=exclude_bos))
    [page] = stage.run(cfg)
    out = tmp_path / "records/0/resid_post"
    assert page == out / "viewer.html" and page.exists()
    assert (out / "done").exists() and not (out / "_scratch").exists()

    sae = load_sae(tmp_path / "saes/0/resid_post")
    Z = sae.encode_dense(acts)  # one big batch: equal to the scan's up to float rounding
    Z_ref = Z.clone()  # what every statistic and every record's acts must show
    if exclude_bos:
        Z_ref[::CTX] = 0
    n_tok = N_SEQ * (CTX - 1) if exclude_bos else N_SEQ * CTX
    index = _strict((out / "index.json").read_text())
    summary = _strict((out / "summary.json").read_text())
    assert len(index["latents"]) == N_LAT and index["n_tokens"] == n_tok
    assert summary["dead"] == int(((Z_ref > 0).sum(0) == 0).sum()) >= 1
    assert summary["exclude_bos"] is exclude_bos
    assert summary["excluded_positions"] == ([0] if exclude_bos else [])
    assert "latent_groups" not in summary  # a TopK SAE's latents form no groups

    # Stored once: the viewer's shards are the records.
    assert [f["index"] for f in viewer.read_features(out)] == list(range(N_LAT))
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "density.svg", "done", "index.json",
                                                       "summary.json", "viewer.html", "viewer_data"]
    bos_fired = 0  # records whose window shows a BOS position where the dense encode fires
    for latent in range(N_LAT):
        f = viewer.read_feature(out, latent)
        for key in ("density", "mean_act", "mean_act_squared", "skew", "kurtosis", "hist", "top", "random",
                    "hist_bin_width"):
            assert key in f
        a = Z_ref[:, latent]
        assert f["density"] == pytest.approx(float((a > 0).sum()) / n_tok)
        assert f["mean_act"] == pytest.approx(float(a.double().sum()) / n_tok, rel=1e-5)
        if latent == DEAD:
            assert f["top"] == [] and f["random"] == [] and f["hist"] == {} and f["skew"] is None
            continue
        assert sum(f["hist"].values()) == int((a > 0).sum())
        want = brute_top(a, 5)
        assert [(s["doc_id"] * CTX + s["window_start"] + s["idx"]) for s in f["top"]] == [r for r, _ in want]
        assert [s["act"] for s in f["top"]] == pytest.approx([v for _, v in want], abs=1e-5)
        assert 1 <= len(f["random"]) <= 3
        for s in f["top"] + f["random"]:
            start, n = s["window_start"], len(s["tokens"])
            if window is None:
                assert start == 0 and n == CTX
            else:
                assert n <= 2 * window + 1 and s["idx"] <= window
            assert s["token_ints"] == tokens[s["doc_id"], start: start + n].tolist()
            assert "".join(s["tokens"]) == tokenizer.decode(s["token_ints"], clean_up_tokenization_spaces=False)
            rows = slice(s["doc_id"] * CTX + start, s["doc_id"] * CTX + start + n)
            assert s["acts"] == pytest.approx(Z_ref[rows, latent].tolist(), abs=1e-5)
            assert s["acts"][s["idx"]] == pytest.approx(s["act"], abs=1e-5) and s["act"] > 0
            if start == 0:  # the window shows the sequence's BOS
                dense_bos = float(Z[s["doc_id"] * CTX, latent])
                bos_fired += dense_bos > 0
                assert s["acts"][0] == (0.0 if exclude_bos else pytest.approx(dense_bos, abs=1e-5))
    assert bos_fired > 0  # the BOS check above saw a latent firing on BOS (ALWAYS does)

    js = (out / "viewer_data/features_0.js").read_text()
    assert js.startswith("saeViewer.shard(0, [") and (out / "viewer_data/index.js").exists()
    assert summary["context_size"] == CTX

    # The viewer's search data: per latent, the distinct words at its top records' picked rows, each
    # [word, start, end] with the picked token at word[start:end], the word a run of the record's text.
    js = (out / "viewer_data/search.js").read_text()
    assert js.startswith("saeViewer.search(") and js.endswith(");\n")
    search = _strict(js[len("saeViewer.search("): -len(");\n")])
    words = [tuple(w) for w in search["words"]]
    assert len(search["latents"]) == N_LAT and len(set(words)) == len(words)
    for latent in range(N_LAT):
        mine = [words[j] for j in search["latents"][latent]]
        want = {tokenizer.decode([int(tokens.flat[row])]) for row, _ in brute_top(Z_ref[:, latent], 5)}
        assert {w[a:b] for w, a, b in mine} == want, latent
        for s in viewer.read_feature(out, latent)["top"]:
            text = "".join(s["tokens"])
            at = len("".join(s["tokens"][: s["idx"]]))
            assert any(text[at - a: at - a + len(w)] == w for w, a, b in mine)


EMOJI = "\N{GRINNING FACE}"


def _made_records(root: Path, tokenizer_dir: Path, tokenizer, window):
    """Collate's records of a store whose every third sequence holds an emoji (its bytes span
    tokens), computed in memory and written to root / "out": (the folder, the Collator, the
    Records, the config)."""
    emoji = tokenizer.encode(" " + EMOJI, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in emoji)  # a token holding part of a character
    ids = tokenizer.encode(" ".join(CORPUS * 8), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    tokens[::3, 5: 5 + len(emoji)] = emoji
    tokens[:, 0] = tokenizer.bos_token_id
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    store = write_synthetic(root, acts, tokens, layer=0, chunk_rows=3 * CTX,
                            attrs={"tokenizer": str(tokenizer_dir), "prepend_bos": True})
    sae = make_sae()
    cfg = CollateConfig(**make_cfg(root, window=window, n_quantiles=3, n_per_quantile=2)["collate"])
    col = S.scan(store, 0, "resid_post", sae, cfg, "cpu")
    recs = pick(col, cfg, CTX, root / "scratch")
    cut_windows(store, 0, "resid_post", sae, recs, cfg, "cpu")
    out = root / "out"
    out.mkdir()
    records.write_records(out, col, recs, TokenText(tokenizer), cfg, {"layer": 0, "hook": "resid_post"})
    return out, col, recs, cfg


def _dense_records(recs, col, tokenizer, latent: int) -> dict:
    """Latent's records as collate holds them, each a whole SequenceInfo (acts and act at 6
    decimals), built one by one: {"top", "random", "quantiles": [each present interval's]}."""
    text = TokenText(tokenizer)
    of_kind: dict[int, list[dict]] = {}
    for r in range(int(recs.offsets[latent]), int(recs.offsets[latent + 1])):
        slot, start, length = int(recs.slot[r]), int(recs.start[r]), int(recs.length[r])
        ids = recs.tokens[slot, :length]
        of_kind.setdefault(int(recs.kind[r]), []).append({
            "doc_id": int(recs.row[r]) // CTX, "idx": int(recs.row[r]) % CTX - start,
            "act": round(float(recs.act[r]), 6), "acts": [round(float(a), 6) for a in recs.acts[slot, :length]],
            "tokens": text.strings(ids), "token_ints": ids.tolist(), "window_start": start})
    present = np.flatnonzero(col.quantiles.present[latent].cpu().numpy()).tolist()
    return {"top": of_kind.get(0, []), "random": of_kind.get(1, []),
            "quantiles": [of_kind.get(2 + q, []) for q in present]}


def _windows_files(out: Path) -> list[dict]:
    files = []
    for k in range(len(list((out / "viewer_data").glob("windows_*.js")))):
        js = (out / f"viewer_data/windows_{k}.js").read_text()
        head = f"saeViewer.windows({k}, "
        assert js.startswith(head) and js.endswith(");\n")
        files.append(_strict(js[len(head): -len(");\n")]))
    return files


@pytest.mark.parametrize("window", [None, 2])
def test_records_read_back_exactly_as_collate_made_them(tmp_path, tokenizer_dir, tokenizer, window):
    """The files hold records compact (each window's tokens once, only the acts that are not 0),
    yet read_feature and read_features give back every record exactly as collate computed it."""
    out, col, recs, cfg = _made_records(tmp_path, tokenizer_dir, tokenizer, window)
    features = list(viewer.read_features(out))
    assert len(features) == N_LAT
    n_records = 0
    for latent, f in enumerate(features):
        want = _dense_records(recs, col, tokenizer, latent)
        assert f["top"] == want["top"] and f["random"] == want["random"], latent
        assert [q["examples"] for q in f["quantiles"]] == want["quantiles"], latent
        assert viewer.read_feature(out, latent) == f
        n_records += len(f["top"]) + len(f["random"]) + sum(len(q["examples"]) for q in f["quantiles"])
    assert n_records == len(recs.row) and any(f["quantiles"] for f in features)

    # Each window the records show is stored once, in (doc_id, window_start) order, with its file's
    # strings; those where the emoji spans tokens carry their own, which hold it whole.
    shown = {(s["doc_id"], s["window_start"], len(s["tokens"]))
             for f in features for s in f["top"] + f["random"] + [e for q in f["quantiles"] for e in q["examples"]]}
    files = _windows_files(out)
    stored = [(doc, start, len(ids)) for data in files for doc, start, ids, *_ in data["windows"]]
    assert stored == sorted(shown)
    per = json.loads((out / "summary.json").read_text())["windows_per_file"]
    assert per == viewer.windows_per_file(CTX if window is None else 2 * window + 1)
    assert [len(data["windows"]) for data in files[:-1]] == [per] * (len(files) - 1)
    own = [w for data in files for w in data["windows"] if len(w) == 4]
    assert own and any(EMOJI in w[3] for w in own)  # whole, on the token that completes it
    assert all("".join(w[3]) == tokenizer.decode(w[2], clean_up_tokenization_spaces=False) for w in own)


def test_records_on_disk_are_a_fraction_of_the_whole_records(tmp_path, tokenizer_dir, tokenizer):
    """Whole-sequence windows: the shards and windows files take under a third of the bytes of the
    same features with whole records (the format before), and an old folder of those still reads."""
    out, col, recs, cfg = _made_records(tmp_path, tokenizer_dir, tokenizer, None)
    data = out / "viewer_data"
    compact = sum(p.stat().st_size for p in [*data.glob("features_*.js"), *data.glob("windows_*.js")])
    features = list(viewer.read_features(out))
    whole = sum(len(records._dumps(f)) + 2 for f in features)
    assert compact < whole / 3, (compact, whole)

    # The format before: whole records in the shards, no windows files, no records_format.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for p in (old / "viewer_data").glob("*_*.js"):
        p.unlink()
    for j in range(0, N_LAT, viewer.SHARD_SIZE):
        body = ",\n".join(records._dumps(f) for f in features[j: j + viewer.SHARD_SIZE])
        (old / f"viewer_data/features_{j // viewer.SHARD_SIZE}.js").write_text(
            f"saeViewer.shard({j // viewer.SHARD_SIZE}, [\n{body}\n]);\n")
    summary = json.loads((old / "summary.json").read_text())
    del summary["records_format"], summary["windows_per_file"]
    (old / "summary.json").write_text(json.dumps(summary))
    assert list(viewer.read_features(old)) == features
    assert viewer.read_feature(old, LOUD) == features[LOUD]


def test_records_missing_their_windows_are_refused_in_one_line(tmp_path, tokenizer_dir, tokenizer):
    out, *_ = _made_records(tmp_path, tokenizer_dir, tokenizer, None)
    assert viewer.read_feature(out, ALWAYS)["top"]
    (out / "viewer_data/windows_0.js").unlink()
    with pytest.raises(UserError, match=r"windows_0\.js is missing.*\(rerun saepipe collate --force") as e:
        viewer.read_feature(out, ALWAYS)
    assert "\n" not in str(e.value)
    summary = json.loads((out / "summary.json").read_text())
    del summary["windows_per_file"]
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match=r"gives no windows_per_file \(rerun saepipe collate --force"):
        list(viewer.read_features(out))


def test_picked_word_joins_a_word_across_tokens():
    toks = ["import", " Dep", "rec", "ated", "(", "x", ") ", "\n", " a", "b", "c", "d", "e", "f", "g"]
    assert records.picked_word(toks, 2) == (" Deprecated(x) ", 4, 7)  # no whitespace until ") "
    assert records.picked_word(toks, 1) == (" Deprecated(x", 0, 4)  # at most WORD_TOKENS = 4 each side
    assert records.picked_word(toks, 0) == ("import", 0, 6)  # the next token opens a word
    assert records.picked_word(toks, 7) == ("\n", 0, 1)  # whitespace alone: a word of its own
    assert records.picked_word(toks, 14) == ("cdefg", 4, 5)
    assert records.picked_word(["", "ab", ""], 1) == ("ab", 0, 2)  # a held-back partial character joins


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_run_leaves_nothing_finished_and_rerun_is_identical(tmp_path, tokenizer_dir, monkeypatch, capsys):
    make_run(tmp_path, tokenizer_dir)
    cfg = config_from_dict(make_cfg(tmp_path))
    out = tmp_path / "records/0/resid_post"
    stage.run(cfg)
    first = _snapshot(out)
    assert "done" in first and "viewer_data/features_0.js" in first

    # A kill halfway through writing the features of a fresh run.
    shutil.rmtree(tmp_path / "records")
    real_add, calls = viewer.ViewerWriter.add, []

    def dying_add(self, i, blob, picked):
        calls.append(i)
        if len(calls) == 20:
            raise KeyboardInterrupt
        real_add(self, i, blob, picked)

    monkeypatch.setattr(viewer.ViewerWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg)
    monkeypatch.undo()
    assert not out.exists() and (out.parent / "resid_post.partial").exists()
    assert not records.finished(out, records.fingerprint(cfg.collate, tmp_path / "saes/0/resid_post"))
    assert not list((out.parent / "resid_post.partial").rglob("*.tmp"))  # no torn file under a final name

    stage.run(cfg)
    assert _snapshot(out) == first
    assert not (out.parent / "resid_post.partial").exists()

    # Finished: skipped (nothing rewritten) unless forced.
    stamp = (out / "viewer_data/features_0.js").stat().st_mtime_ns
    capsys.readouterr()
    stage.run(cfg)
    assert "already done" in capsys.readouterr().out
    assert (out / "viewer_data/features_0.js").stat().st_mtime_ns == stamp
    stage.run(cfg, force=True)
    assert _snapshot(out) == first
    assert (out / "viewer_data/features_0.js").stat().st_mtime_ns != stamp

    # A retrained SAE makes the records stale.
    sae = make_sae()
    with torch.no_grad():
        sae.b_lat[DEAD] = 0.0
    sae.save(tmp_path / "saes/0/resid_post")
    assert not records.finished(out, records.fingerprint(cfg.collate, tmp_path / "saes/0/resid_post"))
    stage.run(cfg)
    assert _snapshot(out) != first


def test_changed_settings_or_sae_redo_stale_records(tmp_path, tokenizer_dir, capsys):
    make_run(tmp_path, tokenizer_dir)
    out = tmp_path / "records/0/resid_post"
    stage.run(config_from_dict(make_cfg(tmp_path)))
    top_count = len(viewer.read_feature(out, ALWAYS)["top"])
    assert top_count == 5
    stamp = (out / "viewer_data/features_0.js").stat().st_mtime_ns

    # Killed inside the folder swap, with the old records set aside: they get their name back.
    out.rename(out.with_name("resid_post.old"))
    capsys.readouterr()
    stage.run(config_from_dict(make_cfg(tmp_path)))
    assert "already done" in capsys.readouterr().out
    assert (out / "viewer_data/features_0.js").stat().st_mtime_ns == stamp and not out.with_name("resid_post.old").exists()

    # Speed settings do not change the records: nothing is redone.
    capsys.readouterr()
    stage.run(config_from_dict(make_cfg(tmp_path, batch_size=64, reader_threads=1, device="cpu")))
    assert "already done" in capsys.readouterr().out
    assert (out / "viewer_data/features_0.js").stat().st_mtime_ns == stamp

    # A changed n_top is redone, and the line says which key changed.
    stage.run(config_from_dict(make_cfg(tmp_path, n_top=3)))
    lines = [line for line in capsys.readouterr().out.splitlines() if "redoing" in line]
    assert len(lines) == 1 and "collate.n_top 5 -> 3" in lines[0]
    assert len(viewer.read_feature(out, ALWAYS)["top"]) == 3
    assert _strict((out / "summary.json").read_text())["n_top"] == 3
    stage.run(config_from_dict(make_cfg(tmp_path, n_top=3)))
    assert "already done" in capsys.readouterr().out

    # A retrained SAE (a different one saved in its folder) is redone too.
    sae = make_sae()
    with torch.no_grad():
        sae.b_lat[DEAD] = 10.0  # the dead latent now fires everywhere
    sae.save(tmp_path / "saes/0/resid_post")
    stage.run(config_from_dict(make_cfg(tmp_path, n_top=3)))
    lines = [line for line in capsys.readouterr().out.splitlines() if "redoing" in line]
    assert len(lines) == 1 and "SAE was retrained" in lines[0] and "n_top" not in lines[0]
    assert len(viewer.read_feature(out, DEAD)["top"]) == 3

    # Records from before fingerprints (a done marker without one) are redone.
    (out / "done").write_text(json.dumps({"sae": {"size": 1, "mtime_ns": 2}}))
    stage.run(config_from_dict(make_cfg(tmp_path, n_top=3)))
    assert "predate" in capsys.readouterr().out
    assert "fingerprint" in json.loads((out / "done").read_text())

    # Records in an older format (their fingerprint names none) are redone in this one.
    done = json.loads((out / "done").read_text())
    del done["fingerprint"]["records.format"]
    (out / "done").write_text(json.dumps(done))
    stage.run(config_from_dict(make_cfg(tmp_path, n_top=3)))
    assert f"records.format (not recorded; now {viewer.RECORDS_FORMAT})" in capsys.readouterr().out
    assert json.loads((out / "done").read_text())["fingerprint"]["records.format"] == viewer.RECORDS_FORMAT


def test_collate_holds_a_lock_per_layer_and_hook(tmp_path, tokenizer_dir, monkeypatch):
    make_run(tmp_path, tokenizer_dir)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(make_cfg(tmp_path)))

    # Another collate holds the lock: a second one, a real process, refuses at once.
    with fsio.run_lock(tmp_path, "collate.0.resid_post"):
        res = subprocess.run([SAEPIPE, "collate", str(cfg_path)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: another") and "layer 0 hook resid_post" in lines[0]
    assert not (tmp_path / "records/0/resid_post").exists()
    assert not (tmp_path / "records/0/resid_post.partial").exists()

    # And collate itself holds it while it works.
    refused = []
    real = C.collate_sae

    def probe(*args, **kwargs):
        with pytest.raises(UserError, match="another"):
            with fsio.run_lock(tmp_path, "collate.0.resid_post"):
                pass
        refused.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "collate_sae", probe)
    stage.run(config_from_dict(make_cfg(tmp_path)))
    assert refused == [True] and (tmp_path / "records/0/resid_post/done").exists()


def test_cli_device_not_present(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir)
    _assert_one_line_error(_cli(tmp_path, device="mps"), tmp_path, "collate.device", "mps")


def test_cli_truncated_sae_weights(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir)
    weights = tmp_path / "saes/0/resid_post/sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _assert_one_line_error(_cli(tmp_path), tmp_path, "sae.safetensors")


def test_cli_sae_without_done_marker(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir)
    (tmp_path / "saes/0/resid_post/done").unlink()
    _assert_one_line_error(_cli(tmp_path), tmp_path, "saes/0/resid_post")


def _cli(root: Path, *extra, **collate):
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(make_cfg(root, **collate)))
    return CliRunner().invoke(main, ["collate", str(cfg_path), *extra])


def _assert_one_line_error(result, root: Path, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), result.output
    for frag in fragments:
        assert frag in lines[0]
    assert not (root / "records").exists()


def test_cli_no_trained_sae(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir, sae=False)
    _assert_one_line_error(_cli(tmp_path), tmp_path, "no trained SAE for layer 0", "make train")


def test_cli_sae_width_mismatch(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir, sae=False)
    TopKSAE(D // 2, N_LAT, K).save(tmp_path / "saes/0/resid_post")
    _assert_one_line_error(_cli(tmp_path), tmp_path, f"d_in = {D // 2}", f"d_model = {D}")


def test_cli_tokens_missing(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir)
    zarr.open_group(str(tmp_path / "activations.zarr"), mode="a")["tokens"].attrs["complete"] = False
    _assert_one_line_error(_cli(tmp_path), tmp_path, "tokens")


def test_cli_layer_flag_and_viewer_path(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir)
    result = _cli(tmp_path, "--layers", "0")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].endswith("records/0/resid_post/viewer.html")
    out = tmp_path / "records/0/resid_post"
    # (viewer_data/eval.js comes after, with the index page)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "eval.js")
    assert f"; {size / 2**20:.1f} MiB in {out}" in result.output  # the folder's total size, reported
    result = _cli(tmp_path, "--layers", "3")
    assert result.exit_code == 2 and result.output.startswith("saepipe: error: layer 3 hook resid_post is not in")


def test_number_arrays_parse_to_the_rounded_values():
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(40, 17, generator=g, dtype=torch.float64) * torch.logspace(-8, 6, 17, dtype=torch.float64)).numpy()
    v[0, :4] = [0.0, -0.0, 0.5e-6, -0.49e-6]  # rounds to +-0
    v[1, :3] = [123456789012.3456789, -999999.9999996, 1e-6]
    v[3, :2] = [9.9e11, 2e12]  # 13 integer digits: json's turn
    v[2, 1] = 3e19  # past the digit layout: that row goes through json
    v = v.astype(np.float32).astype(np.float64)
    lengths = np.arange(40) % 18  # empty rows and full ones
    text = records.json_number_arrays(v.astype(np.float32), lengths, piece=100)  # several pieces
    assert text == records.json_number_arrays(v.astype(np.float32), lengths)
    assert records.json_number_arrays(np.zeros((0, 17), np.float32), lengths[:0]) == []
    for r in range(40):
        got = _strict(text[r])
        want = np.round(v[r, :lengths[r]].astype(np.float32).astype(np.float64), 6).tolist()
        assert got == want and all(type(x) is float for x in got), (r, text[r])


def test_token_strings_concatenate_to_text(tokenizer):
    text = "Zarr café — naïve 😀 façade\nnext line"
    ids = tokenizer.encode(text, add_special_tokens=False)
    strings = TokenText(tokenizer).strings(ids)
    assert len(strings) == len(ids)
    assert "".join(strings) == text
    assert "😀" in strings  # the emoji's bytes span tokens; it lands, whole, on the last one
    plain = TokenText(tokenizer).strings(tokenizer.encode(" the lazy dog", add_special_tokens=False))
    assert "".join(plain) == " the lazy dog" and plain[0].startswith(" ")


@pytest.mark.parametrize("array", ["layers/0/resid_post", "tokens"])
def test_cli_missing_store_chunk(tmp_path, tokenizer_dir, array):
    """A deleted chunk must not read as zeros: one line naming it, nothing written."""
    make_run(tmp_path, tokenizer_dir)
    chunk = tmp_path / "activations.zarr" / array / "c" / "1" / "0"
    assert chunk.is_file()
    chunk.unlink()
    result = _cli(tmp_path)
    assert result.exit_code == 2, result.output
    # The scan's progress bar may come first; then one line, and no traceback.
    errors = [line for line in result.output.splitlines() if "saepipe: error: " in line]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0], result.output
    assert f"array {array} chunk 1 is missing" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "records/0/resid_post").exists()
    assert not (tmp_path / "records/0/resid_post.partial").exists()


def test_full_disk_is_one_line_keeps_old_records_and_the_rerun_completes(tmp_path, tokenizer_dir):
    """A real write failure (RLIMIT_FSIZE: Python ignores SIGXFSZ, so writes fail with EFBIG)
    mid-collate: one line, exit 2, the earlier finished records untouched, and a rerun
    without the limit writes the same records as an unbroken run."""
    import resource

    make_run(tmp_path, tokenizer_dir)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(make_cfg(tmp_path)))
    stage.run(config_from_dict(make_cfg(tmp_path)))
    out = records_dir(tmp_path, 0, "resid_post")
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    # A new n_top makes the finished records stale, so collate redoes them: the writes hit the limit.
    res = subprocess.run([SAEPIPE, "collate", str(cfg_path), "--set", "collate.n_top=4"], capture_output=True,
                         text=True, preexec_fn=small_files)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("saepipe: error:")]
    assert len(errors) == 1 and "file size limit" in errors[0] and "Traceback" not in res.stderr, res.stderr
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before, "the finished records stay as they were"

    res = subprocess.run([SAEPIPE, "collate", str(cfg_path), "--set", "collate.n_top=4"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert len(viewer.read_feature(out, 0)["top"]) <= 4
    reference = tmp_path / "reference"
    make_run(reference, tokenizer_dir)
    stage.run(config_from_dict(make_cfg(reference, n_top=4)))
    ref_out = records_dir(reference, 0, "resid_post")
    for p in sorted(ref_out.rglob("*.json")):
        if p.name != "done":
            assert (out / p.relative_to(ref_out)).read_bytes() == p.read_bytes(), p


def test_index_page_links_every_finished_layer_with_its_numbers(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir, sae=False)
    sae = make_sae()
    sae.save(tmp_path / "saes/0/resid_post", extra_cfg={"eval": {"fvu": 0.123456, "dead_frac": 0.0625}})
    stage.run(config_from_dict(make_cfg(tmp_path)))
    # Another layer finished earlier (a copy stands in for it): listed too, though not collated now.
    shutil.copytree(tmp_path / "records/0/resid_post", tmp_path / "records/3/resid_post")
    shutil.copytree(tmp_path / "records/0/resid_post", tmp_path / "records/3/mlp_out.partial")  # unfinished
    stage.run(config_from_dict(make_cfg(tmp_path)))

    page = (tmp_path / "records/index.html").read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)[1:]  # after the header
    cells = [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", r)] for r in rows]
    summary = json.loads((tmp_path / "records/0/resid_post/summary.json").read_text())
    numbers = [str(N_LAT), str(summary["dead"]), str(summary["ultra_rare"]), f"{summary['n_tokens']:,}"]
    # train's numbers say their space; the density picture is collate's, over the whole store
    assert cells == [["0", "resid_post", "viewer", *numbers, "0.1235 (raw)", "–", "6.25%", "–", "density"],
                     ["3", "resid_post", "viewer (its SAE is gone)", *numbers, "–", "–", "–", "–", "density"]]
    assert 'href="0/resid_post/density.png"' in page and (tmp_path / "records/0/resid_post/density.png").exists()
    assert 'href="0/resid_post/viewer.html"' in page and 'href="3/resid_post/viewer.html"' in page
    assert 'id="groups"' not in page and "Latent groups" not in page  # no listed SAE has latent groups

    # Retrained after collate: the row says its records are stale.
    with torch.no_grad():
        sae.b_lat[DEAD] = 0.0
    sae.save(tmp_path / "saes/0/resid_post", extra_cfg={"eval": {"fvu": 0.5, "dead_frac": 0.0}})
    viewer.write_index_page(tmp_path)
    assert "the SAE changed since: rerun collate" in (tmp_path / "records/index.html").read_text()


def test_logit_lens_matches_brute_force(tmp_path, monkeypatch):
    """Each latent's promoted/suppressed tokens: W_U rmsnorm(W_dec[i]) in plain torch, against
    the records, computed in blocks of a few latents."""
    from transformers import AutoTokenizer

    from helpers import make_model

    d, n_latents, k = 16, 40, records.LENS_K
    model = make_model("llama", tmp_path / "llama", n_layers=2, d_model=d)
    with torch.no_grad():  # a gain far from ones, so folding it in changes which tokens win
        model.model.norm.weight.copy_(torch.rand(d, generator=torch.Generator().manual_seed(2)) * 3)
    model.save_pretrained(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    ids = tok.encode(" ".join(CORPUS * 8), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    acts = torch.randn(N_SEQ * CTX, d, generator=torch.Generator().manual_seed(0))
    root = tmp_path / "run"
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(tmp_path / "llama"), "model": str(tmp_path / "llama"),
                                               "revision": "main"})
    torch.manual_seed(1)
    sae = TopKSAE(d, n_latents, 4)
    sae.save(root / "saes" / "0" / "resid_post")
    vocab = model.lm_head.weight.shape[0]
    monkeypatch.setattr(records, "LENS_BLOCK", vocab * 7)  # blocks of 7 latents: the last one short
    C.run(config_from_dict(make_cfg(root)))

    with torch.no_grad():
        w = sae.W_dec.float()
        h = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * model.model.norm.weight
        logits = h @ model.lm_head.weight.T
    up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    out = records_dir(root, 0, "resid_post")
    for i in range(n_latents):
        f = viewer.read_feature(out, i)
        assert f["top_upvote_token_ints"] == up.indices[i].tolist()
        assert f["top_downvote_token_ints"] == down.indices[i].tolist()
        assert f["top_upvotes_logits"] == pytest.approx(up.values[i].tolist(), abs=1e-4)
        assert f["top_downvotes_logits"] == pytest.approx(down.values[i].tolist(), abs=1e-4)
        assert f["top_upvote_tokens_logits"][0] == tok.decode([up.indices[i, 0].item()])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["logit_lens"] == {"model": str(tmp_path / "llama"), "k": k, "vocab": vocab}

    # How peaked each latent's logits are, in numpy: the top logit's z over the whole vocabulary,
    # against the bar random directions of the same seed reach through the same norm and unembedding.
    def peak(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        h = rows / np.sqrt((rows ** 2).mean(-1, keepdims=True) + model.config.rms_norm_eps)
        h = h * model.model.norm.weight.detach().double().numpy()
        z = h @ model.lm_head.weight.detach().double().numpy().T
        return (z.max(1) - z.mean(1)) / z.std(1)

    z = peak(sae.W_dec.detach().numpy())
    null = torch.randn(records.LENS_NULL_DIRECTIONS, d, generator=torch.Generator().manual_seed(records.LENS_NULL_SEED))
    bar = float(np.quantile(peak(null.numpy()), records.LENS_NULL_QUANTILE))
    q = summary["lens_quality"]
    assert q["peak_z_bar"] == pytest.approx(bar, rel=1e-4)
    assert q["n_layers"] == 2 and q["lower_third"] is False  # layer 0 of 2 blocks: block 1, half way up
    flags = []
    for i in range(n_latents):
        f = viewer.read_feature(out, i)
        assert f["lens_peak_z"] == pytest.approx(z[i], rel=1e-4)
        if abs(z[i] - bar) > 1e-3:
            assert f["lens_uninformative"] == (z[i] < bar)
        flags.append(f["lens_uninformative"])
    assert q["uninformative"] == sum(flags)
    assert records.lens_quality(records.LensOut(*[np.zeros((1, 1))] * 4, np.zeros(1), 1.0, 30), 9)["lower_third"]
    assert not records.lens_quality(records.LensOut(*[np.zeros((1, 1))] * 4, np.zeros(1), 1.0, 30), 10)["lower_third"]


def test_logit_lens_skipped_without_a_model(tmp_path, tokenizer_dir):
    make_run(tmp_path, tokenizer_dir)
    C.run(config_from_dict(make_cfg(tmp_path)))
    out = records_dir(tmp_path, 0, "resid_post")
    assert "top_upvote_tokens_logits" not in viewer.read_feature(out, 0)
    assert "skipped" in json.loads((out / "summary.json").read_text())["logit_lens"]
