"""Sparse kernels for the TopK SAE: every product that touches only k of n latents.

Notation: ``B`` tokens, ``d`` = d_model, ``n`` latents, ``k`` latents per token.
``idx`` is an integer tensor ``[B, k]`` (int32 or int64) of latent ids; a latent
may appear in many rows but at most once per row.

Three products, each as a raw Triton launcher ``<product>_triton``, a plain
PyTorch ``<product>_reference`` (gathers and index_add_, the yardstick of the
tests; decode's is F.embedding_bag, already the fastest on CPU), and for the
other two a path for off CUDA, ``<product>_cpu``: torch's sparse CSR kernels
(MKL on CPU), which never build the [B, k, d] block of gathered rows the
references do (5-20x faster on CPU):

* ``decode``        out[b]    = sum_j vals[b,j] * W[idx[b,j]]              -> [B, d]
* ``gather_dot``    out[b,j]  = <dense[b], W[idx[b,j]]> (+ bias[idx[b,j]])  -> [B, k]
* ``scatter_outer`` out[m]    = sum_{(b,j): idx[b,j]=m} vals[b,j] * dense[b] -> [n, d]

plus ``scatter_sum`` (the bias gradient, [n]; torch only), and the encoder's
top-k without the dense [B, n] pre-activations (section 5):

* ``encode_topk``   (vals, idx) = top-k over m of x_c[b] . W[m] + b[m]       -> [B, k] x2

as ``encode_topk_triton`` (GEMM and running top-k fused in one kernel),
``encode_topk_blocked`` (torch, the latents a block at a time; on CPU each block's top-k in C,
pipeline/cpu_kernels.c, where a compiler built it, and where the CPU has a fast bf16 GEMM
(AVX512-BF16, AMX) z is screened in bf16 and only the latents its error bound cannot rule
out get an fp32 dot) and
``encode_topk_reference`` (the whole z, then topk). None of these take
part in autograd. The two autograd entry points, which sae.py calls, wire them
together and pick the backend:

* :func:`decode`        forward decode;     backward gather_dot and scatter_outer
* :func:`encode_gather` forward gather_dot; backward decode, scatter_outer, scatter_sum

Kernels accumulate in fp32 (fp64 when an input is fp64) and write the output
dtype (the promoted input dtype, or the dtype a caller asks for).

Backends (:func:`resolve_backend`, the one place that chooses): ``"torch"``
(the ``_cpu`` paths), ``"triton"`` (kernels; on CPU only under ``TRITON_INTERPRET=1``,
for tests), ``"auto"`` = Triton on a CUDA device, else torch.

Triton is imported lazily: only when a kernel is first needed is it imported
and are the kernels handed to ``triton.jit``.  So this module imports where
Triton is missing ("auto" then means torch), and ``TRITON_INTERPRET`` only has
to be set before the first kernel launch (the interpreter needs it set before
``import triton``, which importing this module does not do).
"""

from __future__ import annotations  # kernel annotations stay strings: no `tl` needed at import

import importlib.util
import math
import os
import threading
import warnings
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import cpu_kernels
from pipeline.errors import UserError

# Bound by _build() on first use; the kernel bodies look `tl` up at compile time.
triton = None
tl = None

HAS_TRITON = importlib.util.find_spec("triton") is not None  # installed (not yet imported)

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "resolve_backend",
    "decode",
    "encode_gather",
    "decode_triton",
    "decode_reference",
    "gather_dot_triton",
    "gather_dot_reference",
    "scatter_outer_triton",
    "scatter_outer_reference",
    "gather_dot_cpu",
    "scatter_outer_cpu",
    "scatter_sum",
    "encode_topk",
    "encode_topk_blocked",
    "topk_rows",
    "topk_rows_torch",
    "encode_topk_triton",
    "encode_topk_reference",
]

BACKENDS = ("auto", "triton", "torch")
_INT32_MAX = 2**31 - 1
# The references work on chunks of about this many elements so their
# temporaries stay bounded (~16 MB in fp32) whatever B, k and d are.
_REF_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------
# backend selection and small host-side helpers
# --------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device | str, key: str = "train.backend") -> str:
    """"torch" or "triton" for work on ``device``; ``key`` names the config entry in errors.

    "auto" is Triton on a CUDA device when Triton builds, else torch. The interpreter is
    for testing kernels, not for running them: off CUDA "auto" always means torch,
    whatever TRITON_INTERPRET says, while an explicit "triton" runs under it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and _triton_ready() else "torch"
    if not HAS_TRITON:
        raise UserError(f"{key} = triton but triton is not installed; use {key}=torch")
    if not (on_cuda or _interpreting()):
        raise UserError(f"{key} = triton needs a CUDA device (or TRITON_INTERPRET=1 for testing); "
                        f"use {key}=torch on CPU")
    return "triton"


def _check_idx(idx: torch.Tensor) -> None:
    if idx.dim() != 2:
        raise ValueError(f"idx must be [B, k], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor the kernels can address as ``base + row * stride(0) + col``."""
    if t.shape[-1] <= 1 or (t.stride(-1) == 1 and t.stride(0) >= t.shape[-1]):
        return t
    return t.contiguous()


def _extent(t: torch.Tensor) -> int:
    """Largest element offset a kernel may form for a 2-D row-addressed tensor (upper bound)."""
    return t.shape[0] * max(t.stride(0), t.shape[-1]) if t.dim() == 2 else t.numel()


def _needs_i64(*tensors: torch.Tensor) -> bool:
    """True when some element offset may not fit in int32 (then kernels do int64 index math)."""
    return max(_extent(t) for t in tensors) > _INT32_MAX


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------
# Triton kernels (plain functions here; jitted on first launch by _build())
# --------------------------------------------------------------------------

_TRITON_FN_NAMES: list[str] = []
_built = False
_build_error: Exception | None = None


