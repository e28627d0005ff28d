"""Train one TopK SAE on one (layer, hook) of the activation store.

`plan()` resolves and checks everything first (widths, k, the store, NaN/Inf
rows, an earlier run in the output folder), so bad input fails before a byte
is written. `train()` then runs the recipe of DESIGN.md:

    loss = ||x - x_hat||^2 / ||x - mean(x)||^2  +  aux_alpha * AuxK
    Adam (tiny eps), lr warmup then linear decay, decoder rows kept unit-norm
    (parallel gradient removed before the step, rows renormalised after it),
    tied init, b_pre from the geometric median of a sample.

Everything a step depends on (weights, Adam state, EMA, dead counters, the
loader cursor) is checkpointed atomically, and batches are a pure function of
(seed, step), so a killed run resumes to the same weights as an unbroken one.

The folders of one SAE (`pipeline.paths.sae_dir`, called `out` here):

    <out>.partial/   the work: checkpoint.pt, metrics.jsonl; at the end loss.svg,
                     density.svg, then sae.save() (sae.safetensors, cfg.json, and
                     LAST the `done` marker); then the checkpoint is dropped and
    <out>/           the finished SAE takes the name by fsio.swap_dir, which keeps
                     the old one until the new one holds the name.

So `<out>` is always a complete SAE or absent, --force never loses the old one
before the new exists, and state is read from the markers alone:
`.partial` with `done` = finished, only the swap remains; `.partial` with a
checkpoint of this config = resume; anything else = start over. The caller
holds the SAE's lock (`lock`) while training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import pipeline
from pipeline import fsio, plots
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.model import resolve_device
from pipeline.loader import (BatchLoader, Cursor, RowFilter, count_nonfinite, derive_seed, eval_rows,
                             split_chunks, trainable_rows)
from pipeline.paths import DONE, sae_dir
from pipeline.sae import TopKSAE, saved_cfg
from pipeline.store import ActivationStore

CHECKPOINT = "checkpoint.pt"
# A finished SAE folder holds exactly these (DONE written last, by TopKSAE.save).
OUTPUTS = ("metrics.jsonl", "loss.svg", "density.svg", "sae.safetensors", "cfg.json", DONE)
# Keys of the train config that change how or where a run executes, not what it computes:
# a run may resume with different values of these.
_LOGISTICS = ("layers", "hooks", "device", "backend", "eval_every", "eval_tokens", "log_every",
              "checkpoint_every", "reader_threads", "check_finite")


@dataclass
class Plan:
    layer: int
    hook: str
    out: Path
    status: str  # done | finish (only the swap remains) | resume | fresh
    force: bool
    hparams: dict  # the train config with every default resolved (n_latents, lr, k_aux, dead_tokens, ...)
    fingerprint: dict  # what must match for a resume
    device: torch.device
    matmul_dtype: torch.dtype | None
    train_chunks: list[int]
    eval_chunks: list[int]
    window_chunks: int
    rows_per_epoch: int

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.hook}"

    @property
    def work(self) -> Path:
        return partial_dir(self.out)


def partial_dir(out: Path) -> Path:
    """Where the SAE of `out` is trained until it is finished and swapped in."""
    return out.with_name(out.name + ".partial")


def lock(run_dir, layer: int, hook: str):
    """The lock of one SAE: a second `saepipe train` of it is refused with one line."""
    return fsio.run_lock(run_dir, f"train.{layer}.{hook}", f"layer {layer} {hook} of {run_dir}")


# --------------------------------------------------------------------------- planning
def plan(cfg: Config, store: ActivationStore, layer: int, hook: str, force: bool = False) -> Plan:
    tc = cfg.train
    name = f"layer {layer} {hook}"
    store.array(layer, hook)  # missing or partly harvested: one clear error
    d = store.d_model(layer, hook)
    n = tc.n_latents or tc.expansion_factor * d
    if tc.k > n:
        how = "train.n_latents" if tc.n_latents else f"train.expansion_factor {tc.expansion_factor} x d_model {d}"
        raise UserError(f"train.k = {tc.k} exceeds n_latents = {n} ({how}); lower k or raise n_latents")
    device = resolve_device(tc.device, key="train.device")
    _check_backend(tc.backend, device)
    hp = dataclasses.asdict(tc)
    hp.update(
        n_latents=n,
        lr=tc.lr or 2e-4 / math.sqrt(n / 2**14),
        k_aux=min(n, tc.k_aux or 2 ** max(0, round(math.log2(max(1, d / 2))))),
        dead_tokens=tc.dead_tokens or int(min(10_000_000, max(4 * tc.batch_size, tc.n_tokens // 10))),
        n_steps=max(1, tc.n_tokens // tc.batch_size),
    )
    del hp["expansion_factor"]  # folded into n_latents
    attrs = store.attrs
    fingerprint = {"d_in": d, "model": attrs.get("model"), "n_rows": store.n_rows(layer, hook),
                   **{k: v for k, v in hp.items() if k not in _LOGISTICS}}
    fingerprint = json.loads(json.dumps(fingerprint))  # as cfg.json will hold it (tuples become lists)

    train_chunks, eval_chunks = split_chunks(store.n_chunks(layer, hook), tc.eval_fraction)
    rf = RowFilter(store, layer, hook, tc.exclude_bos, tc.skip_nonfinite)
    rows_per_epoch = trainable_rows(store, layer, hook, train_chunks, rf)
    if rows_per_epoch == 0:
        raise UserError(f"{name}: no rows left to train on (store too small, or only BOS positions)")
    if tc.batch_size > rows_per_epoch:
        raise UserError(f"train.batch_size = {tc.batch_size} exceeds the {rows_per_epoch} trainable rows of "
                        f"{name}; lower it or harvest more tokens")
    chunk_rows = store.chunk_rows(layer, hook)
    window_chunks = max(tc.shuffle_chunks, -(-4 * tc.batch_size // chunk_rows))

    out = sae_dir(cfg.run_dir, layer, hook)
    p = Plan(layer, hook, out, "", force, hp, fingerprint, device, _matmul_dtype(tc.autocast, device),
             train_chunks, eval_chunks, window_chunks, rows_per_epoch)
    # Planning writes nothing: a swap a kill interrupted is only undone under the lock, in train(),
    # and until then the old folder aside is what recover_swap will give back the name.
    shown = out if out.exists() or not fsio.old_name(out).exists() else fsio.old_name(out)
    p.status = _status(p, shown)
    if p.status == "fresh" and shown.exists() and not force:
        print(f"train: {name}: {out} holds no finished SAE (no intact `{DONE}` marker); training a new one, "
              "which replaces it once finished")
    if p.status == "fresh":
        _check_finite(store, p)
    return p


def _status(p: Plan, out: Path) -> str:
    """done / finish / resume / fresh, refusing work left by a different config (unless --force)."""
    d, work = p.fingerprint["d_in"], p.work
    ours = p.fingerprint
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
            ck = _load_checkpoint(work / CHECKPOINT, mmap=True)["fingerprint"]
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


def _check_finite(store: ActivationStore, p: Plan):
    hp = p.hparams
    if not hp["check_finite"]:
        return
    bad = count_nonfinite(store, p.layer, p.hook, hp["reader_threads"])
    if bad and not hp["skip_nonfinite"]:
        raise UserError(f"{p.name}: {bad} of {store.n_rows(p.layer, p.hook)} stored rows hold NaN/Inf; refusing "
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


def _check_backend(backend: str, device: torch.device):
    from pipeline.kernels import HAS_TRITON

    interpreting = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    if backend == "triton" and not HAS_TRITON:
        raise UserError("train.backend = triton but triton is not installed; use train.backend=torch")
    if backend == "triton" and device.type != "cuda" and not interpreting:
        raise UserError("train.backend = triton needs a CUDA device (or TRITON_INTERPRET=1 for testing); "
                        "use train.backend=torch on CPU")


def _matmul_dtype(autocast: str, device: torch.device) -> torch.dtype | None:
    if autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[autocast]


# --------------------------------------------------------------------------- training
def train(store: ActivationStore, p: Plan, progress: bool = True) -> dict:
    """Train (or resume, or finish) the SAE of a plan; the caller holds its lock."""
    hp, dev = p.hparams, p.device
    B, n_steps, n = hp["batch_size"], hp["n_steps"], hp["n_latents"]
    # Under the lock, the folders are ours: finish a swap a kill cut short, and look again,
    # since another process may have moved things on since plan().
    fsio.recover_swap(p.out)
    planned, p.status = p.status, _status(p, p.out)
    if p.status == "fresh" and planned != "fresh":
        _check_finite(store, p)
    if p.status == "done":
        print(f"train: {p.name}: already trained in {p.out}; skipping (--force retrains it)")
        return saved_cfg(p.out)
    if p.status == "finish":
        _publish(p.work, p.out)
        print(f"train: {p.name}: finished the interrupted save -> {p.out}")
        return saved_cfg(p.out)
    out = p.work
    if p.status == "fresh" and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    d = p.fingerprint["d_in"]
    rf = RowFilter(store, p.layer, p.hook, hp["exclude_bos"], hp["skip_nonfinite"])

    sae = TopKSAE(d, n, hp["k"], "layer_norm" if hp["normalize"] == "layer_norm" else "none", hp["backend"])
    ck = _load_checkpoint(out / CHECKPOINT) if p.status == "resume" else None
    if ck is None:
        scale = _init(sae, store, p, RowFilter(store, p.layer, p.hook, hp["exclude_bos"], hp["skip_nonfinite"]))
        step, cursor, since_fired = 0, Cursor(), torch.zeros(n, dtype=torch.long)
        _rewrite_metrics(out, last_step=-1)
    else:
        sae.load_state_dict(ck["model"])
        scale, step, cursor, since_fired = ck["scale"], ck["step"], Cursor(*ck["cursor"]), ck["since_fired"]
        rf.nonfinite = dict(ck["nonfinite"])
        _rewrite_metrics(out, last_step=step)
    sae.to(dev)
    since_fired = since_fired.to(dev)
    opt = torch.optim.Adam(sae.parameters(), lr=hp["lr"], betas=tuple(hp["adam_betas"]), eps=hp["adam_eps"])
    ema = None
    if hp["ema_decay"]:
        ema = TopKSAE(d, n, hp["k"], sae.normalize, hp["backend"]).to(dev)
        ema.load_state_dict(sae.state_dict() if ck is None else ck["ema"])
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
    elapsed0 = ck["elapsed"] if ck else 0.0
    # The log row averages the steps since the previous row, whichever process ran them.
    log = (ck or {}).get("log") or {"sums": torch.zeros(4), "from": step}
    del ck

    x_eval = eval_rows(store, p.layer, p.hook, p.eval_chunks or p.train_chunks, hp["eval_tokens"],
                       RowFilter(store, p.layer, p.hook, hp["exclude_bos"], hp["skip_nonfinite"]))
    _announce(p, step, x_eval.shape[0], dev)
    loader = BatchLoader(store, p.layer, p.hook, p.train_chunks, B, hp["seed"], p.window_chunks, rf, dev,
                         hp["reader_threads"], start=cursor)
    warmup = min(hp["warmup_steps"], n_steps // 10)

    def lr_at(s):
        ramp = (s + 1) / warmup if s < warmup else 1.0
        decay_from = int(hp["decay_start"] * n_steps)
        tail = 1.0 if s < decay_from else (n_steps - s) / max(1, n_steps - decay_from)
        return hp["lr"] * min(ramp, tail)

    bar = tqdm(total=n_steps * B, initial=step * B, unit="tok", unit_scale=True, desc=f"train L{p.layer} {p.hook}",
               disable=not progress, dynamic_ncols=True)
    sums = log["sums"].to(dev)  # loss, fvu, nmse, aux since the last log row
    t_log, s_log, t0 = time.time(), log["from"], time.time()
    metrics = open(out / "metrics.jsonl", "a")
    batches = iter(loader)
    try:
        while step < n_steps:
            x, cursor = next(batches)
            x = sae.preprocess(x) * scale
            lr = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            dead = since_fired >= hp["dead_tokens"]
            n_dead = int(dead.sum())
            k_aux = min(hp["k_aux"], n_dead) if hp["aux_alpha"] > 0 else 0

            o = sae.forward_train(x, dead, k_aux, p.matmul_dtype)
            loss, fvu, aux, nmse = sae_loss(x, o, hp["aux_alpha"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grad()
            if hp["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), hp["grad_clip"])
            opt.step()
            sae.normalize_decoder()
            with torch.no_grad():
                if ema is not None:
                    for pe, ps in zip(ema.parameters(), sae.parameters()):
                        pe.lerp_(ps, 1 - hp["ema_decay"])
                # scatter-add, not boolean indexing: no host sync, and duplicates are harmless
                fires = torch.zeros(n, dtype=torch.long, device=dev)
                fires.scatter_add_(0, o.idx.reshape(-1), (o.vals > 0).long().reshape(-1))
                since_fired = (since_fired + x.shape[0]) * (fires == 0)
                sums += torch.stack([loss, fvu, nmse, aux]).detach()
            step += 1
            bar.update(B)

            if step % hp["log_every"] == 0 or step == n_steps:
                now = time.time()
                avg = (sums / (step - s_log)).tolist()
                row = {"split": "train", "step": step, "tokens": step * B, "loss": avg[0], "fvu": avg[1],
                       "nmse": avg[2], "aux_loss": avg[3], "dead_frac": n_dead / n, "lr": lr,
                       "tokens_per_s": (step - s_log) * B / max(now - t_log, 1e-9),
                       "elapsed_s": elapsed0 + now - t0}
                if rf.dropped_nonfinite:
                    row["dropped_nonfinite"] = rf.dropped_nonfinite
                _append(metrics, row)
                bar.set_postfix(fvu=f"{avg[1]:.4f}", dead=f"{n_dead / n:.1%}", refresh=False)
                sums.zero_()
                t_log, s_log = now, step
            if step % hp["eval_every"] == 0 and step < n_steps:
                ev = evaluate(ema or sae, x_eval, scale, B, p.matmul_dtype)
                _append(metrics, {"split": "eval", "step": step, "tokens": step * B,
                                  **{k: v for k, v in ev.items() if k != "density"}})
            if step % hp["checkpoint_every"] == 0 and step < n_steps:
                metrics.flush()
                _checkpoint(out, p, sae, opt, ema, step, cursor, scale, since_fired, rf,
                            elapsed0 + time.time() - t0, {"sums": sums.cpu(), "from": s_log})
    finally:
        bar.close()
        batches.close()
        metrics.close()

    final = ema or sae
    ev = evaluate(final, x_eval, scale, B, p.matmul_dtype)
    density = ev.pop("density")
    with open(out / "metrics.jsonl", "a") as f:
        _append(f, {"split": "eval", "step": step, "tokens": step * B, **ev})
    saved = final.folded(scale) if scale != 1.0 else final
    info = _saved_cfg(store, p, scale, ev, n_steps * B, elapsed0 + time.time() - t0, rf.dropped_nonfinite)
    # Pictures first, then the SAE with its marker last: a folder marked done holds everything.
    _plots(out, p, density, x_eval.shape[0])
    saved.save(out, info)
    _publish(out, p.out)
    print(f"train: {p.name}: done; eval fvu {ev['fvu']:.4f}, dead {ev['dead_frac_eval']:.1%} -> {p.out}")
    return saved.cfg


def sae_loss(x: torch.Tensor, o, aux_alpha: float):
    """(loss, fvu, aux, nmse): FVU + aux_alpha * AuxK, plus OpenAI's per-token normalised MSE for the log."""
    e = x - o.x_hat
    fvu = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)
    aux = torch.zeros((), device=x.device)
    if o.aux_hat is not None:
        # dead latents learn to predict what the live ones missed (the residual, detached)
        r = e.detach()
        aux = (o.aux_hat - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30)
    with torch.no_grad():
        nmse = (e.pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-30)).mean()
    return fvu + aux_alpha * aux, fvu, aux, nmse


