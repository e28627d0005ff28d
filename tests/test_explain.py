"""explain (N2G): known answers, the three predictors against each other, the batched
suffix search and importance against direct forwards, scores by hand, a SIGKILL and its
resume, and the one-line refusals."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import harvest_config, make_model, run_cli, write_corpus
from pipeline import collate
from pipeline.collate import explain, n2g
from pipeline.config import config_from_dict
from pipeline.model import ActivationCapture
from pipeline.collate.n2g import START, WILDCARD
from pipeline.saes import load_sae
from pipeline.saes.topk import TopKSAE
from pipeline.store import ActivationStore, write_synthetic

SAEPIPE = str(Path(sys.executable).with_name("saepipe"))
REPO = Path(__file__).resolve().parents[1]
N_SEQ, CTX, N_LAT = 64, 16, 16


# --------------------------------------------------------------------------- a run whose latents are known
def _token_latents(root: Path, store: ActivationStore) -> dict[int, list[int]]:
    """An SAE on block 0 of a Llama whose embeddings dominate the residual stream (scaled 20x):
    latents 0 and 1 each read one frequent token's embedding direction, latent 2 the sum of two
    others', each with its bias halfway between the token's positions and all the others; the
    other latents are random. Returns {latent: the tokens it fires on}."""
    from transformers import AutoModelForCausalLM

    tokens = store.read_tokens(0, N_SEQ).reshape(-1)
    x = store.read_rows(0, "resid_post", 0, N_SEQ * CTX).float()
    emb = AutoModelForCausalLM.from_pretrained(root / "model").model.embed_tokens.weight.detach()
    ids, counts = np.unique(tokens.reshape(N_SEQ, CTX)[:, 1:], return_counts=True)
    frequent = [int(t) for t in ids[np.argsort(-counts, kind="stable")][:4]]
    wanted = {0: [frequent[0]], 1: [frequent[1]], 2: frequent[2:4]}
    torch.manual_seed(0)
    sae = TopKSAE(32, N_LAT, N_LAT)  # k = n: a plain ReLU code, so no latent is crowded out
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(N_LAT, 32) / 32 ** 0.5)
        sae.b_lat.fill_(-1.0)
        sae.b_pre.zero_()
        for latent, toks in wanted.items():
            u = sum(emb[t] for t in toks)
            u = u / u.norm()
            proj = (x @ u).numpy()
            on = np.isin(tokens, toks)
            assert proj[on].min() > proj[~on].max() + 0.2, "the tokens must be linearly separable with a margin"
            sae.W_enc[latent] = u
            sae.b_lat[latent] = -float(proj[on].min() + proj[~on].max()) / 2
    sae.save(root / "run" / "saes" / "0" / "resid_post")
    fired = sae.encode_dense(x)
    for latent, toks in wanted.items():  # the latents are exactly the token indicators on the store
        assert torch.equal(fired[:, latent] > 0, torch.from_numpy(np.isin(tokens, toks)))
    return wanted


def _raw(root: Path, **explain_settings) -> dict:
    raw = harvest_config(root / "model", root / "corpus.jsonl", root / "run", n_tokens=N_SEQ * CTX, layers=[0])
    raw["collate"] = {"n_top": 10, "n_random": 5, "batch_size": 256, "device": "cpu"}
    raw["explain"] = {"n_score_windows": 16, "n_select_windows": 16, "chunk_windows": 8, "batch_tokens": 512, "device": "cpu",
                      **explain_settings}
    return raw


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A harvested tiny Llama (layer 0), its known-answer SAE and collate's records."""
    root = tmp_path_factory.mktemp("explain")
    model = make_model("llama", root / "model", n_layers=2, d_model=32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(root / "model")
    write_corpus(root / "corpus.jsonl")
    raw = _raw(root)
    assert run_cli(root, raw, "harvest").exit_code == 0
    wanted = _token_latents(root, ActivationStore(root / "run"))
    collate.run(config_from_dict(raw))
    return root, wanted


@pytest.fixture
def run(built, tmp_path):
    """A copy of the built run for one test to change as it likes: (root, raw config, known latents)."""
    root, wanted = built
    shutil.copytree(root / "run", tmp_path / "run")
    raw = _raw(root)
    raw["run_dir"] = str(tmp_path / "run")
    return tmp_path, raw, wanted


def _out(root: Path) -> Path:
    return root / "run" / "records" / "0" / "resid_post"


def test_building_examples_take_the_first_records_of_each_kind(built):
    from pipeline.collate.explain import building_examples
    from pipeline.viewer import read_features

    root, _ = built
    records = _out(root)
    held_out, first = 6, 1
    live, ex = building_examples(records, 2, 1, held_out, first, n_quantile=1)
    want = set()
    for f in read_features(records):
        picked = f["top"][:2] + f["random"][:1] + [r for q in f["quantiles"] for r in q["examples"][:1]]
        for r in picked:
            w, p = int(r["doc_id"]), int(r.get("window_start", 0)) + int(r["idx"])
            if w < held_out and p >= first:
                want.add((w, p, int(f["index"])))
    got = set(zip(ex.window.tolist(), ex.position.tolist(), ex.latent.tolist()))
    assert got == want and len(got) == len(ex.latent)  # each (window, position) once per latent
    assert any(len(f["quantiles"]) > 1 for f in read_features(records))  # the intervals add examples
    only_top = building_examples(records, 2, 0, held_out, first)[1]
    assert len(only_top.latent) < len(ex.latent)


# --------------------------------------------------------------------------- known answers
def test_token_latents_come_back_with_their_tokens_and_a_high_f1(run, capsys):
    root, raw, wanted = run
    explain.run(config_from_dict(raw))
    out = _out(root)
    got = explain.read_explanations(out)
    doc = json.loads((out / explain.FILE).read_text())
    assert doc["score_windows"] == [N_SEQ - 16, N_SEQ] and doc["n_positions"] == 16 * (CTX - 1)
    assert doc["select_windows"] == [N_SEQ - 32, N_SEQ - 16]
    for latent, toks in wanted.items():
        e = got[latent]
        assert sorted(tuple(p["ids"]) for p in e["patterns"]) == sorted((t,) for t in toks), e["text"]
        assert all(p["tokens"] != ["*"] and p["count"] >= 1 for p in e["patterns"])
        assert e["scores"]["f1"] >= 0.95 and e["scores"]["corr"] > 0.9 and e["scores"]["n_fires"] > 0
        assert e["n_explained"] == e["n_examples"] > 0 and e["depth"] == 1
        assert e["baseline"]["ids"] and set(e["baseline"]["ids"]) <= set(toks)  # the repeated ones
        assert e["text"] == " | ".join(explain.render(p["tokens"]) for p in e["patterns"])
    summary = json.loads((out / explain.SUMMARY).read_text())
    assert summary["n_live"] == len(got) and summary["n2g"]["mean_f1"] is not None
    assert not (out / explain.PARTIAL).exists()

    # Done: skipped; a changed setting redoes it and says which; logistics change nothing.
    stamp = (out / explain.FILE).stat().st_mtime_ns
    capsys.readouterr()
    explain.run(config_from_dict({**raw, "explain": {**raw["explain"], "batch_tokens": 64, "chunk_windows": 3}}))
    assert "already done" in capsys.readouterr().out and (out / explain.FILE).stat().st_mtime_ns == stamp
    explain.run(config_from_dict({**raw, "explain": {**raw["explain"], "max_suffix": 4}}))
    assert "explain.max_suffix: 6 there, 4 now" in capsys.readouterr().out
    assert json.loads((out / explain.FILE).read_text())["fingerprint"]["explain.max_suffix"] == 4


class RuleProbe:
    """A stand-in for the model and SAE whose latents follow known rules over a query's tokens
    (prefix = (BOS,)): latent 0 = 2 where the text ends B ? A; latent 1 = 3 where it is exactly
    C D; latent 2 = 1 once it holds 5 tokens or more."""

    A, B, C, D, BOS, PAD = 5, 6, 7, 8, 0, 1

    def codes(self, queries):
        idx = np.tile(np.arange(3), (len(queries), 1))
        vals = np.zeros((len(queries), 3), np.float32)
        for i, q in enumerate(queries):
            text = q[1:]
            vals[i, 0] = 2.0 if len(text) >= 3 and text[-1] == self.A and text[-3] == self.B else 0
            vals[i, 1] = 3.0 if tuple(text) == (self.C, self.D) else 0
            vals[i, 2] = 1.0 if len(text) >= 5 else 0
        return idx, vals


def test_wildcards_anchors_and_unexplained_examples_by_rule():
    P = RuleProbe
    tokens = np.array([[P.BOS, P.C, P.D, 9, P.B, 9, P.A, 9],
                       [P.BOS, 9, P.B, 2, P.A, P.C, P.D, 9]])
    st = n2g.Settings(max_suffix=3, threshold=0.5, prefix=(P.BOS,), pad=P.PAD)
    window, position, latent = [0, 0, 1, 0, 1, 1], [2, 6, 4, 6, 6, 7], [1, 0, 0, 2, 1, 0]
    a, keys = n2g.explain_examples(P(), tokens, window, position, latent, st)
    assert a.tolist() == [3.0, 2.0, 2.0, 1.0, 0.0, 0.0]
    assert keys == [(P.D, P.C, START),  # C D only where it opens the text: anchored
                    (P.A, WILDCARD, P.B), (P.A, WILDCARD, P.B),  # the token between is a wildcard
                    None,  # needs 5 tokens of context: longer than max_suffix
                    None, None]  # does not fire at all
    trie = n2g.Trie()
    for k, act in [(keys[1], 2.0), (keys[2], 2.0)]:
        trie.insert(k, act)
    assert trie.patterns() == [((P.A, WILDCARD, P.B), 2.0, 2)]
    assert trie.predict([P.BOS, P.B, 4, P.A, P.A, 3, P.A], first=1).tolist() == [0, 0, 0, 2.0, 0, 0, 0]


class PadProbe(RuleProbe):
    """RuleProbe plus latent 3 = 4 wherever the text ends with the pad token."""

    def codes(self, queries):
        idx, vals = super().codes(queries)
        last = np.array([[4.0 if q[-1] == self.PAD else 0.0] for q in queries], np.float32)
        return np.hstack([idx, np.full((len(queries), 1), 3)]), np.hstack([vals, last])


def test_the_pad_token_is_never_a_wildcard():
    """Blanking the pad token out is a no-op, which would make it look unimportant."""
    P = PadProbe
    tokens = np.array([[P.BOS, 9, P.PAD, 9]])
    st = n2g.Settings(max_suffix=3, threshold=0.5, prefix=(P.BOS,), pad=P.PAD)
    a, keys = n2g.explain_examples(P(), tokens, [0], [2], [3], st)
    assert a.tolist() == [4.0] and keys == [(P.PAD,)]


def test_depth_selection_cuts_context_that_does_not_pay(built):
    """On the known-answer SAE: latent 0 fires on its token whatever comes before, so a pattern
    that also asks for one particular token before it is cut back to the token; a latent that
    never fires in the selection windows keeps its patterns whole; no windows, no cut."""
    root, wanted = built
    store = ActivationStore(root / "run")
    sae = load_sae(root / "run" / "saes" / "0" / "resid_post")
    windows = range(N_SEQ - 32, N_SEQ - 16)
    tokens = store.read_tokens(windows.start, windows.stop)
    t0 = wanted[0][0]
    r, c = np.nonzero(tokens[:, 1:] == t0)
    before = np.array([tokens[i, j] for i, j in zip(r, c)])  # the token before each t0 (BOS included)
    assert len(set(before.tolist())) > 1, "t0 must follow more than one token there"
    ctx = int(np.bincount(before).argmax())
    fires = sae.encode_dense(store.read_rows(0, "resid_post", windows.start * CTX, windows.stop * CTX).float())
    silent = next(i for i in range(3, N_LAT) if not (fires[:, i].reshape(-1, CTX)[:, 1:] > 0).any())
    keyed = {0: [((t0, ctx), 2.0), ((t0, ctx, WILDCARD), 1.0)], silent: [((t0, 5, 7), 1.0)], 1: []}
    t = explain.Target(0, "resid_post", None, root / "run" / "saes" / "0" / "resid_post", _out(root), {}, None)
    depth, patterns = explain.select_depths(store, t, sae, windows, 1, keyed, 512, torch.device("cpu"))
    assert depth == {0: 1, silent: 3, 1: 0}
    assert patterns[0] == [((t0,), 1.5, 2)] and patterns[silent] == [((t0, 5, 7), 1.0, 1)] and patterns[1] == []
    depth, patterns = explain.select_depths(store, t, sae, range(0), 1, keyed, 512, torch.device("cpu"))
    assert depth == {0: 3, silent: 3, 1: 0} and patterns[0] == [((t0, ctx), 2.0, 1), ((t0, ctx, WILDCARD), 1.0, 1)]


# --------------------------------------------------------------------------- three predictors, one definition
def _random_keys(rng: random.Random, vocab: int, n: int) -> list[tuple[int, ...]]:
    keys = []
    for _ in range(n):
        key = tuple(WILDCARD if rng.random() < 0.3 else rng.randrange(vocab) for _ in range(rng.randint(1, 4)))
        keys.append(key + ((START,) if rng.random() < 0.3 else ()))
    return keys


@pytest.mark.parametrize("seed", range(6))
def test_trie_and_pattern_set_predict_exactly_as_the_reference(seed):
    rng = random.Random(seed)
    vocab, T, first = 4, 14, seed % 2
    tries = {}
    for latent in range(5):
        trie = tries[latent] = n2g.Trie()
        for key in _random_keys(rng, vocab, rng.randint(1, 8)):
            for _ in range(rng.randint(1, 2)):  # repeats: a pattern several examples reached
                trie.insert(key, rng.uniform(0.1, 5.0))
    windows = np.array([[rng.randrange(vocab) for _ in range(T)] for _ in range(6)])
    pats = {i: trie.patterns() for i, trie in tries.items()}
    ps = n2g.PatternSet([i for i in pats for _ in pats[i]], [k for i in pats for k, _, _ in pats[i]],
                        [v for i in pats for _, v, _ in pats[i]])
    pos, lat, val = ps.predict(windows, first)
    dense = np.zeros((len(tries), windows.size))
    dense[lat, pos] = val
    for latent, trie in tries.items():
        for b, seq in enumerate(windows):
            want = n2g.reference_predict([(k, v) for k, v, _ in pats[latent]], seq, first)
            assert trie.predict(seq, first).tolist() == want
            assert dense[latent, b * T:(b + 1) * T].tolist() == want


# --------------------------------------------------------------------------- batched against direct forwards
def test_minimal_suffix_and_importance_match_direct_forwards(tmp_path):
    """explain_examples' batched, prefix-shared, right-padded forwards against one unpadded
    forward per query, on a plain tiny Llama whose latents do depend on context."""
    model = make_model("llama", tmp_path / "m", n_layers=2, d_model=32)
    capture = ActivationCapture(model, [(1, "resid_post")])
    torch.manual_seed(3)
    sae = TopKSAE(32, 24, 4, normalize="layer_norm")
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(24, 32))
    st = n2g.Settings(max_suffix=5, threshold=0.5, prefix=(0,), pad=1)
    probe = n2g.LatentProbe(capture, (1, "resid_post"), sae, torch.float32, st.pad, batch_tokens=40)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 60, (3, 12), generator=g).numpy()
    tokens[:, 0] = 0

    def act(row, latent) -> float:
        x = capture.run(torch.tensor([row]))[(1, "resid_post")][0, -1:]
        idx, vals = sae.encode(x)
        return float(n2g.latent_acts(idx.numpy(), vals.numpy(), [latent])[0])

    examples = []  # (window, position, latent) where the latent fires in full context
    for w in range(3):
        for p in (3, 7, 11):
            idx, _ = sae.encode(capture.run(torch.tensor(tokens[w: w + 1, :p + 1]))[(1, "resid_post")][0, -1:])
            examples += [(w, p, int(latent)) for latent in idx[0, :2]]
    a, keys = n2g.explain_examples(probe, tokens, *zip(*examples), st)
    checked = 0
    for e, (w, p, latent) in enumerate(examples):
        row = [int(t) for t in tokens[w]]
        full = act(row[:p + 1], latent)
        assert a[e] == pytest.approx(full, rel=1e-5, abs=1e-6)
        by_start = [(s, act(list(st.prefix) + row[s:p + 1], latent)) for s in n2g.suffix_starts(p, 1, st.max_suffix)]
        s = n2g.minimal_start(by_start, full)
        near = [v for _, v in by_start if abs(v - full / 2) < 1e-3 * full]
        if s is None:
            assert keys[e] is None or near
            continue
        pad = act(list(n2g.start_query(row, s, p, st)), latent)
        blanked = [act(list(q), latent) for q in n2g.importance_queries(row, s, p, st)]
        alone = dict(by_start)[s]  # importance is against the suffix's own activation
        if near or abs(pad - full / 2) < 1e-3 * full or any(abs((alone - b) / alone - 0.5) < 1e-3 for b in blanked):
            continue  # a decision on the knife's edge: rounding may take either side
        want = n2g.pattern_key(row, s, p, [(alone - b) / alone >= st.threshold for b in blanked], pad < full / 2)
        assert keys[e] == want, (w, p, latent)
        checked += 1
    assert checked >= 8
    assert any(len(k) > 1 for k in keys if k) and any(WILDCARD in k or START in k for k in keys if k)
    # Shared across latents and examples: a window's suffix and full-context queries are one row per
    # start s, up to the furthest example needing s (here positions 3, 7, 11 need starts 1..11); the
    # full contexts BOS + t[1..p] are the start-1 row's prefixes.
    row = tuple(int(t) for t in tokens[0])
    queries = [row[:p + 1] for p in (3, 7, 11)] + [st.prefix + row[s:p + 1] for p in (3, 7, 11)
                                                   for s in n2g.suffix_starts(p, 1, st.max_suffix)]
    _, rows = n2g.rows_for(queries)
    furthest = {s: max(p for p in (3, 7, 11) if s in n2g.suffix_starts(p, 1, st.max_suffix)) for s in range(1, 12)}
    furthest[1] = 11
    assert sorted(rows) == sorted(st.prefix + row[s:e + 1] for s, e in furthest.items())