def _triton_fn(fn):
    """Register ``fn`` to be replaced by ``triton.jit(fn)`` the first time kernels are needed."""
    _TRITON_FN_NAMES.append(fn.__name__)
    return fn


def _build() -> None:
    """Import triton and jit the kernels (once)."""
    global _built, triton, tl
    if _built:
        return
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl
    g = globals()
    for name in _TRITON_FN_NAMES:
        # Rebinding the module globals lets kernels find their jitted helpers by name.
        g[name] = triton.jit(g[name])
    _built = True


def _triton_ready() -> bool:
    """True when the kernels can be built; a broken triton install makes "auto" pick torch."""
    global _build_error
    if not HAS_TRITON or _build_error is not None:
        return False
    try:
        _build()
    except Exception as e:  # noqa: BLE001 - any import/jit failure means "use torch"
        _build_error = e
        return False
    return True


def _torch_to_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@_triton_fn
def _decode_kernel(
    idx_ptr, vals_ptr, w_ptr, out_ptr,
    B, K, D,
    stride_w, stride_out,
    ACC: tl.constexpr, I64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Embedding-bag decode: out[b, :] = sum_j vals[b, j] * W[idx[b, j], :].

    Shapes: idx [B, K] int32/int64 (contiguous), vals [B, K] (contiguous),
    W [n, D] (row stride ``stride_w``, unit column stride), out [B, D] (row
    stride ``stride_out``).  Grid: (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D)); each
    program owns a BLOCK_B x BLOCK_D tile of ``out`` and loops over the K
    latents of its rows, so every W row slice is read as one coalesced run
    along D and ``out`` is written exactly once (no atomics).  Accumulates in
    ``ACC`` (fp32, or fp64 for fp64 inputs); I64 switches offsets to int64.
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    tile_mask = rmask[:, None] & (cols < D)[None, :]
    if I64:
        rows = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC)
    for j in range(K):
        lat = tl.load(idx_ptr + rows * K + j, mask=rmask, other=0)
        if I64:
            lat = lat.to(tl.int64)
        else:
            lat = lat.to(tl.int32)
        v = tl.load(vals_ptr + rows * K + j, mask=rmask, other=0).to(ACC)
        w = tl.load(w_ptr + lat[:, None] * stride_w + cols[None, :], mask=tile_mask, other=0).to(ACC)
        acc += v[:, None] * w
    out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@_triton_fn