def _init(sae: TopKSAE, store: ActivationStore, p: Plan, rf: RowFilter) -> float:
    """Tied random init; input scale and b_pre from a sample of training rows. Returns the scale."""
    hp = p.hparams
    sae.reset_parameters(torch.Generator().manual_seed(derive_seed(hp["seed"], -1)))
    g = torch.Generator().manual_seed(derive_seed(hp["seed"], -2))
    order = torch.randperm(len(p.train_chunks), generator=g).tolist()
    parts, have = [], 0
    for i in order:
        if have >= hp["init_sample"]:
            break
        c = p.train_chunks[i]
        parts.append(rf(c, store.read_chunk(p.layer, p.hook, c)).float())
        have += parts[-1].shape[0]
    x = sae.preprocess(torch.cat(parts)[: hp["init_sample"]])
    # scalar: one factor so the mean row norm is sqrt(d); folded into the saved weights
    scale = math.sqrt(x.shape[1]) / x.norm(dim=1).mean().item() if hp["normalize"] == "scalar" else 1.0
    x = x * scale
    with torch.no_grad():
        if hp["b_pre_init"] == "geometric_median":
            sae.b_pre.copy_(geometric_median(x))
        elif hp["b_pre_init"] == "mean":
            sae.b_pre.copy_(x.mean(0))
    return scale


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iterations: the point minimising the sum of distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * max(1.0, y.norm().item()):
            break
    return y.float()


