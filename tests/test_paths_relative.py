"""Relative paths in a config file are read from its project folder (pipeline.paths.project_folder),
not from wherever saepipe is started: `cd /tmp && saepipe verify /repo/configs/x.yaml` finds the run.
A store harvested before (its fingerprint holds the paths as written) stays current."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_model, write_corpus
from pipeline.config import config_from_dict, load_config
from pipeline.harvest import run_fingerprint
from pipeline.paths import PROJECT_MARKERS, project_folder
from pipeline.store import ActivationStore, Location
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _relative_config(run_dir="runs/r", **harvest) -> dict:
    """harvest_config with paths as a project's configs write them: from the project's top folder."""
    raw = harvest_config("models/tiny", "data/corpus.jsonl", run_dir, **harvest)
    raw["train"] = {"n_latents": 64, "n_tokens": 1024, "batch_size": 128, "eval_every": 4, "checkpoint_every": 4,
                    "log_every": 4, "eval_tokens": 128, "device": "cpu"}
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project (pyproject.toml on top) with its config in configs/, a model in models/, a corpus in
    data/, and a store harvested the way saepipe did before: run from the project's top folder, the
    config's relative paths read from there (config_from_dict reads them from the current folder)."""
    top = tmp_path_factory.mktemp("project")
    (top / "pyproject.toml").write_text("[project]\nname = 'research'\n")
    make_model("llama", top / "models" / "tiny", n_layers=3, d_model=32)
    write_corpus(top / "data" / "corpus.jsonl")
    raw = _relative_config()
    (top / "configs").mkdir()
    (top / "configs" / "c.yaml").write_text(yaml.safe_dump(raw))
    from pipeline import harvest

    here = os.getcwd()
    os.chdir(top)
    try:
        harvest.run(config_from_dict(json.loads(json.dumps(raw))), progress=False)
    finally:
        os.chdir(here)
    return top


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_old_stores_fingerprint_holds_the_paths_as_written(project):
    attrs = ActivationStore(project / "runs" / "r").attrs
    assert attrs["fingerprint"]["data.path"] == "data/corpus.jsonl"
    assert attrs["fingerprint"]["model.name"] == "models/tiny"


@pytest.mark.parametrize("cwd", ["top", "elsewhere", "configs"])
def test_stages_find_the_run_from_any_folder(project, tmp_path, monkeypatch, cwd):
    monkeypatch.chdir({"top": project, "elsewhere": tmp_path, "configs": project / "configs"}[cwd])
    config = project / "configs" / "c.yaml"
    cfg = load_config(config)
    assert cfg.run_dir == str(project / "runs" / "r")
    assert cfg.data.path == str(project / "data" / "corpus.jsonl")
    assert cfg.model.name == str(project / "models" / "tiny")
    # The fingerprint is the one the store was harvested with, byte for byte: nothing looks stale.
    store = ActivationStore(Location.of(cfg))
    assert run_fingerprint(cfg) == store.attrs["fingerprint"]

    res = _cli("verify", config)
    assert res.exit_code == 0 and "verify: sound" in res.output, res.output
    res = _cli("harvest", config)
    assert res.exit_code == 0 and "already harvested" in res.output and "nothing to do" in res.output, res.output


def test_train_on_the_old_store_from_another_folder(project, tmp_path, monkeypatch):
    import shutil

    # A private copy of the project, so the module's store stays as harvested for the other tests.
    top = tmp_path / "copy"
    shutil.copytree(project, top)
    monkeypatch.chdir(tmp_path)
    res = _cli("train", top / "configs" / "c.yaml")
    assert res.exit_code == 0, res.output
    assert (top / "runs" / "r" / "saes" / "1" / "resid_post" / "done").is_file()
    assert not (tmp_path / "runs").exists() and not (top / "configs" / "runs").exists()


