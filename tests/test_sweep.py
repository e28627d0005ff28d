"""train.sweep: several SAEs of one (layer, hook) from one pass over the batches. Each member must be
bit for bit the SAE a plain run of its overrides makes, read the store no more than one plain run,
resume exactly when a kill leaves its members at different steps, and reach collate, eval and steer."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import train as trainer
from pipeline.config import config_from_dict
from pipeline.paths import records_dir, sae_dir
from pipeline.saes import load_sae, saved_marker
from pipeline.store import ActivationStore
from stages import train as stage
from test_train import cli, config, random_store, snapshot, write_config

# The plain config, a named member, and one whose name is derived; the third also takes another
# init sample (the first rows of the shared one) and another input normalisation.
SWEEP = [{}, {"k": 4, "name": "narrow"}, {"n_latents": 64, "k": 4, "init_sample": 1000, "normalize": "scalar"}]
FOLDERS = ["resid_post", "resid_post@narrow", "resid_post@n_latents64_k4_init_sample1000_normalizescalar"]
TIMING = {"train_seconds", "tokens_per_s", "elapsed_s"}


def store(run_dir):
    # 16 chunks of 512 rows, one held out: the 50-step budget is 1.7 epochs, so the loader keeps
    # the rows it read (each chunk read once: read counts are exact, not a race with prefetching)
    random_store(run_dir, n_rows=8 * 1024)


def raw_config(run_dir, **train) -> dict:
    return config(run_dir, **{"n_tokens": 256 * 50, "dormant_tokens": 1024, **train})


def counting_reads(monkeypatch) -> Counter:
    """Every chunk read from the store, by (layer, hook, chunk)."""
    reads, read_chunk = Counter(), ActivationStore.read_chunk

    def counted(self, layer, hook, chunk, *args, **kwargs):
        reads[(layer, hook, chunk)] += 1
        return read_chunk(self, layer, hook, chunk, *args, **kwargs)

    monkeypatch.setattr(ActivationStore, "read_chunk", counted)
    return reads


def without(row: dict, keys=TIMING) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


def result(folder: Path) -> tuple:
    """What a member must share with its plain run: weights, cfg.json and metrics but their timings."""
    cfg = without(json.loads((folder / "cfg.json").read_text()))
    rows = [without(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return (folder / "sae.safetensors").read_bytes(), cfg, rows


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """Each member trained alone, as the plain config with its overrides; and the reads of one of them."""
    out, reads = [], None
    with pytest.MonkeyPatch.context() as mp:
        for i, member in enumerate(SWEEP):
            run_dir = tmp_path_factory.mktemp(f"plain{i}")
            store(run_dir)
            counted = counting_reads(mp) if i == 0 else None
            stage.run(config_from_dict(raw_config(run_dir, **without(member, {"name"}))), progress=False)
            if i == 0:
                reads = dict(counted)
                mp.undo()
            out.append(result(sae_dir(run_dir, 1, "resid_post")))
    return out, reads


def test_a_sweep_of_three_is_three_plain_runs_bit_for_bit_from_one_read_of_each_chunk(tmp_path, monkeypatch,
                                                                                      plain_runs):
    refs, plain_reads = plain_runs
    store(tmp_path / "run")
    reads = counting_reads(monkeypatch)
    done = stage.run(config_from_dict(raw_config(tmp_path / "run", sweep=SWEEP)), progress=False)
    monkeypatch.undo()

    assert set(done) == {(1, "resid_post"), (1, "resid_post", "narrow"),
                         (1, "resid_post", FOLDERS[2].split("@")[1])}
    saes = Path(tmp_path / "run" / "saes" / "1")
    assert sorted(p.name for p in saes.iterdir()) == sorted(FOLDERS)  # no work folder left
    for folder, ref in zip(FOLDERS, refs):
        got = result(saes / folder)
        assert got[0] == ref[0], f"{folder}: weights differ from its plain run"
        assert got[1] == ref[1], folder
        assert got[2] == ref[2], folder
    assert json.loads((saes / FOLDERS[2] / "cfg.json").read_text())["input_scale"] != 1.0  # scalar: its own init

    # One plain run reads each chunk: once for the NaN/Inf count, the init sample's chunks, the
    # held-out chunk for eval, each training chunk once (then kept). The sweep reads exactly that.
    assert reads == plain_reads
    assert max(plain_reads.values()) <= 3 and sum(plain_reads.values()) == 16 + 15 + 1 + 15


def test_members_at_different_steps_after_a_kill_resume_to_the_unbroken_sweep(tmp_path, monkeypatch, plain_runs):
    refs, _ = plain_runs
    store(tmp_path / "run")
    cfg = config_from_dict(raw_config(tmp_path / "run", sweep=SWEEP))
    work = [sae_dir(tmp_path / "run", 1, "resid_post", m).with_name(f + ".partial")
            for m, f in zip([None, "narrow", FOLDERS[2].split("@")[1]], FOLDERS)]

    # Keep the third member's checkpoint of step 20; finish the first member, then die while
    # finishing the second: the second is left at its step-40 checkpoint, the first is done.
    save, finish, kept = trainer.save_checkpoint, trainer._finish, tmp_path / "step20.pt"

    def saving(path, fingerprint, state):
        save(path, fingerprint, state)
        if path.parent == work[2] and state.step == 20:
            shutil.copy(path, kept)

    class Killed(Exception):
        pass

    def finishing(p, state, x_eval):
        if p.member == "narrow":
            raise Killed
        return finish(p, state, x_eval)

    monkeypatch.setattr(trainer, "save_checkpoint", saving)
    monkeypatch.setattr(trainer, "_finish", finishing)
    with pytest.raises(Killed):
        stage.run(cfg, progress=False)
    monkeypatch.undo()
    shutil.copy(kept, work[2] / "checkpoint.pt")  # as if the kill came before its step-40 save
    assert (sae_dir(tmp_path / "run", 1, "resid_post") / "done").exists()
    steps = [torch.load(w / "checkpoint.pt", weights_only=True)["state"]["step"] for w in work[1:]]
    assert steps == [40, 20]

    resumed = []
    monkeypatch.setattr(trainer, "_announce", lambda p, step, n: resumed.append((p.member, step)))
    stage.run(cfg, progress=False)
    assert resumed == [("narrow", 40), (FOLDERS[2].split("@")[1], 20)]  # the finished member is skipped
    saes = Path(tmp_path / "run" / "saes" / "1")
    for folder, ref in zip(FOLDERS, refs):
        assert result(saes / folder) == ref, folder
    assert sorted(p.name for p in saes.iterdir()) == sorted(FOLDERS)


def test_a_sigkilled_sweep_resumes_to_the_unbroken_one(tmp_path, plain_runs):
    import signal
    import subprocess
    import time

    from test_train import REPO, SAEPIPE

    refs, _ = plain_runs
    store(tmp_path / "run")
    cfg = tmp_path / "c.yaml"  # keys in their order: a derived name follows the order the overrides are written in
    cfg.write_text(yaml.safe_dump(raw_config(tmp_path / "run", sweep=SWEEP), sort_keys=False))
    saes = Path(tmp_path / "run" / "saes" / "1")
    proc = subprocess.Popen([SAEPIPE, "train", cfg], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(saes.glob("*.partial/checkpoint.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(saes.glob("*.partial/checkpoint.pt")) and not any((saes / f).exists() for f in FOLDERS), \
        proc.stderr.read()
    done = subprocess.run([SAEPIPE, "train", cfg], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "resuming from the checkpoint at step 20" in done.stdout, done.stderr
    for folder, ref in zip(FOLDERS, refs):
        assert result(saes / folder) == ref, folder


def test_rows_dropped_for_nan_count_for_every_member(tmp_path):
    # One row filter serves the shared loader: every member must still record the rows it never saw.
    for name in ("run", "plain"):
        random_store(tmp_path / name, n_rows=8 * 1024, nan_rows=(3, 700, 5000))
    raw = raw_config(tmp_path / "run", n_tokens=256 * 32, skip_nonfinite=True)  # past one epoch: every chunk read
    stage.run(config_from_dict({**raw, "train": {**raw["train"], "sweep": [{}, {"k": 4}]}}), progress=False)
    stage.run(config_from_dict({**raw, "run_dir": str(tmp_path / "plain"), "train": {**raw["train"], "k": 4}}),
              progress=False)
    member, plain = sae_dir(tmp_path / "run", 1, "resid_post", "k4"), sae_dir(tmp_path / "plain", 1, "resid_post")
    assert result(member)[:2] == result(plain)[:2]
    for folder in (member, plain, sae_dir(tmp_path / "run", 1, "resid_post")):
        assert json.loads((folder / "cfg.json").read_text())["dropped_nonfinite"] == 3, folder


def test_force_retrains_every_member_and_a_rerun_skips_them(tmp_path):
    store(tmp_path / "run")
    cfg = write_config(tmp_path / "c.yaml", raw_config(tmp_path / "run", n_tokens=256 * 5, sweep=[{}, {"k": 4}]))
    assert cli("train", cfg)[0] == 0
    before = snapshot(tmp_path / "run")
    code, out = cli("train", cfg)
    assert code == 0 and out.count("already trained") == 2 and snapshot(tmp_path / "run") == before
    code, out = cli("train", cfg, "--force")
    assert code == 0 and "already trained" not in out and snapshot(tmp_path / "run") != before


def test_a_member_and_a_plain_train_of_its_folder_refuse_each_other(tmp_path):
    from pipeline import fsio

    store(tmp_path / "run")
    raw = raw_config(tmp_path / "run", n_tokens=256 * 5, sweep=[{}, {"k": 4}])
    cfg = write_config(tmp_path / "c.yaml", raw)
    plain = write_config(tmp_path / "plain.yaml", raw_config(tmp_path / "run", n_tokens=256 * 5))
    other = write_config(tmp_path / "other.yaml", raw_config(tmp_path / "run", n_tokens=256 * 5, sweep=[{"k": 2}]))
    # A plain train holds the plain folder's lock: the sweep (whose {} member is that folder) is refused.
    with fsio.target_locks(tmp_path / "run", "train", [(1, "resid_post")]):
        code, out = cli("train", cfg)
        assert code == 2 and out.count("\n") == 1 and "another `saepipe train` is working on layer 1 hook " \
            "resid_post of" in out, out
        assert cli("train", other)[0] == 0  # another member's folder is not locked
    # A sweep holds each member's own lock: a second train of that member is refused, the plain folder is free.
    with fsio.target_locks(tmp_path / "run", "train", [(1, "resid_post", "k4")]):
        code, out = cli("train", cfg)
        assert code == 2 and out.count("\n") == 1 and "working on layer 1 hook resid_post@k4 of" in out, out
        assert cli("train", plain)[0] == 0
    assert not sae_dir(tmp_path / "run", 1, "resid_post", "k4").exists()
    assert (sae_dir(tmp_path / "run", 1, "resid_post", "k2") / "done").exists()


# --------------------------------------------------------------------------- bad input
BAD = {
    "batch size": ([{"k": 4, "batch_size": 128}], "train.sweep[0] overrides train.batch_size, which every SAE of "
                                                   "a sweep shares"),
    "seed": ([{}, {"seed": 3}], "train.sweep[1] overrides train.seed"),
    "logistics": ([{"checkpoint_every": 5}], "train.sweep[0] overrides train.checkpoint_every"),
    "unknown key": ([{"kk": 4}], "unknown key 'kk' in train.sweep[0]"),
    "repeated name": ([{"k": 4}, {"k": 4}], "train.sweep[1] and train.sweep[0] are both name 'k4'"),
    "repeated plain": ([{}, {"name": "x"}, {}], "train.sweep[2] and train.sweep[0] are both the plain config"),
    "nested": ([{"sweep": [{}]}], "train.sweep[0] holds a sweep of its own"),
    "bad value": ([{"k": 0}], "train.sweep[0]: train.sae.k = 0 must be > 0"),
    "bad type": ([{"k": "many"}], "train.sweep[0].sae.k = 'many' should be an integer"),
    "bad name": ([{"name": "../x"}], "train.sweep[0].name = '../x': use letters, digits"),
    "empty": ([], "train.sweep is empty"),
    "k above the width": ([{}, {"k": 20, "n_latents": 16}], "layer 1 resid_post@k20_n_latents16: train.k = 20 "
                                                            "exceeds train.n_latents = 16"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, case):
    sweep, message = BAD[case]
    store(tmp_path / "run")
    cfg = write_config(tmp_path / "c.yaml", raw_config(tmp_path / "run", sweep=sweep))
    before = snapshot(tmp_path / "run")
    code, out = cli("train", cfg)
    assert code == 2 and out.count("\n") == 1 and out.startswith("saepipe: error: ") and message in out, out
    assert snapshot(tmp_path / "run") == before


# --------------------------------------------------------------------------- the stages after train
def test_collate_eval_steer_and_export_reach_every_member(tmp_path):
    from helpers import harvest_config, make_model, write_corpus
    from safetensors.torch import load_file

    from pipeline import collate, harvest, steer, viewer
    from pipeline import eval as evaluator

    make_model("llama", tmp_path / "model", n_layers=2, d_model=32)
    raw = harvest_config(tmp_path / "model", write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "run")
    raw["train"] = {"n_latents": 64, "k": 8, "batch_size": 64, "n_tokens": 64 * 10, "eval_tokens": 64,
                    "sweep": [{}, {"k": 4}]}
    raw["collate"] = {"batch_size": 64, "n_top": 3, "n_random": 2, "device": "cpu"}
    raw["eval"] = {"n_tokens": 4 * 16, "batch_size": 4, "device": "cpu"}
    cfg = config_from_dict(raw)
    harvest.run(cfg, progress=False)
    stage.run(cfg, progress=False)
    folders = {m: sae_dir(tmp_path / "run", 1, "resid_post", m) for m in (None, "k4")}
    shas = {m: saved_marker(f)["sha256"] for m, f in folders.items()}
    assert len(set(shas.values())) == 2

    collate.run(cfg)
    for m, k in ((None, 8), ("k4", 4)):
        out = records_dir(tmp_path / "run", 1, "resid_post", m)
        done = json.loads((out / "done").read_text())
        assert done["fingerprint"]["sae.sha256"] == shas[m], m  # made from that member's SAE
        assert json.loads((out / "summary.json").read_text())["k"] == k and (out / "viewer.html").exists()
    page = viewer.index_page(tmp_path / "run").read_text()
    assert 'href="1/resid_post/viewer.html"' in page and 'href="1/resid_post%40k4/viewer.html"' in page

    rows = evaluator.run(cfg, progress=False)
    assert [(layer, hook) for layer, hook, _ in rows] == [(1, "resid_post"), (1, "resid_post@k4")]
    for m, (_, _, row) in zip(folders, rows):
        assert json.loads((folders[m] / "eval.json").read_text()) == row and row["sae_sha256"] == shas[m]
    # The reference: the member's SAE copied where a plain run keeps its SAE, evaluated without a sweep.
    alone = tmp_path / "alone"
    shutil.copytree(folders["k4"], sae_dir(alone, 1, "resid_post"))
    (alone / "saes" / "1" / "resid_post" / "eval.json").unlink()
    raw_alone = {**raw, "run_dir": str(alone), "train": {**raw["train"], "sweep": None}}
    [(_, _, ref)] = evaluator.run(config_from_dict(raw_alone), progress=False)
    assert rows[1][2] == ref
    assert rows[1][2]["delta_ce"] != rows[0][2]["delta_ce"]
    assert "CE spliced" in viewer.write_index_page(tmp_path / "run").read_text()

    for m in folders:  # steer takes the member's decoder row
        p = steer.plan(cfg, 1, 5, [1.0], "The quick", member=m)
        assert torch.equal(p.direction, load_sae(folders[m]).W_dec[5])
    cfg_file = write_config(tmp_path / "c.yaml", raw)
    code, out = cli("steer", cfg_file, "--layer", 1, "--latent", 5, "--strength", 1, "--prompt", "The",
                    "--member", "k5")
    assert code == 2 and out.count("\n") == 1 and "--member 'k5' is not a member" in out and "k4" in out, out

    code, out = cli("export", folders[None], "--member", "k4", "--format", "saelens", "--out", tmp_path / "x")
    assert code == 0, out
    assert torch.equal(load_file(tmp_path / "x" / "sae_weights.safetensors")["W_dec"], load_sae(folders["k4"]).W_dec)


def test_collate_of_a_sweep_reads_the_store_once_for_all_members(tmp_path, monkeypatch):
    # Two members collated together: the records of each alone (the same SAE in a plain run_dir
    # over the same store), and exactly one pass 1 fewer over the store than collating them apart.
    from helpers import harvest_config, make_model, write_corpus

    from pipeline import collate, harvest

    make_model("llama", tmp_path / "model", n_layers=2, d_model=32)
    raw = harvest_config(tmp_path / "model", write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "run")
    raw["train"] = {"n_latents": 64, "k": 8, "batch_size": 64, "n_tokens": 64 * 10, "eval_tokens": 64,
                    "sweep": [{}, {"k": 4}]}
    raw["collate"] = {"batch_size": 64, "n_top": 3, "n_random": 2, "device": "cpu"}
    cfg = config_from_dict(raw)
    harvest.run(cfg, progress=False)
    stage.run(cfg, progress=False)
    n_chunks = ActivationStore(tmp_path / "run").n_chunks(1, "resid_post")

    reads = counting_reads(monkeypatch)
    collate.run(cfg)
    together = sum(reads.values())
    apart = 0
    for m in (None, "k4"):
        alone = tmp_path / f"alone-{m}"
        shutil.copytree(sae_dir(tmp_path / "run", 1, "resid_post", m), sae_dir(alone, 1, "resid_post"))
        reads.clear()
        collate.run(config_from_dict({**raw, "run_dir": str(alone), "store": str(tmp_path / "run/activations.zarr"),
                                      "train": {**raw["train"], "sweep": None}}))
        apart += sum(reads.values())
        mine, theirs = records_dir(tmp_path / "run", 1, "resid_post", m), records_dir(alone, 1, "resid_post")
        # The records (the other files name the member).
        files = sorted(p.relative_to(theirs) for name in ("features_*.js", "windows_*.js") for p in theirs.rglob(name))
        assert files and all((mine / f).read_bytes() == (theirs / f).read_bytes() for f in files), m
    assert apart - together == n_chunks


# --------------------------------------------------------------------------- torchrun
def test_two_ranks_train_the_one_process_sweep(tmp_path):
    import torch.distributed as td

    if not td.is_available() or not td.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    from test_train_dist import _train

    folders = {}
    for ranks in (1, 2):
        run = tmp_path / f"run{ranks}"
        random_store(run, n_rows=8 * 1024, dtype="float32")
        cfg = write_config(tmp_path / f"t{ranks}.yaml", raw_config(run, n_tokens=256 * 20, sweep=SWEEP[:2]))
        out = _train(cfg, ranks)
        assert out.returncode == 0, out.stderr[-3000:]
        folders[ranks] = [run / "saes" / "1" / f for f in FOLDERS[:2]]
    for one, two in zip(*folders.values()):
        a, b = load_sae(one), load_sae(two)
        assert a.k == (8 if one.name == "resid_post" else 4)
        for name, w in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], w, rtol=1e-4, atol=1e-5, msg=f"{one.name} {name}")
        assert b.cfg["eval"]["fvu"] == pytest.approx(a.cfg["eval"]["fvu"], rel=1e-4)
