"""What a training run is between steps, and how it survives a kill.

    TrainState        everything a step depends on (weights, optimizer, EMA, dead-latent
                      counters, the loader's cursor, log sums, the RNG), as one checkpoint
    init_sample,      the first weights: tied random init, b_pre from the geometric median of
    init_weights      a sample drawn from the seed, the scalar input scale
    save_checkpoint,  atomic: a kill leaves the old checkpoint or the new one, never half of
    load_checkpoint   either; plain tensors only (weights_only), so loading runs no code
    rewrite_metrics   a resumed run's log cut back to its checkpoint
    publish           the finished work folder swapped in as the SAE

pipeline/train.py plans and runs the loop over these; a resumed run reloads the state and
draws the same batches (a pure function of seed and step), so it ends on the same weights
as an unbroken one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline import dist, fsio, optim
from pipeline.config import TrainConfig
from pipeline.loader import Cursor, derive_seed, read_rows
from pipeline.saes import Dictionary, build_sae
from pipeline.shard import Shard

if TYPE_CHECKING:
    from pipeline.train import Plan

CHECKPOINT = "checkpoint.pt"
# Adam steps a weight matrix inside the backward from this gradient size up (bytes): it keeps one
# [n, d] gradient alive instead of two. Below it the step after the backward was 3-6% faster while
# glibc still trimmed the heap at every free; since model.keep_freed_memory's fix the two differ by
# less than this machine's noise (1-4%, either way, from n 4096 to 65536), so the threshold is kept
# as it was and only memory argues for stepping inside the backward.
STEP_IN_BACKWARD_BYTES = 256 << 20


class TrainState:
    """Everything a training step depends on, checkpointed as one: weights, Adam, EMA, the dormant
    counters, the loader's cursor, the input scale, the log sums, the rows dropped, the RNG."""

    def __init__(self, tc: TrainConfig, d_in: int, device: torch.device, shard: Shard | None = None,
                 transcoder: bool = False):
        normalize = "layer_norm" if tc.normalize == "layer_norm" else "none"  # scalar is folded in, not applied
        # Latent sharding: this rank's n_latents / W latents (pipeline.shard); state_dict() and weights()
        # are then the one-process ones, which gather() collects on rank 0 into `full` first.
        self.shard, self.full = shard, None
        n = tc.n_latents if shard is None else shard.n_local
        self.sae = build_sae(tc.sae.architecture, d_in, n, dataclasses.asdict(tc.sae), normalize, tc.backend)
        if transcoder:  # before the optimizer sees the parameters: W_skip is one
            self.sae.make_transcoder(tc.skip_connection)
        self.sae = self.sae.to(device)
        self.ema = self.sae.empty_like(tc.n_latents) if tc.ema_decay else None
        self.opt = optim.make(tc.optimizer, self.sae.parameters(), tc.lr, tc.adam_betas, tc.adam_eps, tc.sf_beta)
        self.scale = 1.0  # inputs are multiplied by it (train.normalize = scalar)
        self.out_scale = 1.0  # a transcoder's targets are multiplied by it (init_weights)
        self.step = 0
        self.cursor = Cursor()  # where the next batch starts in the loader's row stream
        self.since_fired = torch.zeros(n, dtype=torch.long, device=device)  # tokens since last fired
        self.nonfinite: dict[int, int] = {}  # chunk -> NaN/Inf rows dropped (the RowFilter counts into it)
        self.log_sums = torch.zeros(4, device=device)  # loss, fvu, nmse, aux since the last train row
        self.log_from = 0  # the step of the last train row
        self._elapsed, self._since = 0.0, time.time()
        # From STEP_IN_BACKWARD_BYTES a gradient up, Adam steps each weight matrix inside the
        # backward, as soon as its gradient is whole, and frees that gradient: only one [n, d]
        # gradient is alive at a time (at n 131072, d 768 the two together were most of a step's
        # memory). Adam's update is per parameter, so this is the same arithmetic as one step after
        # the backward. Not for schedule-free (one shared step count) nor with grad_clip (it needs
        # every gradient first).
        self.hooks = []
        w = self.sae.W_dec
        if tc.optimizer == "adam" and not tc.grad_clip and w.numel() * w.element_size() >= STEP_IN_BACKWARD_BYTES:
            self.hooks = [w.register_post_accumulate_grad_hook(self._step_in_backward)
                          for w in (self.sae.W_dec, self.sae.W_enc)]

    def _step_in_backward(self, w: torch.nn.Parameter):
        if self.shard is None:  # a shard's rows already hold their whole gradient
            dist.all_reduce_(w.grad)
        if w is self.sae.W_dec:
            self.sae.remove_parallel_grad()
        others = [(q, q.grad) for q in self.sae.parameters() if q is not w]
        for q, _ in others:  # the optimizer steps every parameter holding a gradient: just this one now
            q.grad = None
        self.opt.step()
        for q, g in others:
            q.grad = g
        w.grad = None

    @property
    def elapsed(self) -> float:
        """Training seconds, over every process that ran this SAE."""
        return self._elapsed + time.time() - self._since

    def weights(self) -> Dictionary:
        """The SAE that eval sees and save writes: the EMA if kept, else for schedule-free the running
        average x with its decoder rows put back on the unit sphere (an average of unit rows is shorter),
        else the trained weights themselves. Sharded: the whole SAE gather() collected, on rank 0."""
        if self.shard is not None:
            return self.full["sae"]
        if self.ema is not None:
            return self.ema
        if not optim.is_schedule_free(self.opt):
            return self.sae
        avg = copy.deepcopy(self.sae)
        with torch.no_grad():
            for a, p in zip(avg.parameters(), self.sae.parameters()):
                a.copy_(self.opt.averaged(p))
        avg.normalize_decoder()
        return avg

    def gather(self):
        """Sharded: the one-process layout of the weights, Adam state and counters into `full` on rank 0, for
        weights() and state_dict(). Every rank calls it at the same point."""
        self.full = self.shard.gather(self.sae, self.opt, self.since_fired)

    def state_dict(self) -> dict:
        """In the one-process layout, sharded or not (a sharded state gather()s first)."""
        sae, opt, since_fired = ((self.sae, self.opt.state_dict(), self.since_fired) if self.shard is None else
                                 (self.full["sae"], self.full["optimizer"], self.full["since_fired"]))
        return {
            "sae": _cpu(sae), "ema": None if self.ema is None else _cpu(self.ema),
            "optimizer": opt, "scale": self.scale, "out_scale": self.out_scale, "step": self.step,
            "cursor": self.cursor.as_list(), "since_fired": since_fired.cpu(), "nonfinite": dict(self.nonfinite),
            "log_sums": self.log_sums.cpu(), "log_from": self.log_from, "elapsed": self.elapsed,
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict):
        """From the one-process layout (a shard takes its slice), whoever wrote it."""
        device = self.since_fired.device
        if self.shard is not None:
            state = self.shard.take(state)
        self.sae.load_state_dict(state["sae"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])  # moves the optimizer's state to the weights' device
        self.scale, self.step, self.cursor = state["scale"], state["step"], Cursor(*state["cursor"])
        self.out_scale = state.get("out_scale", 1.0)
        self.since_fired = state["since_fired"].to(device)
        self.nonfinite.clear()
        self.nonfinite.update(state["nonfinite"])
        self.log_sums, self.log_from = state["log_sums"].to(device), state["log_from"]
        self._elapsed, self._since = state["elapsed"], time.time()
        torch.set_rng_state(state["rng"])


