"""The C kernels of pipeline/cpu_kernels.c against torch, and their build: cached, and optional."""

import os
import platform
import warnings

import pytest
import torch

from pipeline import cpu_kernels as C
from pipeline import kernels as K

needs_lib = pytest.mark.skipif(C.library() is None, reason="no C compiler on this machine")


def _reference(z: torch.Tensor, k: int):
    """z.topk(k) sorted, equal values by column: a stable descending sort's first k."""
    vals, idx = torch.sort(z, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


@needs_lib
@pytest.mark.parametrize("B,m,k", [(7, 4096, 16), (5, 4096, 128), (3, 4608, 32), (4, 1000, 3), (33, 16384, 32),
                                   (2, 65536, 64), (3, 517, 1), (2, 4100, 40)])
@pytest.mark.parametrize("data", ["normal", "ties", "constant"])
def test_topk_rows_is_a_stable_sorted_topk(B, m, k, data):
    # Runs whose width is not a multiple of 8 (m 1000, 517, 4100: the last run takes the tail), few
    # distinct values (ties broken by column), rows all one value (every column a candidate), +-inf.
    g = torch.Generator().manual_seed(B * m + k)
    if data == "normal":
        z = torch.randn(B, m, generator=g)
    elif data == "ties":
        z = torch.randint(-4, 5, (B, m), generator=g).float()
    else:
        z = torch.full((B, m), 0.5)
    z[0, : m // 3] = float("-inf")
    z[-1, m - 1] = float("inf")
    out = C.topk_rows(z, k)
    assert out is not None
    want = _reference(z, k)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert out[1].dtype == torch.int64


@needs_lib
@pytest.mark.parametrize("m,k", [(4096, 16), (4100, 40), (16384, 128)])
def test_topk_rows_adds_the_bias_as_it_reads(m, k):
    # (z + bias).topk without z + bias in memory: z is left as it was, and the values are the sums
    # z + bias rounded once, as torch's add rounds them.
    g = torch.Generator().manual_seed(m + k)
    z, bias = torch.randn(9, m, generator=g), torch.randn(m, generator=g)
    bias[::5] = 1.5  # ties made by the bias
    kept = z.clone()
    vals, idx = C.topk_rows(z, k, bias)
    want = _reference(z + bias, k)
    assert torch.equal(vals, want[0]) and torch.equal(idx, want[1]) and torch.equal(z, kept)
    bias[3] = float("nan")
    assert C.topk_rows(z, k, bias) is None
    with pytest.raises(ValueError, match="bias has shape"):
        C.topk_rows(z, k, bias[:-1])


@needs_lib
def test_topk_rows_threads_split_rows_without_changing_them():
    z = torch.randn(301, 8192, generator=torch.Generator().manual_seed(0))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.topk_rows(z, 24)
        torch.set_num_threads(2)
        two = C.topk_rows(z, 24)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0], z.topk(24, dim=1).values)


