"""What every dictionary is, whatever its architecture: the contract train, eval, collate,
steer, export and verify rely on, and the one owner of the rules they share.

A dictionary maps an activation x [B, d] to a few latents and back:

    encode(x)         -> (idx [B, w] int64, vals [B, w])   w latents a row at most; vals == 0: off
    decode(idx, vals) -> x_hat [B, d]                       in the space encode() works in
    reconstruct_raw(x)-> (x_hat [B, d] in x's own space, idx, vals)

Parameters every architecture has: W_enc [n, d], b_lat [n], W_dec [n, d], b_pre [d]
(an architecture may add its own). encode() applies the input normalisation the SAE was
trained with (`normalize`: none or layer_norm, per token); reconstruct_raw() undoes it, so
what it returns can replace x in the model. input_scale/preprocess/postprocess are the one
place that rule is written.

On disk (save/load) a finished SAE folder holds `sae.safetensors` (the parameters, float32),
`cfg.json` (`architecture`, `d_in`, `n_latents`, `normalize`, the architecture's own settings,
and whatever the trainer records) and, written last, the marker `done` with the weights' size
and sha256: a folder without it is not a finished SAE, and weights that do not match it are
refused. `pipeline.saes.load_sae` reads any architecture's folder.

Any architecture can be a transcoder (make_transcoder): it reads one hook and predicts
another (a block's mlp_in -> its mlp_out), with an optional skip connection:

    encode(x)          z from x as it is: center() subtracts no b_pre (b_pre is the output's bias)
    reconstruct_raw(x) -> (y_hat = decode(idx, vals) + W_skip preprocess(x), idx, vals)

Only the input is normalised (preprocess); the target is predicted in its own raw space (a
scalar the trainer applied is folded into the weights), so postprocess() leaves it as it is.
cfg.json records `transcoder`, `skip_connection` and, from the trainer, `target_hook`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import safetensors.torch
import torch
from torch import nn

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.paths import DONE

WEIGHTS = "sae.safetensors"
LN_EPS = 1e-5  # OpenAI's GPT-2 SAEs and SAELens both use (x - mean) / (std + 1e-5)


class Settings:
    """An architecture's `train.sae` section (a dataclass of config.setting fields, its own
    `architecture` first): the dictionary's own settings, apart from the trainer's."""
    architecture: str

    def validate(self, where):
        pass

    def model_keys(self) -> tuple[str, ...]:
        """The settings that define the dictionary itself (kept in cfg.json); the rest are training rules."""
        return ()

    def resolve(self, d_model: int, n_latents: int, batch_size: int, at: str, width: str) -> "Settings":
        """The settings with every default that depends on the data filled in; refuses (UserError,
        `at` leading the line) what does not fit the width (`width` says how it was reached)."""
        return self


class TrainOutput(NamedTuple):
    """One training forward's results, in the (normalised) training space."""
    x_hat: torch.Tensor  # [B, d] reconstruction
    idx: torch.Tensor  # [B, w] the latents kept
    vals: torch.Tensor  # [B, w] their activations, differentiable
    aux_hat: torch.Tensor | None  # [B, d] the dormant latents' reconstruction of the residual (no b_pre), or None


@dataclass
class TrainView:
    """What a training step shows the architecture besides the batch (pipeline.train builds it).

    settings      its train.sae section, every default resolved
    since_fired   [n] training tokens since each latent (of this rank's shard) last fired
    matmul_dtype  the dtype of the dense encoder matmul (None: the weights')
    global_sum    sums a tensor over the ranks that split the batch (identity for one process):
                  every loss denominator must be the whole batch's
    shard         pipeline.shard.Shard when the ranks split the latents, else None
    step, n_steps this step's index (0-based) and the run's length (for warm-ups and schedules)
    optimizer     the torch optimizer (after_step may reset a latent's state when it reinitialises it)
    n_dormant     set by train_forward: latents its dead-latent rule counts as dormant (for the log)

    A buffer an architecture registers (register_buffer, persistent) is part of its state_dict,
    so it is checkpointed, resumed and saved with the weights: running estimates (a BatchTopK
    threshold) belong there.
    """
    settings: Settings | None = None
    since_fired: torch.Tensor | None = None
    matmul_dtype: torch.dtype | None = None
    global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    shard: object | None = None
    step: int = 0
    n_steps: int = 1
    optimizer: object | None = None
    n_dormant: int = 0


