"""CPU kernels in C (``cpu_kernels.c``), for the few steps torch has no fast op for.

Built on first use with the machine's C compiler (``$CC``, else ``cc``) at ``-O3 -march=native``
into ``cache_root()/cpu-kernels/`` (one library per source, compiler and CPU), loaded with ctypes.
Where there is no compiler, or ``SAEPIPE_CPU_KERNELS=0``, :func:`library` is None and every caller
keeps its torch path: these kernels change how fast, not what comes out (the screened top-k's values
are fp32 dots, so they may differ from the fp32 GEMM's in the last bits).

A call splits its rows over ``torch.get_num_threads()`` threads: ctypes releases the GIL for the
length of a foreign call, so Python threads run the C side by side.

* :func:`topk_rows` -- ``(z + bias).topk(k, dim=1)``, sorted, on fp32 CPU rows: 1.7-4.8x faster than
  torch's at the `bench/train.py --peers` grid's shapes (``bench/kernel_speed.py --topk``).
* :func:`to_bf16`, :func:`topk_screened` -- the encoder's top k of ``x @ W.T + bias`` from a bf16 GEMM
  (2.5x fp32's on a CPU with AVX512-BF16 or AMX): with x and W split exactly into bf16 parts and
  remainders, Cauchy-Schwarz bounds how far the bf16 GEMM's s can be from the fp32 z; only the
  latents whose upper bound reaches the k-th largest lower bound get an fp32 dot (about 1.5-2k of n),
  and their top k is the top k of the fp32 z over all latents. ``SAEPIPE_BF16_SCREEN=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")

_LOCK = threading.Lock()
_LIB: list = []  # [] not yet tried; [None] unavailable; [CDLL] loaded


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags (a home directory may be shared)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(cc: str) -> Path:
    """The library for this source, compiler and CPU, compiled unless the cache has it."""
    from pipeline.fsio import publish
    from pipeline.model import cache_root

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_root() / "cpu-kernels" / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise OSError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"{cc} exited {r.returncode}")
        publish(tmp, out)  # another process building the same library at once writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None (with one warning) where they cannot be built."""
    if _LIB:
        return _LIB[0]
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib = None
        if os.environ.get("SAEPIPE_CPU_KERNELS", "1") != "0":
            cc = os.environ.get("CC") or "cc"
            try:
                lib = ctypes.CDLL(str(_build(cc)))
            except (OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"saepipe: the C kernels of pipeline/cpu_kernels.c did not build with {cc!r} ({e}); "
                              "using torch's ops (slower on CPU, the same results)", RuntimeWarning, stacklevel=2)
        if lib is not None:
            P, I = ctypes.c_void_p, ctypes.c_int64
            lib.topk_rows_f32.argtypes = [P, P, I, I, I, P, P, I, I]
            lib.topk_rows_f32.restype = ctypes.c_int
            lib.bf16_rows.argtypes = [P, I, P, P, P, I, I]
            lib.bf16_rows.restype = ctypes.c_int
            lib.topk_screened.argtypes = [P, P, P, P, I, I, P, P, P, P, I, I, P, P, I, I]
            lib.topk_screened.restype = ctypes.c_int
        _LIB.append(lib)
        return lib


_POOL: dict = {}  # (pid, workers) -> executor: a forked child starts its own


