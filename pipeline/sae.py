"""The TopK sparse autoencoder.

    z      = W_enc (x - b_pre) + b_lat          dense [B, n], never differentiated
    idx, v = top-k of z per row, v = relu(v)     [B, k]
    x_hat  = sum_j v_j W_dec[idx_j] + b_pre      [B, d]

Training picks `idx` from `z` without a graph, then recomputes the k chosen
pre-activations with `encode_gather`, so autograd only ever sees [B, k]
tensors and the sparse kernels in `pipeline.kernels` do every backward product.
AuxK does the same with the top `k_aux` dormant latents.

A saved SAE folder holds `sae.safetensors` (W_enc [n, d], b_lat [n],
W_dec [n, d], b_pre [d]), `cfg.json`, and last the marker `done` (the
weights' size and sha256): without it the folder is not a finished SAE. Scalar input normalisation is folded
into the weights at save time, so a saved SAE takes raw activations; per-token
layer norm cannot be folded and is applied by `encode` when cfg says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.paths import DONE

WEIGHTS = "sae.safetensors"

LN_EPS = 1e-5  # OpenAI's GPT-2 SAEs and SAELens both use (x - mean) / (std + 1e-5)
# AuxK runs as dense matmuls over the dormant columns while they number at most this many times k_aux
# (torch backend; on CPU the two paths cost the same near 4x, at d 384 and at d 768)
AUX_DENSE_RATIO = 4


class TrainOutput(NamedTuple):
    x_hat: torch.Tensor  # [B, d] reconstruction, in the (normalised) training space
    idx: torch.Tensor  # [B, k]
    vals: torch.Tensor  # [B, k], differentiable
    aux_hat: torch.Tensor | None  # [B, d] dormant latents' reconstruction of the residual (no b_pre)


class _DormantDecode(torch.autograd.Function):
    """AuxK's reconstruction from a few (m) dormant latents as dense matmuls over their columns.

    acts [B, m]: relu of the kept pre-activations, 0 elsewhere (from z, no graph); ids [m]: the latents;
    x_c [B, d]; W_enc, W_dec [n, d]; b_lat [n]  ->  acts @ W_dec[ids]  [B, d].
    The forward reuses z's values, so only the backward's four [B, m] x [m, d] products are paid; with
    dz = (g @ W_dec[ids].T) where acts > 0, the grads are W_dec[ids] += acts.T @ g, W_enc[ids] += dz.T @ x_c,
    b_lat[ids] += dz.sum(0) and x_c += dz @ W_enc[ids] (what autograd of the dense formulation gives)."""

    @staticmethod
    def forward(ctx, acts, ids, x_c, W_enc, b_lat, W_dec):
        W_d = W_dec.index_select(0, ids)
        ctx.save_for_backward(acts, ids, x_c, W_enc, W_d)
        ctx.n = W_dec.shape[0]
        return acts @ W_d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        acts, ids, x_c, W_enc, W_d = ctx.saved_tensors
        dz = (g @ W_d.T).mul_(acts > 0)
        grad_W_dec = grad_W_enc = grad_b = grad_x = None
        if ctx.needs_input_grad[5]:
            grad_W_dec = g.new_zeros(ctx.n, g.shape[1]).index_copy_(0, ids, acts.T @ g)
        if ctx.needs_input_grad[3]:
            grad_W_enc = g.new_zeros(ctx.n, g.shape[1]).index_copy_(0, ids, dz.T @ x_c)
        if ctx.needs_input_grad[4]:
            grad_b = g.new_zeros(ctx.n).index_copy_(0, ids, dz.sum(0))
        if ctx.needs_input_grad[2]:
            grad_x = dz @ W_enc.index_select(0, ids)
        return None, None, grad_x, grad_W_enc, grad_b, grad_W_dec


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, n_latents: int, k: int, normalize: str = "none", backend: str = "auto"):
        super().__init__()
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.normalize = normalize  # what encode() does to its input: none | layer_norm
        self.backend = backend
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_lat = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.cfg: dict = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Random unit decoder rows; encoder tied to the decoder."""
        w = torch.randn(self.n_latents, self.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_lat.zero_()

    # ---- the forward pieces, and the one place the input normalisation is undone
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
        """preprocess()'s inverse: a reconstruction of preprocess(x) put back where raw x lives."""
        if self.normalize == "layer_norm":
            x_hat = x_hat * self.input_scale(x) + x.mean(-1, keepdim=True)
        return x_hat

    @torch.no_grad()
    def reconstruct_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat [N, d], idx [N, k], vals [N, k]) for raw x [N, d], x_hat in x's own space (what
        eval splices into the model; decode(*encode(x)) is in the normalised space)."""
        xf = x.float()
        idx, vals = self.encode(xf)
        return self.postprocess(self.decode(idx, vals), xf), idx, vals

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations z [B, n] (for users and tests; training never backprops it)."""
        x = self.preprocess(x).to(self.W_enc.dtype)
        return (x - self.b_pre) @ self.W_enc.T + self.b_lat

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx [B, k] int64, vals [B, k]) with vals = relu(top-k of z), z never held whole
        (kernels.encode_topk: a block of latents at a time, or the fused kernel)."""
        from pipeline.kernels import encode_topk

        x = self.preprocess(x).to(self.W_enc.dtype)
        vals, idx, _, _ = encode_topk(x - self.b_pre, self.W_enc, self.b_lat, self.k, backend=self.backend)
        return idx, vals.clamp_min(0)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations as a dense [B, n] tensor (zeros off the top-k)."""
        idx, vals = self.encode(x)
        return torch.zeros(x.shape[0], self.n_latents, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)

    def decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """x_hat from (idx, vals), in the space after preprocess()."""
        from pipeline.kernels import decode

        return decode(idx, vals.to(self.W_dec.dtype), self.W_dec, backend=self.backend) + self.b_pre

    def decode_dense(self, acts: torch.Tensor) -> torch.Tensor:
        """x_hat from dense latents [B, n] (a plain matmul; for users, not training)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor):
        """Differentiable reconstruction of raw x: returns (x_hat, idx, vals, z_detached)."""
        from pipeline.kernels import encode_gather

        x = self.preprocess(x)
        x_c = x - self.b_pre
        with torch.no_grad():
            z = x_c @ self.W_enc.T + self.b_lat
            idx = z.topk(self.k, dim=-1, sorted=False).indices
        vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, idx, backend=self.backend))
        return self.decode(idx, vals), idx, vals, z

    def forward_train(self, x: torch.Tensor, dormant: torch.Tensor | None = None, k_aux: int = 0,
                      matmul_dtype: torch.dtype | None = None) -> TrainOutput:
        """One training forward on already-normalised x [B, d].

        `dormant` [n] bool marks latents eligible for AuxK; `k_aux` of them (the
        caller caps it at the number dormant) are kept per token. Only the dense
        z matmul runs in `matmul_dtype` (bf16 on GPU): the gathers recompute
        the chosen pre-activations in full precision. A full-precision z already
        holds them, and the gathers' forward takes them from it.
        """
        from pipeline.kernels import decode, encode_gather

        x_c = x - self.b_pre
        pre, idx, aux_pre, aux_idx, ids, low = self.topk_candidates(x_c, self.k, dormant, k_aux, matmul_dtype)
        if low:  # a low-precision z only picks the latents; the gathers recompute their values
            pre = aux_pre = None
        vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, idx, backend=self.backend, pre=pre))
        x_hat = decode(idx, vals, self.W_dec, backend=self.backend) + self.b_pre
        aux_hat = None
        if aux_pre is not None and self.backend == "torch" and ids.numel() <= AUX_DENSE_RATIO * k_aux:
            # Few dormant latents, many kept a row (k_aux ~ d/2): plain matmuls over the m dormant
            # columns beat the sparse products, which pay per kept latent what a GEMM pays per column.
            acts = torch.zeros(x.shape[0], ids.numel(), dtype=x.dtype, device=x.device)
            acts.scatter_(1, torch.searchsorted(ids, aux_idx), aux_pre.clamp_min(0))
            aux_hat = _DormantDecode.apply(acts, ids, x_c, self.W_enc, self.b_lat, self.W_dec)
        elif aux_idx is not None:
            aux_vals = torch.relu(encode_gather(x_c, self.W_enc, self.b_lat, aux_idx, backend=self.backend,
                                                pre=aux_pre))
            aux_hat = decode(aux_idx, aux_vals, self.W_dec, backend=self.backend)
        return TrainOutput(x_hat, idx, vals, aux_hat)

    @torch.no_grad()
    def topk_candidates(self, x_c: torch.Tensor, k: int, dormant: torch.Tensor | None, k_aux: int,
                        matmul_dtype: torch.dtype | None):
        """kernels.encode_topk of the centred batch x_c [B, d], z in `matmul_dtype` when it differs from
        x_c's: (pre [B, k], idx [B, k], aux_pre, aux_idx [B, k_aux] or None, ids, low). ids [m]: the
        dormant latents AuxK ranks (None without AuxK); low: z was computed in lower precision, so pre
        ranks the latents but is not their value."""
        from pipeline.kernels import encode_topk

        low = matmul_dtype is not None and matmul_dtype != x_c.dtype
        operands = (x_c, self.W_enc, self.b_lat)
        if low:
            operands = tuple(t.to(matmul_dtype) for t in operands)
        # The AuxK top-k runs over the dormant columns only (a top-k costs in proportion
        # to the columns it scans), in the same sweep over the latents as the main one.
        ids = dormant.nonzero().squeeze(1) if dormant is not None and k_aux > 0 else None
        pre, idx, aux_pre, aux_idx = encode_topk(*operands, k, backend=self.backend, aux_ids=ids, k_aux=k_aux)
        return pre, idx, aux_pre, aux_idx, ids, low

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
        # temporary small (a whole [n, d] one was the step's peak at large n). Rows are independent.
        rows = max(1, (1 << 22) // g.shape[1])
        for lo in range(0, g.shape[0], rows):
            gb, wb = g[lo: lo + rows], self.W_dec[lo: lo + rows]
            gb.addcmul_(torch.linalg.vecdot(gb, wb).unsqueeze(1), wb, value=-1)

    @torch.no_grad()
    def folded(self, scale: float) -> "TopKSAE":
        """A copy that takes raw x when this one was trained on x * scale.

        z = W_enc (s x - b_pre) + b_lat = (s W_enc)(x - b_pre / s) + b_lat, and
        the reconstruction of x is x_hat / s.
        """
        out = TopKSAE(self.d_in, self.n_latents, self.k, self.normalize, self.backend)
        out.W_enc.copy_(self.W_enc * scale)
        out.b_lat.copy_(self.b_lat)
        out.W_dec.copy_(self.W_dec / scale)
        out.b_pre.copy_(self.b_pre / scale)
        out.cfg = dict(self.cfg)
        return out.to(self.W_enc.device)

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
            "architecture": "topk",
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "normalize": self.normalize,
            **(extra_cfg or {}),
        }
        tensors = {name: p.detach().float().contiguous().cpu() for name, p in self.named_parameters()}
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

    @classmethod
    def load(cls, folder, device="cpu", backend: str = "auto") -> "TopKSAE":
        """The SAE in a finished folder; UserError (one line, how to fix) for anything less."""
        from pipeline.kernels import resolve_backend

        folder = Path(folder)
        blob, cfg = _read_checked(folder)
        backend = resolve_backend(backend, device, key="backend")
        try:
            sae = cls(cfg["d_in"], cfg["n_latents"], cfg["k"], cfg.get("normalize", "none"), backend=backend)
            sae.load_state_dict(safetensors.torch.load(blob))
        except (KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise UserError(f"{folder} does not hold a saepipe SAE ({str(e).splitlines()[0]}); "
                            f"{_retrain(cfg)}") from None
        sae.cfg = cfg
        return sae.to(device)


def saved_marker(folder) -> dict | None:
    """The `done` marker of a saved SAE folder ({"sha256", "bytes", ...}), None when absent or unreadable."""
    try:
        marker = json.loads((Path(folder) / DONE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("sha256"), str) and isinstance(marker.get("bytes"), int)
    return marker if ok else None


def saved_cfg(folder) -> dict | None:
    """cfg.json of a finished folder (marker present, weights of the recorded size), else None.
    Cheap: no hashing, for deciding what is done; load() and verify_saved() check the bytes."""
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
        _read_checked(Path(folder))
    except UserError as e:
        return str(e)
    return None


def _read_checked(folder: Path) -> tuple[bytes, dict]:
    """The weights' bytes and the cfg of a finished folder, checked against the marker."""
    weights = folder / WEIGHTS
    cfg = _read_cfg(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(f"no trained SAE in {folder}; train it first: saepipe train CONFIG --layers L")
    marker = saved_marker(folder)
    if marker is None:
        raise UserError(f"{folder} holds no finished SAE (its `{DONE}` marker is missing or unreadable); "
                        f"{_retrain(cfg)}")
    if cfg is None:
        raise UserError(f"{folder / 'cfg.json'} is missing or unreadable; {_retrain(cfg)}")
    try:
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{weights} is missing; {_retrain(cfg)}") from None
    if len(blob) != marker["bytes"]:
        raise UserError(f"{weights} is truncated or damaged ({len(blob)} bytes, {marker['bytes']} were saved); "
                        f"{_retrain(cfg)}")
    if hashlib.sha256(blob).hexdigest() != marker["sha256"]:
        raise UserError(f"{weights} is corrupt (its sha256 differs from the one saved with it); {_retrain(cfg)}")
    return blob, cfg


def _read_cfg(folder: Path) -> dict | None:
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _retrain(cfg: dict | None) -> str:
    return f"retrain it: saepipe train CONFIG --layers {(cfg or {}).get('layer', 'L')} --force"
