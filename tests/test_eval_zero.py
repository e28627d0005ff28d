"""Eval's cost cuts keep its numbers: CE and KL from logsumexps, a chunk of rows at a time, against
float64 log-softmax; the spliced and zero-ablated runs that start from the clean run's block
outputs against full forwards; and the zero-ablated CE, computed once per (layer, hook, BOS rule)
and kept in the run, is reused only while everything it depends on holds. Tiny random Llamas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from helpers import eval_sae, harvest_config, make_model, with_setting, write_corpus
from pipeline import eval as ev
from pipeline.config import EvalConfig
from pipeline.model import find_blocks, hook_module, load_causal_lm
from pipeline.paths import sae_dir
from pipeline.saes.topk import TopKSAE
from stages.cli import main

D, CTX, LAYER = 32, 16, 1
N_EVAL = 6  # held-out windows: 2 batches of 4, the second ragged


def _sae(seed=1) -> TopKSAE:
    return eval_sae(D, seed)


# ---------------------------------------------------------------------------
# CE and KL without a log-softmax


def test_ce_and_kl_from_logsumexps_match_float64():
    """Rows in several chunks (the last one short), a vocabulary as large as SmolLM2's: each row's
    logsumexp, CE and KL(clean || spliced) within float32 rounding of the float64 log-softmax's."""
    g = torch.Generator().manual_seed(0)
    N, V = 23, 49152
    clean = 4 * torch.randn(N, V, generator=g)
    spliced = clean + 0.5 * torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    assert len(list(ev._chunks(clean))) > 2

    lp, lq = F.log_softmax(clean.double(), -1), F.log_softmax(spliced.double(), -1)
    lse_clean = ev._logsumexp(clean)
    torch.testing.assert_close(lse_clean.double(), torch.logsumexp(clean.double(), -1), rtol=0, atol=2e-6)
    ce = ev._ce_sum(clean, lse_clean, targets)
    assert ce.dtype == torch.float64 and ce.item() == pytest.approx(-lp[range(N), targets].sum().item(), abs=2e-5)
    lse, kl = ev._against_clean(clean, lse_clean, spliced)
    torch.testing.assert_close(lse.double(), torch.logsumexp(spliced.double(), -1), rtol=0, atol=2e-6)
    torch.testing.assert_close(kl.double(), (lp.exp() * (lp - lq)).sum(-1), rtol=1e-5, atol=1e-6)

    _, same = ev._against_clean(clean, lse_clean, clean.clone())  # a lossless splice: KL exactly 0
    assert torch.equal(same, torch.zeros(N))
    half = clean.bfloat16()  # a bfloat16 model's logits: reduced in float32, a chunk at a time
    torch.testing.assert_close(ev._logsumexp(half).double(), torch.logsumexp(half.double(), -1), rtol=0, atol=2e-6)


