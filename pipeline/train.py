"""Train SAEs on the (layer, hook)s of the activation store: one each, or a sweep of several.

`plan()` resolves and checks everything first (widths, k, the store, NaN/Inf
rows, an earlier run in the output folder), so bad input fails before a byte
is written. `run()` then takes every SAE's lock and `train()`s the SAEs of each
(layer, hook) together, by the recipe of DESIGN.md:

    loss = ||x - x_hat||^2 / ||x - mean(x)||^2  +  the architecture's terms (TopK: aux_alpha * AuxK)
    Adam (tiny eps) under warmup then cosine decay, or schedule-free sign descent; decoder rows kept unit-norm
    (parallel gradient removed before the step, rows renormalised after it),
    tied init, b_pre from the geometric median of a sample.

The dictionary is any architecture of pipeline.saes: the step asks it for its
training forward and its loss terms (TopK's are AuxK's: the dormant latents,
silent for the last `dormant_tokens` training tokens, predict what the live ones
missed) and adds them to the FVU. Everything a step depends on is one
`TrainState` (pipeline/train_state.py: state, init, checkpoints), checkpointed
atomically, and batches are a pure function of (seed, step), so a killed run
resumes to the same weights as an unbroken one.

A sweep (`train.sweep`, config.TrainConfig.members) is several SAEs of one
(layer, hook) fed from one BatchLoader: each batch is read and decoded once and
every member steps on it, each on its own TrainState, with its own init, log,
eval, checkpoint and finish, so a member is bit for bit the SAE a run of the
plain config with that member's overrides makes. What the stream is made of
(batch size, budget, seed, held-out chunks, dropped rows) the members share by
construction (config.SWEEP_SHARED); so do the rows read once for init and eval.
Members checkpoint at the same steps, but a kill may land between two of their
saves: the loader then starts at the earliest member's step and a member that
is ahead lets the batches it has seen go by.

The folders of one SAE (`pipeline.paths.sae_dir`, called `out` here; a named
member's is `<hook>@<member>`):

    <out>.partial/   the work: checkpoint.pt, metrics.jsonl; at the end the loss
                     and density figures, then sae.save() (sae.safetensors,
                     cfg.json, and LAST the `done` marker); then the checkpoint
                     is dropped and
    <out>/           the finished SAE takes the name by fsio.swap_dir, which keeps
                     the old one until the new one holds the name.

So `<out>` is always a complete SAE or absent, --force never loses the old one
before the new exists, and state is read from the markers alone:
`.partial` with `done` = finished, only the swap remains; `.partial` with a
checkpoint of this config = resume; anything else = start over. The lock is the
folder's (`fsio.target_locks`), so two trains of one SAE (a sweep's `{}` member
and a plain train share the plain folder) refuse each other, and different
members may train at once.

Under torchrun (docs/guides/gpu.md, torchrun) training is data-parallel: every
rank draws the same batches (the loader reads each rank's share of the chunks
and gathers the rest) and computes its own rows of each, the gradients
and counters are summed over the ranks (pipeline.dist), member after member in
the same order on every rank, and rank 0 alone holds the locks and writes the
files above. With train.shard_latents the ranks split the latents instead of
the rows (pipeline.shard): every rank steps on the whole batch with its
n_latents / W latents, and rank 0 gathers the shards whenever it evaluates,
checkpoints or saves, so every file keeps the one-process layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import pipeline
from pipeline import dist, dtypes, fsio, optim, plots
from pipeline.config import Config, TrainConfig, logistics
from pipeline.errors import UserError
from pipeline.kernels import resolve_backend
from pipeline.loader import (CACHE_BYTES, BatchLoader, RowFilter, count_nonfinite, eval_rows, split_chunks,
                             trainable_rows)
from pipeline.metrics import ReconStats, describe, fvu_space
from pipeline.model import resolve_device
from pipeline.paths import DONE, leaf, sae_dir
from pipeline.saes import DEFAULT, Dictionary, TrainView, saved_cfg
from pipeline.shard import Shard, check as check_shard
from pipeline.store import ActivationStore, Location
from pipeline.train_state import (CHECKPOINT, TrainState, init_sample, init_weights, load_checkpoint, publish,
                                  rewrite_metrics, save_checkpoint)

# A finished SAE folder holds exactly these (DONE written last, by Dictionary.save).
OUTPUTS = ("metrics.jsonl", "loss.png", "loss.svg", "density.png", "density.svg", "sae.safetensors", "cfg.json",
           DONE)
# What a resume must match: the train config but its logistics, expansion_factor (folded into n_latents)
# and the sweep (a member's config has none: it is the plain config with the member's overrides).
# A transcoder's fingerprint names its own target instead of the whole train.transcode map.
_NOT_FINGERPRINTED = {*logistics(TrainConfig), "expansion_factor", "sweep", "transcode", "skip_connection"}


@dataclass
class Plan:
    store: ActivationStore
    layer: int
    hook: str
    out: Path
    status: str  # done | finish (only the swap remains) | resume | fresh
    force: bool
    tc: TrainConfig  # every default resolved: n_latents, lr, k_aux, dormant_tokens, backend
    d_in: int
    fingerprint: dict  # what must match for a resume
    device: torch.device
    matmul_dtype: torch.dtype | None
    train_chunks: list[int]
    eval_chunks: list[int]
    window_chunks: int
    rows_per_epoch: int
    member: str | None = None  # the sweep member's name; None: the plain folder
    target: str | None = None  # a transcoder's target hook (train.transcode); None: an SAE

    @property
    def name(self) -> str:
        to = f" (transcoder to {self.target})" if self.target else ""
        return f"layer {self.layer} {leaf(self.hook, self.member)}{to}"

    @property
    def key(self) -> tuple:
        """run()'s key for this SAE: (layer, hook), and the member's name for a named member."""
        return (self.layer, self.hook) if self.member is None else (self.layer, self.hook, self.member)

    @property
    def work(self) -> Path:
        return partial_dir(self.out)

    def row_filter(self) -> RowFilter:
        return RowFilter(self.store, self.layer, self.hook, self.tc.exclude_bos, self.tc.skip_nonfinite)


def partial_dir(out: Path) -> Path:
    """Where the SAE of `out` is trained until it is finished and swapped in."""
    return out.with_name(out.name + ".partial")


# --------------------------------------------------------------------------- plan and run
def plan(cfg: Config, layers: list[int] | None = None, force: bool = False) -> list[Plan]:
    """Every SAE to train (each member of a sweep, per (layer, hook)), planned and checked before any is trained."""
    store = ActivationStore(Location.of(cfg))
    plans = []
    for layer, hook in cfg.targets("train", layers):
        group = [plan_sae(cfg, store, layer, hook, force, member, check_finite=False)
                 for member, _ in cfg.train.members()]
        fresh = [p for p in group if p.status == "fresh"]
        if fresh:  # one read pass per (layer, hook), however many members start there
            _check_finite(fresh[0])
        plans += group
    return plans


def run(cfg: Config, layers: list[int] | None = None, force: bool = False, progress: bool = True) -> dict:
    """Train (or resume, or finish) the SAEs of the config; returns {Plan.key: cfg.json}.
    Every lock is taken before any SAE is trained: a concurrent train is refused now, not halfway."""
    rank, _ = dist.rank_world()
    todo, trained = [], {}
    for p in plan(cfg, layers, force):
        if p.status == "done" and p.out.exists():
            if rank == 0:
                print(f"train: {p.name}: already trained in {p.out}; skipping (--force retrains it)")
        else:  # to train, or a finished SAE whose swap a kill cut short: only under its lock
            todo.append(p)
    # Under torchrun rank 0 holds the locks and writes every file; the others compute.
    locks = (fsio.target_locks(cfg.run_dir, "train", [(p.layer, p.hook, p.member) for p in todo]) if rank == 0
             else nullcontext())
    with locks, dist.group(todo[0].device if todo else None):  # NCCL when the ranks train on GPUs
        for target in dict.fromkeys((p.layer, p.hook) for p in todo):
            trained.update(train([p for p in todo if (p.layer, p.hook) == target], progress=progress and rank == 0))
    return trained


def plan_sae(cfg: Config, store: ActivationStore, layer: int, hook: str, force: bool = False,
             member: str | None = None, check_finite: bool = True) -> Plan:
    """One SAE: the plain config's, or the sweep member's named `member`."""
    tc = dict(cfg.train.members())[member]
    name = f"layer {layer} {leaf(hook, member)}"
    store.array(layer, hook)  # missing or partly harvested: one clear error
    d = store.d_model(layer, hook)
    target = tc.target_hook(hook)
    if target is not None:
        _check_pair(store, layer, hook, target, tc, name)
    n = tc.n_latents or tc.expansion_factor * d
    width = (f"train.n_latents = {n}" if tc.n_latents
             else f"n_latents = {n} (train.expansion_factor {tc.expansion_factor} x d_model {d})")
    # The architecture's settings against the width (which may depend on d_model), its defaults filled in.
    sae = tc.sae.resolve(d, n, tc.batch_size, "" if member is None else f"{name}: ", width)
    check_shard(dataclasses.replace(tc, n_latents=n), name)
    device = resolve_device(tc.device, key="train.device")
    tc = dataclasses.replace(
        tc, n_latents=n,
        lr=tc.lr or optim.default_lr(tc.optimizer, n, d), sae=sae,
        shuffle_chunks=tc.shuffle_chunks or _shuffle_chunks(store, layer, hook),
        backend=resolve_backend(tc.backend, device, key="train.backend"))
    fingerprint = {"d_in": d, "model": store.attrs.get("model"), "n_rows": store.n_rows(layer, hook),
                   "n_steps": tc.n_steps,
                   **{k: v for k, v in tc.flat().items() if k not in _NOT_FINGERPRINTED},
                   **({"target_hook": target, "skip_connection": tc.skip_connection} if target else {})}
    fingerprint = json.loads(json.dumps(fingerprint))  # as cfg.json will hold it (tuples become lists)

    train_chunks, eval_chunks = split_chunks(store.n_chunks(layer, hook), tc.eval_fraction)
    rows_per_epoch = trainable_rows(store, layer, hook, train_chunks,
                                    RowFilter(store, layer, hook, tc.exclude_bos, tc.skip_nonfinite))
    if rows_per_epoch == 0:
        raise UserError(f"{name}: no rows left to train on (store too small, or only BOS positions)")
    if tc.batch_size > rows_per_epoch:
        raise UserError(f"train.batch_size = {tc.batch_size} exceeds the {rows_per_epoch} trainable rows of "
                        f"{name}; lower it or harvest more tokens")
    window_chunks = max(tc.shuffle_chunks, -(-4 * tc.batch_size // store.chunk_rows(layer, hook)))

    out = sae_dir(cfg.run_dir, layer, hook, member)
    p = Plan(store, layer, hook, out, "", force, tc, d, fingerprint, device, _matmul_dtype(tc.autocast, device),
             train_chunks, eval_chunks, window_chunks, rows_per_epoch, member, target)
    # Planning writes nothing: a swap a kill interrupted is only undone under the lock, in train(),
    # and until then the old folder aside is what recover_swap will give back the name.
    shown = out if out.exists() or not fsio.old_name(out).exists() else fsio.old_name(out)
    p.status = _status(p, shown)
    if p.status == "fresh" and shown.exists() and not force:
        print(f"train: {name}: {out} holds no finished SAE (no intact `{DONE}` marker); training a new one, "
              "which replaces it once finished")
    if p.status == "fresh" and check_finite:
        _check_finite(p)
    return p


def _check_pair(store: ActivationStore, layer: int, hook: str, target: str, tc: TrainConfig, name: str):
    """A transcoder's target: harvested, of the input's width, row for row beside it."""
    if not store.has(layer, target):
        raise UserError(f"{name}: train.transcode predicts {target} from {hook}, but layer {layer} {target} was not "
                        f"harvested; add {target} to harvest.hooks and run saepipe harvest CONFIG --layers {layer}")
    store.array(layer, target)  # partly harvested: one clear error
    if store.d_model(layer, target) != store.d_model(layer, hook):
        raise UserError(f"{name}: train.transcode maps {hook} (width {store.d_model(layer, hook)}) to {target} (width "
                        f"{store.d_model(layer, target)}); a transcoder's two hooks must have one width")
    if (store.n_rows(layer, target), store.chunk_rows(layer, target)) != (store.n_rows(layer, hook),
                                                                         store.chunk_rows(layer, hook)):
        raise UserError(f"{name}: layer {layer} {hook} and {target} hold different rows; harvest them again together: "
                        f"saepipe harvest CONFIG --layers {layer} --force")
    if tc.shard_latents and dist.rank_world()[1] > 1:
        raise UserError(f"{name}: train.shard_latents does not split a transcoder's latents; set shard_latents: false")


# The default shuffle window: rows mixed at once, and the most bytes they may take. A window of 8
# chunks (11k rows, ~80 sequences) gave FVU 0.113 and 14% dead latents on the demo store where 64
# chunks (88k rows) gave 0.108 and 7%: batches drawn from too few sequences pull the SAE
# back and forth between them (docs/recipe.md).
SHUFFLE_ROWS = 2**17
SHUFFLE_BYTES = 512 * 2**20


def _shuffle_chunks(store: ActivationStore, layer: int, hook: str) -> int:
    rows = min(SHUFFLE_ROWS, SHUFFLE_BYTES // store.row_bytes(layer, hook))
    return max(1, -(-rows // store.chunk_rows(layer, hook)))


def _status(p: Plan, out: Path) -> str:
    """done / finish / resume / fresh, refusing work left by a different config (unless --force)."""
    d, work, ours = p.d_in, p.work, p.fingerprint
    theirs = saved_cfg(work)
    if theirs is not None and theirs.get("d_in") == d and theirs.get("fingerprint") == ours:
        return "finish"  # trained and saved; a kill came before the swap
    if not p.force:
        final = saved_cfg(out)
        if final is not None:
            _same_config(out, d, final.get("d_in"), final.get("fingerprint", {}), ours, p.name)
            return "done"
        if theirs is not None:
            _same_config(work, d, theirs.get("d_in"), theirs.get("fingerprint", {}), ours, p.name)
    if (work / CHECKPOINT).exists():
        try:
            ck = load_checkpoint(work / CHECKPOINT, mmap=True)["fingerprint"]
        except Exception as e:
            if p.force:
                return "fresh"
            raise UserError(f"{work / CHECKPOINT} is unreadable ({type(e).__name__}); rerun with --force "
                            "to start this SAE over") from None
        if ck == ours:
            return "resume"
        if not p.force:
            _same_config(work, d, ck.get("d_in"), ck, ours, p.name)
    return "fresh"


def _check_finite(p: Plan):
    if not p.tc.check_finite:
        return
    bad = count_nonfinite(p.store, p.layer, p.hook, p.tc.reader_threads, p.target)
    if bad and not p.tc.skip_nonfinite:
        raise UserError(f"{p.name}: {bad} of {p.store.n_rows(p.layer, p.hook)} stored rows hold NaN/Inf; refusing "
                        "to train on them (set train.skip_nonfinite=true to drop those rows, or re-harvest)")
    if bad:
        print(f"train: {p.name}: dropping {bad} stored rows that hold NaN/Inf (train.skip_nonfinite)")


def _same_config(out: Path, d: int, their_d, theirs: dict, ours: dict, name: str):
    if their_d is not None and their_d != d:
        raise UserError(f"{out} holds an SAE of d_in {their_d} but the store's {name} has d_model {d}; "
                        "rerun with --force to retrain it, or use another run_dir")
    if not theirs:
        raise UserError(f"{out} holds an SAE without saepipe's training record; rerun with --force to replace it")
    diff = [f"{k} {theirs.get(k)!r} there vs {ours.get(k)!r} now" for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)]
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UserError(f"{out} was started with a different train config ({'; '.join(diff[:3])}{more}); "
                        "restore that config, or rerun with --force to start this SAE over")


def _matmul_dtype(autocast: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the dense encoder matmul; None = the weights' own."""
    if autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if autocast == "none" else dtypes.torch_dtype(autocast)


