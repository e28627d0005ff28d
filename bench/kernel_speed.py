"""Benchmark the sparse kernels (pipeline/kernels.py) against their torch references.

    python bench/kernel_speed.py [--B 4096] [--d 768] [--n 32768] [--k 32] [--dtype bf16]
    python bench/kernel_speed.py --topk [--rounds 15]   # CPU: the step's top-k, C and torch
    python bench/kernel_speed.py --encoder [--rounds 11] # CPU: the encoder's top-k, bf16-screened or fp32

--topk times, at the `bench/train.py --peers` shapes, the top k of each row of z [B, n] three
ways, interleaved, each on a z just written by its GEMM as in a step (hot in cache): torch.topk,
kernels.topk_rows_torch (groups of strided columns, torch ops) and the C kernel
(pipeline.cpu_kernels.topk_rows); medians of --rounds, with the ratios.

--encoder times kernels.encode_topk_blocked (the encoder GEMM and top-k a training step runs) at
the grid's shapes, with its top-k screened through the bf16 GEMM and with the fp32 GEMM
(SAEPIPE_BF16_SCREEN=0), interleaved, on a freshly initialised SAE's W_enc and Gaussian inputs; it
prints how many latents a row's screen left as candidates, since that is what the fp32 dots cost.

On CUDA: times each Triton kernel and its torch reference and reports the
achieved GB/s against a simple bytes-moved estimate (each gathered row read
once, outputs written once; caches ignored).  On CPU: says that the kernels
need CUDA and times only the references, at small sizes.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402
from pipeline import kernels as K  # noqa: E402


def timeit(fn, reps):
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def topk(rounds: int) -> None:
    from pipeline import cpu_kernels

    if cpu_kernels.library() is None:
        raise SystemExit("bench/kernel_speed.py --topk: the C kernels did not build (is there a cc?)")
    shapes = [(1024, n, k) for n in (4096, 65536) for k in (16, 128)] + [(1024, 4096, 32), (1024, 4096, 64),
                                                                         (2048, 4608, 32), (1024, 16384, 32)]
    print(f"CPU, {torch.get_num_threads()} threads, medians of {rounds} rounds, ms")
    print("| B | n | k | torch.topk | topk_rows_torch | C | torch.topk / C | topk_rows_torch / C |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for B, n, k in shapes:
        g = torch.Generator().manual_seed(0)
        x, W, b = torch.randn(B, 256, generator=g), torch.randn(n, 256, generator=g) / 16, torch.zeros(n)
        fns = {"topk": lambda z: z.topk(k, dim=1, sorted=False), "torch": lambda z: K.topk_rows_torch(z, k),
               "c": lambda z: cpu_kernels.topk_rows(z, k)}
        z = torch.addmm(b, x, W.T)
        assert torch.equal(fns["c"](z)[0], z.topk(k, dim=1).values)
        ms = {name: [] for name in fns}
        for _ in range(rounds + 1):
            for name, fn in fns.items():
                z = torch.addmm(b, x, W.T)
                t = time.perf_counter()
                fn(z)
                ms[name].append(1e3 * (time.perf_counter() - t))
        med = {name: sorted(v[1:])[rounds // 2] for name, v in ms.items()}
        print(f"| {B} | {n} | {k} | {med['topk']:.2f} | {med['torch']:.2f} | {med['c']:.2f} | "
              f"{med['topk'] / med['c']:.2f}x | {med['torch'] / med['c']:.2f}x |", flush=True)


def encoder(rounds: int) -> None:
    from pipeline import cpu_kernels
    from pipeline.saes import build_sae

    print(f"CPU, {torch.get_num_threads()} threads, medians of {rounds} interleaved rounds, ms; "
          f"fast bf16 GEMM: {cpu_kernels._fast_bf16_gemm()}")
    print("| B | d | n | k | fp32 GEMM + C top-k | screened | fp32 / screened | candidates a row |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for B, d, n, k in [(1024, d, n, k) for n in (4096, 65536) for d in (256, 1024) for k in (16, 128)] + [
            (2048, 576, 4608, 32), (1024, 768, 16384, 32)]:
        torch.manual_seed(0)
        sae = build_sae("topk", d, n, {"k": k}, "none", "torch")
        x = torch.randn(B, d)
        with torch.no_grad():
            x_c, W, b = sae.center(x).contiguous(), sae.W_enc.detach(), sae.b_lat.detach()
            ms: dict[str, list[float]] = {"fp32": [], "screened": []}
            for i in range(rounds + 1):
                for name in ms:
                    os.environ["SAEPIPE_BF16_SCREEN"] = "0" if name == "fp32" else "1"
                    t = time.perf_counter()
                    K.encode_topk_blocked(x_c, W, b, k)
                    ms[name].append(1e3 * (time.perf_counter() - t))
            del os.environ["SAEPIPE_BF16_SCREEN"]
            cand = candidates(x_c[:256], W[: min(n, 16384)], b[: min(n, 16384)], k)
        med = {name: sorted(v[1:])[rounds // 2] for name, v in ms.items()}
        print(f"| {B} | {d} | {n} | {k} | {med['fp32']:.1f} | {med['screened']:.1f} | "
              f"{med['fp32'] / med['screened']:.2f}x | {cand:.0f} |", flush=True)


def candidates(x, W, b, k) -> float:
    """Mean candidates a row of x gets from topk_screened's bound (recomputed here in fp64 from the
    same bf16 split), over W's first block of latents."""
    from pipeline import cpu_kernels

    (xh, xn), (Wh, wn) = cpu_kernels.to_bf16(x), cpu_kernels.to_bf16(W)
    s = (xh @ Wh.T).double()
    g2 = 2 * x.shape[1] * 2.0**-24 * (xn[0] + xn[1]).double()
    e = ((xn[1].double() + g2)[:, None] * wn[0].double() + (xn[0] + xn[1]).double()[:, None] * wn[1].double()
         + g2[:, None] * wn[1].double() + 2.0**-8 * s.abs())
    y = s + b.double()
    low = (y - e).topk(k, dim=1).values[:, -1:]
    return (y + e >= low).sum(1).double().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--topk", action="store_true", help="CPU: the step's top-k, torch.topk against the C kernel")
    ap.add_argument("--encoder", action="store_true", help="CPU: the encoder's top-k, screened through the bf16 "
                    "GEMM against the fp32 GEMM")
    ap.add_argument("--rounds", type=int, default=15, help="--topk, --encoder: interleaved rounds")
    a = ap.parse_args()
    if a.topk:
        return topk(a.rounds)
    if a.encoder:
        return encoder(a.rounds)

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        print("The Triton kernels need CUDA: timing only the torch references, at small sizes.")
    B = a.B or (8192 if cuda else 512)
    d = a.d or (768 if cuda else 128)
    n = a.n or (32768 if cuda else 4096)
    k = a.k
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    es = torch.tensor([], dtype=dt).element_size()

    g = torch.Generator(device=dev).manual_seed(0)
    idx = torch.rand(B, n, device=dev, generator=g).topk(k, dim=1).indices.to(torch.int32)
    vals = torch.rand(B, k, device=dev, dtype=dt, generator=g)
    W = torch.randn(n, d, device=dev, dtype=dt, generator=g)
    dense = torch.randn(B, d, device=dev, dtype=dt, generator=g)
    touched = int(torch.unique(idx).numel())

    pairs = B * k * (4 + es)  # idx + one value per pair
    cases = {
        # name: (triton fn, torch fn, bytes moved)
        "decode": (lambda: K.decode_triton(idx, vals, W), lambda: K.decode_reference(idx, vals, W),
                   pairs + B * k * d * es + B * d * es),
        "gather_dot": (lambda: K.gather_dot_triton(dense, W, idx), lambda: K.gather_dot_reference(dense, W, idx),
                       pairs + B * k * d * es + B * d * es),
        # zero-fill of the fp32 [n, d] buffer, dense row per pair, touched rows written,
        # plus the fp32 -> bf16 cast when the output is bf16.
        "scatter_outer": (lambda: K.scatter_outer_triton(idx, vals, dense, n, out_dtype=dt),
                          lambda: K.scatter_outer_reference(idx, vals, dense, n, out_dtype=dt),
                          n * d * 4 + pairs + B * k * d * es + touched * d * 4
                          + (n * d * (4 + es) if dt != torch.float32 else 0)),
    }
    # The encoder + top-k: "torch" is the whole z then topk (the reference), "triton" the fused
    # kernel (z never in memory); bytes = x and W read once, the [B, k] result written.
    x_c, b = dense, torch.randn(n, device=dev, generator=g)
    cases["encode_topk"] = (lambda: K.encode_topk_triton(x_c, W, b, k)[0],
                            lambda: K.encode_topk_reference(x_c, W, b.to(dt), k)[0].float().sort(1, descending=True).values,
                            B * d * es + n * d * es + B * k * 12)
    print(f"B={B} d={d} n={n} k={k} dtype={a.dtype} device={dev} touched_rows={touched}")
    print(f"{'kernel':<14}{'backend':<8}{'ms':>10}{'GB/s':>10}")
    for name, (tri, ref, nbytes) in cases.items():
        runs = [("torch", ref)] + ([("triton", tri)] if cuda and K.HAS_TRITON else [])
        for backend, fn in runs:
            s = timeit(fn, a.reps if cuda else max(3, a.reps // 4))
            print(f"{name:<14}{backend:<8}{s * 1e3:>10.3f}{nbytes / s / 1e9:>10.1f}")
        if cuda and K.HAS_TRITON:
            err = (tri().float() - ref().float()).abs().max().item()
            print(f"{'':<14}max |triton - torch| = {err:.3g}")


if __name__ == "__main__":
    main()
