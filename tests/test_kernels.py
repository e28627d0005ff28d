"""Tests for pipeline/kernels.py: Triton kernels (*_triton) vs their references (*_reference)
vs a dense formulation, and the autograd entry points (decode, encode_gather).

Runs the Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1,
set below before torch/triton/pipeline are imported); shapes stay small
because the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline import cpu_kernels as C  # noqa: E402
from pipeline import kernels as K  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

INTERPRET_OR_CUDA = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not (K.HAS_TRITON and INTERPRET_OR_CUDA), reason="needs triton (CUDA or TRITON_INTERPRET=1)"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]

HOT = 3  # a latent present in every row: one long run across many sorted segments


def make_idx(B, k, n, dtype=torch.int64, seed=0, hot=True):
    """[B, k] latent ids, distinct within a row, repeated across rows; latent HOT in every row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        row = torch.randperm(n, generator=g)[:k]
        if hot and HOT not in row:
            row[torch.randint(k, (1,), generator=g)] = HOT
        rows.append(row)
    return torch.stack(rows).to(dtype=dtype, device=DEVICE)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def dense_S(idx, vals, n):
    """The dense [B, n] matrix holding vals at the idx positions (test-only formulation)."""
    S = torch.zeros(idx.shape[0], n, dtype=torch.float64, device=idx.device)
    return S.scatter(1, idx.long(), vals.double())


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=2e-2, atol=3e-2)
    elif dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# Shapes (B, k, n, d): B is not a multiple of any block, n and d are not powers
# of two (d=40 is not a multiple of the 16-wide column blocks used below either).
SHAPES = [(37, 5, 70, 40), (37, 1, 70, 40), (9, 3, 11, 7)]
DTYPES = [torch.float32, torch.bfloat16]
IDX_DTYPES = [torch.int32, torch.int64]


# ----------------------------------------------------------------------------
# Triton kernels vs their references
# ----------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}k{}n{}d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
def test_decode_triton_vs_reference(shape, dtype, idx_dtype):
    B, k, n, d = shape
    idx = make_idx(B, k, n, idx_dtype)
    vals, W = randn(B, k, dtype=dtype, seed=1), randn(n, d, dtype=dtype, seed=2)
    ref = K.decode_reference(idx, vals, W)
    close(K.decode_triton(idx, vals, W), ref, dtype)
    close(K.decode_triton(idx, vals, W, block_b=8, block_d=16), ref, dtype)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}k{}n{}d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
def test_gather_dot_triton_vs_reference(shape, dtype, idx_dtype):
    B, k, n, d = shape
    idx = make_idx(B, k, n, idx_dtype)
    dense, W, bias = randn(B, d, dtype=dtype, seed=1), randn(n, d, dtype=dtype, seed=2), randn(n, dtype=dtype, seed=3)
    close(K.gather_dot_triton(dense, W, idx), K.gather_dot_reference(dense, W, idx), dtype)
    close(K.gather_dot_triton(dense, W, idx, bias, block_p=8, block_d=16),
          K.gather_dot_reference(dense, W, idx, bias), dtype)


# Scatter cases: (B, k, n, d, block_p, block_d).  Small segments (block_p=8)
# give runs inside one segment, runs crossing a boundary, and segments lying
# wholly inside the HOT run; the defaults give one segment per 32 pairs.
SCATTER_CASES = [(37, 5, 70, 24, 8, 16), (37, 5, 70, 24, None, None), (37, 1, 70, 24, 8, 16), (9, 3, 11, 7, 4, 4)]