def _reference(model, ids: torch.Tensor, layer: int, hook: str, sae: TopKSAE, pass_bos: bool) -> dict:
    """Full forwards, the hooked module's output replaced; float64 log-softmax."""
    start = 1 if pass_bos else 0
    module = hook_module(find_blocks(model)[layer], hook, layer)

    def run(mode):
        def replace(_m, _i, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, start:] = 0 if mode == "zero" else sae.reconstruct_raw(h[:, start:].reshape(-1, D))[0].reshape(
                h[:, start:].shape)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = module.register_forward_hook(replace) if mode else None
        try:
            with torch.no_grad():
                return F.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        finally:
            if handle:
                handle.remove()

    targets = ids[:, 1:, None]
    clean, spliced, zero = run(None), run("sae"), run("zero")
    return {"ce_clean": -clean.gather(-1, targets).mean().item(), "ce_spliced": -spliced.gather(-1, targets).mean().item(),
            "ce_zero": -zero.gather(-1, targets).mean().item(),
            "kl": (clean.exp() * (clean - spliced)).sum(-1).mean().item()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero") / "model"
    make_model("llama", folder, n_layers=3, d_model=D, random_norms=True)
    model, tok = load_causal_lm(str(folder), "main", "float32", "cpu")
    windows = np.random.default_rng(0).integers(0, len(tok), size=(7, CTX), dtype=np.int32)
    windows[:, 0] = tok.bos_token_id
    return model, windows


@pytest.fixture
def shared(monkeypatch) -> list:
    """What each search for one window's zero-ablated logits found: True (shared by every window) or False."""
    found = []
    find = ev._SharedZero.find.__func__

    def spy(cls, *args):
        out = find(cls, *args)
        found.append(out is not None)
        return out

    monkeypatch.setattr(ev._SharedZero, "find", classmethod(spy))
    return found


@pytest.mark.parametrize("layer, hook, pass_bos, other_first", [
    (0, "resid_post", True, False), (2, "resid_post", False, False), (1, "resid_post", True, True),
    (1, "attn_out", True, False), (2, "mlp_out", False, False)])
def test_the_numbers_match_full_forwards(llama, shared, layer, hook, pass_bos, other_first):
    """resid_post resumes after the hooked block itself (its output recorded by the clean run), the
    other hooks after the block before; 7 windows in batches of 3. Zeroing resid_post leaves every
    window the same logits (one window's forward stands for all); zeroing attn_out or mlp_out leaves
    the residual stream its tokens, and the probe sees it. other_first: window 5 starts with another
    token than BOS, which passes through, so its batch is run in full."""
    model, windows = llama
    if other_first:
        windows = windows.copy()
        windows[5, 0] = windows[5, 3]
    key = (layer, hook, None)
    p = ev.Plan(EvalConfig(batch_size=3), [], [], model, windows, {key: _sae()}, {key: pass_bos})
    row = ev.evaluate(p, progress=False)[key]
    assert shared == [hook == "resid_post"]
    ref = _reference(model, torch.from_numpy(windows).long(), layer, hook, _sae(), pass_bos)
    # Not vacuous: each run moves the numbers far more than the 1e-5 they are compared to.
    assert row["kl"] > 1e-3 and abs(row["ce_zero"] - row["ce_clean"]) > 1e-4
    for k, v in ref.items():
        assert row[k] == pytest.approx(v, abs=1e-5), k
    assert row["n_tokens"] == windows.size


def test_one_windows_zero_ablated_logits_stand_for_all_only_when_shown():
    """_SharedZero.find: two windows' logits that agree are shared, and their CE is what each
    window's own logits give; refused for one window, a repeated window (it proves nothing), first
    tokens that differ where BOS passes through, and logits that differ."""
    g = torch.Generator().manual_seed(0)
    T, V = 5, 11
    ids = torch.randint(1, V, (3, T), generator=g)
    ids[:, 0] = 0
    one = torch.randn(T - 1, V, generator=g)
    same = one.repeat(2, 1)
    z = (1, "resid_post", True)
    shared = ev._SharedZero.find(same, ids, z)
    assert shared is not None and shared.covers(ids)
    targets = ids[:, 1:]
    want = ev._ce_sum(one.repeat(3, 1), ev._logsumexp(one.repeat(3, 1)), targets.reshape(-1))
    assert shared.ce_sum(targets).item() == pytest.approx(want.item(), rel=1e-12)
    other_first = ids.clone()
    other_first[2, 0] = 4
    assert not shared.covers(other_first)
    assert ev._SharedZero.find(same[: T - 1], ids[:1], z) is None                  # one window
    assert ev._SharedZero.find(same, ids[[0, 0, 1]], z) is None                    # the first window again
    assert ev._SharedZero.find(same, other_first[[0, 2]], z) is None                # BOS passed, first tokens differ
    assert ev._SharedZero.find(same, other_first[[0, 2]], (1, "resid_post", False)) is not None  # all zeroed
    moved = same.clone()
    moved[T - 1 + 2, 3] += 1e-3
    assert ev._SharedZero.find(moved, ids, z) is None                               # the logits differ


# ---------------------------------------------------------------------------
# The zero-ablated CE, kept in the run


def _cli(root: Path, raw: dict, *args):
    path = Path(root) / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, ["eval", str(path), *args])


def _save(run: Path, model, seed=1, layer=LAYER, member=None, exclude_bos=True) -> Path:
    folder = sae_dir(run, layer, "resid_post", member)
    _sae(seed).save(folder, {"layer": layer, "hook": "resid_post", "context_size": CTX, "prepend_bos": True,
                             "exclude_bos": exclude_bos, "model": str(model)})
    return folder


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """(raw config, run_dir) with layers 1 and 2 harvested from a tiny Llama."""
    root = tmp_path_factory.mktemp("zerocache")
    model = root / "model"
    make_model("llama", model, n_layers=3, d_model=D)
    raw = harvest_config(model, write_corpus(root / "corpus.jsonl"), root / "run", layers=[1, 2])
    raw["eval"] = {"n_tokens": N_EVAL * CTX, "batch_size": 4, "device": "cpu", "layers": [LAYER]}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(main, ["harvest", str(path)])
    assert res.exit_code == 0, res.output
    return raw, root / "run"