def test_set_on_the_command_line_is_read_from_the_current_folder(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(project / "configs" / "c.yaml", ["run_dir=mine/r2", "data.path=here.jsonl"])
    assert cfg.run_dir == str(tmp_path / "mine" / "r2")
    assert cfg.data.path == str(tmp_path / "here.jsonl")
    assert cfg.as_written("run_dir") == "mine/r2" and cfg.model.name == str(project / "models" / "tiny")
    assert load_config(project / "configs" / "c.yaml", ["model.name=org/model"]).model.name == "org/model"


def test_a_missing_store_names_the_folder_searched_and_why(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _cli("verify", project / "configs" / "c.yaml", "--set", "run_dir=runs/none")
    assert res.exit_code == 2
    assert str(tmp_path / "runs" / "none") in res.output and "given on the command line" in res.output, res.output
    (project / "configs" / "other.yaml").write_text(yaml.safe_dump(_relative_config("runs/none")))
    res = _cli("verify", project / "configs" / "other.yaml")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert f"no activation store at {project / 'runs' / 'none' / 'activations.zarr'}" in line, line
    assert f"run_dir runs/none is read from {project}" in line and "pyproject.toml" in line, line


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_the_repositorys_configs_read_paths_from_its_top(name, cwd, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT if cwd == "root" else tmp_path)
    path = ROOT / "configs" / f"{name}.yaml"
    written = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.run_dir == str(ROOT / written["run_dir"])
    local = written["data"]["path"].startswith("data/")
    assert cfg.data.path == (str(ROOT / written["data"]["path"]) if local else written["data"]["path"])
    assert cfg.model.name == written["model"]["name"]  # pkg: and hub ids are not paths
    # What fingerprints record: the text, as before paths were read from the top.
    assert cfg.as_written("data.path") == written["data"]["path"]
    assert cfg.as_written("model.name") == written["model"]["name"]


def test_a_config_outside_any_project_reads_paths_from_its_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    folder.mkdir()
    if project_folder(folder / "c.yaml")[0] != folder:
        pytest.skip(f"a folder above {tmp_path} holds one of {PROJECT_MARKERS}")
    (folder / "c.yaml").write_text(yaml.safe_dump(_relative_config()))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(folder / "c.yaml")
    assert cfg.run_dir == str(folder / "runs" / "r")
    assert cfg.data.path == str(folder / "data" / "corpus.jsonl")  # written as a file: a path, found or not
    assert cfg.model.name == "models/tiny"  # no such folder: a hub id, as written


def test_a_path_found_only_from_the_current_folder_is_taken_from_there(tmp_path, monkeypatch):
    """How saepipe read every path before: a run made so keeps working."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / ".git").mkdir()
    (tmp_path / "proj" / "c.yaml").write_text(yaml.safe_dump(_relative_config()))
    (tmp_path / "cwd" / "runs" / "r").mkdir(parents=True)
    (tmp_path / "proj" / "data").mkdir()
    write_corpus(tmp_path / "proj" / "data" / "corpus.jsonl")
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = load_config(tmp_path / "proj" / "c.yaml")
    assert cfg.run_dir == str(tmp_path / "cwd" / "runs" / "r")
    assert cfg.data.path == str(tmp_path / "proj" / "data" / "corpus.jsonl")  # there in the project: taken there
    why = {n.key: n.why for n in cfg.path_notes()}
    assert "as saepipe did before" in why["run_dir"] and ".git" in why["data.path"]


def test_what_is_not_a_local_path_stays_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("")
    raw = _relative_config()
    raw["model"]["name"] = "org/model"
    raw["data"] = {"path": "allenai/c4", "data_files": "en/c4-train.00000-of-01024.json.gz"}
    raw["store"] = "s3://bucket/acts.zarr"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.name, cfg.data.path, cfg.data.data_files, cfg.store) == (
        "org/model", "allenai/c4", "en/c4-train.00000-of-01024.json.gz", "s3://bucket/acts.zarr")


def test_data_files_of_a_builder_are_paths_and_fingerprint_as_written(tmp_path, monkeypatch):
    top = tmp_path / "top"
    (top / "configs").mkdir(parents=True)
    (top / "pyproject.toml").write_text("")
    write_corpus(top / "data" / "a.jsonl")
    write_corpus(top / "data" / "b.jsonl", n_docs=5)
    raw = _relative_config()
    raw["data"] = {"path": "json", "data_files": ["data/a.jsonl", "data/b.jsonl"]}
    (top / "configs" / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(top)
    before = run_fingerprint(config_from_dict(json.loads(json.dumps(raw))))  # as saepipe read it before
    monkeypatch.chdir(tmp_path)
    cfg = load_config(top / "configs" / "c.yaml")
    assert cfg.data.data_files == [str(top / "data" / "a.jsonl"), str(top / "data" / "b.jsonl")]
    assert before["data.sha256"] is not None and run_fingerprint(cfg) == before