def test_rows_for_maps_every_query_to_a_row_it_is_a_prefix_of():
    rng = random.Random(0)
    queries = [tuple(rng.randrange(3) for _ in range(rng.randint(1, 5))) for _ in range(200)]
    row_of, rows = n2g.rows_for(queries)
    assert len(set(rows)) == len(rows)
    for q, r in zip(queries, row_of):
        assert rows[r][:len(q)] == q
    assert not any(a != b and b[:len(a)] == a for a in rows for b in rows)  # no row extends another


# --------------------------------------------------------------------------- scores
def test_scores_match_a_hand_computation():
    rng = np.random.default_rng(0)
    n_pos, n_lat = 40, 4
    X = np.where(rng.random((n_pos, n_lat)) < 0.3, rng.uniform(0.5, 3, (n_pos, n_lat)), 0.0)
    Y = np.where(rng.random((n_pos, n_lat)) < 0.3, rng.uniform(0.5, 3, (n_pos, n_lat)), 0.0)
    X[:, 2] = 0  # never predicted: no precision, no correlation
    Y[:, 3] = 0  # never fires: no recall, no F1
    sums = explain.ScoreSums(n_lat)
    for lo in (0, 25):  # two batches, positions numbered within each
        hi = 25 if lo == 0 else n_pos
        sparse = []
        for M in (X, Y):
            pos, lat = np.nonzero(M[lo:hi])
            sparse.append((pos, lat, M[lo:hi][pos, lat]))
        sums.add(hi - lo, *sparse)
    for i in range(n_lat):
        x, y = X[:, i], Y[:, i]
        tp, fp, fn = int(((x > 0) & (y > 0)).sum()), int(((x > 0) & (y == 0)).sum()), int(((x == 0) & (y > 0)).sum())
        got = sums.scores(i)
        assert got["n_fires"] == tp + fn and got["n_positions"] == n_pos
        assert got["precision"] == (pytest.approx(tp / (tp + fp), abs=1e-6) if tp + fp else None)
        assert got["recall"] == (pytest.approx(tp / (tp + fn), abs=1e-6) if tp + fn else None)
        assert got["f1"] == (pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6) if tp + fn else None)
        want_corr = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else None
        assert got["corr"] == (pytest.approx(want_corr, abs=1e-6) if want_corr is not None else None)
    assert sums.scores(0)["corr"] is not None and sums.scores(2)["precision"] is None
    assert sums.scores(3)["f1"] is None and sums.scores(3)["recall"] is None