# --------------------------------------------------------------------------- the state


# --------------------------------------------------------------------------- training
def train(plans: list[Plan], progress: bool = True) -> dict:
    """Train (or resume, or finish) the SAEs of one (layer, hook), one or a sweep's members, from one
    stream of batches; the caller holds their locks. Returns {Plan.key: cfg.json}."""
    rank, world = dist.rank_world()
    main = rank == 0
    settled = {p.key: _settle(p) for p in plans} if main else {}
    dist.barrier()  # the others look at the folders once rank 0 has settled them
    results, members = {}, []
    for p in plans:
        if not main:
            p.status = _status(p, p.out)
            if p.status == "done":
                results[p.key] = saved_cfg(p.out)
                continue
        elif settled[p.key] is not None:
            results[p.key] = settled[p.key]
            continue
        members.append(p)
    if not members:
        return results
    # Everything the stream is made of is the same for every member (config.SWEEP_SHARED).
    first, tc = members[0], members[0].tc
    B = tc.batch_size
    if main:
        for p in members:
            if p.status == "fresh" and p.work.exists():
                shutil.rmtree(p.work)
            p.work.mkdir(parents=True, exist_ok=True)

    states, sample = [], None
    for p in members:
        state = TrainState(p.tc, p.d_in, p.device, Shard.of(p.tc), transcoder=p.target is not None)
        if p.status == "resume":
            state.load_state_dict(load_checkpoint(p.work / CHECKPOINT)["state"])
        else:
            if sample is None:  # read once: a member with a smaller init_sample takes the first rows of it
                sample = init_sample(first, max(q.tc.init_sample for q in members))
            if state.shard is None:
                state.scale, state.out_scale = init_weights(state.sae, p, sample)
            else:  # the one-process init, then this rank's rows of it
                whole = state.sae.empty_like(p.tc.n_latents)
                state.scale, state.out_scale = init_weights(whole, p, sample)
                state.sae.load_state_dict(state.shard.rows(whole.state_dict()))
                del whole
            if state.ema is not None:
                state.ema.load_state_dict(state.sae.state_dict())
        if main:
            rewrite_metrics(p.work, last_step=state.step)  # a killed run may have logged past its checkpoint
        states.append(state)
    del sample
    # One row filter for the one loader: its NaN/Inf counts (chunk -> rows, the same whoever read
    # the chunk) are every member's, resumed ones' included.
    rf = first.row_filter()
    for state in states:
        rf.nonfinite.update(state.nonfinite)
    for state in states:
        state.nonfinite = rf.nonfinite
    x_eval = eval_rows(first.store, first.layer, first.hook, first.eval_chunks or first.train_chunks,
                       tc.eval_tokens, first.row_filter(), first.target)
    if main:
        for p, state in zip(members, states):
            _announce(p, state.step, x_eval.shape[0])
        if len(members) > 1:
            print(f"train: layer {first.layer} {first.hook}: {len(members)} SAEs from one pass over the batches "
                  f"({', '.join(leaf(p.hook, p.member) for p in members)})")
    # A kill between two members' checkpoints leaves them at different steps: the stream starts at
    # the earliest, and a member ahead of it lets the batches it has trained on go by.
    behind = min(states, key=lambda st: st.step)
    loader = BatchLoader(first.store, first.layer, first.hook, first.train_chunks, B, tc.seed, first.window_chunks,
                         rf, first.device, tc.reader_threads, start=behind.cursor, cache=_cache_rows(first),
                         target=first.target)

    what = f"train L{first.layer} {first.hook}" + (f" x{len(members)} SAEs" if len(members) > 1 else "")
    bar = tqdm(total=tc.n_steps * B, initial=behind.step * B, unit="tok", unit_scale=True, desc=what,
               disable=not progress, dynamic_ncols=True)
    t_log, postfix = [time.time()] * len(members), {}
    metrics = [open(p.work / "metrics.jsonl", "a") for p in members] if main else []
    batches = iter(loader)
    try:
        for step in range(behind.step, tc.n_steps):
            x, cursor = next(batches)
            if world > 1 and not tc.shard_latents:  # every rank draws the same batch and computes its own rows
                x = x[rank::world]
            for i, (p, state) in enumerate(zip(members, states)):
                if state.step > step:
                    continue
                state.cursor = cursor
                lr = learning_rate(p.tc, step)
                x_in, y = (x, None) if p.target is None else (x[:, :p.d_in], x[:, p.d_in:] * state.out_scale)
                n_dormant = train_step(state, state.sae.preprocess(x_in) * state.scale, lr, p.tc, p.matmul_dtype, y)
                if state.shard is not None and any(_due(p.tc, state.step)):
                    state.gather()  # every rank sends its shard; rank 0 evaluates and checkpoints the whole SAE
                if main:
                    t_log[i], shown = _after_step(p, state, metrics[i], rf, x_eval, lr, n_dormant, t_log[i])
                    if shown and len(members) == 1:
                        bar.set_postfix(shown, refresh=False)
                    elif shown:
                        postfix[p.member or "{}"] = shown["fvu"]
                        bar.set_postfix(postfix, refresh=False)
                state.full = None
            bar.update(B)
    finally:
        bar.close()
        batches.close()
        for f in metrics:
            f.close()
    for p, state in zip(members, states):
        if state.shard is not None:
            state.gather()
        if main:
            results[p.key] = _finish(p, state, x_eval)
    dist.barrier()  # the others return once rank 0 has published the SAEs
    if not main:
        results.update({p.key: saved_cfg(p.out) for p in members})
    return results


