"""Benchmark one SAE training step: our sparse path against a dense PyTorch TopK baseline.

    python bench/train.py                                 # GPU grid on CUDA, a small grid on CPU
    python bench/train.py --n 16384,65536 --d 768 --k 32 --batch 4096 --peak-tflops 989
    python bench/train.py --vs-floor                      # CPU: the real step against GEMM + top-k alone
    python bench/train.py --memory                        # CPU: a step's peak memory at n 131072, batch 4096
    python bench/train.py --peers                         # CPU: floor, saepipe, sparsify and SAELens, ms/step
    python bench/train.py --peers --n 4096,65536 --d 256,1024 --k 16,128 --rounds 1   # ... over a grid
    python bench/train.py --peers --shapes demo,anchor    # named shapes (SHAPES) or N:D:K:BATCH, each its own batch
    python bench/train.py --phases --shapes small,demo    # CPU: where a step's time goes, phase by phase
    python bench/train.py --screen-ab --shapes small,anchor   # CPU: the step with and without the bf16 screen

A step = forward, loss, backward, Adam (the pipeline's, fused), decoder constraint. Ours: dense encoder
matmul without a graph, top-k, then the sparse kernels (Triton on CUDA, the
torch sparse CSR paths on CPU) for every product that touches k of n latents. The
baseline: dense z with autograd, top-k scattered into dense [B, n] latents, a
dense decoder matmul. Both run the encoder matmul in bf16 on CUDA, fp32 on CPU.

Reported per (n, d, k): tokens/s of each and their ratio; peak step memory
(memory a step needs above the resident weights, optimizer state and batch;
on CPU from peak RSS in a fresh worker process per measurement) and its
ratio; and tokens/s as a fraction of the encoder-matmul roofline, i.e. what
2*d*n FLOPs per token would allow at --peak-tflops (default: measured
throughput of one large [B, d] x [d, n] matmul on this device).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402

from pipeline import optim  # noqa: E402
from pipeline.saes.topk import TopKSAE, TopKSettings  # noqa: E402


def dense_step(sae: TopKSAE, x, opt, matmul_dtype):
    """The baseline: what a plain PyTorch TopK SAE does (autograd through dense latents)."""
    x_c = x - sae.b_pre
    with torch.autocast(x.device.type, dtype=matmul_dtype or torch.float32, enabled=matmul_dtype is not None):
        z = x_c @ sae.W_enc.T + sae.b_lat
    vals, idx = z.topk(sae.k, dim=-1, sorted=False)
    acts = torch.zeros_like(z).scatter(1, idx, torch.relu(vals))
    with torch.autocast(x.device.type, dtype=matmul_dtype or torch.float32, enabled=matmul_dtype is not None):
        x_hat = acts @ sae.W_dec + sae.b_pre
    loss = (x - x_hat.float()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()
    opt.zero_grad(set_to_none=True)


def sparse_step(sae: TopKSAE, x, opt, matmul_dtype):
    o = sae.forward_train(x, matmul_dtype=matmul_dtype)
    loss = (x - o.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()
    opt.zero_grad(set_to_none=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str, n: int, d: int, k: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    sae = TopKSAE(d, n, k, backend="auto").to(dev)
    opt = optim.make("adam", sae.parameters(), lr=1e-4)  # the pipeline's Adam (fused), for both paths
    x = torch.randn(batch, d, device=dev)
    matmul_dtype = torch.bfloat16 if dev.type == "cuda" else None
    step = sparse_step if path == "ours" else dense_step
    for _ in range(warmup):  # also creates Adam state, so it counts as resident below
        step(sae, x, opt, matmul_dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for _ in range(steps):  # the fastest step: what the code can do when no neighbour steals the cores
        t = time.perf_counter()
        step(sae, x, opt, matmul_dtype)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    seconds = min(times)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"tokens_per_s": batch / seconds, "peak_bytes": max(peak, 0)}


def matmul_tflops(batch: int, d: int, n: int, device: str) -> float:
    """Achieved TFLOP/s of the encoder matmul alone: the roofline when --peak-tflops is not given."""
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(batch, d, device=dev, dtype=dt), torch.randn(d, n, device=dev, dtype=dt)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(20 if dev.type == "cuda" else 5):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * batch * d * n / min(times) / 1e12


def run_one(args, path, n, d, k) -> dict:
    if args.device == "cuda":
        try:
            return measure(path, n, d, k, args.batch, args.steps, args.warmup, "cuda")
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"tokens_per_s": float("nan"), "peak_bytes": float("nan")}
    # CPU: a fresh process per measurement, so peak RSS belongs to this path alone
    cmd = [sys.executable, __file__, "--worker", json.dumps([path, n, d, k, args.batch, args.steps, args.warmup])]
    # Large blocks from mmap go back to the OS when freed, so resident memory tracks live tensors
    # (glibc would otherwise keep the warmup's freed temporaries resident and hide them in the baseline).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_state(n: int, d: int, k: int, batch: int, device: torch.device):
    """(TrainState, its TrainConfig, a batch) for timing pipeline.train.train_step itself: Adam, no dormant
    latents (so no AuxK), the torch backend."""
    from pipeline.config import TrainConfig
    from pipeline.train_state import TrainState

    tc = TrainConfig(n_latents=n, sae=TopKSettings(k=k, k_aux=1, dormant_tokens=10**12), batch_size=batch, lr=1e-4,
                     backend="torch")
    return TrainState(tc, d, device), tc, torch.randn(batch, d)


def versus_floor(n: int, d: int, k: int, batch: int, rounds: int, fp32_too: bool = False) -> dict:
    """ms of pipeline.train.train_step (the real step: forward, loss, backward, the configured optimizer,
    decoder constraint; no dormant latents, so no AuxK) against its floor, the encoder GEMM + top-k alone,
    timed interleaved in one process; medians of `rounds`. fp32_too: a third, "fp32", the same step with
    the encoder's bf16 screen off (SAEPIPE_BF16_SCREEN=0; one TrainState, so the same work either way)."""
    from pipeline.model import resolve_device
    from pipeline.train import train_step

    state, tc, x = step_state(n, d, k, batch, resolve_device("cpu"))  # as train does: also the allocator setting
    W, b = state.sae.W_enc.detach().clone(), torch.zeros(n)

    def floor():
        torch.addmm(b, x, W.T).topk(k, dim=1, sorted=False)

    def step(screen: str):
        os.environ["SAEPIPE_BF16_SCREEN"] = screen
        train_step(state, x, 1e-4, tc)

    fns = {"floor": floor, "step": lambda: step(before or "1")}
    if fp32_too:
        fns["fp32"] = lambda: step("0")
    times: dict[str, list[float]] = {name: [] for name in fns}
    before = os.environ.get("SAEPIPE_BF16_SCREEN")
    try:
        for i in range(rounds + 2):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                if i >= 2:  # the first two rounds warm up (and allocate Adam's state)
                    times[name].append(time.perf_counter() - t)
    finally:
        os.environ.pop("SAEPIPE_BF16_SCREEN")
        if before is not None:
            os.environ["SAEPIPE_BF16_SCREEN"] = before
    return {name: 1e3 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}