@torch.no_grad()
def evaluate(sae: TopKSAE, x_raw: torch.Tensor, scale: float, batch: int,
             matmul_dtype: torch.dtype | None = None) -> dict:
    """FVU, normalised MSE, L0, and per-latent firing density on held-out rows (training space)."""
    dev = sae.W_enc.device
    n = sae.n_latents
    N = x_raw.shape[0]
    if N == 0:
        return {"fvu": float("nan"), "nmse": float("nan"), "explained_variance": float("nan"), "l0": 0.0,
                "dead_frac_eval": float("nan"), "eval_tokens": 0, "density": torch.zeros(n)}
    mean = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
    for i in range(0, N, batch):
        mean += (sae.preprocess(x_raw[i:i + batch].to(dev)) * scale).double().sum(0)
    mean /= N
    se = var = nmse = l0 = 0.0
    fires = torch.zeros(n, dtype=torch.long, device=dev)
    for i in range(0, N, batch):
        x = sae.preprocess(x_raw[i:i + batch].to(dev)) * scale
        o = sae.forward_train(x, matmul_dtype=matmul_dtype)
        e = x - o.x_hat
        se += e.double().pow(2).sum().item()
        var += (x.double() - mean).pow(2).sum().item()
        nmse += (e.pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-30)).sum().item()
        on = o.vals > 0
        l0 += on.sum().item()
        fires.scatter_add_(0, o.idx.reshape(-1), on.long().reshape(-1))
    fvu = se / max(var, 1e-30)
    return {"fvu": fvu, "nmse": nmse / N, "explained_variance": 1 - fvu, "l0": l0 / N,
            "dead_frac_eval": (fires == 0).float().mean().item(), "eval_tokens": N,
            "density": (fires.double() / N).cpu()}