@needs_triton
@pytest.mark.parametrize("case", SCATTER_CASES, ids=lambda c: "B{}k{}n{}d{}bp{}bd{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
def test_scatter_outer_triton_vs_reference(case, dtype, idx_dtype):
    B, k, n, d, bp, bd = case
    idx = make_idx(B, k, n, idx_dtype)
    vals, dense = randn(B, k, dtype=dtype, seed=1), randn(B, d, dtype=dtype, seed=2)
    kw = {} if bp is None else dict(block_p=bp, block_d=bd)
    got = K.scatter_outer_triton(idx, vals, dense, n, **kw)
    close(got, K.scatter_outer_reference(idx, vals, dense, n), dtype)
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[idx.long().reshape(-1)] = False
    assert (got[untouched] == 0).all()


@needs_triton
def test_scatter_outer_triton_out_dtype_and_unsorted_duplicates():
    # Weight grads come out in the requested dtype; every row hits the same
    # few latents, so runs are long and nearly every segment is shared.
    B, k, n, d = 29, 2, 5, 9
    g = torch.Generator().manual_seed(7)
    idx = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(B)]).to(DEVICE)
    vals, dense = randn(B, k, seed=4), randn(B, d, seed=5)
    got = K.scatter_outer_triton(idx, vals, dense, n, out_dtype=torch.bfloat16, block_p=4, block_d=8)
    assert got.dtype == torch.bfloat16
    close(got, K.scatter_outer_reference(idx, vals, dense, n, out_dtype=torch.bfloat16), torch.bfloat16)
    assert (got[3:] == 0).all()


@needs_triton
def test_triton_kernels_fp64():
    B, k, n, d = 13, 3, 17, 10
    idx = make_idx(B, k, n)
    vals, dense, W = randn(B, k, dtype=torch.float64), randn(B, d, dtype=torch.float64, seed=1), \
        randn(n, d, dtype=torch.float64, seed=2)
    close(K.decode_triton(idx, vals, W), K.decode_reference(idx, vals, W), torch.float64)
    close(K.gather_dot_triton(dense, W, idx), K.gather_dot_reference(dense, W, idx), torch.float64)
    close(K.scatter_outer_triton(idx, vals, dense, n, block_p=4, block_d=8),
          K.scatter_outer_reference(idx, vals, dense, n), torch.float64)


# ----------------------------------------------------------------------------
# References vs an independent dense formulation
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}k{}n{}d{}".format(*s))
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
def test_references_vs_dense(shape, idx_dtype):
    B, k, n, d = shape
    idx = make_idx(B, k, n, idx_dtype)
    vals, W, dense, bias = randn(B, k, seed=1), randn(n, d, seed=2), randn(B, d, seed=3), randn(n, seed=4)
    S = dense_S(idx, vals, n)                     # [B, n]
    W64, dense64 = W.double(), dense.double()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.decode_reference(idx, vals, W).double(), S @ W64, **tol)
    G = dense64 @ W64.T + bias.double()           # [B, n], then gathered at idx
    torch.testing.assert_close(K.gather_dot_reference(dense, W, idx, bias).double(), G.gather(1, idx.long()), **tol)
    torch.testing.assert_close(K.scatter_outer_reference(idx, vals, dense, n).double(), S.T @ dense64, **tol)
    torch.testing.assert_close(K.scatter_sum(idx, vals, n).double(), S.sum(0), **tol)


