"""Every registered architecture through every stage, on one tiny harvested Llama:
train -> eval -> collate -> steer -> export (each format it lists) -> verify, all through the
CLI. What each architecture computes is tested in its own file (tests/test_arch_*.py); this
file proves the stages reach each of them only through the contract (pipeline.saes)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import harvested_llama, run_cli
from pipeline.paths import sae_dir
from pipeline.saes import ARCHITECTURES, load_sae
from pipeline.viewer import read_features
from stages.cli import main

D, LAYER = 32, 1


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    # scalar: folded into the weights: every architecture's fold, and sparsify can take it
    return root, harvested_llama(root, normalize="scalar")


_cli = run_cli


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_stage_runs_every_architecture(tmp_path, harvested, name):
    src, base = harvested
    shutil.copytree(src / "run", tmp_path / "run")
    raw = {**base, "run_dir": str(tmp_path / "run"), "train": {**base["train"], "sae": {"architecture": name}}}

    res = _cli(tmp_path, raw, "train")
    assert res.exit_code == 0, res.output
    folder = sae_dir(tmp_path / "run", LAYER, "resid_post")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == name and cfg["eval"]["l0"] > 0
    sae = load_sae(folder)
    assert type(sae) is ARCHITECTURES[name]

    res = _cli(tmp_path, raw, "eval")
    assert res.exit_code == 0, res.output
    row = json.loads((folder / "eval.json").read_text())
    assert row["l0"] > 0 and row["ce_spliced"] > 0 and row["fingerprint"]["sae_sha256"] == row["sae_sha256"]

    res = _cli(tmp_path, raw, "collate")
    assert res.exit_code == 0, res.output
    records = tmp_path / "run" / "records" / str(LAYER) / "resid_post"
    summary = json.loads((records / "summary.json").read_text())
    assert summary["architecture"] == name and summary["n_latents"] == 64
    assert sum(1 for _ in read_features(records)) == 64

    live = int(torch.tensor([f["density"] for f in read_features(records)]).argmax())
    res = _cli(tmp_path, raw, "steer", "--layer", str(LAYER), "--latent", str(live), "--strength", "0",
               "--strength", "8", "--prompt", "The quick brown fox", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line for line in res.output.splitlines()[-3:]}
    assert rows["clean"].split(None, 1)[1] == rows["0"].split(None, 1)[1]  # strength 0 changes nothing

    for fmt in ("saelens", "sparsify"):
        out = tmp_path / f"export-{fmt}"
        res = CliRunner().invoke(main, ["export", str(folder), "--format", fmt, "--out", str(out)])
        if fmt in sae.exports:
            assert res.exit_code == 0 and (out / "cfg.json").exists(), res.output
        else:  # the format cannot hold it: one line, nothing written
            assert res.exit_code == 2 and res.output.count("\n") == 1 and f"cannot hold a {name} SAE" in res.output
            assert not out.exists()

    res = CliRunner().invoke(main, ["verify", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output


def test_a_sweep_trains_several_architectures_from_one_pass(tmp_path, harvested):
    """Sweep members may differ in architecture: each its own folder, cfg.json and settings, from
    the same batches; eval then puts them on one frontier."""
    src, base = harvested
    shutil.copytree(src / "run", tmp_path / "run")
    sweep = [{}, {"sae": {"architecture": "batchtopk"}, "name": "btk"},
             {"sae": {"architecture": "relu", "target_l0": 8}, "name": "relu8"}]
    raw = {**base, "run_dir": str(tmp_path / "run"), "train": {**base["train"], "k": 8, "sweep": sweep}}
    res = _cli(tmp_path, raw, "train")
    assert res.exit_code == 0 and "3 SAEs from one pass over the batches" in res.output, res.output
    got = {m: json.loads((sae_dir(tmp_path / "run", LAYER, "resid_post", m) / "cfg.json").read_text())
           for m in (None, "btk", "relu8")}
    assert [got[m]["architecture"] for m in (None, "btk", "relu8")] == ["topk", "batchtopk", "relu"]
    # k carries over to the member of another architecture that has one
    assert got[None]["k"] == 8 and got["btk"]["k"] == 8 and got["relu8"]["target_l0"] == 8
    res = _cli(tmp_path, raw, "eval")
    assert res.exit_code == 0, res.output
    from pipeline.eval import frontier_points

    points = frontier_points(tmp_path / "run", LAYER, "resid_post")
    assert sorted((p["name"], p["architecture"]) for p in points) == [
        ("resid_post", "topk"), ("resid_post@btk", "batchtopk"), ("resid_post@relu8", "relu")]