# --------------------------------------------------------------------------- files
def _publish(work: Path, out: Path):
    """A saved work folder replaces `out`: the checkpoint (and any temp file) goes first,
    so the finished folder holds OUTPUTS only; the old SAE keeps the name until then."""
    with fsio.no_interrupt():
        for f in [work / CHECKPOINT, *work.glob("*.tmp")]:
            f.unlink(missing_ok=True)
        fsio.swap_dir(work, out)


def _checkpoint(out: Path, p: Plan, sae, opt, ema, step, cursor, scale, since_fired, rf, elapsed, log):
    state = {
        "format": 1, "fingerprint": p.fingerprint, "step": step, "cursor": cursor.as_list(), "scale": scale,
        "model": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
        "optimizer": opt.state_dict(),
        "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "since_fired": since_fired.cpu(), "rng": torch.get_rng_state(),
        "nonfinite": dict(rf.nonfinite), "elapsed": elapsed, "log": log,
    }
    tmp = out / (CHECKPOINT + ".tmp")
    # Ctrl-C inside torch.save surfaces as a RuntimeError: hold it until the write is whole.
    with fsio.no_interrupt():
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
        except (OSError, RuntimeError) as e:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)  # a torn temp file only takes the space a full disk lacks
            cause = e if isinstance(e, OSError) else e.__context__
            if isinstance(cause, OSError):  # torch wraps the failed write (disk full, EFBIG, read-only)
                raise cause from None
            raise
        fsio.publish(tmp, out / CHECKPOINT)  # a kill leaves either the old checkpoint or the new one