@needs_lib
def test_topk_rows_leaves_nan_and_other_inputs_to_torch():
    z = torch.randn(4, 4096, generator=torch.Generator().manual_seed(1))
    z[2, 77] = float("nan")
    assert C.topk_rows(z, 16) is None
    vals, idx = K.topk_rows(z, 16)  # the torch path: NaN ranks first, as in torch.topk
    assert torch.isnan(vals[2]).sum() == 1 and idx[2][torch.isnan(vals[2])].item() == 77
    assert torch.equal(vals[[0, 1, 3]], z[[0, 1, 3]].topk(16, dim=1).values)
    ok = torch.randn(4, 4096)
    assert C.topk_rows(ok.double(), 16) is None                     # not fp32
    assert C.topk_rows(ok.t().contiguous().t(), 16) is None          # not contiguous
    assert C.topk_rows(ok[:, :511], 16) is None                      # under 8 columns a run
    assert C.topk_rows(torch.randn(0, 4096), 16) is None
    tracked = ok.clone().requires_grad_()
    assert C.topk_rows(tracked, 16) is None                          # autograd would lose the values' grad
    vals, _ = K.topk_rows(tracked, 16)
    vals.sum().backward()
    assert tracked.grad.sum() == 4 * 16
    with torch.no_grad():
        assert C.topk_rows(tracked, 16) is not None


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """cpu_kernels with nothing loaded yet and its cache in tmp_path; the real one restored after."""
    monkeypatch.setenv("SAEPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "_LIB", [])
    return tmp_path


@needs_lib
def test_the_library_is_built_once_per_source_and_cpu(fresh_library, monkeypatch):
    lib = C.library()
    built = list((fresh_library / "cpu-kernels").glob("*.so"))
    assert lib is not None and len(built) == 1 and not list((fresh_library / "cpu-kernels").glob("*.tmp"))
    mtime = built[0].stat().st_mtime_ns
    assert C._build(os.environ.get("CC") or "cc") == built[0] and built[0].stat().st_mtime_ns == mtime
    monkeypatch.setattr(C, "_cpu_id", lambda: "another cpu")
    assert C._build(os.environ.get("CC") or "cc") != built[0]


def test_without_a_compiler_torch_does_the_work(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_library / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert C.library() is None
    z = torch.randn(3, 4096)
    assert C.topk_rows(z, 16) is None
    vals, idx = K.topk_rows(z, 16)
    assert torch.equal(vals, z.topk(16, dim=1).values) and torch.equal(z.gather(1, idx), vals)


def test_switched_off(fresh_library, monkeypatch):
    monkeypatch.setenv("SAEPIPE_CPU_KERNELS", "0")
    assert C.library() is None and not (fresh_library / "cpu-kernels").exists()


def test_a_failing_compile_leaves_no_file(fresh_library, monkeypatch):
    fake = fresh_library / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="error: no"):
        assert C.library() is None
    assert list((fresh_library / "cpu-kernels").iterdir()) == []


# ---- the encoder's top-k through a bf16 GEMM ---------------------------------------------------

def _operands(B, d, m, data, seed):
    g = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(B, d, generator=g), torch.randn(m, d, generator=g) / d ** 0.5, torch.randn(m, generator=g)
    if data == "near ties":  # every z within the bf16 GEMM's error of every other: all are candidates
        W = W[:1] + 1e-4 * W
        b = 1e-5 * b
    elif data == "scales":  # rows and latents 30 orders of magnitude apart, a bias that dwarfs some z
        x[::2] *= 1e-15
        x[1::3] *= 1e12
        W[::3] *= 1e-3
        b *= 1e-3
    return x, W, b


def _check_fp32_topk(x, W, b, k, vals, idx, ordered=True):
    """(vals, idx) is a top k of z = x @ W.T + b up to fp32 rounding: each value within fp32's error of
    its z in fp64, largest first (if ordered), and no latent left out whose z lies clearly above a kept
    one's; where the k-th and (k+1)-th z lie clearly apart, the same latents as fp64's."""
    z = x.double() @ W.double().T + (0 if b is None else b.double())
    scale = x.double().abs() @ W.double().abs().T + (0 if b is None else b.double().abs())
    tol = (x.shape[1] + 2) * 2.0 ** -23 * scale
    assert idx.dtype == torch.int64 and vals.dtype == torch.float32
    assert (vals.double() - z.gather(1, idx)).abs().le(tol.gather(1, idx)).all()
    assert not ordered or (vals[:, :-1] >= vals[:, 1:]).all()
    left = torch.ones_like(z, dtype=torch.bool).scatter_(1, idx, False)
    least = (z.gather(1, idx) + tol.gather(1, idx)).min(1, keepdim=True).values
    assert not (left & (z - tol > least)).any()
    want = z.topk(k, dim=1)
    clear = want.values[:, k - 1] - z.masked_fill(~left, -float("inf")).max(1).values > 2 * tol.max(1).values
    assert torch.equal(idx[clear].sort(1).values, want.indices[clear].sort(1).values)


@needs_lib
def test_to_bf16_splits_each_row_exactly():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 200, generator=g) * torch.logspace(-30, 30, 37).unsqueeze(1)
    a[0, :5] = torch.tensor([1e-39, -3e-40, 1.00390625, 1.01171875, 0.0])  # subnormals, ties to even
    h, norms = C.to_bf16(a)
    assert h.dtype == torch.bfloat16 and h.shape == a.shape and norms.shape == (2, 37)
    normal = a.abs() >= torch.finfo(torch.float32).tiny
    assert torch.equal(h[normal], a[normal].bfloat16())             # torch's round to nearest even
    assert (h[~normal] == 0).all()                                  # below FLT_MIN: zero, the rest in lo
    rest = a - h.float()
    assert torch.equal(h.double() + rest.double(), a.double())      # the split is exact
    for got, part in zip(norms, (h.double(), rest.double())):
        want = part.norm(dim=1)
        assert (got.double() >= want).all() and (got.double() <= want * (1 + 1e-5) + 1e-300).all()
    for bad in (float("nan"), float("inf"), 3.4e38):                # 3.4e38 rounds up to bf16's infinity
        a[5, 7] = bad
        assert C.to_bf16(a) is None