@pytest.fixture
def run(tmp_path, harvested):
    """(root, raw config) of a private copy of the harvested run and of its model (which a test may
    replace in place)."""
    raw, src = harvested
    shutil.copytree(src, tmp_path / "run")
    shutil.copytree(raw["model"]["name"], tmp_path / "model")
    return tmp_path, {**raw, "run_dir": str(tmp_path / "run"), "model": {**raw["model"], "name": str(tmp_path / "model")}}


@pytest.fixture
def forwards(monkeypatch) -> list:
    """One entry per forward of the model eval loads that ran to its logits (the hook probe,
    which stops early, is not one): per batch the clean one, the zero-ablated ones, the spliced ones."""
    runs = []
    load = ev.load_causal_lm

    def counting(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        model.register_forward_hook(lambda *_: runs.append(1))
        return model, tok

    monkeypatch.setattr(ev, "load_causal_lm", counting)
    return runs


def _row(folder: Path) -> dict:
    return json.loads((folder / "eval.json").read_text())


def _cached(run_dir: Path, layer=LAYER) -> list[Path]:
    return sorted((Path(run_dir) / "saes" / str(layer)).glob("ce_zero-*.json"))


BATCHES = 2  # N_EVAL windows in batches of 4
# One SAE's forwards: per batch the clean one and the spliced one, and, unless the zero-ablated CE is
# kept, one zero-ablated forward of the first batch's first windows, whose logits every window shares
WARM = 2 * BATCHES
COLD = WARM + 1


def test_a_second_sae_reuses_the_zero_ablated_ce(run, forwards):
    root, raw = run
    first = _save(root / "run", raw["model"]["name"])
    res = _cli(root, raw)
    assert res.exit_code == 0, res.output
    assert len(forwards) == COLD
    [cache] = _cached(root / "run")
    kept, before = json.loads(cache.read_text()), _row(first)
    assert kept["ce_zero"] == before["ce_zero"] and kept["key"]["layer"] == LAYER
    assert kept["key"]["hook"] == "resid_post" and kept["key"]["pass_bos"] is True

    forwards.clear()
    _save(root / "run", raw["model"]["name"], seed=2)  # retrained: new weights, its eval redone
    res = _cli(root, raw)
    assert res.exit_code == 0 and "zero-ablated CE from" in res.output, res.output
    assert len(forwards) == WARM and _cached(root / "run") == [cache]
    second = _row(first)
    assert second["ce_zero"] == kept["ce_zero"] and second["sae_sha256"] != before["sae_sha256"]
    assert second["ce_clean"] == before["ce_clean"] and second["ce_spliced"] != before["ce_spliced"]

    forwards.clear()
    res = _cli(root, raw, "--force")  # --force computes it again, to the same number
    assert res.exit_code == 0 and len(forwards) == COLD, res.output
    assert _row(first)["ce_zero"] == kept["ce_zero"] and json.loads(cache.read_text()) == kept


def test_a_sweep_computes_it_once_per_bos_rule(run, forwards):
    """Three SAEs of one layer and hook in one eval: one zero-ablated run for the two that pass BOS
    through, one more for the one that splices BOS too (other positions, another CE)."""
    root, raw = run
    model = raw["model"]["name"]
    _save(root / "run", model)
    _save(root / "run", model, seed=2, member="b")
    _save(root / "run", model, seed=3, member="c", exclude_bos=False)
    swept = with_setting(raw, "train.sweep", [{}, {"name": "b", "k": 6}, {"name": "c", "k": 6}])
    res = _cli(root, swept)
    assert res.exit_code == 0, res.output
    assert len(forwards) == BATCHES * (1 + 3) + 2
    rows = {m: _row(sae_dir(root / "run", LAYER, "resid_post", m)) for m in (None, "b", "c")}
    assert rows[None]["ce_zero"] == rows["b"]["ce_zero"] != rows["c"]["ce_zero"]
    assert len(_cached(root / "run")) == 2


@pytest.mark.parametrize("change", ["eval.n_tokens", "layer", "model weights", "bos rule"])
def test_a_changed_input_computes_it_again(run, forwards, change):
    root, raw = run
    model = raw["model"]["name"]
    _save(root / "run", model)
    assert _cli(root, raw).exit_code == 0
    [cache] = _cached(root / "run")
    before = json.loads(cache.read_text())["ce_zero"]
    forwards.clear()
    layer, n = LAYER, COLD
    if change == "eval.n_tokens":
        raw, n = with_setting(raw, "eval.n_tokens", 3 * CTX), 3  # one batch
    elif change == "layer":
        layer = 2
        _save(root / "run", model, layer=2)
        raw = with_setting(raw, "eval.layers", [2])
    elif change == "model weights":  # the same folder, other weights: only the weights' digest tells
        make_model("llama", Path(model), n_layers=3, d_model=D, random_norms=True)
        _save(root / "run", model, seed=2)
    else:
        _save(root / "run", model, exclude_bos=False)
    res = _cli(root, raw)
    assert res.exit_code == 0 and "zero-ablated CE from" not in res.output, res.output
    assert len(forwards) == n
    new = [p for p in _cached(root / "run", layer) if p != cache]
    assert len(new) == 1 and json.loads(new[0].read_text())["ce_zero"] != before
    assert json.loads(cache.read_text())["ce_zero"] == before  # the other key's entry is still there


def test_the_key_holds_the_windows_themselves(run):
    """A hub dataset or tokenizer can change with nothing in the config changing: the windows'
    own sha256 is in the key, and so are the settings that change rounding."""
    from pipeline.config import config_from_dict

    _, raw = run
    model, tok = load_causal_lm(raw["model"]["name"], "main", "float32", "cpu")

    def key(raw, windows=None):
        cfg = config_from_dict(raw)
        w = ev._windows(cfg, {})
        win = ev.held_out_windows(cfg, tok, w, progress=False) if windows is None else windows
        return ev.zero_key(cfg, w, ev.corpus_fingerprint(cfg), model, win), win

    first, windows = key(raw)
    assert first == key(raw)[0]
    windows[-1, -1] += 1
    other = key(raw, windows)[0]
    assert [k for k in first if first[k] != other[k]] == ["windows.sha256"]
    assert key(with_setting(raw, "eval.batch_size", 2))[0]["eval.batch_size"] == 2
    assert first["device"] == "cpu" and first["model.dtype"] == "float32" and len(first["model.digest"]) == 64


@pytest.mark.parametrize("damage", ["half written", "ce_zero edited", "key edited"])
def test_a_damaged_cache_file_is_not_trusted(run, forwards, damage):
    root, raw = run
    folder = _save(root / "run", raw["model"]["name"])
    assert _cli(root, raw).exit_code == 0
    [cache] = _cached(root / "run")
    text = cache.read_text()
    kept = json.loads(text)
    if damage == "half written":
        cache.write_text(text[: len(text) // 2])
    elif damage == "ce_zero edited":
        cache.write_text(json.dumps({**kept, "ce_zero": kept["ce_zero"] + 1.0}))
    elif damage == "key edited":  # checksum made to match: a file that claims another key
        other = {"ce_zero": kept["ce_zero"], "key": {**kept["key"], "eval.n_tokens": 1}}
        other["sha256"] = ev.hashlib.sha256(ev._canonical(other)).hexdigest()
        cache.write_text(json.dumps(other))
    forwards.clear()
    _save(root / "run", raw["model"]["name"], seed=2)
    res = _cli(root, raw)
    assert res.exit_code == 0, res.output
    assert f"not using {cache}" in res.output and "computing the zero-ablated CE again" in res.output
    assert len(forwards) == COLD
    assert json.loads(cache.read_text()) == kept and _row(folder)["ce_zero"] == kept["ce_zero"]


def test_a_cache_that_cannot_be_written_is_one_line(run, forwards, monkeypatch):
    root, raw = run
    folder = _save(root / "run", raw["model"]["name"])
    write = ev.write_atomic

    def full_disk(path, data, durable=True):
        if Path(path).name.startswith("ce_zero-"):
            raise OSError(28, "No space left on device", str(path))
        write(path, data, durable)

    monkeypatch.setattr(ev, "write_atomic", full_disk)
    res = _cli(root, raw)
    assert res.exit_code == 0 and "could not keep the zero-ablated CE" in res.output, res.output
    assert _row(folder)["ce_zero"] > 0 and _cached(root / "run") == []