def test_references_bf16():
    B, k, n, d = 11, 3, 13, 6
    idx = make_idx(B, k, n)
    vals, W, dense = (randn(*s, dtype=torch.bfloat16, seed=i) for i, s in enumerate([(B, k), (n, d), (B, d)]))
    S = dense_S(idx, vals, n)
    for got, exp in [(K.decode_reference(idx, vals, W), S @ W.double()),
                     (K.gather_dot_reference(dense, W, idx), (dense.double() @ W.double().T).gather(1, idx)),
                     (K.scatter_outer_reference(idx, vals, dense, n), S.T @ dense.double())]:
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), exp, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 11, 7)], ids=lambda s: "B{}k{}n{}d{}".format(*s))
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cpu_paths_vs_dense(shape, idx_dtype, dtype):
    # The torch backend's sparse CSR products against the dense formulation; latent HOT repeats in every row.
    B, k, n, d = shape
    idx = make_idx(B, k, n, idx_dtype).cpu() if B else torch.zeros(0, k, dtype=idx_dtype)
    vals, W, dense, bias = (randn(*s, dtype=dtype, seed=i).cpu() for i, s in enumerate([(B, k), (n, d), (B, d), (n,)]))
    S = dense_S(idx, vals, n)
    got_g, got_s = K.gather_dot_cpu(dense, W, idx, bias), K.scatter_outer_cpu(idx, vals, dense, n)
    assert got_g.dtype == got_s.dtype == dtype and got_g.shape == (B, k) and got_s.shape == (n, d)
    want_g = (dense.double() @ W.double().T + bias.double()).gather(1, idx.long())
    want_s = S.T @ dense.double()
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}[dtype]
    torch.testing.assert_close(got_g.double(), want_g, **tol)
    torch.testing.assert_close(got_s.double(), want_s, **tol)
    assert got_s.is_contiguous()
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx.long().reshape(-1)] = False
    assert (got_s[untouched] == 0).all()


