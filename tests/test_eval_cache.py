"""eval.json vouches for its numbers: everything they depend on is in its fingerprint, and a
change to any of it redoes the eval (or is refused in one line where a redo would be wrong).
Eval also refuses a corpus other than the harvested one, whose "held-out" windows would be
training tokens. A tiny random Llama, a real harvest, SAEs saved directly (no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from helpers import eval_sae, harvest_config, make_model, with_setting, write_corpus
from pipeline.paths import sae_dir
from pipeline.saes.topk import TopKSAE
from stages.cli import main

D, CTX, HARVESTED, LAYER = 32, 16, 24, 1  # harvest_config: 24 windows of 16 tokens, layers [1]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """(model folder, corpus, a run_dir with layers 1 and 2 harvested, its raw config)."""
    root = tmp_path_factory.mktemp("evalcache")
    model = root / "model"
    make_model("llama", model, n_layers=3, d_model=D)
    corpus = write_corpus(root / "corpus.jsonl")
    raw = harvest_config(model, corpus, root / "run", layers=[1, 2])
    raw["eval"] = {"n_tokens": 6 * CTX, "batch_size": 4, "device": "cpu"}
    res = _cli(root, raw, "harvest")
    assert res.exit_code == 0, res.output
    return model, corpus, root / "run", raw


def _cli(root: Path, raw: dict, stage: str, *args):
    path = Path(root) / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, [stage, str(path), *args])


def _sae(seed=1) -> TopKSAE:
    return eval_sae(D, seed)


def _save(run: Path, model, layer=LAYER, seed=1, **extra) -> Path:
    folder = sae_dir(run, layer, "resid_post")
    _sae(seed).save(folder, {"layer": layer, "hook": "resid_post", "context_size": CTX, "prepend_bos": True,
                             "exclude_bos": True, "model": str(model), **extra})
    return folder


@pytest.fixture
def run(tmp_path, harvested):
    """A private copy of the harvested run with a saved SAE at layer 1, evaluated once."""
    model, corpus, src, raw = harvested
    shutil.copytree(src, tmp_path / "run")
    raw = {**raw, "run_dir": str(tmp_path / "run")}
    folder = _save(tmp_path / "run", model)
    res = _cli(tmp_path, raw, "eval", "--layers", str(LAYER))
    assert res.exit_code == 0, res.output
    return tmp_path, raw, folder


def _mark(folder: Path) -> dict:
    """Put a mark in eval.json that a redo removes and a reuse keeps."""
    row = json.loads((folder / "eval.json").read_text())
    row["ce_clean"] = 123.0
    (folder / "eval.json").write_text(json.dumps(row))
    return row


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    # (a tokenizer's progress bar may stand before it: stderr is a terminal's, not a log)
    lines = [line for line in res.output.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), res.output
    for n in needles:
        assert n in lines[0], res.output


def test_unchanged_settings_reuse_the_eval(run):
    root, raw, folder = run
    marked = _mark(folder)
    res = _cli(root, raw, "eval", "--layers", str(LAYER))
    assert res.exit_code == 0 and "skipping" in res.output and "123.0000" in res.output, res.output
    assert json.loads((folder / "eval.json").read_text()) == marked
    fp = marked["fingerprint"]
    assert fp["sae_sha256"] == marked["sae_sha256"] and fp["held_out_after"] == HARVESTED
    assert (fp["context_size"], fp["prepend_bos"], fp["pass_bos"], fp["layer"]) == (CTX, True, True, LAYER)
    assert len(fp["data.sha256"]) == 64 and fp["model.name"] == str(raw["model"]["name"])


@pytest.mark.parametrize("key, value, changed", [
    ("eval.n_tokens", 4 * CTX, "eval.n_tokens"),
    ("model.dtype", "bfloat16", "model.dtype"),
    ("model.revision", "v2", "model.revision"),
])
def test_a_changed_setting_redoes_the_eval(run, key, value, changed):
    root, raw, folder = run
    _mark(folder)
    res = _cli(root, with_setting(raw, key, value), "eval", "--layers", str(LAYER))
    assert res.exit_code == 0, res.output
    assert f"eval.json was made with other settings ({changed}:" in res.output and "redoing" in res.output
    row = json.loads((folder / "eval.json").read_text())
    assert row["ce_clean"] != 123.0 and row["fingerprint"][changed] == value
    if key == "eval.n_tokens":
        assert row["n_tokens"] == value


def test_an_sae_trained_without_bos_redoes_the_eval(run):
    """Same weights (same sha256), but position 0 now spliced too: other numbers."""
    root, raw, folder = run
    before = _mark(folder)
    _save(root / "run", raw["model"]["name"], exclude_bos=False)
    res = _cli(root, raw, "eval", "--layers", str(LAYER))
    row = json.loads((folder / "eval.json").read_text())
    assert res.exit_code == 0 and "pass_bos: True there, False now" in res.output, res.output
    assert row["sae_sha256"] == before["sae_sha256"] and row["ce_clean"] != 123.0
    assert row["ce_spliced"] != before["ce_spliced"]


def test_another_model_is_refused_not_skipped(run, tmp_path_factory):
    """Issue 23.1: --set model.name=OTHER printed the first model's cached numbers."""
    root, raw, folder = run
    marked = _mark(folder)
    other = tmp_path_factory.mktemp("other") / "model"
    make_model("llama", other, n_layers=3, d_model=D)
    res = _cli(root, with_setting(raw, "model.name", str(other)), "eval", "--layers", str(LAYER))
    _one_line_error(res, "was trained on model", str(other))
    assert json.loads((folder / "eval.json").read_text()) == marked


