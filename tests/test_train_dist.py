"""Training under torchrun: two gloo ranks, each computing its half of every batch,
give the one-process SAE (to fp32 rounding), with one set of files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as td

from pipeline.saes import load_sae, verify_saved
from test_train import REPO, config, random_store, sae_folder, work_folder, write_config

pytestmark = pytest.mark.skipif(not td.is_available() or not td.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _cmd(cfg: str, ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "stages.cli", "train", cfg]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "stages.cli", "train", cfg]


def _train(cfg: str, ranks: int) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(cfg, ranks), capture_output=True, text=True, timeout=600, cwd=REPO)


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (a child of the agent with RANK=rank), or None."""
    for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _kill_once(cmd: list[str], sign: Path, rank: int | None = 1) -> subprocess.Popen:
    """Launch `cmd`, SIGKILL its rank `rank` (None: the process itself, a one-process run) as soon as
    `sign` exists, and return it once the launch has ended (communicate raises if it hangs)."""
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not sign.exists() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim = agent.pid if rank is None else _rank_pid(agent.pid, rank)
    assert sign.exists() and victim is not None, f"the run ended before {sign.name} and a kill"
    os.kill(victim, signal.SIGKILL)
    agent.communicate(timeout=120)
    return agent


def test_two_ranks_train_the_one_process_sae(tmp_path):
    saes = {}
    for ranks in (1, 2):
        run = tmp_path / f"run{ranks}"
        random_store(run, dtype="float32")
        # AuxK on (512 latents, k 4: some go quiet for a batch), so its reductions are exercised too.
        cfg = write_config(tmp_path / f"t{ranks}.yaml", config(run, n_latents=512, k=4, dormant_tokens=256))
        out = _train(cfg, ranks)
        assert out.returncode == 0, out.stderr[-3000:]
        saes[ranks] = sae_folder(run)
    one, two = load_sae(saes[1]), load_sae(saes[2])
    for name, a in one.state_dict().items():
        # float32 sums taken in another order (two ranks' halves) drift apart by ~1e-5 over 40 steps;
        # a wrong reduction (a rank's own variance, unsummed counters) is off by far more.
        torch.testing.assert_close(two.state_dict()[name], a, rtol=1e-4, atol=5e-5, msg=name)
    # One writer: the metrics hold each logged step once, and the eval numbers match.
    rows = [json.loads(line) for line in (saes[2] / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    ev1, ev2 = one.cfg["eval"], two.cfg["eval"]
    assert ev2["fvu"] == pytest.approx(ev1["fvu"], rel=1e-4) and ev2["dead_frac"] == ev1["dead_frac"]
    train1 = [r for r in map(json.loads, (saes[1] / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    train2 = [r for r in rows if r["split"] == "train"]
    for a, b in zip(train1, train2):
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4) and b["dormant_frac"] == a["dormant_frac"]
    assert any(r["dormant_frac"] > 0 and r["aux_loss"] > 0 for r in train2), "AuxK never ran"


def test_a_killed_rank_stops_the_run_and_every_rank_resumes_from_the_checkpoint(tmp_path):
    # Rank 1 killed after the first checkpoint: torchrun stops rank 0 (nobody hangs), and the
    # rerun, every rank from rank 0's checkpoint, ends on the very weights of an unbroken run.
    raw = lambda run: config(run, n_tokens=256 * 400, checkpoint_every=10, eval_every=500, log_every=50)  # noqa: E731
    runs = {name: tmp_path / name for name in ("broken", "unbroken")}
    for run in runs.values():
        random_store(run, dtype="float32")
    cfgs = {name: write_config(tmp_path / f"{name}.yaml", raw(run)) for name, run in runs.items()}

    agent = _kill_once(_cmd(cfgs["broken"], 2), work_folder(runs["broken"]) / "checkpoint.pt")
    assert agent.returncode != 0 and not sae_folder(runs["broken"]).exists()

    resumed = _train(cfgs["broken"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step" in resumed.stdout
    unbroken = _train(cfgs["unbroken"], 2)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    a, b = (load_sae(sae_folder(run)).state_dict() for run in runs.values())
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_rank_killed_at_the_end_of_training_stops_the_run_and_the_sae_stands(tmp_path):
    # Rank 1 killed while rank 0 writes the SAE's figures (rank 1 waits at the last barrier): the
    # launch ends rather than hangs (torchrun stops rank 0 wherever it is), and a rerun ends with a
    # sound SAE and no work folder left, whether rank 0 had published it or not.
    run = tmp_path / "run"
    random_store(run, dtype="float32")
    cfg = write_config(tmp_path / "t.yaml", config(run))
    _kill_once(_cmd(cfg, 2), work_folder(run) / "loss.png")
    again = _train(cfg, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert verify_saved(sae_folder(run)) is None and not work_folder(run).exists()


def test_ranks_on_gpus_reduce_with_nccl_and_on_cpu_with_gloo():
    from pipeline import dist

    assert dist.backend_for(None) == "gloo" and dist.backend_for(torch.device("cpu")) == "gloo"
    # A CPU build of torch has no NCCL: CUDA ranks would then fall back to gloo, which reduces CUDA tensors too.
    assert dist.backend_for(torch.device("cuda", 1)) == ("nccl" if td.is_nccl_available() else "gloo")


def _draw(run: Path, cache: bool, steps: int) -> tuple[dict, object]:
    """`steps` batches of a loader over `run`'s store (7 training chunks in windows of 3, NaN rows
    dropped), with the chunks this process read and the NaN/Inf rows it knows of; and the loader."""
    from pipeline.loader import BatchLoader, RowFilter
    from pipeline.store import ActivationStore

    store = ActivationStore(run)
    reads, read_chunk = [], store.read_chunk
    store.read_chunk = lambda layer, hook, c: reads.append(c) or read_chunk(layer, hook, c)
    rf = RowFilter(store, 1, "resid_post", exclude_bos=True, skip_nonfinite=True)
    loader = BatchLoader(store, 1, "resid_post", list(range(1, 8)), 96, 3, 3, rf, torch.device("cpu"),
                         reader_threads=2, cache=cache)
    batches = iter(loader)
    got = [next(batches) for _ in range(steps)]
    batches.close()
    return {"x": torch.stack([x for x, _ in got]), "cursors": [c for _, c in got], "reads": reads,
            "nonfinite": dict(rf.nonfinite)}, loader


_LOADER_RANK = """
import sys
from pathlib import Path

import torch

from pipeline import dist
from test_train_dist import _draw

run, out, cache, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
with dist.group():
    torch.save(_draw(run, cache, steps)[0], out / f"rank{dist.rank_world()[0]}.pt")
"""


@pytest.mark.parametrize("cache", [False, True])
def test_ranks_read_disjoint_shares_of_each_window_and_draw_the_one_process_batches(tmp_path, cache):
    # 7 training chunks of 512 rows in windows of 3: each window's chunks are split 2/1 over the ranks,
    # and the last window (1 chunk) leaves rank 1 none. Some rows hold NaN: each rank drops its own
    # chunks' and learns the count of the others'. 120 steps of 96 rows are ~3 epochs: with the cache,
    # the later epochs read nothing.
    from collections import Counter

    run, steps = tmp_path / "run", 120
    random_store(run, n_rows=8 * 512, nan_rows=(600, 1900, 3000))
    script = tmp_path / "ranks.py"
    script.write_text(_LOADER_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(run), str(tmp_path), "1" if cache else "0", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # The same loader in one process: what every rank must have drawn.
    want, one = _draw(run, cache, steps)
    for r in ranks:
        assert torch.equal(r["x"], want["x"]) and r["cursors"] == want["cursors"]
        assert r["nonfinite"] == want["nonfinite"] and len(want["nonfinite"]) == 3

    # What each rank read: its share (positions rank, rank + 2, ...) of each window's chunks still to
    # read, window after window, for as many windows as it had read ahead when stopped.
    def shares(rank: int, n_windows: int) -> Counter:
        seen, out = set(), Counter()
        for i in range(n_windows):
            ids = one.window_ids(*divmod(i, one.n_windows))
            todo = [c for c in ids if not (cache and c in seen)]
            seen.update(ids)
            out.update(todo[rank::2])
        return out

    used = 1 + want["cursors"][-1].epoch * one.n_windows + want["cursors"][-1].window  # windows drawn on
    for rank, r in enumerate(ranks):
        assert any(Counter(r["reads"]) == shares(rank, n) for n in range(used, used + 4)), (rank, r["reads"])
    assert set(ranks[0]["reads"]).isdisjoint(ranks[1]["reads"]) or not cache
    if cache:  # each chunk read once, by one rank
        assert sorted(ranks[0]["reads"] + ranks[1]["reads"]) == list(range(1, 8))


# --------------------------------------------------------------------------- latent sharding
def _sharded(run) -> dict:
    """train.shard_latents with 512 latents, k 4 and latents dormant after one silent batch: ~15% are
    dormant from the start, so AuxK's global top-k over the shards' dormant latents (a shard may hold
    fewer than k_aux of them) runs every step. A checkpoint every 10 steps, an eval row at step 100."""
    return config(run, n_latents=512, k=4, dormant_tokens=256, shard_latents=True, n_tokens=256 * 200,
                  checkpoint_every=10, eval_every=100, log_every=50)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference: _sharded's config trained by one process (where shard_latents changes nothing)."""
    run = tmp_path_factory.mktemp("sharded") / "one"
    random_store(run, dtype="float32")
    out = _train(write_config(run.with_suffix(".yaml"), _sharded(run)), 1)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def _assert_same_sae(one: Path, other: Path):
    a, b = load_sae(sae_folder(one)).state_dict(), load_sae(sae_folder(other)).state_dict()
    for name in a:
        # float32 products split over ranks sum in another order: ~2e-5 apart after 200 steps here
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=5e-5, msg=name)


def test_ranks_sharing_out_the_latents_train_the_one_process_sae(tmp_path, one_process_run):
    # Each of 2 ranks holds 256 of the 512 latents and sees the whole batch; the weights, the logged
    # losses, the dormant counts and the eval (on rank 0, from the gathered shards) are one process's.
    run = tmp_path / "two"
    random_store(run, dtype="float32")
    out = _train(write_config(tmp_path / "two.yaml", _sharded(run)), 2)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_sae(one_process_run, run)
    rows = [[json.loads(line) for line in (sae_folder(r) / "metrics.jsonl").read_text().splitlines()]
            for r in (one_process_run, run)]
    assert [(r["split"], r["step"]) for r in rows[1]] == [(r["split"], r["step"]) for r in rows[0]]  # written once
    assert ("eval", 100) in [(r["split"], r["step"]) for r in rows[0]]
    for a, b in zip(*rows):
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4)
        if a["split"] == "train":
            assert a["aux_loss"] > 0 and b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-4)
            assert b["dormant_frac"] == a["dormant_frac"]
        else:
            assert b["dead_frac"] == a["dead_frac"]


_SHARD_STEP = '''
import sys

import torch

from pipeline import dist
from pipeline.saes import load_sae
from pipeline.saes.topk import TopKSAE
from pipeline.shard import Shard
from helpers import topk_loss
from test_train import tiny_double_sae

out = sys.argv[1]
rank, world = dist.rank_world()
sae, x = tiny_double_sae()
dormant = torch.zeros(64, dtype=torch.bool)
dormant[[3, 7, 20, 30]] = True  # all in rank 0's half: rank 1 offers AuxK no candidate
if rank == 0:  # the one-process step
    loss = topk_loss(sae, x, sae.forward_train(x, dormant, k_aux=3), aux_alpha=0.25)[0]
    loss.backward()
    torch.save({n: p.grad for n, p in sae.named_parameters()}, f"{out}/one.pt")
    sae.zero_grad()
shard = Shard(64, rank, world)
with dist.group():
    local = TopKSAE(16, 32, 4, backend="torch").double()
    local.load_state_dict(shard.rows(sae.state_dict()))
    loss = topk_loss(local, x, shard.forward_train(local, x, dormant[shard.lo:shard.hi], k_aux=3), aux_alpha=0.25,
                     whole_batch=True)[0]
    loss.backward()
    torch.save({"loss": loss.detach(), **{n: p.grad for n, p in local.named_parameters()}}, f"{out}/rank{rank}.pt")
'''


def test_a_sharded_step_gives_each_rank_its_rows_of_the_one_process_gradient(tmp_path):
    # One step in float64 on 2 ranks: the same loss on both, each rank's W_enc, b_lat, W_dec rows get
    # their one-process gradients and b_pre (its encoder-path part summed over the shards) the whole
    # one, with AuxK's dormant latents all on rank 0.
    script = tmp_path / "step.py"
    script.write_text(_SHARD_STEP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert out.returncode == 0, out.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["loss"], ranks[1]["loss"])
    for name in ("W_enc", "b_lat", "W_dec"):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]), one[name], msg=name)
    for r in ranks:
        torch.testing.assert_close(r["b_pre"], one["b_pre"], msg="b_pre")


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)], ids=["one-then-sharded", "sharded-then-one"])
def test_checkpoints_keep_the_one_process_layout_so_a_run_resumes_sharded_or_not(tmp_path, one_process_run,
                                                                                 first, then):
    # A checkpoint holds the whole SAE, its Adam state and its fire counters whoever wrote it (rank 0
    # gathers the shards): one process's resumes on 2 sharded ranks, each taking its slice, and 2 sharded
    # ranks' resumes in one process; both end on the unbroken run's weights.
    run = tmp_path / "run"
    random_store(run, dtype="float32")
    cfg = write_config(tmp_path / "run.yaml", _sharded(run))
    _kill_once(_cmd(cfg, first), work_folder(run) / "checkpoint.pt", 1 if first > 1 else None)
    resumed = _train(cfg, then)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step" in resumed.stdout
    _assert_same_sae(one_process_run, run)


def test_sharding_refuses_in_one_line_what_it_does_not_do(tmp_path, monkeypatch):
    import dataclasses

    from pipeline.config import TrainConfig
    from pipeline.errors import UserError
    from pipeline.shard import check
    from test_train import cli

    random_store(tmp_path, dtype="float32")
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node 3 sets; the plan refuses before any group
    code, output = cli("train", write_config(tmp_path / "c.yaml", _sharded(tmp_path)))
    assert code == 2 and len(output.strip().splitlines()) == 1
    assert "train.shard_latents splits n_latents = 512 over 3 ranks" in output
    tc = TrainConfig(n_latents=513, shard_latents=True)
    for bad in ({"optimizer": "signum_sf"}, {"ema_decay": 0.999}, {"grad_clip": 1.0}):
        with pytest.raises(UserError, match=f"train.{next(iter(bad))} = "):
            check(dataclasses.replace(tc, n_latents=513 * 3, **bad), "layer 1 resid_post")
    check(dataclasses.replace(tc, shard_latents=False), "layer 1 resid_post")  # not sharded: any width
    monkeypatch.setenv("WORLD_SIZE", "1")
    check(tc, "layer 1 resid_post")  # one process: nothing to split