def test_encode_gather_takes_precomputed_values():
    # `pre` replaces the forward's gather (the caller's z already holds the values); the backward is unchanged.
    B, k, n, d = 9, 3, 11, 7
    idx = make_idx(B, k, n)
    x_c, W, b = (randn(*s, dtype=torch.float64, seed=i).requires_grad_() for i, s in enumerate([(B, d), (n, d), (n,)]))
    with torch.no_grad():
        pre = (x_c @ W.T + b).gather(1, idx)
    out = K.encode_gather(x_c, W, b, idx, backend="torch", pre=pre)
    ref = K.encode_gather(x_c, W, b, idx, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = randn(B, k, dtype=torch.float64, seed=9)
    grads = torch.autograd.grad(out, (x_c, W, b), g)
    want = torch.autograd.grad(ref, (x_c, W, b), g)
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pre has shape"):
        K.encode_gather(x_c, W, b, idx, backend="torch", pre=pre[:, :2])


def _dense_topk(x_c, W, b, k, cols=None):
    """The test's own top-k: the whole z in fp64, then a full sort (ids over `cols` if given)."""
    z = x_c.double() @ W.double().T + b.double()
    if cols is not None:
        z = z[:, cols]
    order = z.argsort(dim=1, descending=True)[:, :k]
    ids = order if cols is None else cols[order]
    return z.gather(1, order), ids


def _same_topk(vals, idx, want_vals, want_idx, atol):
    """Same latents in each row (in any order), each with its value."""
    order = idx.argsort(dim=1)
    got_idx, got_vals = idx.gather(1, order), vals.gather(1, order)
    w_order = want_idx.argsort(dim=1)
    assert torch.equal(got_idx.long().cpu(), want_idx.gather(1, w_order).long().cpu())
    torch.testing.assert_close(got_vals.double().cpu(), want_vals.gather(1, w_order).double().cpu(), rtol=0, atol=atol)


@pytest.mark.parametrize("block", [None, 1, 7, 16, 70])
def test_encode_topk_blocked_vs_dense(block):
    B, k, n, d = 37, 5, 70, 40
    x_c, W, b = randn(B, d, dtype=torch.float64), randn(n, d, dtype=torch.float64, seed=1), randn(n, dtype=torch.float64, seed=2)
    dormant = torch.tensor([0, 3, 4, 9, 10, 11, 40, 41, 69], device=DEVICE)  # blocks hold 0, 1 or several
    vals, idx, aux_vals, aux_idx = K.encode_topk_blocked(x_c, W, b, k, dormant, 4, block=block)
    _same_topk(vals, idx, *_dense_topk(x_c, W, b, k), atol=1e-12)
    _same_topk(aux_vals, aux_idx, *_dense_topk(x_c, W, b, 4, dormant), atol=1e-12)
    assert K.encode_topk_blocked(x_c, W, b, k, block=block)[2:] == (None, None)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU path")
@pytest.mark.parametrize("block", [None, 1024])
def test_encode_topk_blocked_with_the_bias_added_in_the_c_top_k(block):
    # fp32 on CPU, rows long enough for the C top-k: z holds x_c @ W.T only, the kernel adds b as it
    # reads, and the dormant set's columns get b added apart. The same latents as the dense fp64 top-k,
    # and the values of addmm's z within fp32 rounding; a NaN in a row sends the block to torch's rules.
    B, k, n, d = 33, 8, 2048, 40
    x_c, W, b = randn(B, d), randn(n, d, seed=1), randn(n, seed=2)
    dormant = torch.arange(5, n, 3)
    vals, idx, aux_vals, aux_idx = K.encode_topk_blocked(x_c, W, b, k, dormant, 6, block=block)
    dense = [t.double() for t in (x_c, W, b)]
    _same_topk(vals, idx, *_dense_topk(*dense, k), atol=1e-5)
    _same_topk(aux_vals, aux_idx, *_dense_topk(*dense, 6, dormant), atol=1e-5)
    # Without the C kernels (no compiler): z + b rounded the same way, so the same values, bit for bit.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "_LIB", [None])
        again = K.encode_topk_blocked(x_c, W, b, k, dormant, 6, block=block)
    for got, want in zip(again, (vals, idx, aux_vals, aux_idx)):
        assert torch.equal(got, want)
    x_c[4, 0] = float("nan")
    vals, idx, _, _ = K.encode_topk_blocked(x_c, W, b, k, block=block)
    assert torch.isnan(vals[4]).all()
    _same_topk(vals[5:], idx[5:], *_dense_topk(*(t[5:] if t.shape[0] == B else t for t in dense), k), atol=1e-5)


def test_encode_topk_one_block_is_the_unblocked_path():
    # The default block holds the anchor shape's z whole: bit for bit the old addmm + topk's latents
    # and values (in another order: neither sorts them), twice (the second z reuses the first's memory).
    B, k, n, d = 64, 8, 300, 24
    x_c, W, b = randn(B, d), randn(n, d, seed=1), randn(n, seed=2)
    ref_vals, ref_idx = K.encode_topk_reference(x_c, W, b, k)
    ref_idx, order = ref_idx.sort(1)
    for _ in range(2):
        vals, idx, _, _ = K.encode_topk_blocked(x_c, W, b, k)
        idx, j = idx.sort(1)
        assert torch.equal(idx, ref_idx) and torch.equal(vals.gather(1, j), ref_vals.gather(1, order))


@needs_triton
@pytest.mark.parametrize("shape", [(37, 5, 70, 40), (9, 1, 11, 7), (70, 16, 200, 33), (5, 11, 11, 3)],
                         ids=lambda s: "B{}k{}n{}d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_topk_triton_vs_dense(shape, dtype):
    # k = n, k not a power of two, n and d not multiples of the blocks, negative z throughout.
    B, k, n, d = shape
    x_c, W, b = randn(B, d, dtype=dtype), randn(n, d, dtype=dtype, seed=1), randn(n, seed=2)
    vals, idx = K.encode_topk_triton(x_c, W, b, k, block_b=16, block_n=16, block_d=16)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and vals.shape == idx.shape == (B, k)
    _same_topk(vals, idx, *_dense_topk(x_c, W, b, k), atol=1e-5 if dtype == torch.float32 else 1e-3)
    # Largest first, as tl.topk leaves them.
    assert (vals[:, :-1] >= vals[:, 1:]).all()


@needs_triton
def test_encode_topk_dispatch_aux_on_triton():
    B, k, n, d = 20, 4, 50, 16
    x_c, W, b = randn(B, d), randn(n, d, seed=1), randn(n, seed=2)
    dormant = torch.tensor([1, 2, 30, 31, 32, 49], device=DEVICE)
    vals, idx, aux_vals, aux_idx = K.encode_topk(x_c, W, b, k, backend="triton", aux_ids=dormant, k_aux=3)
    _same_topk(vals, idx, *_dense_topk(x_c, W, b, k), atol=1e-5)
    _same_topk(aux_vals, aux_idx, *_dense_topk(x_c, W, b, 3, dormant), atol=1e-5)


def test_keys_order_like_the_floats():
    v = torch.tensor([float("-inf"), -3e38, -2.5, -1e-30, -0.0, 0.0, 1e-30, 1.0, 7.5, 3e38, float("inf")])
    bits = v.view(torch.int32)
    keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() << 32) | torch.arange(len(v))
    assert torch.equal(keys.argsort(), torch.arange(len(v)))  # -0.0 before 0.0 by its id
    vals, ids = K._unpack_keys(keys)
    assert torch.equal(vals.view(torch.int32), bits) and torch.equal(ids, torch.arange(len(v)))
    assert keys[0].item() == K._MIN_KEY  # -inf with id 0, where the kernel starts every row


def test_reference_chunking(monkeypatch):
    # Force many small chunks in the references; results must not change.
    B, k, n, d = 20, 4, 15, 6
    idx = make_idx(B, k, n)
    vals, W, dense = randn(B, k), randn(n, d, seed=1), randn(B, d, seed=2)
    full = (K.gather_dot_reference(dense, W, idx), K.scatter_outer_reference(idx, vals, dense, n))
    monkeypatch.setattr(K, "_REF_CHUNK_ELEMS", 50)
    chunked = (K.gather_dot_reference(dense, W, idx), K.scatter_outer_reference(idx, vals, dense, n))
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------
# Autograd: a full training step vs the dense formulation, and gradcheck
# ----------------------------------------------------------------------------

def _params(B, d, n, dtype):
    x = randn(B, d, dtype=dtype, seed=10)
    p = dict(b_pre=randn(d, dtype=dtype, seed=11) * 0.1, W_enc=randn(n, d, dtype=dtype, seed=12) / d ** 0.5,
             b_lat=randn(n, dtype=dtype, seed=13) * 0.5 - 2.0, W_dec=randn(n, d, dtype=dtype, seed=14) / d ** 0.5)
    return x, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("b_pre_given", [False, True], ids=["grad-via-x_c", "grad-to-b_pre"])
def test_training_step_grads_match_dense(backend, dtype, b_pre_given):
    # b_pre_given: encode_gather is told x_c = x - b_pre, and gives b_pre its gradient directly
    B, d, n, k = 37, 24, 70, 5
    x, base = _params(B, d, n, dtype)
    sp = {name: t.clone().requires_grad_() for name, t in base.items()}
    dn = {name: t.clone().requires_grad_() for name, t in base.items()}

    # Sparse path: idx from a dense z computed without grad; autograd sees [B, k] only.
    x_c = x - sp["b_pre"]
    with torch.no_grad():
        z = x_c @ sp["W_enc"].T + sp["b_lat"]
    idx = z.topk(k, dim=1).indices
    vals = torch.relu(K.encode_gather(x_c, sp["W_enc"], sp["b_lat"], idx, backend=backend,
                                      b_pre=sp["b_pre"] if b_pre_given else None))
    assert (vals == 0).any() and (vals > 0).any()  # relu mask is exercised
    x_hat = K.decode(idx, vals, sp["W_dec"], backend=backend) + sp["b_pre"]
    loss = ((x - x_hat) ** 2).sum()
    loss.backward()

    # Dense path: full z, keep the same top-k positions, relu, dense matmul.
    z_d = (x - dn["b_pre"]) @ dn["W_enc"].T + dn["b_lat"]
    mask = torch.zeros_like(z_d).scatter(1, idx, 1.0)
    x_hat_d = (torch.relu(z_d) * mask) @ dn["W_dec"] + dn["b_pre"]
    loss_d = ((x - x_hat_d) ** 2).sum()
    loss_d.backward()

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, loss_d, **tol)
    for name in base:
        assert sp[name].grad is not None and sp[name].grad.dtype == dtype, name
        torch.testing.assert_close(sp[name].grad, dn[name].grad, **tol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    B, k, n, d = 6, 2, 7, 5
    idx = make_idx(B, k, n, torch.int32)
    vals = randn(B, k, dtype=torch.float64).requires_grad_()
    W = randn(n, d, dtype=torch.float64, seed=1).requires_grad_()
    x_c = randn(B, d, dtype=torch.float64, seed=2).requires_grad_()
    b = randn(n, dtype=torch.float64, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: K.decode(idx, v, w, backend=backend), (vals, W))
    assert torch.autograd.gradcheck(lambda x, w, bb: K.encode_gather(x, w, bb, idx, backend=backend), (x_c, W, b))
    b_pre = randn(d, dtype=torch.float64, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, bb, bp: K.encode_gather(x_c.detach() - bp, w, bb, idx, backend=backend,
                                                                      b_pre=bp), (W, b, b_pre))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_bf16_matches_dense_float64(backend):
    # bf16 in, bf16 grads out, and their values those of the dense formulation in
    # float64 over the same (bf16-exact) inputs, to bf16 accuracy.
    B, k, n, d = 10, 3, 12, 8
    idx = make_idx(B, k, n)
    W_enc, W_dec = (randn(n, d, dtype=torch.bfloat16, seed=s).requires_grad_() for s in (1, 2))
    b_lat = (randn(n, dtype=torch.bfloat16, seed=4) * 0.5).requires_grad_()
    x_c = randn(B, d, dtype=torch.bfloat16, seed=3).requires_grad_()
    vals = torch.relu(K.encode_gather(x_c, W_enc, b_lat, idx, backend=backend))
    out = K.decode(idx, vals, W_dec, backend=backend)
    assert vals.dtype == out.dtype == torch.bfloat16
    out.float().square().sum().backward()

    ref = {name: t.detach().double().requires_grad_() for name, t in
           dict(W_enc=W_enc, W_dec=W_dec, b_lat=b_lat, x_c=x_c).items()}
    z = ref["x_c"] @ ref["W_enc"].T + ref["b_lat"]
    mask = torch.zeros_like(z).scatter(1, idx, 1.0)
    out_ref = (torch.relu(z) * mask) @ ref["W_dec"]
    out_ref.square().sum().backward()
    assert (vals > 0).any() and (vals == 0).any()  # the relu mask is exercised
    torch.testing.assert_close(out.double(), out_ref.detach(), rtol=2e-2, atol=2e-2 * out_ref.abs().max().item())
    for name, t in dict(W_enc=W_enc, W_dec=W_dec, b_lat=b_lat, x_c=x_c).items():
        want = ref[name].grad
        assert t.grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(t.grad.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item(), msg=name)


# ----------------------------------------------------------------------------
# Backend dispatch
# ----------------------------------------------------------------------------

def test_resolve_backend(monkeypatch):
    assert K.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError):
        K.resolve_backend("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"  # off CUDA: torch, even when interpreting
    if K.HAS_TRITON:
        assert K.resolve_backend("triton", "cpu") == "triton"  # the interpreter serves explicit requests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(UserError) as err:
        K.resolve_backend("triton", "cpu", key="train.backend")
    assert str(err.value) == ("train.backend = triton needs a CUDA device (or TRITON_INTERPRET=1 for testing); "
                              "use train.backend=torch on CPU")
    monkeypatch.setattr(K, "HAS_TRITON", False)
    assert K.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(UserError) as err:
        K.resolve_backend("triton", "cuda")
    assert str(err.value) == "train.backend = triton but triton is not installed; use train.backend=torch"
    # The autograd entry points go through it too.
    with pytest.raises(UserError, match="triton is not installed"):
        K.decode(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1), torch.zeros(4, 3), backend="triton")