def _cpu(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def init_sample(p: Plan, n: int) -> torch.Tensor:
    """The init sample: the first n rows of the training chunks in an order drawn from the seed. A
    smaller sample is the first rows of a larger one, so a sweep reads it once for every member."""
    rf = p.row_filter()
    g = torch.Generator().manual_seed(derive_seed(p.tc.seed, -2))
    order = torch.randperm(len(p.train_chunks), generator=g).tolist()
    parts, have = [], 0
    for i in order:
        if have >= n:
            break
        c = p.train_chunks[i]
        parts.append(rf(c, read_rows(p.store, p.layer, p.hook, p.target, c)).float())
        have += parts[-1].shape[0]
    return torch.cat(parts)[:n]


def init_weights(sae: Dictionary, p: Plan, sample: torch.Tensor) -> tuple[float, float]:
    """Tied random init; input scale and b_pre from the init sample (init_sample). Returns the
    scales of the inputs and of a transcoder's targets (the sample's rows are then pairs,
    pipeline.loader.read_rows): the target is never layer-normed, only scaled (unless
    normalize is none), and b_pre, its bias, starts at its centre."""
    tc = p.tc
    sae.reset_parameters(torch.Generator().manual_seed(derive_seed(tc.seed, -1)))
    rows = sample[: tc.init_sample]
    x = sae.preprocess(rows[:, :sae.d_in])
    # scalar: one factor so the mean row norm is sqrt(d); folded into the saved weights
    scale = _unit_scale(x) if tc.normalize == "scalar" else 1.0
    x, out_scale = x * scale, scale
    if sae.transcoder:
        # Nothing is subtracted from a transcoder's input (center), so its centre would push the same
        # few latents to the top for every token (93% dead on SmolLM2's mlp_in): the encoder bias
        # takes the centre off instead, b_lat = -W_enc c.
        with torch.no_grad():
            sae.b_lat.sub_(_centre(x, tc.b_pre_init).to(sae.W_enc) @ sae.W_enc.T)
            # The decoder starts at zero (as sparsify's transcoders): the first steps give every latent
            # the direction of the target it fired on, before the encoder learns which to pick. Tied
            # to the encoder, as an SAE starts, the few latents whose random rows happened to help
            # took every token (93% dead at 195 steps on SmolLM2's block 15).
            sae.W_dec.zero_()
        x = rows[:, sae.d_in:]
        out_scale = _unit_scale(x) if tc.normalize != "none" else 1.0
        x = x * out_scale
    with torch.no_grad():
        sae.b_pre.copy_(_centre(x, tc.b_pre_init))
    return scale, out_scale


def _centre(x: torch.Tensor, rule: str) -> torch.Tensor:
    """train.b_pre_init's centre of the rows x: their geometric median, mean, or zeros."""
    if rule == "geometric_median":
        return geometric_median(x)
    return x.mean(0) if rule == "mean" else torch.zeros(x.shape[1], dtype=x.dtype)


def _unit_scale(x: torch.Tensor) -> float:
    """The factor that makes the mean row norm of x sqrt(d)."""
    return math.sqrt(x.shape[1]) / x.norm(dim=1).mean().clamp_min(1e-30).item()


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


def publish(work: Path, out: Path):
    """A saved work folder replaces `out`: the checkpoint (and any temp file) goes first,
    so the finished folder holds OUTPUTS only; the old SAE keeps the name until then."""
    with fsio.no_interrupt():
        for f in [work / CHECKPOINT, *work.glob("*.tmp")]:
            f.unlink(missing_ok=True)
        fsio.swap_dir(work, out)


def save_checkpoint(path: Path, fingerprint: dict, state: TrainState):
    blob = {"format": 2, "fingerprint": fingerprint, "state": state.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    # Ctrl-C inside torch.save surfaces as a RuntimeError: hold it until the write is whole.
    with fsio.no_interrupt():
        try:
            with open(tmp, "wb") as f:
                torch.save(blob, f)
        except (OSError, RuntimeError) as e:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)  # a torn temp file only takes the space a full disk lacks
            cause = e if isinstance(e, OSError) else e.__context__
            if isinstance(cause, OSError):  # torch wraps the failed write (disk full, EFBIG, read-only)
                raise cause from None
            raise
        fsio.publish(tmp, path)  # a kill leaves either the old checkpoint or the new one


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Plain tensors and containers only (weights_only): a checkpoint can't run code when loaded."""
    if mmap:  # cheap look at the fingerprint; fall back where mmap is not possible
        try:
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError:
            pass
    return torch.load(path, weights_only=True, map_location="cpu")


def rewrite_metrics(work: Path, last_step: int):
    """Keep only rows up to the checkpoint being resumed from."""
    path = work / "metrics.jsonl"
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
