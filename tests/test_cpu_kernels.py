"""The C kernels of pipeline/cpu_kernels.c against torch, and their build: cached, and optional."""

import os

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