def test_bad_idx_rejected():
    W = torch.zeros(4, 3)
    with pytest.raises(TypeError):
        K.decode(torch.zeros(2, 2), torch.zeros(2, 2), W, backend="torch")
    with pytest.raises(ValueError):
        K.decode(torch.zeros(2, dtype=torch.int64), torch.zeros(2), W, backend="torch")


# --------------------------------------------------------------------------
# the CPU step's helpers: grouped top-k, the radix order by latent and its cache
# --------------------------------------------------------------------------

@pytest.mark.parametrize("B,m,k", [(7, 4096, 16), (5, 4096, 128), (3, 4608, 32), (4, 1000, 3), (6, 96, 40), (2, 37, 5),
                                   (3, 65536, 16)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fn", ["topk_rows", "topk_rows_torch"])
def test_topk_rows_is_topk(B, m, k, ties, fn):
    # The grouped top-k against torch.topk: the same values (the k largest, as a multiset, exactly),
    # each at the column it names, no column twice; ties from few distinct integer values. Where it
    # groups (m >= 16 k), largest first, as torch.topk leaves a small k on CPU (a decode sums in that order).
    g = torch.Generator().manual_seed(B * m + k)
    z = torch.randint(-4, 5, (B, m), generator=g).float() if ties else torch.randn(B, m, generator=g)
    z[0, : m // 3] = float("-inf")
    vals, idx = getattr(K, fn)(z, k)
    want = z.topk(k, dim=1).values
    assert vals.shape == idx.shape == (B, k) and idx.dtype == torch.int64
    assert torch.equal(vals.sort(1, descending=True).values, want)
    if m >= 16 * k and m % 4 == 0:
        assert torch.equal(vals, want)
    assert torch.equal(z.gather(1, idx), vals)
    assert all(len(set(row.tolist())) == k for row in idx)


@pytest.mark.parametrize("n", [11, 4096, 70_000, 300_000])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_latent_order_is_a_stable_sort(n, dtype):
    flat = torch.randint(0, n, (5000,), generator=torch.Generator().manual_seed(n), dtype=torch.int64).to(dtype)
    flat[::7] = n - 1  # many equal keys: stability shows
    order = K.latent_order(flat)
    assert order.dtype == torch.int64
    assert torch.equal(order, torch.sort(flat.long(), stable=True).indices)


def test_by_latent_is_cached_for_the_same_idx_only():
    n = 13
    idx = make_idx(9, 4, n).cpu()
    crow, rows, order = K.by_latent(idx, n)
    # latent m's pairs: their flat positions in row order, their rows, counted by crow
    for m in range(n):
        pos = order[crow[m]: crow[m + 1]]
        assert torch.equal(pos, (idx.reshape(-1) == m).nonzero().squeeze(1))
        assert torch.equal(rows[crow[m]: crow[m + 1]], pos // 4)
    assert K.by_latent(idx, n)[2] is order                      # the same tensor: built once
    same_values = idx.clone()
    assert K.by_latent(same_values, n)[2] is not order          # another tensor: built again
    idx[0] = idx[1]  # in place: its version moves on
    assert K.by_latent(idx, n)[2] is not order
    assert torch.equal(K.by_latent(idx, n)[0][-1], torch.tensor(idx.numel()))


def test_scatter_outer_cpu_writes_every_row(monkeypatch):
    # Its output starts as uninitialised memory (torch.empty, then addmm_ with beta = 0): rows no pair
    # touches must still come out as zeros, not what the memory held. NaN-filled "empty" memory shows it.
    B, k, n, d = 6, 2, 20, 5
    idx = make_idx(B, k, n, hot=False).cpu()
    vals, dense = randn(B, k).cpu(), randn(B, d, seed=1).cpu()
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = K.scatter_outer_cpu(idx, vals, dense, n)
    monkeypatch.undo()
    want = dense_S(idx, vals, n).T @ dense.double()
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