def active_width(on: torch.Tensor) -> int:
    """The most True entries in any row of on [B, n] (at least 1): how wide the dictionaries whose rows
    fire unevenly (ReLU, Gated, JumpReLU) pad their [B, w] idx. On CPU numpy counts: torch widens the
    bools to int64 first, ~13x slower at [1024, 65536]."""
    if not on.shape[0]:
        return 1
    counts = on.numpy().sum(1, dtype=np.int32) if on.device.type == "cpu" else on.sum(1)
    return max(1, int(counts.max()))


def active_count(on: torch.Tensor) -> int:
    """How many entries of the bools `on` are True (numpy on CPU, as active_width)."""
    return int(np.count_nonzero(on.numpy()) if on.device.type == "cpu" else on.sum())


class Dictionary(nn.Module):
    """The base of every architecture (pipeline.saes registers each by its `architecture`)."""

    architecture: ClassVar[str]
    Settings: ClassVar[type]  # its train.sae section, a Settings dataclass
    # Export format -> the architecture's name there (pipeline.export); a format not listed cannot hold it.
    exports: ClassVar[dict[str, str]] = {}
    # The same for the architecture as a transcoder: format -> (its name there, with a skip connection).
    transcodes: ClassVar[dict[str, tuple[str, str]]] = {}
    shards: ClassVar[bool] = False  # train_forward handles view.shard (train.shard_latents)
    # Its sparsity holds without the training loss (a fixed k or threshold), so pipeline.finetune may
    # train it on the model's KL alone; a penalised one's L0 would drift.
    finetunes: ClassVar[bool] = False

    def __init__(self, d_in: int, n_latents: int, normalize: str = "none", backend: str = "auto"):
        super().__init__()
        self.d_in, self.n_latents = d_in, n_latents
        self.normalize = normalize  # what encode() does to its input: none | layer_norm
        self.backend = backend
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_lat = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.transcoder = False  # make_transcoder(): predicts another hook from this one
        self.register_parameter("W_skip", None)  # [d, d] a transcoder's skip connection, when it has one
        self.cfg: dict = {}

    # ---- what an architecture defines
    def settings(self) -> dict:
        """The architecture's own settings, as cfg.json records them and from_cfg reads them back."""
        raise NotImplementedError

    @classmethod
    def from_cfg(cls, d_in: int, n_latents: int, settings: dict, normalize: str = "none",
                 backend: str = "auto") -> "Dictionary":
        """An untrained SAE with these settings (cfg.json's keys; unknown ones are ignored)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_forward(self, x: torch.Tensor, view: TrainView) -> TrainOutput:
        """One differentiable forward on a batch already in training space (preprocessed, scaled);
        with a view of no settings (evaluation), without any auxiliary part."""
        raise NotImplementedError

    def train_loss(self, x: torch.Tensor, o: TrainOutput, fvu: torch.Tensor,
                   view: TrainView) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to minimise, its auxiliary term for the log) given the batch's FVU, whose
        denominator the trainer already made the whole batch's. Default: the FVU alone."""
        return fvu, torch.zeros((), device=x.device)

    def after_step(self, view: TrainView):
        """Called after every optimizer step: keeps the decoder rows at unit norm by default."""
        self.normalize_decoder()

    def calibrate(self, x: torch.Tensor) -> dict | None:
        """Re-fit the inference rule's one free scalar to rows x [N, d] in training space (already
        preprocessed), so that they keep the L0 the SAE was asked for on average, and return
        {"before": ..., "after": ...}; None (the default) when the rule has nothing to re-fit (a
        fixed k, or thresholds the training loss owns). pipeline.finetune calls it on each batch and
        at the end, since the encoder it moves no longer puts the pre-activations where the trained
        threshold was estimated."""
        return None

    def latent_groups(self) -> tuple[str, torch.Tensor] | None:
        """(what one group is called, [n] int64 each latent's group) when the architecture splits
        its latents into groups, numbered from 0 in latent order, each a contiguous run of latents
        (collate records each group's range and live/dead counts; the viewer shows and filters by
        them); None, the default, when it does not."""
        return None

    def export_extras(self, fmt: str) -> tuple[dict, dict]:
        """(tensors, cfg keys) the export format needs beyond W_enc, b_enc, W_dec, b_dec
        (pipeline.export): a threshold, gate biases, ...; a tensor given as None is left out
        (a format with no b_enc for this architecture). Default: none."""
        return {}, {}

    # ---- transcoders
    def make_transcoder(self, skip: bool = False) -> "Dictionary":
        """This dictionary as a transcoder (module docstring); with `skip`, a dense W_skip [d, d] that
        starts at zero. Call it before the optimizer sees the parameters."""
        self.transcoder = True
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_in, device=self.W_enc.device))
        return self

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x - b_pre for an SAE (b_pre is the data's centre), x itself for a
        transcoder (b_pre is the target's bias, in another space). Every architecture's encoder uses it."""
        return x if self.transcoder else x - self.b_pre

    def gather_b_pre(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the encoder's sparse gathers pass as kernels.encode_gather's `b_pre` for centred x:
        b_pre itself when x needs no gradient (training on stored activations, fine-tuning through a
        frozen model), so b_pre's share of the encoder's gradient is one pass over W_enc rather than
        a [B, d] gradient of x_c; None for a transcoder (its x is not centred) or an x that needs
        its own gradient."""
        return None if self.transcoder or x.requires_grad else self.b_pre

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """A transcoder's skip term W_skip x [B, d] for preprocessed x; 0 without one."""
        return 0.0 if self.W_skip is None else x @ self.W_skip.T

    def output_scale(self, y: torch.Tensor) -> torch.Tensor | float:
        """How much larger a raw activation y at the hook the decoder writes to is than decode()'s
        space: input_scale(y) for an SAE, 1 for a transcoder (its decoder writes the target's raw space)."""
        return 1.0 if self.transcoder else self.input_scale(y)

    # ---- the input normalisation, and the one place it is undone
    def input_scale(self, x: torch.Tensor) -> torch.Tensor | float:
        """How much larger raw x [.., d] is than what encode() sees: std(x) + LN_EPS per token
        under layer_norm, else 1. A decoder row (a steering direction) times it is in x's space."""
        return x.std(-1, keepdim=True) + LN_EPS if self.normalize == "layer_norm" else 1.0

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "layer_norm":
            x = x - x.mean(-1, keepdim=True)
            x = x / self.input_scale(x)
        return x

    def postprocess(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """preprocess()'s inverse: a reconstruction of preprocess(x) put back where raw x lives (a
        transcoder's output is already where its target lives)."""
        if self.normalize == "layer_norm" and not self.transcoder:
            x_hat = x_hat * self.input_scale(x) + x.mean(-1, keepdim=True)
        return x_hat

    @torch.no_grad()
    def reconstruct_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat [N, d], idx [N, w], vals [N, w]) for raw x [N, d], x_hat in x's own space (what
        eval splices into the model; decode(*encode(x)) is in the normalised space). A transcoder's
        x_hat is its prediction of the target hook, skip term included."""
        xf = x.float()
        idx, vals = self.encode(xf)
        x_hat = self.decode(idx, vals)
        if self.transcoder:
            return x_hat + self.skip(self.preprocess(xf)), idx, vals
        return self.postprocess(x_hat, xf), idx, vals

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations as a dense [B, n] tensor (zeros where off)."""
        idx, vals = self.encode(x)
        return torch.zeros(x.shape[0], self.n_latents, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)

    def decode_dense(self, acts: torch.Tensor) -> torch.Tensor:
        """x_hat from dense latents [B, n] (a plain matmul; for users, not training)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_pre

    # ---- the unit-norm decoder constraint
    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self):
        """Drop the part of each decoder row's gradient along the row (unit-norm constraint)."""
        g = self.W_dec.grad
        if g is None:
            return
        # vecdot builds the [rows, d] product before summing: a block of rows at a time keeps that
        # temporary small (a whole [n, d] one was the step's peak at large n), and a block of 128K
        # numbers is still in L2 when addcmul_ reads it again. Rows are independent.
        rows = max(1, (1 << 17) // g.shape[1])
        for lo in range(0, g.shape[0], rows):
            gb, wb = g[lo: lo + rows], self.W_dec[lo: lo + rows]
            gb.addcmul_(torch.linalg.vecdot(gb, wb).unsqueeze(1), wb, value=-1)

    def empty_like(self, n_latents: int | None = None) -> "Dictionary":
        """An SAE of the same architecture and settings (another width when given), on this one's device."""
        out = type(self).from_cfg(self.d_in, n_latents or self.n_latents, self.settings(), self.normalize,
                                  self.backend)
        if self.transcoder:
            out.make_transcoder(self.W_skip is not None)
        return out.to(self.W_enc.device)

    @torch.no_grad()
    def folded(self, scale: float, out_scale: float | None = None) -> "Dictionary":
        """A copy that takes raw x when this one was trained on x * scale (a transcoder: predicting
        its target times out_scale).

        z = W_enc (s x - b_pre) + b_lat = (s W_enc)(x - b_pre / s) + b_lat, and
        the reconstruction of x is x_hat / s. A transcoder's z = (s W_enc) x + b_lat and its
        prediction (W_dec f + b_pre + W_skip s x) / t.
        """
        t = scale if out_scale is None else out_scale
        out = self.empty_like()
        out.load_state_dict(self.state_dict())
        out.W_enc.mul_(scale)
        out.W_dec.div_(t)
        out.b_pre.div_(t)
        if out.W_skip is not None:
            out.W_skip.mul_(scale / t)
        out.cfg = dict(self.cfg)
        return out

    # ---- disk
    def save(self, folder, extra_cfg: dict | None = None):
        """Write sae.safetensors and cfg.json durably, then LAST the `done` marker.

        The marker records the weights' size and sha256, so a folder without
        it is unfinished and a torn or overwritten weights file is caught on load.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # What the weights are wins over a cfg loaded earlier: a loaded SAE may have been changed.
        cfg = {
            **self.cfg,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            **self.settings(),
            "normalize": self.normalize,
            **({"transcoder": True, "skip_connection": self.W_skip is not None} if self.transcoder else {}),
            **(extra_cfg or {}),
        }
        # Parameters and persistent buffers (running estimates such as a threshold) alike.
        tensors = {name: t.detach().float().contiguous().cpu() for name, t in self.state_dict().items()}
        blob = safetensors.torch.save(tensors)
        # The old marker goes first, so a kill mid-save leaves a folder that is not done;
        # Ctrl-C waits until the marker is written.
        with fsio.no_interrupt():
            (folder / DONE).unlink(missing_ok=True)
            fsio.write_atomic(folder / WEIGHTS, blob)
            fsio.write_atomic(folder / "cfg.json", json.dumps(cfg, indent=2))
            marker = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "format": 1}
            fsio.write_atomic(folder / DONE, json.dumps(marker))
        self.cfg = cfg


def saved_marker(folder) -> dict | None:
    """The `done` marker of a saved SAE folder ({"sha256", "bytes", ...}), None when absent or unreadable."""
    try:
        marker = json.loads((Path(folder) / DONE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("sha256"), str) and isinstance(marker.get("bytes"), int)
    return marker if ok else None


def trained(folder, layer: int, name: str) -> tuple[dict, dict]:
    """(marker, cfg.json) of the finished SAE in `folder` (saved_cfg's cheap check), else the one
    line a stage gives: which SAE (`name`: its hook, or hook@member), where it looked, what to run."""
    marker, cfg = saved_marker(folder), saved_cfg(folder)
    if marker is None or cfg is None:
        raise UserError(f"no trained SAE for layer {layer} hook {name} (looked in {folder}); train it first: "
                        f"saepipe train CONFIG --layers {layer}")
    return marker, cfg


def saved_cfg(folder) -> dict | None:
    """cfg.json of a finished folder (marker present, weights of the recorded size), else None.
    Cheap: no hashing, for deciding what is done; load_sae() and verify_saved() check the bytes."""
    folder = Path(folder)
    marker, cfg = saved_marker(folder), _read_cfg(folder)
    try:
        size = (folder / WEIGHTS).stat().st_size
    except OSError:
        return None
    return cfg if marker is not None and cfg is not None and size == marker["bytes"] else None


def verify_saved(folder) -> str | None:
    """None when `folder` holds a finished SAE whose weights match their recorded sha256;
    else one line saying what is wrong and how to fix it (for `saepipe verify`)."""
    try:
        read_checked(Path(folder))
    except UserError as e:
        return str(e)
    return None


def read_checked(folder: Path) -> tuple[bytes, dict]:
    """The weights' bytes and the cfg of a finished folder, checked against the marker."""
    weights = folder / WEIGHTS
    cfg = _read_cfg(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(f"no trained SAE in {folder}; train it first: saepipe train CONFIG --layers L")
    marker = saved_marker(folder)
    if marker is None:
        raise UserError(f"{folder} holds no finished SAE (its `{DONE}` marker is missing or unreadable); "
                        f"{retrain_hint(cfg)}")
    if cfg is None:
        raise UserError(f"{folder / 'cfg.json'} is missing or unreadable; {retrain_hint(cfg)}")
    try:
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{weights} is missing; {retrain_hint(cfg)}") from None
    if len(blob) != marker["bytes"]:
        raise UserError(f"{weights} is truncated or damaged ({len(blob)} bytes, {marker['bytes']} were saved); "
                        f"{retrain_hint(cfg)}")
    if hashlib.sha256(blob).hexdigest() != marker["sha256"]:
        raise UserError(f"{weights} is corrupt (its sha256 differs from the one saved with it); {retrain_hint(cfg)}")
    return blob, cfg


def _read_cfg(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def retrain_hint(cfg: dict | None) -> str:
    return f"retrain it: saepipe train CONFIG --layers {(cfg or {}).get('layer', 'L')} --force"