def test_an_sae_moved_to_another_layer_or_run_is_redone(run, harvested, tmp_path):
    """Issue 23.1: an SAE folder copied into another run brought its eval.json along."""
    root, raw, folder = run
    _mark(folder)
    moved = sae_dir(root / "run", 2, "resid_post")
    shutil.copytree(folder, moved)
    res = _cli(root, raw, "eval", "--layers", "2")
    assert res.exit_code == 0 and "layer: 1 there, 2 now" in res.output, res.output
    assert json.loads((moved / "eval.json").read_text())["ce_clean"] != 123.0

    # Another run harvested further: its held-out windows start later.
    model, corpus, _, _ = harvested
    other = with_setting({**raw, "run_dir": str(tmp_path / "other")}, "harvest.n_tokens", 30 * CTX)
    other["harvest"]["layers"] = [LAYER]
    assert _cli(tmp_path, other, "harvest").exit_code == 0
    copied = sae_dir(tmp_path / "other", LAYER, "resid_post")
    shutil.copytree(folder, copied)
    res = _cli(tmp_path, other, "eval")
    assert res.exit_code == 0 and f"held_out_after: {HARVESTED} there, 30 now" in res.output, res.output
    row = json.loads((copied / "eval.json").read_text())
    assert row["ce_clean"] != 123.0 and row["fingerprint"]["held_out_after"] == 30

    # And a run cut into longer windows, without BOS.
    longer = with_setting({**other, "run_dir": str(tmp_path / "longer")}, "harvest.context_size", 2 * CTX)
    longer["harvest"]["prepend_bos"] = False
    assert _cli(tmp_path, longer, "harvest").exit_code == 0
    copied = sae_dir(tmp_path / "longer", LAYER, "resid_post")
    shutil.copytree(folder, copied)
    res = _cli(tmp_path, longer, "eval")
    assert res.exit_code == 0, res.output
    assert f"context_size: {CTX} there, {2 * CTX} now" in res.output and "prepend_bos: True there, False now" in res.output
    assert json.loads((copied / "eval.json").read_text())["n_tokens"] % (2 * CTX) == 0