def _load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Plain tensors and containers only (weights_only): a checkpoint can't run code when loaded."""
    if mmap:  # cheap look at the fingerprint; fall back where mmap is not possible
        try:
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError:
            pass
    return torch.load(path, weights_only=True, map_location="cpu")


def _append(f, row: dict):
    f.write(json.dumps(row) + "\n")
    f.flush()


def _rewrite_metrics(out: Path, last_step: int):
    """Keep only rows up to the checkpoint being resumed (a killed run may have logged past it)."""
    path = out / "metrics.jsonl"
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by the kill
            if row.get("step", math.inf) <= last_step:
                keep.append(line + "\n")
    fsio.write_atomic(path, "".join(keep))


def _saved_cfg(store, p: Plan, scale, ev, tokens, seconds, dropped) -> dict:
    attrs = store.attrs
    return {
        "normalize": "layer_norm" if p.hparams["normalize"] == "layer_norm" else "none",  # what encode() applies
        "normalize_trained": p.hparams["normalize"],
        "input_scale": scale,  # already folded into the weights
        "model": attrs.get("model"), "revision": attrs.get("revision"), "layer": p.layer, "hook": p.hook,
        "dataset": attrs.get("dataset"), "context_size": store.context_size,
        "prepend_bos": attrs.get("prepend_bos"), "exclude_bos": p.hparams["exclude_bos"],
        "tokens_trained": tokens, "steps": p.hparams["n_steps"], "epochs": tokens / p.rows_per_epoch,
        "eval": ev, "eval_chunks": p.eval_chunks, "dropped_nonfinite": dropped, "train_seconds": seconds,
        "train": p.hparams, "fingerprint": p.fingerprint, "package_version": pipeline.__version__,
    }