def _over_rows(fn, args: tuple, rows: int, min_rows: int = 16) -> int:
    """fn(*args, lo, hi) over [0, rows) in torch.get_num_threads() parts at once; the OR of their returns."""
    parts = max(1, min(torch.get_num_threads(), rows // min_rows))
    if parts == 1:
        return fn(*args, 0, rows)
    key = (os.getpid(), parts - 1)
    pool = _POOL.get(key)
    if pool is None:
        pool = _POOL[key] = ThreadPoolExecutor(parts - 1, thread_name_prefix="saepipe-cpu")
    cuts = [rows * p // parts for p in range(parts + 1)]
    futures = [pool.submit(fn, *args, cuts[p], cuts[p + 1]) for p in range(1, parts)]
    status = fn(*args, cuts[0], cuts[1])
    for f in futures:
        status |= f.result()
    return status


def topk_groups(m: int, k: int) -> int:
    """How many runs topk_rows_f32 cuts a row of m into for a top k (0: too few columns for it).
    2k to 4k runs leave about k to 2k candidates; fewer than 64 cost more in candidates than they save."""
    G = 1 << max(63, 2 * k - 1).bit_length()
    return G if k >= 1 and m >= 8 * G else 0


def _kernel_inputs(*ts: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors (None: absent): at least one row, contiguous fp32 CPU
    tensors that autograd does not track (the kernels' outputs carry no gradient), the library built."""
    ts = [t for t in ts if t is not None]
    return (ts[0].shape[0] > 0 and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in ts)
            and library() is not None)


def topk_ready(z: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> bool:
    """Whether topk_rows takes (z, k, bias) (short of a NaN in them): _kernel_inputs, and a row long
    enough for its runs (topk_groups)."""
    return bool(topk_groups(z.shape[1], k)) and _kernel_inputs(z, bias)


def topk_rows(z: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """z [B, m], bias [m] or None -> (vals [B, k], idx [B, k] int64) = (z + bias).topk(k, dim=1) (largest
    first; among equal values, the smaller column first), or None where the kernel does not apply
    (topk_ready) or z + bias holds a NaN. The bias is added as z is read, never written into z."""
    B, m = z.shape
    if bias is not None and bias.shape != (m,):  # the kernel would read past its end
        raise ValueError(f"bias has shape {tuple(bias.shape)}, z's rows {m} columns")
    if not topk_ready(z, k, bias):
        return None
    vals = torch.empty(B, k, dtype=torch.float32)
    idx = torch.empty(B, k, dtype=torch.int64)
    args = (z.data_ptr(), None if bias is None else bias.data_ptr(), m, k, topk_groups(m, k), vals.data_ptr(),
            idx.data_ptr())
    status = _over_rows(library().topk_rows_f32, args, B)
    if status & 2:
        raise MemoryError(f"topk_rows_f32: no memory for a row's {2 * m} candidates")
    return None if status else (vals, idx)


def _fast_bf16_gemm() -> bool:
    """Whether torch's bf16 GEMM beats its fp32 one on this CPU (AVX512-BF16 or AMX: 2.5x at the
    grid's shapes; elsewhere bf16 is emulated, and slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def screen_ready(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the encoder's top-k of x @ W.T + bias can go through a bf16 GEMM (to_bf16, then
    topk_screened): contiguous fp32 CPU tensors that autograd does not track, the library built, a CPU
    whose bf16 GEMM is fast, d >= 128, and ``SAEPIPE_BF16_SCREEN`` not 0. Whether it pays: screen_pays."""
    if (os.environ.get("SAEPIPE_BF16_SCREEN", "1") == "0" or _SCREEN_BROKEN or x.shape[1] < 128
            or not _fast_bf16_gemm()):
        return False
    return _kernel_inputs(x, W, bias)


def screen_pays(m: int, d: int, k: int) -> bool:
    """Whether screening a row of m latents beats the fp32 GEMM at this d and k: the bf16 GEMM saves in
    proportion to m d, the screen costs about 1.5-2k dots of d and the sorts of as many keys a row.
    `kernel_speed.py --encoder` (m d / (k (d + 256)), the speed-up): n 4096, d 256, k 128: 16, 0.87x;
    n 4096, d 1024, k 128: 26, 1.21x; n 16384 a block, d 256, k 128: 64, 1.36x; n 4096, d 256, k 16:
    128, 1.26x."""
    return m * d >= 20 * k * (d + 256) and topk_groups(m, k) > 0


_SCREEN_BROKEN: list = []  # a dot broke the bound once: this torch's bf16 GEMM is not what it assumes


def to_bf16(a: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """a [r, d] fp32 contiguous -> (a in bf16, rounded to nearest even, [r, d]; norms [2, r] fp32: the
    2-norms of each row's bf16 part, then of a minus it, rounded up), or None at a value that is not
    finite. ``out``: a bf16 buffer of at least r * d elements to write into."""
    r, d = a.shape
    h = torch.empty(r, d, dtype=torch.bfloat16) if out is None else out[:r * d].view(r, d)
    norms = torch.empty(2, r, dtype=torch.float32)
    bad = _over_rows(library().bf16_rows, (a.data_ptr(), d, h.data_ptr(), norms[0].data_ptr(),
                                            norms[1].data_ptr()), r)
    return None if bad else (h, norms)


def topk_screened(s: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, W: torch.Tensor,
                  xn: torch.Tensor, wn: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """topk_rows(x @ W.T, k, bias) from s = xh @ Wh.T [B, m] bf16 (xh, Wh and the norms xn [2, B],
    wn [2, m] from to_bf16): the same latents and the fp32 values <x, W_j> + bias_j, each summed in one
    fixed order. Only the latents that s's error bound cannot rule out get an fp32 dot. None where a
    value is not finite, and where a dot broke its bound (s was not summed in fp32: one warning, and
    screen_ready is False from then on)."""
    B, m = s.shape
    d = x.shape[1]
    if W.shape != (m, d) or x.shape[0] != B or xn.shape != (2, B) or wn.shape != (2, m) or (
            bias is not None and bias.shape != (m,)) or not topk_groups(m, k):
        raise ValueError(f"topk_screened: s {tuple(s.shape)}, x {tuple(x.shape)}, W {tuple(W.shape)}, k {k}")
    vals = torch.empty(B, k, dtype=torch.float32)
    idx = torch.empty(B, k, dtype=torch.int64)
    args = (s.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), W.data_ptr(), m, d,
            xn[0].data_ptr(), xn[1].data_ptr(), wn[0].data_ptr(), wn[1].data_ptr(), k, topk_groups(m, k),
            vals.data_ptr(), idx.data_ptr())
    status = _over_rows(library().topk_screened, args, B)
    if status & 2:
        raise MemoryError(f"topk_screened: no memory for a row's {2 * m} candidates")
    if status & 4 and not _SCREEN_BROKEN:
        _SCREEN_BROKEN.append(True)
        warnings.warn("saepipe: an fp32 dot fell outside the error bound of torch's bf16 GEMM, so it does not "
                      "sum in fp32 here; the encoder's top-k takes the fp32 GEMM from now on", RuntimeWarning,
                      stacklevel=2)
    return None if status else (vals, idx)