def test_a_reordered_corpus_is_refused(run):
    """Issue 23.2: after the file's lines were reordered, eval evaluated on training tokens."""
    root, raw, folder = run
    marked = _mark(folder)
    corpus = Path(raw["data"]["path"])
    lines = corpus.read_text().splitlines(keepends=True)
    shuffled = root / "shuffled.jsonl"
    shuffled.write_text("".join(lines[1::2] + lines[::2]))
    shutil.copy(shuffled, root / "corpus.jsonl")
    moved = with_setting(raw, "data.path", str(root / "corpus.jsonl"))
    res = _cli(root, moved, "eval", "--layers", str(LAYER), "--force")
    _one_line_error(res, "the corpus differs from the one", "data.sha256")
    assert json.loads((folder / "eval.json").read_text()) == marked


def test_a_store_without_a_data_hash_checks_its_last_window(run):
    """A store that records no sha256 of its data (older, or a hub dataset): the last harvested
    window, cut again, must equal the stored one."""
    root, raw, folder = run
    group = zarr.open_group(str(root / "run" / "activations.zarr"), mode="r+")
    fp = dict(group.attrs["fingerprint"])
    del fp["data.sha256"]
    group.attrs["fingerprint"] = fp
    res = _cli(root, raw, "eval", "--layers", str(LAYER), "--force")  # same corpus: fine
    assert res.exit_code == 0, res.output
    corpus = Path(raw["data"]["path"])
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[::-1]))
    try:
        res = _cli(root, raw, "eval", "--layers", str(LAYER), "--force")
        _one_line_error(res, "no longer give the windows stored in", f"its last window, {HARVESTED - 1}")
    finally:
        corpus.write_text("".join(lines))


def test_the_model_named_as_another_path_is_the_same_model(run, monkeypatch):
    """Issue 23.10: a trailing slash or a relative path was refused as another model."""
    root, raw, folder = run
    marked = _mark(folder)
    model = Path(raw["model"]["name"])
    for name in (f"{model}/", str(Path("..") / model.parent.name / model.name)):
        monkeypatch.chdir(model.parent)
        res = _cli(root, with_setting(raw, "model.name", name), "eval", "--layers", str(LAYER))
        assert res.exit_code == 0 and "skipping" in res.output, res.output
        assert json.loads((folder / "eval.json").read_text()) == marked
        res = _cli(root, with_setting(raw, "model.name", name), "harvest")  # harvest's fingerprint agrees
        assert res.exit_code == 0, res.output
        res = _cli(root, with_setting(raw, "model.name", name), "eval", "--layers", str(LAYER), "--force")
        assert res.exit_code == 0 and json.loads((folder / "eval.json").read_text())["ce_clean"] != 123.0
        marked = _mark(folder)


def test_more_eval_tokens_than_the_corpus_holds_says_so(run):
    """Issue 23.10: eval used what the corpus held without saying so."""
    root, raw, folder = run
    res = _cli(root, with_setting(raw, "eval.n_tokens", 10_000 * CTX), "eval", "--layers", str(LAYER))
    assert res.exit_code == 0, res.output
    n = json.loads((folder / "eval.json").read_text())["n_tokens"] // CTX
    assert 0 < n < 10_000
    assert f"the corpus holds only {n} windows ({n * CTX} tokens) past the {HARVESTED} harvested ones" in res.output


def test_a_hook_eval_cannot_splice_is_skipped_and_the_rest_evaluated(run):
    """Issue 23.9: one non-residual hook stopped eval for the config's other hooks too."""
    root, raw, folder = run
    raw = with_setting(raw, "harvest.hooks", ["resid_post", "mlp.act_fn"])
    odd = sae_dir(root / "run", LAYER, "mlp.act_fn")
    TopKSAE(2 * D, 4 * D, 4, backend="torch").save(odd, {"layer": LAYER, "hook": "mlp.act_fn", "context_size": CTX,
                                                          "prepend_bos": True, "model": raw["model"]["name"]})
    res = _cli(root, raw, "eval", "--layers", str(LAYER), "--force")
    assert res.exit_code == 0, res.output
    assert "eval: layer 1 hook mlp.act_fn: skipped: hook 'mlp.act_fn' of layer 1 outputs shape" in res.output
    assert not (odd / "eval.json").exists() and json.loads((folder / "eval.json").read_text())["ce_clean"] > 0
    table = [line.split() for line in res.output.splitlines() if line.split()[:1] == [str(LAYER)]]
    assert [row[1] for row in table] == ["resid_post"]