PHASES = ("encoder GEMM + top-k", "gathers + decode", "loss", "backward", "optimizer", "decoder constraint",
          "bookkeeping")


def phases(n: int, d: int, k: int, batch: int, rounds: int) -> dict:
    """ms per phase of a training step (medians of `rounds`, after two warm-up steps), the floor, the
    encoder GEMM alone and the whole train_step, timed interleaved in one process. The phases are
    pipeline.train.train_step's TopK path (no AuxK) written out call by call, so each can be timed:
    "backward" holds Adam's steps of W_enc and W_dec when TrainState takes them inside the backward
    (from train_state.STEP_IN_BACKWARD_BYTES); "optimizer" is what opt.step() has left."""
    from pipeline.kernels import decode, encode_gather
    from pipeline.model import resolve_device
    from pipeline.train import reconstruction_loss, train_step

    state, tc, x = step_state(n, d, k, batch, resolve_device("cpu"))
    sae, opt = state.sae, state.opt
    W, b = sae.W_enc.detach().clone(), torch.zeros(n)

    def step_by_phase(t):
        x_c = sae.center(x)
        pre, idx, *_ = sae.topk_candidates(x_c, k, None, 0, None)
        t = tick("encoder GEMM + top-k", t)
        vals = torch.relu(encode_gather(x_c, sae.W_enc, sae.b_lat, idx, backend=sae.backend, pre=pre))
        x_hat = decode(idx, vals, sae.W_dec, backend=sae.backend) + sae.b_pre
        t = tick("gathers + decode", t)
        fvu, nmse = reconstruction_loss(x, x_hat)
        opt.zero_grad(set_to_none=True)
        t = tick("loss", t)
        fvu.backward()
        t = tick("backward", t)
        sae.remove_parallel_grad()
        opt.step()
        t = tick("optimizer", t)
        sae.normalize_decoder()
        t = tick("decoder constraint", t)
        with torch.no_grad():
            fires = torch.zeros_like(state.since_fired).scatter_add_(0, idx.reshape(-1), (vals > 0).long().reshape(-1))
            state.log_sums += torch.stack([fvu, fvu, nmse, fvu]).detach()
            state.since_fired = (state.since_fired + batch) * (fires == 0)
        tick("bookkeeping", t)

    times: dict[str, list[float]] = {}

    def tick(name, t0):
        t = time.perf_counter()
        times.setdefault(name, []).append(t - t0)
        return t

    for i in range(rounds + 2):
        if i == 2:
            times.clear()
        t = time.perf_counter()
        torch.addmm(b, x, W.T).topk(k, dim=1, sorted=False)
        t = tick("floor", t)
        x @ W.T
        t = tick("encoder GEMM alone", t)
        train_step(state, x, 1e-4, tc)
        t = tick("train_step", t)
        step_by_phase(t)
    return {name: 1e3 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def print_phases(shapes: list[tuple[int, int, int, int]], rounds: int):
    print(f"cpu ({torch.get_num_threads()} threads), ms, medians of {rounds} interleaved rounds")
    cols = ("floor", "encoder GEMM alone", "train_step") + PHASES
    print("| n | d | k | batch | " + " | ".join(cols) + " | sum of phases |")
    print("| --- " * (5 + len(cols)) + "|")
    for n, d, k, batch in shapes:
        r = phases(n, d, k, batch, rounds)
        print(f"| {n} | {d} | {k} | {batch} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
              + f" | {sum(r[c] for c in PHASES):.1f} |", flush=True)


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def step_memory(n: int, d: int, k: int, batch: int, whole: bool) -> dict:
    """In a fresh worker: one real train_step's peak resident memory above what stays resident between
    steps (weights, Adam's state, the batch), with the encoder top-k in the default blocks or (whole)
    from all of z at once. Linux's VmHWM is reset just before the step (clear_refs 5)."""
    from pipeline import kernels
    from pipeline.train import train_step

    if whole:
        kernels.TOPK_BLOCK_BYTES = 1 << 62
    state, tc, x = step_state(n, d, k, batch, torch.device("cpu"))  # no resolve_device: glibc may hand memory back
    train_step(state, x, 1e-4, tc)  # allocates Adam's state
    state.opt.zero_grad(set_to_none=True)
    base = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    train_step(state, x, 1e-4, tc)
    seconds = time.perf_counter() - t
    return {"peak_above_bytes": _hwm_bytes() - base, "grad_bytes": 2 * n * d * 4, "seconds": seconds,
            "base_bytes": base}


def memory_table(n: int, d: int, k: int, batch: int):
    rows = {}
    for name, whole in (("blocked (default)", False), ("z whole", True)):
        cmd = [sys.executable, __file__, "--memory-worker", json.dumps([n, d, k, batch, whole])]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed big blocks go back: RSS tracks live tensors
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"cpu ({torch.get_num_threads()} threads); n {n}, d {d}, k {k}, batch {batch}; one train_step, fp32")
    print("| encoder top-k | peak above weights + Adam state + batch (gradients included) | step s |")
    print("| --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_above_bytes'] / mib:,.0f} MiB | {r['seconds']:.1f} |")
    print(f"(the two weight gradients are {rows['z whole']['grad_bytes'] / mib:,.0f} MiB together; Adam steps each "
          "inside the backward and frees it, so one is alive at a time)")


