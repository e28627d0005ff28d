"""Nothing lost or half-written by train: the SAE folder protocol under concurrent runs, --force,
kills, Ctrl-C, read-only and full disks.

The folder protocol (pipeline/train.py): work happens in `<sae>.partial/`, the finished SAE
(`done` marker last) replaces `<sae>/` by a folder swap, so `<sae>/` is always whole or absent.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline import fsio
from pipeline import train as trainer
from pipeline.config import config_from_dict
from pipeline.paths import DONE
from pipeline.saes import load_sae, saved_marker
from stages import train as stage
from stages.cli import main
from test_train import REPO, SAEPIPE, config, random_store, sae_folder, work_folder, write_config

INTERRUPTED = "saepipe: interrupted; rerun the same command to resume"


# --------------------------------------------------------------------------- helpers
def setup_run(tmp_path, **train):
    """A store, a config file for it, and the same run trained without interruption in `ref`."""
    for name in ("run", "ref"):
        random_store(tmp_path / name)
    raw = config(tmp_path / "run", **train)
    stage.run(config_from_dict({**raw, "run_dir": str(tmp_path / "ref")}), progress=False)
    return write_config(tmp_path / "c.yaml", raw), sae_folder(tmp_path / "ref")


def old_sae(cfg) -> dict:
    """A finished SAE of the config but another seed where the run's SAE lives; returns its files."""
    raw = yaml.safe_load(Path(cfg).read_text())
    raw["train"]["seed"] = 1
    stage.run(config_from_dict(raw), progress=False)
    return files(sae_folder(raw["run_dir"]))


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def metrics(folder) -> list:
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["fvu"]) for r in rows]


def assert_same_result(out, ref):
    """Bit-identical weights and the same logged losses as the uninterrupted run, nothing else left."""
    assert sorted(files(out)) == sorted(trainer.OUTPUTS)
    assert files(out)["sae.safetensors"] == files(ref)["sae.safetensors"]
    assert metrics(out) == metrics(ref)
    assert not (out.parent / (out.name + ".partial")).exists() and not (out.parent / (out.name + ".old")).exists()
    load_sae(out)


def start(cfg, *args, limit_bytes=None):
    def child():
        # As from a terminal: a test run started in the background (`make test &`, nohup) inherits
        # SIGINT ignored, and python then never turns Ctrl-C into KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([SAEPIPE, "train", cfg, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=child)


def wait_for(path: Path, proc, after_ns: int = -1):
    """Until `path` exists with an mtime past `after_ns` (the process then holds its lock)."""
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if path.stat().st_mtime_ns > after_ns:
                return path.stat().st_mtime_ns
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"{path} never appeared; {proc.poll()=}")