def _after_step(p: Plan, state: TrainState, metrics, rf: RowFilter, x_eval: torch.Tensor, lr: float,
                n_dormant: int, t_log: float) -> tuple[float, dict | None]:
    """Rank 0, after a member's step: its train row, eval row and checkpoint when due. Returns when
    its last train row was written, and what the progress bar shows of it when one was."""
    tc, B, step, shown = p.tc, p.tc.batch_size, state.step, None
    if step % tc.log_every == 0 or step == tc.n_steps:
        now, steps = time.time(), step - state.log_from
        loss, fvu, nmse, aux = (state.log_sums / steps).tolist()
        row = {"split": "train", "step": step, "tokens": step * B, "loss": loss, "fvu": fvu, "nmse": nmse,
               "aux_loss": aux, "dormant_frac": n_dormant / tc.n_latents, "lr": lr,
               "tokens_per_s": steps * B / max(now - t_log, 1e-9), "elapsed_s": state.elapsed}
        if rf.dropped_nonfinite:
            row["dropped_nonfinite"] = rf.dropped_nonfinite
        _append(metrics, row)
        shown = {"fvu": f"{fvu:.4f}", "dormant": f"{n_dormant / tc.n_latents:.1%}"}
        state.log_sums.zero_()
        state.log_from, t_log = step, now
    eval_due, checkpoint_due = _due(tc, step)
    if eval_due:
        ev = evaluate(state.weights(), x_eval, state.scale, B, p.matmul_dtype, state.out_scale)
        del ev["density"]
        _append(metrics, {"split": "eval", "step": step, "tokens": step * B, **ev})
    if checkpoint_due:
        metrics.flush()
        save_checkpoint(p.work / CHECKPOINT, p.fingerprint, state)
    return t_log, shown