def blocked_vs_whole(n: int, d: int, k: int, batch: int, rounds: int, block_bytes: int) -> dict:
    """ms of train_step with z in blocks of block_bytes against z whole, interleaved; medians."""
    from pipeline import kernels
    from pipeline.model import resolve_device
    from pipeline.train import train_step

    state, tc, x = step_state(n, d, k, batch, resolve_device("cpu"))
    times = {"whole": [], "blocked": []}
    for i in range(rounds + 2):
        for name, bytes_ in (("whole", 1 << 62), ("blocked", block_bytes)):
            kernels.TOPK_BLOCK_BYTES = bytes_
            t = time.perf_counter()
            train_step(state, x, 1e-4, tc)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def peers_table(n: int, d: int, k: int, batch: int, rounds: int, steps: int = 3,
                names: tuple[str, ...] = ("sparsify", "saelens")):
    """({name: median ms/step}, {peer: why it has none}): the floor and saepipe's real step (one worker,
    interleaved) and each peer's step in its own venv (bench/peer_step.py), the workers taking turns
    over `rounds`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    here = Path(__file__).resolve().parent
    ms: dict[str, list[float]] = {"floor": [], "saepipe": [], "sparsify": [], "saelens": []}
    missing = {}
    pythons = {}
    for peer in names:
        try:
            pythons[peer] = peers.python(peer)
        except subprocess.CalledProcessError as e:
            missing[peer] = f"its venv could not be made ({e})"
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}
    if pipeline.OMP_WAIT_POLICY_SET:  # the peers run as their users get them
        env.pop("OMP_WAIT_POLICY", None)
    for _ in range(rounds):
        out = subprocess.run([sys.executable, __file__, "--vs-floor-worker", json.dumps([n, d, k, batch, steps])],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ms["floor"].append(r["floor"])
        ms["saepipe"].append(r["step"])
        for peer, py in pythons.items():
            out = subprocess.run([str(py), str(here / "peer_step.py"), peer, str(n), str(d), str(k), str(batch),
                                  str(steps)], capture_output=True, text=True, env=env)
            if out.returncode:
                missing[peer] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
                continue
            times = json.loads(out.stdout.strip().splitlines()[-1])
            ms[peer].append(1e3 * sorted(times)[len(times) // 2])
    return {name: sorted(v)[len(v) // 2] for name, v in ms.items() if v}, missing


def print_peers(shapes: list[tuple[int, int, int, int]], rounds: int, steps: int = 3,
                names: tuple[str, ...] = ("sparsify", "saelens")):
    print(f"cpu ({torch.get_num_threads()} threads), fp32; ms/step, medians of {rounds} rounds of "
          f"{steps} steps, the workers (saepipe with the floor, then each peer in its venv) taking turns")
    print("| n | d | k | batch | floor | saepipe | sparsify 1.3.3 | SAELens 6 | saepipe / floor | sparsify / saepipe "
          "| SAELens / saepipe |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    notes = {}
    for n, d, k, batch in shapes:
        med, missing = peers_table(n, d, k, batch, rounds, steps, names)
        notes.update(missing)
        cell = {name: f"{med[name]:.1f}" if name in med else "-" for name in ("floor", "saepipe", "sparsify", "saelens")}
        ratio = {name: f"{med[name] / med['saepipe']:.2f}x" if name in med else "-" for name in ("sparsify", "saelens")}
        print(f"| {n} | {d} | {k} | {batch} | {cell['floor']} | {cell['saepipe']} | {cell['sparsify']} | {cell['saelens']} | "
              f"{med['saepipe'] / med['floor']:.2f}x | {ratio['sparsify']} | {ratio['saelens']} |", flush=True)
    for peer, why in notes.items():
        print(f"{peer}: not measured: {why}")


def ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t]


# Shapes by name (n, d, k, batch): the demo's own SAE (configs/smollm2.yaml), the anchor of the tables and
# the smallest corner of the --peers grid.
SHAPES = {"demo": (4608, 576, 32, 2048), "anchor": (16384, 768, 32, 1024), "small": (4096, 256, 16, 1024)}


def shapes(text: str) -> list[tuple[int, int, int, int]]:
    """--shapes: names of SHAPES or N:D:K:BATCH, comma-separated."""
    out = []
    for item in filter(None, text.split(",")):
        if item in SHAPES:
            out.append(SHAPES[item])
        elif len(item.split(":")) == 4:
            out.append(tuple(ints(item.replace(":", ","))))
        else:
            raise SystemExit(f"train.py: error: --shapes {item!r} is neither {' nor '.join(SHAPES)} nor N:D:K:BATCH")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", help="n_latents list (default GPU 16384,65536,131072; CPU 4096,16384)")
    ap.add_argument("--d", help="d_model list (default GPU 768,2048; CPU 256,512)")
    ap.add_argument("--k", help="k list (default GPU 32,128; CPU 32,128)")
    ap.add_argument("--batch", type=int, help="tokens per step (default GPU 4096, CPU 1024)")
    ap.add_argument("--steps", type=int, help="timed steps, fastest reported (default GPU 20, CPU 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (also allocate Adam state)")
    ap.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for the roofline (default: measured matmul)")
    ap.add_argument("--vs-floor", action="store_true", help="CPU: ms/step of the real training step against "
                    "the encoder GEMM + top-k alone, interleaved (default shape d 768, n 16384, k 32, batch 1024)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds, medians reported (default: --vs-floor 9, "
                    "--memory 7, --peers 3)")
    ap.add_argument("--memory", action="store_true", help="CPU: peak memory of one train_step with the encoder "
                    "top-k in blocks and with z whole (default shape d 768, n 131072, k 32, batch 4096), then "
                    "ms/step of the two interleaved at the anchor shape (z in 4 blocks there)")
    ap.add_argument("--peers", action="store_true", help="CPU: ms/step of the floor, saepipe, sparsify and SAELens "
                    "(each peer in its venv of bench/peers.py; default shape d 768, n 16384, k 32, batch 1024)")
    ap.add_argument("--peer-names", default="sparsify,saelens", help="--peers: which peers (comma-separated)")
    ap.add_argument("--phases", action="store_true", help="CPU: ms per phase of a step (encoder, gathers + decode, "
                    "loss, backward, optimizer, constraint, bookkeeping) beside the floor and the whole train_step")
    ap.add_argument("--shapes", help="--peers, --phases, --screen-ab and --vs-floor: these shapes instead of the --n/--d/--k grid, each "
                    "with its own batch: " + ", ".join(f"{k} (n {v[0]}, d {v[1]}, k {v[2]}, batch {v[3]})"
                                                   for k, v in SHAPES.items()) + ", or N:D:K:BATCH")
    ap.add_argument("--screen-ab", action="store_true", help="CPU: ms/step with the encoder's top-k screened "
                    "through the bf16 GEMM and with the fp32 GEMM (SAEPIPE_BF16_SCREEN=0), beside the floor, "
                    "interleaved in one process (default shape: the anchor)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--vs-floor-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vs_floor_worker:
        n, d, k, batch, steps = json.loads(args.vs_floor_worker)
        print(json.dumps(versus_floor(n, d, k, batch, steps)))
        return
    grid = shapes(args.shapes) if args.shapes else [
        (n, d, k, args.batch or 1024) for d in ints(args.d or "768") for n in ints(args.n or "16384")
        for k in ints(args.k or "32") if k <= n]
    if args.peers:
        print_peers(grid, args.rounds or 3, names=tuple(args.peer_names.split(",")))
        return
    if args.phases:
        print_phases(grid, args.rounds or 7)
        return
    if args.memory_worker:
        print(json.dumps(step_memory(*json.loads(args.memory_worker))))
        return
    if args.memory:
        memory_table(ints(args.n or "131072")[0], ints(args.d or "768")[0], ints(args.k or "32")[0],
                     args.batch or 4096)
        n, d, k, batch = 16384, 768, 32, 1024
        args.rounds = args.rounds or 7
        r = blocked_vs_whole(n, d, k, batch, args.rounds, batch * 4 * n // 4)
        print(f"\nanchor n {n}, d {d}, k {k}, batch {batch}: z whole {r['whole']:.1f} ms/step, in 4 blocks "
              f"{r['blocked']:.1f} ms/step: {r['blocked'] / r['whole']:.3f}x (medians of {args.rounds} interleaved rounds)")
        return
    if args.vs_floor:
        args.rounds = args.rounds or 9
        print(f"cpu ({torch.get_num_threads()} threads), medians of {args.rounds} interleaved rounds")
        print(f"{'n':>7} {'d':>5} {'k':>4} {'batch':>6} | {'floor ms':>8} {'step ms':>8} {'step/floor':>10}")
        for n, d, k, batch in grid:
            r = versus_floor(n, d, k, batch, args.rounds)
            print(f"{n:>7} {d:>5} {k:>4} {batch:>6} | {r['floor']:>8.1f} {r['step']:>8.1f} {r['step'] / r['floor']:>9.2f}x")
        return
    if args.screen_ab:
        from pipeline import cpu_kernels

        args.rounds = args.rounds or 9
        print(f"cpu ({torch.get_num_threads()} threads), medians of {args.rounds} interleaved rounds; "
              f"fast bf16 GEMM: {cpu_kernels._fast_bf16_gemm()}")
        print("| n | d | k | batch | floor | screened | fp32 | screened / floor | fp32 / floor | fp32 / screened |")
        print("| --- " * 10 + "|")
        for n, d, k, batch in grid:
            r = versus_floor(n, d, k, batch, args.rounds, fp32_too=True)
            print(f"| {n} | {d} | {k} | {batch} | {r['floor']:.1f} | {r['step']:.1f} | {r['fp32']:.1f} | "
                  f"{r['step'] / r['floor']:.2f}x | {r['fp32'] / r['floor']:.2f}x | "
                  f"{r['fp32'] / r['step']:.2f}x |", flush=True)
        return
    if args.worker:
        path, n, d, k, batch, steps, warmup = json.loads(args.worker)
        print(json.dumps(measure(path, n, d, k, batch, steps, warmup, "cpu")))
        return
    gpu = args.device == "cuda"
    ns = ints(args.n or ("16384,65536,131072" if gpu else "4096,16384"))
    ds = ints(args.d or ("768,2048" if gpu else "256,512"))
    ks = ints(args.k or "32,128")
    args.batch = args.batch or (4096 if gpu else 1024)
    args.steps = args.steps or (20 if gpu else 5)

    name = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {args.batch} tokens, {args.steps} timed steps, "
          f"encoder matmul in {'bf16' if gpu else 'fp32'}")
    head = (f"{'n':>7} {'d':>5} {'k':>4} | {'ours tok/s':>10} {'dense tok/s':>11} {'speedup':>7} | "
            f"{'ours MB':>8} {'dense MB':>8} {'mem ratio':>9} | {'ours %roof':>10} {'dense %roof':>11}")
    print(head)
    print("-" * len(head))
    for d in ds:
        peak = args.peak_tflops or matmul_tflops(args.batch, d, max(ns), args.device)
        for n in ns:
            for k in ks:
                if k > n:
                    continue
                ours, dense = run_one(args, "ours", n, d, k), run_one(args, "dense", n, d, k)
                roof = peak * 1e12 / (2 * d * n)  # tokens/s if the encoder matmul ran at peak
                mb = [r["peak_bytes"] / 2**20 for r in (ours, dense)]
                print(f"{n:>7} {d:>5} {k:>4} | {ours['tokens_per_s']:>10.0f} {dense['tokens_per_s']:>11.0f} "
                      f"{ours['tokens_per_s'] / dense['tokens_per_s']:>6.2f}x | {mb[0]:>8.1f} {mb[1]:>8.1f} "
                      f"{mb[1] / max(mb[0], 1e-9):>8.2f}x | {ours['tokens_per_s'] / roof:>10.1%} "
                      f"{dense['tokens_per_s'] / roof:>11.1%}")
        print(f"(d = {d}: roofline at {peak:.2f} TFLOP/s{'' if args.peak_tflops else ', measured matmul'})")


if __name__ == "__main__":
    main()