def test_baseline_takes_repeated_tokens_else_the_strongest():
    assert explain.baseline_tokens([4, 5, 4, 6, 5, 4], [1.0, 2.0, 3.0, 9.0, 2.0, 2.0]) == [(4, 2.0, 3), (5, 2.0, 2)]
    assert [t for t, _, _ in explain.baseline_tokens([1, 2, 3, 4], [1.0, 4.0, 3.0, 2.0])] == [2, 3, 4]
    assert explain.baseline_tokens([1, 1], [0.0, 0.0]) == []


# --------------------------------------------------------------------------- a SIGKILL, then the resume
def test_a_killed_run_resumes_to_the_same_bytes(run, capsys):
    root, raw, _ = run
    raw["explain"]["chunk_windows"] = 1  # a checkpoint after every window: many chances to be killed
    out = _out(root)
    explain.run(config_from_dict(raw))
    reference = (out / explain.FILE).read_bytes()
    summary = (out / explain.SUMMARY).read_bytes()
    (out / explain.FILE).unlink()
    (out / explain.SUMMARY).unlink()

    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    # As from a terminal: a test started in the background inherits SIGINT ignored.
    proc = subprocess.Popen([SAEPIPE, "explain", str(cfg)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / explain.PARTIAL).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (out / explain.PARTIAL).exists() and not (out / explain.FILE).exists()

    capsys.readouterr()
    explain.run(config_from_dict(raw))
    assert "resuming after" in capsys.readouterr().out
    assert (out / explain.FILE).read_bytes() == reference
    assert (out / explain.SUMMARY).read_bytes() == summary
    assert not (out / explain.PARTIAL).exists()


# --------------------------------------------------------------------------- bad input: one line, exit 2
def _assert_one_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_is_one_line(run, tmp_path):
    root, raw, _ = run
    out = _out(root)
    # A layer without an SAE.
    _assert_one_line(run_cli(root, raw, "explain", "--layers", "5"), "no trained SAE for layer 5")
    # Held-out windows that leave none to build from.
    big = {**raw, "explain": {**raw["explain"], "n_select_windows": N_SEQ - 16}}
    _assert_one_line(run_cli(root, big, "explain"), "n_score_windows + n_select_windows = 16 + 48", "lower them")
    assert not (out / explain.FILE).exists() and not (out / explain.PARTIAL).exists()
    # No records yet.
    shutil.rmtree(out)
    _assert_one_line(run_cli(root, raw, "explain"), "no records for layer 0 hook resid_post", "collate")
    collate.run(config_from_dict(raw))
    # A store whose tokens are gone.
    import zarr

    zarr.open_group(str(root / "run" / "activations.zarr"), mode="a")["tokens"].attrs["complete"] = False
    _assert_one_line(run_cli(root, raw, "explain"), "tokens")
    assert not (out / explain.FILE).exists() and not (out / explain.PARTIAL).exists()


@pytest.mark.parametrize("model", ["bert", None])
def test_a_store_of_an_encoder_or_of_no_model_is_refused(tmp_path, model):
    """Explain reruns the store's model on suffixes: an encoder (no causal LM) and a store that
    names no model at all are each refused in one line."""
    attrs = {"prepend_bos": True}
    if model:
        make_model(model, tmp_path / "model", n_layers=2, d_model=32)
        attrs.update(model=str(tmp_path / "model"), tokenizer=str(tmp_path / "model"), revision="main")
    tokens = np.random.default_rng(0).integers(5, 20, (8, CTX)).astype(np.int32)
    write_synthetic(tmp_path / "run", torch.randn(8 * CTX, 32), tokens, attrs=attrs)
    TopKSAE(32, 8, 2).save(tmp_path / "run" / "saes" / "0" / "resid_post")
    records = tmp_path / "run" / "records" / "0" / "resid_post"
    records.mkdir(parents=True)
    (records / "done").write_text(json.dumps({"fingerprint": {}}))
    raw = {"run_dir": str(tmp_path / "run"), "model": {"name": str(tmp_path / "model") if model else "some/model"},
           "data": {"path": "synthetic"}, "harvest": {"layers": [0], "n_tokens": 8 * CTX, "context_size": CTX},
           "explain": {"n_score_windows": 2, "n_select_windows": 2, "device": "cpu"}}
    result = run_cli(tmp_path, raw, "explain")
    _assert_one_line(result, "not a causal language model" if model else "was harvested from model 'synthetic'")
    assert not (records / explain.FILE).exists()