@needs_lib
@pytest.mark.parametrize("B,d,m,k", [(70, 128, 4096, 16), (33, 200, 4100, 40), (9, 1000, 2048, 128),
                                     (300, 576, 4608, 32), (5, 130, 1031, 1)])
@pytest.mark.parametrize("data", ["normal", "near ties", "scales"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_topk_screened_is_the_fp32_topk(B, d, m, k, data, with_bias):
    x, W, b = _operands(B, d, m, data, seed=B + d + m + k)
    b = b if with_bias else None
    xh, xn = C.to_bf16(x)
    Wh, wn = C.to_bf16(W)
    vals, idx = C.topk_screened(xh @ Wh.T, b, x, W, xn, wn, k)
    _check_fp32_topk(x, W, b, k, vals, idx)
    # each value is the one fixed-order fp32 dot: the same whichever thread and tile it fell in
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = C.topk_screened(xh @ Wh.T, b, x, W, xn, wn, k)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(again[0], vals) and torch.equal(again[1], idx)


@needs_lib
def test_topk_screened_refuses_what_it_cannot_vouch_for(monkeypatch):
    x, W, b = _operands(40, 256, 4096, "normal", seed=5)
    xh, xn = C.to_bf16(x)
    Wh, wn = C.to_bf16(W)
    s = xh @ Wh.T
    bad = b.clone()
    bad[9] = float("nan")
    assert C.topk_screened(s, bad, x, W, xn, wn, 16) is None        # a value that is not finite
    with pytest.raises(ValueError, match="topk_screened"):
        C.topk_screened(s, b[:-1], x, W, xn, wn, 16)
    # A GEMM that did not sum in fp32 (here: s off by far more than its bound) is caught on the
    # candidates' dots: one warning, and the fp32 GEMM from then on.
    monkeypatch.setattr(C, "_SCREEN_BROKEN", [])
    monkeypatch.setattr(C, "_fast_bf16_gemm", lambda: True)
    wrong = s.clone()
    wrong[:, ::2] += 0.5
    assert C.screen_ready(x, W, b)
    with pytest.warns(RuntimeWarning, match="error bound"):
        assert C.topk_screened(wrong, b, x, W, xn, wn, 16) is None
    assert not C.screen_ready(x, W, b)


@needs_lib
def test_screen_ready_only_where_it_pays_and_applies(monkeypatch):
    monkeypatch.setattr(C, "_fast_bf16_gemm", lambda: True)
    x, W, b = torch.randn(8, 128), torch.randn(512, 128), torch.randn(512)
    assert C.screen_ready(x, W, b) and C.screen_ready(x, W)
    assert not C.screen_ready(x[:, :127].contiguous(), W[:, :127].contiguous())  # d < 128
    assert not C.screen_ready(x.double(), W.double())
    assert not C.screen_ready(x, W.t().contiguous().t())
    with torch.enable_grad():
        assert not C.screen_ready(x, W.requires_grad_())
    monkeypatch.setenv("SAEPIPE_BF16_SCREEN", "0")
    assert not C.screen_ready(x, W.detach())
    monkeypatch.delenv("SAEPIPE_BF16_SCREEN")
    monkeypatch.setattr(C, "_fast_bf16_gemm", lambda: False)
    assert not C.screen_ready(x, W.detach())
    # where it pays: the measured shapes of kernel_speed.py --encoder
    assert C.screen_pays(4096, 256, 16) and C.screen_pays(4096, 1024, 128) and C.screen_pays(16384, 256, 128)
    assert not C.screen_pays(4096, 256, 128) and not C.screen_pays(100, 1024, 16)  # nor a row too short for runs


@needs_lib
@pytest.mark.parametrize("block", [None, 1024])
def test_encode_topk_blocked_through_the_bf16_gemm(monkeypatch, block):
    # The blocked encoder screens with the bf16 GEMM, the dormant set's columns get a GEMM of their
    # own, and a row with a NaN sends its block to the fp32 path and torch's rules.
    monkeypatch.setattr(C, "_fast_bf16_gemm", lambda: True)
    monkeypatch.setattr(C, "_SCREEN_BROKEN", [])
    screened = []
    real = C.topk_screened
    monkeypatch.setattr(C, "topk_screened", lambda *a: screened.append(1) or real(*a))
    B, k, n, d = 33, 8, 2048, 160
    x_c, W, b = _operands(B, d, n, "normal", seed=11)
    dormant = torch.arange(5, n, 3)
    vals, idx, aux_vals, aux_idx = K.encode_topk_blocked(x_c, W, b, k, dormant, 6, block=block)
    assert len(screened) == (1 if block is None else 2)
    _check_fp32_topk(x_c, W, b, k, vals, idx, ordered=False)
    _check_fp32_topk(x_c, W[dormant], b[dormant], 6, aux_vals, torch.searchsorted(dormant, aux_idx), ordered=False)
    monkeypatch.setenv("SAEPIPE_BF16_SCREEN", "0")       # the fp32 GEMM: the same latents
    plain = K.encode_topk_blocked(x_c, W, b, k, dormant, 6, block=block)
    assert torch.equal(plain[1], idx) and torch.equal(plain[3], aux_idx)
    torch.testing.assert_close(plain[0], vals, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("SAEPIPE_BF16_SCREEN")
    x_c[4, 0] = float("nan")
    vals, idx, _, _ = K.encode_topk_blocked(x_c, W, b, k, block=block)
    assert torch.isnan(vals[4]).all()
    _check_fp32_topk(x_c[5:], W, b, k, vals[5:], idx[5:], ordered=False)


@needs_lib
@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_the_kernels_without_avx512_give_the_same_answers(fresh_library, monkeypatch, march):
    # The scalar and AVX2 paths a CPU without AVX-512 (or without AVX) compiles: the same top-k.
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 -march targets")
    if "avx2" not in C._cpu_id() and march == "haswell":
        pytest.skip("this CPU runs no AVX2")
    x, W, b = _operands(20, 300, 4100, "normal", seed=2)
    z = (x @ W.T).contiguous()
    xh, xn = C.to_bf16(x)
    Wh, wn = C.to_bf16(W)
    s = xh @ Wh.T
    want_rows = C.topk_rows(z, 40, b)
    want_screened = C.topk_screened(s, b, x, W, xn, wn, 40)
    monkeypatch.setattr(C, "FLAGS", tuple(f if not f.startswith("-march") else f"-march={march}" for f in C.FLAGS))
    monkeypatch.setattr(C, "_LIB", [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if C.library() is None:
            pytest.skip(f"the compiler builds nothing for -march={march}")
    for got, want in zip(C.topk_rows(z, 40, b), want_rows):
        assert torch.equal(got, want)
    assert torch.equal(C.to_bf16(x)[0], xh) and torch.equal(C.to_bf16(x)[1], xn)
    vals, idx = C.topk_screened(s, b, x, W, xn, wn, 40)
    assert torch.equal(idx, want_screened[1])  # the values may differ in the last bit (another sum order)
    torch.testing.assert_close(vals, want_screened[0], rtol=1e-6, atol=1e-6)