def test_without_the_store_the_sae_vouches_for_the_corpus(run):
    """A store deleted after training: the SAE's cfg.json records what it was harvested from,
    so a changed corpus is still refused; an SAE that records nothing gets a notice."""
    root, raw, _ = run
    raw = with_setting(raw, "train", {"n_tokens": 1024, "batch_size": 128, "expansion_factor": 2, "k": 4,
                              "eval_every": 4, "checkpoint_every": 4, "device": "cpu"})
    assert _cli(root, raw, "train", "--layers", "2").exit_code == 0
    folder = sae_dir(root / "run", 2, "resid_post")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["store_sequences"] == HARVESTED and len(cfg["store_fingerprint"]["data.sha256"]) == 64
    shutil.rmtree(root / "run" / "activations.zarr")
    res = _cli(root, raw, "eval", "--layers", "2")
    assert res.exit_code == 0 and "unchecked" not in res.output, res.output
    assert json.loads((folder / "eval.json").read_text())["fingerprint"]["held_out_after"] == HARVESTED

    corpus = Path(raw["data"]["path"])
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[::-1]))
    try:
        _one_line_error(_cli(root, raw, "eval", "--layers", "2", "--force"),
                        f"the corpus differs from the one {folder} was harvested from", "data.sha256")
    finally:
        corpus.write_text("".join(lines))
    del cfg["store_fingerprint"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    res = _cli(root, raw, "eval", "--layers", "2", "--force")
    assert res.exit_code == 0 and "no record of its corpus in the SAEs" in res.output, res.output


def test_the_frontier_shows_every_evaluated_sae_of_the_layer(run):
    """saes/<L>/frontier-<hook>.png: one dot per SAE with a current eval.json (plain and sweep
    members alike), labelled; the records index page shows it."""
    from pipeline import eval as evaluator
    from pipeline import plots, viewer

    root, raw, folder = run
    _save(root / "run", raw["model"]["name"], seed=2)  # the plain SAE, evaluated again below
    member = sae_dir(root / "run", LAYER, "resid_post", "k4")
    TopKSAE(D, 4 * D, 4, backend="torch").save(member, {"layer": LAYER, "hook": "resid_post", "context_size": CTX,
                                                        "prepend_bos": True, "exclude_bos": True,
                                                        "model": raw["model"]["name"]})
    (root / "run/records/1/resid_post").mkdir(parents=True)
    (root / "run/records/1/resid_post/done").write_text("{}")  # a finished records folder stands in
    viewer.write_index_page(root / "run")
    swept = with_setting(raw, "train.sweep", [{}, {"k": 4}])
    res = _cli(root, swept, "eval", "--layers", str(LAYER))
    assert res.exit_code == 0, res.output
    table = [line.split() for line in res.output.splitlines() if line.split()[:1] == [str(LAYER)]]
    assert [(r[1], r[2]) for r in table] == [("resid_post", "topk"), ("resid_post@k4", "topk")]

    points = evaluator.frontier_points(root / "run", LAYER, "resid_post")
    rows = {p["name"]: p for p in points}
    assert set(rows) == {"resid_post", "resid_post@k4"}
    for name, f in (("resid_post", folder), ("resid_post@k4", member)):
        ev = json.loads((f / "eval.json").read_text())
        assert (rows[name]["l0"], rows[name]["delta_ce"], rows[name]["fvu"]) == (ev["l0"], ev["delta_ce"], ev["fvu"])
    assert (root / "run/saes/1/frontier-resid_post.png").stat().st_size > 0
    assert (root / "run/saes/1/frontier-resid_post.svg").exists()
    fig = plots.draw_frontier(points, "t")
    for ax in fig.axes:  # one dot per SAE on each panel, at its (l0, value)
        dots = sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines)
        key = "delta_ce" if "ΔCE" in ax.get_ylabel() else "fvu"
        assert dots == sorted((p["l0"], p[key]) for p in points)
    page = viewer.index_page(root / "run").read_text()
    assert '<img src="../saes/1/frontier-resid_post.png"' in page