def error_line(stderr: str) -> str:
    """The one line the CLI printed after the progress bar (tqdm redraws with carriage returns)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("saepipe")]
    assert len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------- 4: one trainer per SAE
def test_second_concurrent_train_of_one_sae_is_refused_and_the_first_finishes(tmp_path):
    cfg, ref = setup_run(tmp_path, n_tokens=256 * 200, checkpoint_every=20, log_every=5)
    out, work = sae_folder(tmp_path / "run"), work_folder(tmp_path / "run")
    first = start(cfg)
    wait_for(work / "checkpoint.pt", first)
    first.send_signal(signal.SIGSTOP)  # frozen mid-training, holding the lock: no race with its finish
    try:
        code, text = cli("train", cfg)
        assert code == 2 and text.count("\n") == 1, text
        assert text.startswith("saepipe: error: another") and "layer 1 hook resid_post" in text, text
        code, text = cli("train", cfg, "--force")
        assert code == 2 and "another" in text, text
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    rows = metrics(out)
    assert len({(s, step) for s, step, _ in rows}) == len(rows)  # no duplicate rows
    assert_same_result(out, ref)


# --------------------------------------------------------------------------- 6: --force keeps the old SAE
def test_killed_force_run_keeps_the_old_sae_and_a_rerun_resumes_and_replaces_it(tmp_path):
    cfg, ref = setup_run(tmp_path, n_tokens=256 * 200, checkpoint_every=25)
    before = old_sae(cfg)
    out, work = sae_folder(tmp_path / "run"), work_folder(tmp_path / "run")

    proc = start(cfg, "--force")
    wait_for(work / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert files(out) == before  # the old SAE: complete, same bytes, loadable
    assert load_sae(out).cfg["train"]["seed"] == 1

    code, text = cli("train", cfg)  # without --force the finished old SAE (of another seed) stands
    assert code == 2 and "(seed 1 there vs 0 now)" in text and files(out) == before, text
    code, text = cli("train", cfg, "--force")
    assert code == 0 and "resuming from the checkpoint at step" in text, text
    assert_same_result(out, ref)


def test_sae_folder_without_an_intact_marker_is_kept_until_its_replacement_is_finished(tmp_path, monkeypatch):
    cfg, ref = setup_run(tmp_path)
    old_sae(cfg)
    out = sae_folder(tmp_path / "run")
    (out / "cfg.json").write_text("{ torn")
    before = files(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsio, "swap_dir", killed)
    code, text = cli("train", cfg)
    assert code == 130 and "holds no finished SAE" in text and files(out) == before, text
    monkeypatch.undo()
    code, text = cli("train", cfg)
    assert code == 0 and "finished the interrupted save" in text, text
    assert_same_result(out, ref)


# --------------------------------------------------------------------------- 7: done is one marker, last
def test_kill_while_drawing_the_plots_leaves_nothing_marked_done(tmp_path, monkeypatch):
    cfg, ref = setup_run(tmp_path)
    out, work = sae_folder(tmp_path / "run"), work_folder(tmp_path / "run")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.plots, "density_figure", killed)
    code, text = cli("train", cfg)
    assert code == 130 and text.endswith(INTERRUPTED + "\n"), text
    assert not out.exists() and saved_marker(work) is None and not (work / DONE).exists()
    assert (work / "checkpoint.pt").exists()
    monkeypatch.undo()

    code, text = cli("train", cfg)
    assert code == 0 and "resuming from the checkpoint at step 20" in text, text
    assert_same_result(out, ref)  # pictures, no checkpoint


def test_kill_after_the_save_only_the_swap_remains(tmp_path, monkeypatch):
    cfg, ref = setup_run(tmp_path)
    out, work = sae_folder(tmp_path / "run"), work_folder(tmp_path / "run")

    def killed(*args, **kwargs):
        raise SystemExit(137)

    monkeypatch.setattr(fsio, "swap_dir", killed)
    cli("train", cfg)
    assert not out.exists() and saved_marker(work) is not None
    monkeypatch.undo()

    code, text = cli("train", cfg)
    assert code == 0 and "finished the interrupted save" in text and "resuming" not in text, text
    assert_same_result(out, ref)


# --------------------------------------------------------------------------- 8: Ctrl-C at checkpoint time
def test_ctrl_c_while_checkpointing_exits_130_in_one_line_and_resumes_bit_identical(tmp_path):
    # A wide SAE checkpointed every step: most of the run is spent inside torch.save.
    cfg, ref = setup_run(tmp_path, n_latents=2048, n_tokens=256 * 300, checkpoint_every=1, log_every=10,
                         eval_every=1000)
    work = work_folder(tmp_path / "run")
    seen = -1
    for _ in range(2):  # the second run resumes, checkpoints again, and is stopped again
        proc = start(cfg)
        seen = wait_for(work / "checkpoint.pt", proc, after_ns=seen)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert error_line(err) == INTERRUPTED
        assert not list(work.glob("*.tmp"))
        # The stopped run may have checkpointed again after the one seen: wait for the next run's own.
        seen = (work / "checkpoint.pt").stat().st_mtime_ns
    code, text = cli("train", cfg)
    assert code == 0 and "resuming from the checkpoint at step" in text, text
    assert_same_result(sae_folder(tmp_path / "run"), ref)


# --------------------------------------------------------------------------- 15: full and read-only disks
def test_full_disk_is_one_line_keeps_earlier_results_and_the_rerun_resumes(tmp_path):
    # A narrow SAE that logs every step: the checkpoint (~62 kB) outgrows a 20 kB limit at once,
    # the metrics log (~250 B a step) outgrows a 75 kB one after a few checkpoints.
    cfg, ref = setup_run(tmp_path, n_latents=64, n_tokens=256 * 400, log_every=1, checkpoint_every=50,
                         eval_every=200)
    before = old_sae(cfg)
    out, work = sae_folder(tmp_path / "run"), work_folder(tmp_path / "run")

    proc = start(cfg, "--force", limit_bytes=20_000)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "file size limit" in error_line(err), err
    assert files(out) == before
    assert not (work / "checkpoint.pt").exists() and not list(work.glob("*.tmp"))  # no torn checkpoint

    proc = start(cfg, "--force", limit_bytes=75_000)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "file size limit" in error_line(err), err
    assert files(out) == before and (work / "checkpoint.pt").exists()

    code, text = cli("train", cfg, "--force")
    assert code == 0 and "resuming from the checkpoint at step" in text, text
    assert_same_result(out, ref)


READ_ONLY = {
    "lock": lambda path: path.name.startswith(".train."),
    "checkpoint": lambda path: path.name == "checkpoint.pt.tmp",
    "weights": lambda path: path.name == "sae.safetensors.tmp",
}


@pytest.mark.parametrize("what", [*READ_ONLY, "swap"])
def test_read_only_run_dir_is_one_line_and_the_old_sae_survives(tmp_path, monkeypatch, what):
    cfg, ref = setup_run(tmp_path)
    before = old_sae(cfg)
    out = sae_folder(tmp_path / "run")
    real_open, real_replace = builtins.open, os.replace

    def refusing_open(file, mode="r", *args, **kwargs):
        if what in READ_ONLY and any(m in mode for m in "wax+") and READ_ONLY[what](Path(file)):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    def refusing_replace(src, dst, *args, **kwargs):
        if what == "swap" and Path(dst) == out and Path(src).name.endswith(".partial"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(os, "replace", refusing_replace)
    code, text = cli("train", cfg, "--force")
    assert code == 2 and "the file system is read-only" in error_line(text), text
    monkeypatch.undo()
    if what == "swap":  # cut between the two renames: the old SAE waits aside, the new one is saved
        assert files(fsio.old_name(out)) == before and not out.exists()
    else:
        assert files(out) == before

    code, text = cli("train", cfg, "--force")
    assert code == 0, text
    if what == "swap":
        assert "finished the interrupted save" in text, text
    assert_same_result(out, ref)


# --------------------------------------------------------------------------- 5: durable before visible
def test_every_file_is_fsynced_before_the_rename_that_shows_it(tmp_path, monkeypatch):
    cfg, _ = setup_run(tmp_path)
    out, work = sae_folder(tmp_path / "run"), work_folder(tmp_path / "run")
    events = []
    real_fsync, real_replace, real_sync = os.fsync, os.replace, os.sync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst, *args, **kwargs)

    def sync():
        events.append(("sync",))
        real_sync()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "sync", sync)
    assert cli("train", cfg)[0] == 0

    def at(event):
        return max(i for i, e in enumerate(events) if e == event)

    swap = at(("rename", str(work), str(out)))
    for name in ("checkpoint.pt", "sae.safetensors", "cfg.json", DONE, "metrics.jsonl", "loss.png", "loss.svg",
                 "density.png", "density.svg"):
        tmp, final = str(work / (name + ".tmp")), str(work / name)
        renames = [i for i, e in enumerate(events) if e == ("rename", tmp, final)]
        for before, shown in zip([-1] + renames, renames):  # every version: file synced, renamed, name synced
            assert ("fsync", tmp) in events[before + 1:shown], name
            assert events[shown + 1] == ("fsync", str(work)), name
    assert at(("rename", str(work / "cfg.json.tmp"), str(work / "cfg.json"))) < at(
        ("rename", str(work / "done.tmp"), str(work / DONE))) < swap  # the marker last
    assert ("sync",) in events[at(("rename", str(work / "done.tmp"), str(work / DONE))):swap]
    assert ("fsync", str(out.parent)) in events[swap:]