def _due(tc: TrainConfig, step: int) -> tuple[bool, bool]:
    """(an eval row, a checkpoint) due after `step` steps (the end has _finish instead)."""
    return step % tc.eval_every == 0 and step < tc.n_steps, step % tc.checkpoint_every == 0 and step < tc.n_steps


def _cache_rows(p: Plan) -> bool:
    """Keep the training rows in memory after their first read: when they fit, and are read more than once."""
    return (p.tc.n_steps * p.tc.batch_size > p.rows_per_epoch
            and p.rows_per_epoch * p.store.row_bytes(p.layer, p.hook) <= CACHE_BYTES)


def train_step(state: TrainState, x: torch.Tensor, lr: float, tc: TrainConfig,
               matmul_dtype: torch.dtype | None = None, y: torch.Tensor | None = None) -> int:
    """One optimizer step on a normalised batch x [B, d] (under torchrun, this rank's rows of it, the
    gradients and counters summed over the ranks; with latent sharding, the whole batch and this rank's
    latents, pipeline.shard); returns how many latents were dormant. A transcoder predicts y [B, d]
    (scaled): its dictionary is asked for y less the skip term, so every architecture's own loss terms
    (AuxK's residual, Matryoshka's prefixes) see the part the latents must give, and the FVU's
    denominator stays y's variance."""
    sae, opt, shard = state.sae, state.opt, state.shard
    for g in opt.param_groups:
        g["lr"] = lr
    split = dist.rank_world()[1] > 1 and shard is None  # the ranks hold parts of the batch
    view = TrainView(tc.sae, state.since_fired, matmul_dtype, dist.all_reduce_ if split else (lambda t: t), shard,
                     state.step, tc.n_steps, opt)
    o = sae.train_forward(x, view)
    rows = _global_rows(x) if shard is None else x.shape[0]
    target = x if y is None else y - sae.skip(x)
    fvu, nmse = reconstruction_loss(target, o.x_hat, rows, whole_batch=shard is not None, of=y)
    loss, aux = sae.train_loss(target, o, fvu, view)
    for prm in sae.parameters():  # opt.zero_grad(set_to_none=True) without its profiler scope: 0.6 ms a step
        prm.grad = None
    loss.backward()
    if dist.rank_world()[1] > 1 and shard is None:
        # Each rank's loss is its rows' share of the batch's (global denominators, reconstruction_loss):
        # the sum of the ranks' gradients is the one-process gradient. (The weight matrices
        # stepped inside the backward were summed there; their gradients are gone.)
        for prm in sae.parameters():
            if prm.grad is not None:
                dist.all_reduce_(prm.grad)
    sae.remove_parallel_grad()
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), tc.grad_clip)
    opt.step()
    sae.after_step(view)
    with torch.no_grad():
        if state.ema is not None:
            for pe, ps in zip(state.ema.parameters(), sae.parameters()):
                pe.lerp_(ps, 1 - tc.ema_decay)
            for be, bs in zip(state.ema.buffers(), sae.buffers()):  # running estimates (a threshold) as they are
                be.copy_(bs)
        # scatter-add, not boolean indexing: no host sync, and duplicates are harmless
        fires = torch.zeros_like(state.since_fired)
        fires.scatter_add_(0, o.idx.reshape(-1), (o.vals > 0).long().reshape(-1))
        sums = torch.stack([loss, fvu, nmse, aux]).detach()
        if shard is None:  # a shard saw every token of its latents, and every rank holds the whole loss
            dist.all_reduce_(fires)
            dist.all_reduce_(sums)
        state.since_fired = (state.since_fired + rows) * (fires == 0)
        state.log_sums += sums
    state.step += 1
    return view.n_dormant