def _gather_dot_kernel(
    dense_ptr, w_ptr, idx_ptr, bias_ptr, out_ptr,
    P, K, D,
    stride_dense, stride_w,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, I64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """SDDMM at the sparse positions: out[b, j] = <dense[b, :], W[idx[b, j], :]> (+ bias[idx[b, j]]).

    Shapes: dense [B, D] (row stride ``stride_dense``), W [n, D] (row stride
    ``stride_w``), idx [B, K] contiguous, bias [n] (read only if HAS_BIAS),
    out [B, K] contiguous.  The B*K = P (row, slot) pairs are flattened; pair
    p is row p // K.  Grid: (cdiv(P, BLOCK_P),); each program owns BLOCK_P
    pairs and walks D in BLOCK_D-wide coalesced slices, keeping a
    [BLOCK_P, BLOCK_D] partial product and reducing it once at the end, so
    the reduction over D needs no atomics.  (Consecutive pairs share a dense
    row, so the repeated dense loads hit cache.)  Accumulates in ``ACC``.
    """
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    lat = tl.load(idx_ptr + p, mask=pmask, other=0)
    row = p // K
    if I64:
        lat = lat.to(tl.int64)
        row = row.to(tl.int64)
    else:
        lat = lat.to(tl.int32)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = pmask[:, None] & (cols < D)[None, :]
        x = tl.load(dense_ptr + row[:, None] * stride_dense + cols[None, :], mask=m, other=0).to(ACC)
        w = tl.load(w_ptr + lat[:, None] * stride_w + cols[None, :], mask=m, other=0).to(ACC)
        acc += x * w
    res = tl.sum(acc, axis=1)
    if HAS_BIAS:
        res += tl.load(bias_ptr + lat, mask=pmask, other=0).to(ACC)
    tl.store(out_ptr + p, res.to(out_ptr.dtype.element_ty), mask=pmask)


@_triton_fn
def _segmented_add(flag_a, val_a, flag_b, val_b):
    """Combine step of a segmented inclusive sum, for ``tl.associative_scan`` along axis 0.

    Shapes: all four [BLOCK_P, BLOCK_D] (flags int32, values ACC); returns
    (flag, value) of the same shapes. A flag marks the first element of a run,
    and a flagged right operand restarts the sum: value = val_b if flag_b else
    val_a + val_b, flag = flag_a | flag_b.
    """
    return flag_a | flag_b, tl.where(flag_b != 0, val_b, val_a + val_b)


@_triton_fn
def _scatter_outer_kernel(
    lat_ptr, row_ptr, val_ptr, dense_ptr, out_ptr,
    P, D,
    stride_dense, stride_out,
    ACC: tl.constexpr, I64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sparse-transpose times dense: out[m, :] += sum_{(b,j): idx[b,j]=m} vals[b, j] * dense[b, :].

    Inputs are the P = B*K (row, slot) pairs sorted by latent: lat [P] (sorted
    latent ids), row [P] (source row b of each pair), val [P] (vals[b, j]);
    dense [B, D] (row stride ``stride_dense``); out [n, D] (row stride
    ``stride_out``, dtype ``ACC``) must be zero on entry.

    Grid: (cdiv(P, BLOCK_P), cdiv(D, BLOCK_D)).  Each program takes one
    segment of BLOCK_P consecutive sorted pairs and one BLOCK_D slice of
    columns -- the same amount of work whatever the latent frequencies.  It
    loads the gathered dense rows scaled by their values, and a segmented
    inclusive scan along the pairs sums each run of equal latents (in ACC);
    the last lane of a run then holds that run's sum and writes it.

    Why this is race-free: a run that both starts and ends inside the segment
    (its first pair's predecessor and its last pair's successor in the global
    sorted list hold other latents) belongs to this program alone, so it is
    written with a plain store.  Only the first and last run of a segment can
    continue into a neighbouring segment; those (at most two rows per
    program) are added with atomics, and every other program touching such a
    row also reaches it through a boundary run, hence also atomically.
    Untouched rows stay zero.  Different column slices never overlap.
    """
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = pid_p * BLOCK_P
    lane = tl.arange(0, BLOCK_P)
    p = start + lane
    pmask = p < P
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D

    lat = tl.load(lat_ptr + p, mask=pmask, other=-1)
    prev = tl.load(lat_ptr + p - 1, mask=pmask & (p > 0), other=-1)
    nxt = tl.load(lat_ptr + p + 1, mask=(p + 1) < P, other=-1)
    row = tl.load(row_ptr + p, mask=pmask, other=0)
    v = tl.load(val_ptr + p, mask=pmask, other=0).to(ACC)
    if I64:
        row = row.to(tl.int64)
        safe_lat = tl.where(pmask, lat, 0).to(tl.int64)
    else:
        row = row.to(tl.int32)
        safe_lat = tl.where(pmask, lat, 0).to(tl.int32)

    tile_mask = pmask[:, None] & cmask[None, :]
    x = tl.load(dense_ptr + row[:, None] * stride_dense + cols[None, :], mask=tile_mask, other=0).to(ACC)
    x = x * v[:, None]

    global_end = lat != nxt                      # last pair of its run in the whole list
    run_start = (lat != prev) | (lane == 0)      # first pair of its run inside this segment
    run_end = global_end | (lane == BLOCK_P - 1)  # last pair of its run inside this segment
    flags = tl.broadcast_to(run_start.to(tl.int32)[:, None], (BLOCK_P, BLOCK_D))
    _, sums = tl.associative_scan((flags, x), 0, _segmented_add)

    # A run is shared when it continues into the next segment, or when it is
    # the segment's first run and continues from the previous one: since the
    # list is sorted, lat == (latent just before the segment) implies exactly
    # that.  (prev0 = -1 for the first segment, never a latent id.)
    prev0 = tl.load(lat_ptr + start - 1, mask=start > 0, other=-1)
    shared = (~global_end) | (lat == prev0)

    write = run_end & pmask
    out_ptrs = out_ptr + safe_lat[:, None] * stride_out + cols[None, :]
    own_mask = (write & ~shared)[:, None] & cmask[None, :]
    shared_mask = (write & shared)[:, None] & cmask[None, :]
    tl.store(out_ptrs, sums, mask=own_mask)
    tl.atomic_add(out_ptrs, sums, mask=shared_mask, sem="relaxed")


# --------------------------------------------------------------------------
# Default launch shapes.  Not yet timed on a GPU: they were picked from an
# ahead-of-time sm_90 compile so that each kernel (bf16 in, fp32 accumulate)
# uses ~80-100 registers per thread and no spills -- decode 16x128 tiles with
# 8 warps, gather_dot and scatter_outer 16x128 with 4 warps (32x128 with 4
# warps needed 128-250 registers).  Every *_triton function takes the block
# sizes and num_warps as keywords for benchmarks (bench/kernel_speed.py) and tests.
# --------------------------------------------------------------------------

# --------------------------------------------------------------------------
# 1. decode (embedding-bag)
# --------------------------------------------------------------------------

def decode_reference(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """idx [B, k], vals [B, k], W [n, d] -> out [B, d], out[b] = sum_j vals[b,j] * W[idx[b,j]].

    F.embedding_bag in the promoted dtype of vals and W.
    """
    _check_idx(idx)
    dt = _promote(vals.dtype, W.dtype)
    out_dtype = out_dtype or dt
    # embedding_bag wants weights and per-sample weights of one dtype; this
    # only copies W when the dtypes differ.
    out = F.embedding_bag(idx, W.to(dt), per_sample_weights=vals.to(dt), mode="sum")
    return out.to(out_dtype)


def decode_triton(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor,
                  out_dtype: torch.dtype | None = None, *,
                  block_b: int = 16, block_d: int | None = None, num_warps: int = 8) -> torch.Tensor:
    """idx [B, k], vals [B, k], W [n, d] -> out [B, d], out[b] = sum_j vals[b,j] * W[idx[b,j]].

    Launches ``_decode_kernel``.
    """
    _check_idx(idx)
    B, k = idx.shape
    n, d = W.shape
    out = torch.empty(B, d, dtype=out_dtype or _promote(vals.dtype, W.dtype), device=W.device)
    if B == 0 or d == 0 or k == 0:
        return out.zero_()
    _build()
    idx = idx.contiguous()
    vals = vals.contiguous()
    W = _rows(W)
    block_d = block_d or min(128, _next_pow2(d))
    grid = (_cdiv(B, block_b), _cdiv(d, block_d))
    _decode_kernel[grid](
        idx, vals, W, out, B, k, d, W.stride(0), out.stride(0),
        ACC=_torch_to_tl(_acc_dtype(vals.dtype, W.dtype)),
        I64=_needs_i64(W, out, idx),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------
# 2. gather_dot (SDDMM at the sparse positions)
# --------------------------------------------------------------------------

def gather_dot_reference(dense: torch.Tensor, W: torch.Tensor, idx: torch.Tensor,
                         bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dense [B, d], W [n, d], idx [B, k], bias [n] or None -> out [B, k],
    out[b,j] = <dense[b], W[idx[b,j]]> (+ bias[idx[b,j]]).

    Works on row chunks so the gathered [rows, k, d] block stays ~16 MB;
    accumulates in fp32 (fp64 for fp64 inputs).
    """
    _check_idx(idx)
    B, k = idx.shape
    d = W.shape[1]
    dts = (dense.dtype, W.dtype) + ((bias.dtype,) if bias is not None else ())
    acc_t = _acc_dtype(*dts)
    out = torch.empty(B, k, dtype=out_dtype or _promote(*dts), device=W.device)
    step = max(1, _REF_CHUNK_ELEMS // max(1, k * d))
    for s in range(0, B, step):
        ii = idx[s:s + step]
        w = W[ii].to(acc_t)                                   # [c, k, d]
        r = torch.bmm(w, dense[s:s + step].to(acc_t).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            r = r + bias[ii].to(acc_t)
        out[s:s + step] = r
    return out


def gather_dot_triton(dense: torch.Tensor, W: torch.Tensor, idx: torch.Tensor,
                      bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, *,
                      block_p: int = 16, block_d: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """dense [B, d], W [n, d], idx [B, k], bias [n] or None -> out [B, k],
    out[b,j] = <dense[b], W[idx[b,j]]> (+ bias[idx[b,j]]).

    Launches ``_gather_dot_kernel``.
    """
    _check_idx(idx)
    B, k = idx.shape
    d = W.shape[1]
    dts = (dense.dtype, W.dtype) + ((bias.dtype,) if bias is not None else ())
    out = torch.empty(B, k, dtype=out_dtype or _promote(*dts), device=W.device)
    P = B * k
    if P == 0:
        return out
    if d == 0:
        return out.copy_(bias[idx]) if bias is not None else out.zero_()
    _build()
    idx = idx.contiguous()
    dense = _rows(dense)
    W = _rows(W)
    if bias is not None:
        bias = bias.contiguous()
    block_d = block_d or min(128, _next_pow2(d))
    grid = (_cdiv(P, block_p),)
    _gather_dot_kernel[grid](
        dense, W, idx, bias if bias is not None else out, out,
        P, k, d, dense.stride(0), W.stride(0),
        HAS_BIAS=bias is not None,
        ACC=_torch_to_tl(_acc_dtype(*dts)),
        I64=_needs_i64(dense, W, out),
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------
# 3. scatter_outer (sparse^T x dense, the weight gradients) and scatter_sum
# --------------------------------------------------------------------------

def scatter_outer_reference(idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor, n: int,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """idx [B, k], vals [B, k], dense [B, d] -> out [n, d],
    out[m] = sum_{(b,j): idx[b,j]=m} vals[b,j] * dense[b]; untouched rows are zero.

    index_add_ over row chunks (temporaries ~16 MB), accumulating in fp32
    (fp64 for fp64 inputs).
    """
    _check_idx(idx)
    B, k = idx.shape
    d = dense.shape[1]
    acc_t = _acc_dtype(vals.dtype, dense.dtype)
    out = torch.zeros(n, d, dtype=acc_t, device=dense.device)
    step = max(1, _REF_CHUNK_ELEMS // max(1, k * d))
    for s in range(0, B, step):
        contrib = vals[s:s + step].to(acc_t).unsqueeze(-1) * dense[s:s + step].to(acc_t).unsqueeze(1)
        out.index_add_(0, idx[s:s + step].reshape(-1), contrib.reshape(-1, d))
    return out.to(out_dtype or _promote(vals.dtype, dense.dtype))


def scatter_outer_triton(idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor, n: int,
                         out_dtype: torch.dtype | None = None, *,
                         block_p: int = 16, block_d: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """idx [B, k], vals [B, k], dense [B, d] -> out [n, d],
    out[m] = sum_{(b,j): idx[b,j]=m} vals[b,j] * dense[b]; untouched rows are zero.

    Sorts the flattened (b, j) pairs by latent once, then launches
    ``_scatter_outer_kernel``, which adds into a zeroed fp32 (fp64) buffer;
    for another output dtype it is cast at the end, so bf16 weight grads
    cost one transient fp32 [n, d] buffer.
    """
    _check_idx(idx)
    B, k = idx.shape
    d = dense.shape[1]
    out_dtype = out_dtype or _promote(vals.dtype, dense.dtype)
    acc_t = _acc_dtype(vals.dtype, dense.dtype)
    out = torch.zeros(n, d, dtype=acc_t, device=dense.device)
    P = B * k
    if P == 0 or d == 0 or n == 0:
        return out.to(out_dtype)
    if P > _INT32_MAX:
        raise ValueError("B * k must fit in int32")
    _build()
    dense = _rows(dense)
    lat_sorted, order = torch.sort(idx.reshape(-1))
    vals_sorted = vals.reshape(-1)[order]
    rows_sorted = order // k
    i64 = _needs_i64(dense, out)
    if not i64:
        rows_sorted = rows_sorted.to(torch.int32)
    block_d = block_d or min(128, _next_pow2(d))
    grid = (_cdiv(P, block_p), _cdiv(d, block_d))
    _scatter_outer_kernel[grid](
        lat_sorted, rows_sorted, vals_sorted, dense, out,
        P, d, dense.stride(0), out.stride(0),
        ACC=_torch_to_tl(acc_t), I64=i64,
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out if out_dtype == acc_t else out.to(out_dtype)


def scatter_sum(idx: torch.Tensor, vals: torch.Tensor, n: int,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """idx [B, k], vals [B, k] -> out [n], out[m] = sum_{(b,j): idx[b,j]=m} vals[b,j] (the bias gradient).

    One index_add_ on every backend (it moves B*k numbers); fp32/fp64 accumulation.
    """
    _check_idx(idx)
    acc_t = _acc_dtype(vals.dtype)
    out = torch.zeros(n, dtype=acc_t, device=vals.device)
    out.index_add_(0, idx.reshape(-1), vals.reshape(-1).to(acc_t))
    return out.to(out_dtype or vals.dtype)


# --------------------------------------------------------------------------
# 4. the torch backend: sparse CSR products (off CUDA)
# --------------------------------------------------------------------------

def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, vals, size=size)


def _sparse_ok(*tensors: torch.Tensor) -> bool:
    """torch's CSR products, beyond CUDA: CPU tensors with at least one row and one latent a row."""
    return all(t.device.type == "cpu" and t.numel() > 0 for t in tensors)


def gather_dot_cpu(dense: torch.Tensor, W: torch.Tensor, idx: torch.Tensor,
                   bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dense [B, d], W [n, d], idx [B, k], bias [n] or None -> out [B, k],
    out[b,j] = <dense[b], W[idx[b,j]]> (+ bias[idx[b,j]]).

    torch.sparse.sampled_addmm: the dense product dense @ W.T evaluated only at
    the CSR pattern of idx, in fp32 (fp64 for fp64 inputs).
    """
    _check_idx(idx)
    if not _sparse_ok(dense, W, idx):
        return gather_dot_reference(dense, W, idx, bias, out_dtype)
    B, k = idx.shape
    dts = (dense.dtype, W.dtype) + ((bias.dtype,) if bias is not None else ())
    acc_t = _acc_dtype(*dts)
    # row b holds the k columns idx[b] in idx's order, so the product's values line up with idx
    crow = torch.arange(0, B * k + 1, k, dtype=idx.dtype)
    pattern = _csr(crow, idx.reshape(-1), torch.zeros(B * k, dtype=acc_t), (B, W.shape[0]))
    out = torch.sparse.sampled_addmm(pattern, dense.to(acc_t), W.to(acc_t).T, beta=0.0).values().view(B, k)
    if bias is not None:
        out = out + bias[idx].to(acc_t)
    return out.to(out_dtype or _promote(*dts))


def latent_order(flat: torch.Tensor) -> torch.Tensor:
    """flat [N] latent ids (CPU, < 2**32) -> order [N] int64, the stable permutation that sorts them.

    numpy's radix sort on 16-bit digits (one pass below 65,536 latents, two above): 5-10x faster
    than torch.sort on these keys on CPU. Stable, so each latent's entries keep their row order and a
    product summed in that order is the same from run to run."""
    a = flat.contiguous().numpy()
    order = np.argsort((a & 0xFFFF).astype(np.uint16), kind="stable")
    if a.size and int(a.max()) >= 1 << 16:
        order = order[np.argsort((a[order] >> 16).astype(np.uint16), kind="stable")]
    return torch.from_numpy(order.astype(np.int64, copy=False))


# The last idx grouped by latent: a step's decode and encode backward scatter over the same idx
# (gated: three products), and the sort is the costly part of building the CSR. The entry holds a
# weak reference, so an idx that is freed (and a new one at its address) never matches.
_BY_LATENT: list = [None]


def by_latent(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx [B, k] (CPU) -> (crow [n + 1], rows [B*k], order [B*k]): idx's pairs grouped by latent,
    CSR style. Latent m's pairs are order[crow[m]:crow[m + 1]] (flat positions b * k + j, by row),
    and rows holds their b. Cached for the idx tensor last asked (same object, same version)."""
    try:
        key = (idx._version, n)
    except RuntimeError:  # an inference-mode tensor has no version: never cached
        key = None
    hit = _BY_LATENT[0]
    if key is not None and hit is not None and hit[0]() is idx and hit[1] == key:
        return hit[2]
    flat = idx.reshape(-1)
    order = latent_order(flat)
    crow = torch.zeros(n + 1, dtype=idx.dtype)
    crow[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    out = crow, (order // idx.shape[1]).to(idx.dtype), order
    if key is not None:
        _BY_LATENT[0] = (weakref.ref(idx), key, out)
    return out


def scatter_outer_cpu(idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor, n: int,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """idx [B, k], vals [B, k], dense [B, d] -> out [n, d],
    out[m] = sum_{(b,j): idx[b,j]=m} vals[b,j] * dense[b]; untouched rows are zero.

    The [n, B] CSR matrix of (idx, vals) (the pairs grouped by latent, by_latent) times dense,
    in fp32 (fp64 for fp64 inputs). Built directly rather than as the transpose of gather_dot's
    [B, n] pattern, which torch would convert through COO and copy out (2x slower).
    """
    _check_idx(idx)
    if not _sparse_ok(idx, dense):
        return scatter_outer_reference(idx, vals, dense, n, out_dtype)
    acc_t = _acc_dtype(vals.dtype, dense.dtype)
    crow, rows, order = by_latent(idx, n)
    S = _csr(crow, rows, vals.reshape(-1)[order].to(acc_t), (n, idx.shape[0]))
    # Written in place with beta = 0 (every row, untouched ones as zeros): `S @ dense` (or mm with
    # out=) builds its [n, d] result in a temporary and copies it, twice the memory and the time,
    # and zeros + addmm_ writes the [n, d] block twice (measured on torch 2.13's CPU path).
    out = torch.empty(n, dense.shape[1], dtype=acc_t).addmm_(S, dense.to(acc_t), beta=0)
    return out.to(out_dtype or _promote(vals.dtype, dense.dtype))


# --------------------------------------------------------------------------
# 5. encoder + top-k, never holding the dense pre-activations
# --------------------------------------------------------------------------
# The top-k of z = x_c @ W_enc.T + b_lat needs all of z, but not all at once:
# the latents are swept a block at a time and each row keeps a running top-k.
# At n = 131072 and B = 4096, z alone would be 2 GiB of fp32.

TOPK_BLOCK_BYTES = 64 << 20  # the torch path's [B, block] slab of z (the anchor shape's z fits whole)


def encode_topk_reference(x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_c [B, d], W [n, d], b [n] -> (vals [B, k], idx [B, k] int64): the k largest of
    z = x_c @ W.T + b in each row (in no particular order), from the whole z."""
    return torch.mm(x_c, W.T).add_(b).topk(k, dim=1, sorted=False)


def topk_rows(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, m] -> (vals [B, k], idx [B, k] int64): z.topk(k, dim=1, sorted=False), faster on CPU.

    An fp32 z on CPU goes to the C kernel where it is built (pipeline.cpu_kernels.topk_rows: the same
    bound as topk_rows_torch, with runs of columns, one pass and no gathers; 1.7-4.8x torch.topk at
    the grid's shapes), anything else, or where it is not, to topk_rows_torch."""
    fast = cpu_kernels.topk_rows(z, k)
    return fast if fast is not None else topk_rows_torch(z, k)


def topk_rows_torch(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_rows in torch ops, 1.4-3x faster than z.topk on CPU.

    The columns go in c groups' worth of strided slices, z.view(B, c, m / c): group j holds columns
    j, j + m/c, ... One vectorised max over the c slices gives each group's maximum; the k groups with
    the largest maxima hold k values >= the k-th of those maxima t, and every other group's values are
    <= t, so the k largest values of the row lie in those k groups (ties at t aside, where either choice
    is a top k). A top-k over the m / c maxima, then over the k * c candidates, replaces the one over m.
    c ~ sqrt(m / k) balances the two; too few columns a row (c < 4), another layout or off CPU: topk.
    """
    B, m = z.shape
    c = 1 << max(0, round(math.log2(math.sqrt(m / max(k, 1)))))
    while c > 1 and m % c:
        c //= 2
    if c < 4 or k < 1 or z.device.type != "cpu" or not z.is_contiguous():
        return z.topk(k, dim=1, sorted=False)
    g = m // c
    zz = z.view(B, c, g)
    gi = zz.amax(1).topk(k, dim=1, sorted=False).indices                      # [B, k] groups
    cand = zz.gather(2, gi.unsqueeze(1).expand(B, c, k)).view(B, c * k)      # cand[b, r*k + q] = z[b, r*g + gi[b, q]]
    # Largest first, the order torch.topk leaves on CPU: a sum over the k latents (decode) then adds
    # them in the same order as before, and as the latent-sharded step (which merges with topk) does.
    vals, j = cand.topk(k, dim=1, sorted=True)
    return vals, (j // k) * g + gi.gather(1, j % k)


def _merge(best, cand, k: int):
    """The k largest of two (vals, idx) candidate sets per row."""
    if best is None:
        return cand
    v, i = torch.cat([best[0], cand[0]], 1), torch.cat([best[1], cand[1]], 1)
    v, j = v.topk(min(k, v.shape[1]), dim=1, sorted=False)
    return v, i.gather(1, j)


# One slab of z kept per thread (CPU): the same memory each step, already mapped and partly still in
# cache. (Most of what it saved at first were page faults that pipeline.model.keep_freed_memory now
# prevents for every tensor; it is still 2-3% of a step at n 4096.) z never leaves
# encode_topk_blocked, so reusing it is safe.
_SLABS = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's flat buffer `name` of at least `numel` elements, kept from call to call (a fresh
    [B, block] tensor a step would fault its pages in again)."""
    buf = getattr(_SLABS, name, None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        setattr(_SLABS, name, None)  # the old one freed before the new one is allocated
        buf = torch.empty(numel, dtype=dtype)
        setattr(_SLABS, name, buf)
    return buf


def _slab(numel: int, x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """This thread's flat buffer of at least `numel` elements for z (None off CPU, for mixed dtypes,
    or under autograd, where z must be a fresh tensor)."""
    dt = x_c.dtype
    if x_c.device.type != "cpu" or W.dtype != dt or b.dtype != dt or (torch.is_grad_enabled() and (
            x_c.requires_grad or W.requires_grad or b.requires_grad)):
        return None
    return _buffer("z", numel, dt)


def encode_topk_blocked(x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int,
                        aux_ids: torch.Tensor | None = None, k_aux: int = 0, block: int | None = None):
    """encode_topk_reference's (vals, idx), plus the k_aux largest of z over the columns
    aux_ids [m] (sorted ids; None: no second set) as (aux_vals, aux_idx) with aux_idx
    latent ids, from one sweep over the latents `block` at a time (default: as many
    as keep a [B, block] slab within TOPK_BLOCK_BYTES). Never holds more of z than one
    slab; a single block is exactly the unblocked computation.

    On a CPU with a fast bf16 GEMM (cpu_kernels.screen_ready: fp32, d >= 128; where screen_pays)
    z comes from x_c and W rounded to bf16 (2.5x faster), bounded, and only the candidates it
    cannot rule out get z in fp32 (cpu_kernels.topk_screened): the top k of the fp32 z over all latents,
    each value one fp32 dot, so within fp32's rounding of the fp32 GEMM's (the two may choose
    differently only between latents whose z lie that close). A block whose dormant columns
    are over half of it takes the fp32 GEMM: screened, they would need one of their own."""
    B, n = x_c.shape[0], W.shape[0]
    if block is None:
        block = max(k, TOPK_BLOCK_BYTES // max(1, B * x_c.element_size()))
    best = aux = None
    slab = _slab(B * min(n, block), x_c, W, b)
    # Through the bf16 GEMM where it is fast: the same latents, each value an fp32 dot. xs: x_c in
    # bf16 with its norms, made for the first block that screens (False: x_c has a non-finite value).
    screen = slab is not None and cpu_kernels.screen_ready(x_c, W, b)
    xs = None
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        out = None if slab is None else slab[:B * (hi - lo)].view(B, hi - lo)
        found = z = None
        biased = True  # z, where there is one, holds the bias
        a = c = 0  # aux_ids[a:c]: this block's share
        if aux_ids is not None and k_aux > 0:
            a, c = torch.searchsorted(aux_ids, torch.tensor([lo, hi], device=aux_ids.device)).tolist()
        # screened, the dormant columns need a GEMM of their own: not worth it past half the block
        if screen and 2 * (c - a) <= hi - lo and cpu_kernels.screen_pays(hi - lo, x_c.shape[1], min(k, hi - lo)):
            xs = (cpu_kernels.to_bf16(x_c) or False) if xs is None else xs
            if xs:
                found = _screened_topk(x_c, xs, W[lo:hi], b[lo:hi], min(k, hi - lo), slab)
        if found is None and out is not None:
            # z = x_c @ W.T, the bias added after: by the C top-k as it reads z (addmm would first
            # broadcast it into all of z), else by one add. Both round z + b once, the same way: with
            # or without the C kernels the same latents and values (only exactly equal values may
            # come in another order).
            z = torch.mm(x_c, W[lo:hi].T, out=out)
            found = cpu_kernels.topk_rows(z, min(k, hi - lo), b[lo:hi])
            if found is None:
                z.add_(b[lo:hi])
            biased = found is None
        elif found is None:
            z = torch.addmm(b[lo:hi], x_c, W[lo:hi].T)
        v, i = found if found is not None else topk_rows_torch(z, min(k, hi - lo))
        best = _merge(best, (v, i + lo), k)
        if c > a:
            ids = aux_ids[a:c]
            if z is None:  # screened: no fp32 z, so these columns' own GEMM
                za = torch.mm(x_c, W[ids].T).add_(b[ids])
            else:
                za = z.index_select(1, ids - lo)
                if not biased:
                    za.add_(b[ids])
            v, j = topk_rows(za, min(k_aux, c - a))
            aux = _merge(aux, (v, ids[j]), k_aux)
        del z
    return (*best, *(aux if aux is not None else (None, None)))


def _screened_topk(x_c: torch.Tensor, xs: tuple[torch.Tensor, torch.Tensor], W: torch.Tensor, b: torch.Tensor,
                   k: int, slab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One block's top k of x_c @ W.T + b [B, m] through the bf16 GEMM (cpu_kernels.topk_screened), s
    written into the fp32 slab's memory; xs: cpu_kernels.to_bf16(x_c). None where W is not finite."""
    B, m = x_c.shape[0], W.shape[0]
    Ws = cpu_kernels.to_bf16(W, _buffer("wh", W.numel(), torch.bfloat16))
    if Ws is None:
        return None
    s = torch.mm(xs[0], Ws[0].T, out=slab.view(torch.bfloat16)[:B * m].view(B, m))
    return cpu_kernels.topk_screened(s, b, x_c, W, xs[1], Ws[1], k)


# Sortable int64 keys: a float32's bits made order-preserving as a signed int32 (negative floats
# get their 31 low bits flipped) in the high half, the latent id in the low half; the largest
# keys are the largest values, so tl.topk (values only) also carries the ids.
_MIN_KEY = -2139095041 * 2**32  # -inf with id 0: below every real key


@_triton_fn
def _encode_topk_kernel(
    x_ptr, w_ptr, b_ptr, key_ptr,
    B, N, D,
    stride_x, stride_w,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, MIN_KEY: tl.constexpr,
):
    """Fused encoder GEMM + running top-k: for each row b, the K largest of
    z[b, m] = <x[b], W[m]> + bias[m] over m < N, with z never written to memory.

    Shapes: x [B, D] (row stride ``stride_x``), W [N, D] (row stride ``stride_w``),
    both unit column stride, fp32/bf16/fp16; bias [N] fp32; key [B, K] int64 out,
    each kept z (fp32) and its latent id packed into one sortable key, largest
    first. K is a power of two <= BLOCK_N (tl.topk). Grid: (cdiv(B, BLOCK_B),):
    a program owns BLOCK_B rows and sweeps the latents BLOCK_N at a time; each
    [BLOCK_B, BLOCK_N] tile of z is accumulated over D in fp32, and its top K
    joins the running top K by one more top-K over the 2K candidates. Only the
    [B, K] keys reach memory. Tiles are widened to fp32 before tl.dot: IEEE
    (fp32 inputs) keeps exact fp32 products; 16-bit inputs go through tf32,
    whose 10-bit mantissa holds them exactly.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    best = tl.full((BLOCK_B, K), MIN_KEY, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ds[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ds[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        z = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
        z = tl.where(cmask[None, :], z, float("-inf"))
        bits = z.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (ordered.to(tl.int64) << 32) | cols[None, :].to(tl.int64)
        cand = tl.topk(keys, K)
        both = tl.reshape(tl.join(best, cand), (BLOCK_B, 2 * K))
        best = tl.topk(both, K)
    out = key_ptr + rows[:, None].to(tl.int64) * K + tl.arange(0, K)[None, :]
    tl.store(out, best, mask=rmask[:, None])


def _unpack_keys(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = (key >> 32).to(torch.int32)
    vals = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return vals, key & 0xFFFFFFFF


def encode_topk_triton(x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int,
                       block_b: int = 64, block_n: int = 64, block_d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_topk_reference's (vals [B, k] fp32, idx [B, k] int64) from the fused kernel."""
    _build()
    B, D = x_c.shape
    N = W.shape[0]
    if not 0 < k <= N:
        raise ValueError(f"k = {k} must be in 1..n_latents = {N}")
    K = _next_pow2(k)
    block_n = max(block_n, K)
    x_c = x_c if x_c.stride(1) == 1 else x_c.contiguous()
    W = W if W.stride(1) == 1 else W.contiguous()
    key = torch.empty(B, K, dtype=torch.int64, device=x_c.device)
    if B:
        ieee = x_c.dtype == torch.float32 and W.dtype == torch.float32
        _encode_topk_kernel[(_cdiv(B, block_b),)](
            x_c, W, b.float().contiguous(), key, B, N, D, x_c.stride(0), W.stride(0),
            K=K, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee, MIN_KEY=_MIN_KEY)
    vals, idx = _unpack_keys(key[:, :k])
    return vals, idx


def encode_topk(x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, backend: str = "auto",
                aux_ids: torch.Tensor | None = None, k_aux: int = 0):
    """(vals [B, k], idx [B, k], aux_vals [B, k_aux] or None, aux_idx [B, k_aux] or None):
    the k largest of z = x_c @ W.T + b per row, and the k_aux largest over the columns
    aux_ids (sorted latent ids), without z [B, n] in memory: encode_topk_blocked on the
    torch backend, the fused kernel on Triton (fp64 inputs take the blocked path; the
    aux set is a second launch over the rows W[aux_ids])."""
    if resolve_backend(backend, W.device) != "triton" or torch.float64 in (x_c.dtype, W.dtype):
        return encode_topk_blocked(x_c, W, b, k, aux_ids, k_aux)
    vals, idx = encode_topk_triton(x_c, W, b, k)
    aux_vals = aux_idx = None
    if aux_ids is not None and k_aux > 0 and len(aux_ids):
        aux_vals, j = encode_topk_triton(x_c, W.index_select(0, aux_ids), b.index_select(0, aux_ids),
                                         min(k_aux, len(aux_ids)))
        aux_idx = aux_ids[j]
    return vals.to(x_c.dtype), idx, aux_vals if aux_vals is None else aux_vals.to(x_c.dtype), aux_idx


# --------------------------------------------------------------------------
# autograd entry points (public API)
# --------------------------------------------------------------------------

class _DecodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, vals, W, backend):
        ctx.triton = resolve_backend(backend, W.device) == "triton"
        ctx.save_for_backward(idx, vals, W)
        return (decode_triton if ctx.triton else decode_reference)(idx, vals, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        idx, vals, W = ctx.saved_tensors
        gather_dot = gather_dot_triton if ctx.triton else gather_dot_cpu
        scatter_outer = scatter_outer_triton if ctx.triton else scatter_outer_cpu
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_vals = gather_dot(g, W, idx, out_dtype=vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_outer(idx, vals, g, W.shape[0], out_dtype=W.dtype)
        return None, grad_vals, grad_W, None


class _EncodeGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_c, W, b, idx, backend, pre, b_pre):
        ctx.triton = resolve_backend(backend, W.device) == "triton"
        ctx.save_for_backward(x_c, W, idx)
        ctx.b_dtype = None if b is None else b.dtype
        ctx.b_pre_dtype = None if b_pre is None else b_pre.dtype
        if pre is not None:
            return pre.clone()
        return (gather_dot_triton if ctx.triton else gather_dot_cpu)(x_c, W, idx, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x_c, W, idx = ctx.saved_tensors
        decode = decode_triton if ctx.triton else decode_reference
        scatter_outer = scatter_outer_triton if ctx.triton else scatter_outer_cpu
        n = W.shape[0]
        grad_x = grad_W = grad_b = grad_b_pre = None
        if ctx.needs_input_grad[0]:
            grad_x = decode(idx, g, W, out_dtype=x_c.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = scatter_outer(idx, g, x_c, n, out_dtype=W.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[6]:
            col = scatter_sum(idx, g, n, out_dtype=_acc_dtype(g.dtype))
            if ctx.needs_input_grad[2]:
                grad_b = col.to(ctx.b_dtype)
            if ctx.needs_input_grad[6]:
                # sum_b grad_x_c[b] = sum over the pairs of g * W[idx] = (g's sums by latent) @ W
                grad_b_pre = torch.mv(W.T.to(col.dtype), col).neg_().to(ctx.b_pre_dtype)
        return grad_x, grad_W, grad_b, None, None, None, grad_b_pre


def decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor,
           backend: str = "auto") -> torch.Tensor:
    """idx [B, k], vals [B, k], W_dec [n, d] -> x_hat [B, d], x_hat[b] = sum_j vals[b,j] * W_dec[idx[b,j]];
    differentiable in vals and W_dec.

    Backward given g [B, d]: grad_vals = gather_dot(g, W_dec, idx);
    grad_W_dec = scatter_outer(idx, vals, g, n) (only touched rows nonzero).
    """
    _check_idx(idx)
    return _DecodeFn.apply(idx, vals, W_dec, backend)


def encode_gather(x_c: torch.Tensor, W_enc: torch.Tensor, b_lat: torch.Tensor | None,
                  idx: torch.Tensor, backend: str = "auto", pre: torch.Tensor | None = None,
                  b_pre: torch.Tensor | None = None) -> torch.Tensor:
    """x_c [B, d], W_enc [n, d], b_lat [n] or None, idx [B, k] -> pre [B, k],
    pre[b,j] = <x_c[b], W_enc[idx[b,j]]> + b_lat[idx[b,j]] (gather_dot); differentiable
    in x_c, W_enc and b_lat.

    The caller picks ``idx`` (e.g. top-k of a dense z computed under no_grad)
    and applies relu afterwards. A caller whose z already holds these values at
    full precision passes them as ``pre`` [B, k] (z.gather(1, idx)): the forward
    then returns them instead of recomputing, and the backward is the same.
    Backward given g [B, k]:
    grad_x_c = decode(idx, g, W_enc); grad_W_enc = scatter_outer(idx, g, x_c, n);
    grad_b_lat = scatter_sum(idx, g, n) -- no dense [B, n] gradient is built.

    ``b_pre`` [d]: x_c is x - b_pre for an x that needs no gradient (an SAE on stored
    activations). x_c then gets no gradient, and b_pre gets the row sum of the one x_c would
    have got, -(scatter_sum(idx, g, n) @ W_enc): one pass over W_enc instead of decode's
    sparse product over every kept pair (at n 4096, d 1024, k 128: 1.3 ms instead of 8.5).
    """
    _check_idx(idx)
    if pre is not None and pre.shape != idx.shape:
        raise ValueError(f"pre has shape {tuple(pre.shape)}, idx {tuple(idx.shape)}")
    if b_pre is not None:
        x_c = x_c.detach()
    return _EncodeGatherFn.apply(x_c, W_enc, b_lat, idx, backend, pre, b_pre)