def _plots(out: Path, p: Plan, density: torch.Tensor, n_eval: int):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tr = [r for r in rows if r["split"] == "train"]
    ev = [r for r in rows if r["split"] == "eval"]
    plots.line_plot(out / "loss.svg", {
        "train fvu": ([r["tokens"] for r in tr], [r["fvu"] for r in tr]),
        "train aux": ([r["tokens"] for r in tr], [r["aux_loss"] for r in tr]),
        "eval fvu": ([r["tokens"] for r in ev], [r["fvu"] for r in ev]),
    }, f"{p.name}: loss", "tokens", "fraction of variance unexplained", log_y=True)
    live = density[density > 0]
    lo = math.floor(math.log10(1 / max(n_eval, 1)))
    plots.histogram(out / "density.svg", torch.log10(live).tolist(), 50,
                    f"{p.name}: feature density on {n_eval} held-out tokens", "log10(fraction of tokens firing)",
                    lo=lo, hi=0.0, note=f"{int((density == 0).sum())} of {density.numel()} latents never fired")


def _announce(p: Plan, step: int, n_eval: int, dev):
    hp = p.hparams
    tokens = hp["n_steps"] * hp["batch_size"]
    epochs = tokens / p.rows_per_epoch
    held = f"{len(p.eval_chunks)} held out" if p.eval_chunks else "none held out: eval rows are training rows"
    msg = (f"train: {p.name}: d {p.fingerprint['d_in']}, n_latents {hp['n_latents']}, k {hp['k']}, "
           f"{hp['n_steps']} steps x {hp['batch_size']} tokens, lr {hp['lr']:.3g}, {dev.type}; "
           f"{p.rows_per_epoch} trainable tokens in {len(p.train_chunks)} chunks ({held}), "
           f"{n_eval} eval tokens")
    print(msg)
    if epochs > 1:
        print(f"train: {p.name}: the budget of {tokens} tokens is {epochs:.2f} epochs of the store "
              f"(train.n_tokens = {hp['n_tokens']}); rows repeat in a new order each epoch")
    if step:
        print(f"train: {p.name}: resuming from the checkpoint at step {step} of {hp['n_steps']}")