def learning_rate(tc: TrainConfig, step: int) -> float:
    """Linear warmup (at most a tenth of the run), then either a cosine to 0 at the end or (wsd) flat, then
    linear to 0 from decay_start. Schedule-free only warms up: its running average does the decay's work."""
    warmup = min(tc.warmup_steps, tc.n_steps // 10)
    ramp = (step + 1) / warmup if step < warmup else 1.0
    if tc.optimizer in optim.SCHEDULE_FREE:
        return tc.lr * ramp
    if tc.lr_schedule == "cosine":
        return tc.lr * min(ramp, 0.5 * (1 + math.cos(math.pi * step / tc.n_steps)))
    decay_from = int(tc.decay_start * tc.n_steps)
    tail = 1.0 if step < decay_from else (tc.n_steps - step) / max(1, tc.n_steps - decay_from)
    return tc.lr * min(ramp, tail)


def _global_rows(x: torch.Tensor) -> int:
    """Rows of the whole batch: x's own under one process, every rank's under torchrun."""
    if dist.rank_world()[1] == 1:
        return x.shape[0]
    return int(dist.all_reduce_(torch.tensor(x.shape[0], device=x.device)))


class _SquaredError(torch.autograd.Function):
    """(x [B, d], x_hat [B, d]) -> (sse, e): sse = sum((x - x_hat)^2) and e = x - x_hat (no gradient).

    Autograd's own `dot(e, e)` of a difference takes four [B, d] passes back (g * e twice, their sum,
    the negation for x_hat); this one writes x_hat's gradient -2 g e in one, the same numbers."""

    @staticmethod
    def forward(ctx, x, x_hat):
        e = x - x_hat
        ctx.save_for_backward(e)
        ctx.mark_non_differentiable(e)
        flat = e.reshape(-1)
        return torch.dot(flat, flat), e

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _):
        e, = ctx.saved_tensors
        need_x, need_hat = ctx.needs_input_grad
        grad_hat = e * (-2 * g) if need_hat else None
        grad_x = (grad_hat.neg() if need_hat else e * (2 * g)) if need_x else None
        return grad_x, grad_hat


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, rows: int | None = None,
                        whole_batch: bool = False, of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fvu, nmse): the FVU every architecture's loss starts from, and OpenAI's per-token normalised
    MSE for the log.

    Under torchrun x is this rank's rows of the batch: the denominators (the batch's variance, its
    row count) are the whole batch's, so each rank's terms are its share of the one-process values
    and they sum to them. `rows`: the whole batch's row count, when the caller has it
    (_global_rows). `whole_batch`: x is the whole batch on every rank (latent sharding), so nothing
    is summed over the ranks. `of`: the tensor whose variance and row norms are the denominators,
    when not x itself (a skip transcoder's target, of which x is the part left to its latents)."""
    split = dist.rank_world()[1] > 1 and not whole_batch
    sse, e = _SquaredError.apply(x, x_hat)
    x = (x if of is None else of).detach()
    with torch.no_grad():
        n = rows or (_global_rows(x) if split else x.shape[0])
        if not split:
            c = (x - x.mean(0)).reshape(-1)
            var = torch.dot(c, c)  # one [B, d] temporary (torch.var over dim 0 took 3 ms at [1024, 1024])
        else:
            mean = dist.all_reduce_(x.sum(0)) / n
            var = dist.all_reduce_((x - mean).pow(2).sum())
    fvu = sse / var.clamp_min(1e-30)
    with torch.no_grad():
        nmse = (torch.linalg.vector_norm(e, dim=1).square()
                / torch.linalg.vector_norm(x, dim=1).square().clamp_min(1e-30)).sum() / n
    return fvu, nmse


def _settle(p: Plan) -> dict | None:
    """Under the lock the folders are ours: finish a swap a kill cut short and look again, since
    another process may have moved things on since plan(). Returns cfg.json when nothing is left to train."""
    fsio.recover_swap(p.out)
    planned, p.status = p.status, _status(p, p.out)
    if p.status == "fresh" and planned != "fresh":
        _check_finite(p)
    if p.status == "done":
        print(f"train: {p.name}: already trained in {p.out}; skipping (--force retrains it)")
        return saved_cfg(p.out)
    if p.status == "finish":
        publish(p.work, p.out)
        print(f"train: {p.name}: finished the interrupted save -> {p.out}")
        return saved_cfg(p.out)
    return None


@torch.no_grad()
def evaluate(sae: Dictionary, x_raw: torch.Tensor, scale: float, batch: int,
             matmul_dtype: torch.dtype | None = None, out_scale: float = 1.0) -> dict:
    """pipeline.metrics on held-out rows, in training space (normalised, scaled), with `fvu_raw`,
    the FVU of the same rows in the raw space the model holds them in (what `saepipe eval`
    reports), the per-latent firing density and the count of rows. A transcoder's rows are
    (input, target) pairs, and the statistics are of its prediction of the target."""
    dev, d = sae.W_enc.device, sae.d_in
    stats, raw = ReconStats(sae.d_in, sae.n_latents, dev), ReconStats(sae.d_in, sae.n_latents, dev)
    for i in range(0, x_raw.shape[0], batch):
        rows = x_raw[i:i + batch].to(dev)
        x = sae.preprocess(rows[:, :d]) * scale
        o = sae.train_forward(x, TrainView(matmul_dtype=matmul_dtype))
        if sae.transcoder:
            y_hat = o.x_hat + sae.skip(x)
            stats.add(rows[:, d:] * out_scale, y_hat, o.idx, o.vals)
            raw.add(rows[:, d:], y_hat / out_scale, o.idx, o.vals)
        else:
            stats.add(x, o.x_hat, o.idx, o.vals)
            raw.add(rows[:, :d], sae.postprocess(o.x_hat / scale, rows[:, :d].float()), o.idx, o.vals)
    return {**stats.result(), "fvu_raw": raw.result()["fvu"], "eval_tokens": stats.rows, "density": stats.density()}


def _finish(p: Plan, state: TrainState, x_eval: torch.Tensor) -> dict:
    """Evaluate, draw, save (the `done` marker last), then swap the finished SAE into place."""
    final, B, work = state.weights(), p.tc.batch_size, p.work
    # A threshold SAE (BatchTopK's one theta) re-fits its inference rule to the held-out rows with
    # the final weights: a running average of the batches' thresholds lags the weights it was read from.
    fit = final.calibrate(final.preprocess(x_eval[:, :final.d_in].to(final.W_enc.device)) * state.scale)
    ev = evaluate(final, x_eval, state.scale, B, p.matmul_dtype, state.out_scale)
    density = ev.pop("density")
    with open(work / "metrics.jsonl", "a") as f:
        _append(f, {"split": "eval", "step": state.step, "tokens": state.step * B, **ev})
    saved = final.folded(state.scale, state.out_scale) if (state.scale, state.out_scale) != (1.0, 1.0) else final
    info = _saved_cfg(p, state, ev)
    if fit:
        info["threshold_fit"] = fit
    # Pictures first, then the SAE with its marker last: a folder marked done holds everything.
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
    space = fvu_space(final)
    plots.loss_figure(work, rows, f"{p.name}: loss", space)
    plots.density_figure(work, density, x_eval.shape[0], f"{p.name}: feature density on held-out tokens")
    saved.save(work, info)
    publish(work, p.out)
    refit = f"; threshold re-fit to the held-out rows {fit['after']:.4g} (running average {fit['before']:.4g})" if fit else ""
    print(f"train: {p.name}: done; {describe(ev, space)}{refit} -> {p.out}")
    return saved.cfg


# --------------------------------------------------------------------------- files


def _append(f, row: dict):
    f.write(json.dumps(row) + "\n")
    f.flush()


def _saved_cfg(p: Plan, state: TrainState, ev: dict) -> dict:
    attrs, tc = p.store.attrs, p.tc
    tokens = tc.n_steps * tc.batch_size
    return {
        "normalize": state.sae.normalize,  # what encode() applies
        "normalize_trained": tc.normalize,
        "input_scale": state.scale,  # already folded into the weights
        **({"target_hook": p.target, "output_scale": state.out_scale} if p.target else {}),
        "model": attrs.get("model"), "revision": attrs.get("revision"), "layer": p.layer, "hook": p.hook,
        "dataset": attrs.get("dataset"), "context_size": p.store.context_size,
        "prepend_bos": attrs.get("prepend_bos"), "exclude_bos": tc.exclude_bos,
        "tokens_trained": tokens, "steps": tc.n_steps, "epochs": tokens / p.rows_per_epoch,
        "eval": ev, "eval_chunks": p.eval_chunks, "dropped_nonfinite": sum(state.nonfinite.values()),
        "train_seconds": state.elapsed,
        "train": {**{k: v for k, v in tc.flat().items() if k != "sweep"}, "n_steps": tc.n_steps},
        "fingerprint": p.fingerprint, "package_version": pipeline.__version__,
        # What the store was harvested from, so eval can check its corpus and find the held-out
        # windows even once the store is gone.
        "store_fingerprint": attrs.get("fingerprint"), "store_sequences": attrs.get("n_sequences"),
    }


def _settings_text(tc: TrainConfig) -> str:
    """`k 32` for the default TopK; `<architecture> k 32 ...` for another."""
    model = {k: v for k, v in dataclasses.asdict(tc.sae).items() if v is not None}
    name = model.pop("architecture")
    own = tc.sae.model_keys()
    text = ", ".join(f"{k} {v}" for k, v in model.items() if k in own)
    return text if name == DEFAULT else f"{name}: {text}"


def _announce(p: Plan, step: int, n_eval: int):
    tc = p.tc
    tokens = tc.n_steps * tc.batch_size
    epochs = tokens / p.rows_per_epoch
    held = f"{len(p.eval_chunks)} held out" if p.eval_chunks else "none held out: eval rows are training rows"
    print(f"train: {p.name}: d {p.d_in}, n_latents {tc.n_latents}, {_settings_text(tc)}, {tc.n_steps} steps x "
          f"{tc.batch_size} tokens, lr {tc.lr:.3g}, {p.device.type}; {p.rows_per_epoch} trainable tokens in "
          f"{len(p.train_chunks)} chunks ({held}), {n_eval} eval tokens")
    if epochs > 1:
        print(f"train: {p.name}: the budget of {tokens} tokens is {epochs:.2f} epochs of the store "
              f"(train.n_tokens = {tc.n_tokens}); rows repeat in a new order each epoch")
    if step:
        print(f"train: {p.name}: resuming from the checkpoint at step {step} of {tc.n_steps}")
