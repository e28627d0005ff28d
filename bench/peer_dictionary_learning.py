"""Train an SAE with dictionary_learning 0.1.0's own trainers and recipe; run by the peer venv's python.

    bench/.peers/dictionary_learning/bin/python bench/peer_dictionary_learning.py --rows ROWS.npy \
        --trainer batch_top_k --width 3072 --l0 32 --tokens 1000000 --batch 2048 --seed 0 --out FOLDER \
        [--lr LR] [--l1 LAMBDA] [--check ROWS2.npy --check-out OUT.npz] [--threads N]

Trainers (dictionary_learning's class -> the saepipe architecture FOLDER is written as):

    batch_top_k             BatchTopKTrainer / BatchTopKSAE                       -> batchtopk
    matryoshka_batch_top_k  MatryoshkaBatchTopKTrainer / MatryoshkaBatchTopKSAE   -> matryoshka
    jumprelu                JumpReluTrainer / JumpReluAutoEncoder                 -> jumprelu
    gdm                     GatedSAETrainer / GatedAutoEncoder                    -> gated
    standard                StandardTrainer / AutoEncoder (ReLU, L1)              -> relu

The loop is the package's own trainSAE (dictionary_learning.training) with normalize_activations
on, as its README recommends and its demo does: the rows are divided by one scalar so their mean
squared norm is 1, and trainSAE folds that scalar back into the biases (and thresholds) at the
end, so the module left takes raw rows. Each trainer gets its class defaults (lr, penalties, Adam
betas, auxk_alpha, threshold_beta, bandwidth, ...) except what has to follow the run:
k = target_l0 = --l0; the lr warm-up min(1000, steps/10) and sparsity warm-up min(2000, steps/5)
(the class defaults, capped: the package asserts each is shorter than the run); the lr decays
linearly over the last 20% (the demo's decay_start = 0.8 steps); BatchTopK's threshold estimate
starts after S = min(1000, steps/10) steps and averages with beta = 1 - 1/max(10, S) (class
defaults 1000 and 0.999: the same at 10k steps or more; scaled down with the run, as 0.999 over a
few hundred steps leaves the estimate near its first, early value: 256 steps at k 32 ended at a
held-out L0 of 13); Matryoshka's group fractions are the demo's 1/32, 1/16, 1/8, 1/4, 17/32. steps =
tokens // batch; rows are visited in a fresh seeded random order each epoch.

standard and gdm have an L1 coefficient, not an L0: unless --l1 is given, a search picks it (see
search_l1): probes trained for a fraction of the run on the rows minus a held-out tail, a secant
in log L0 vs log lambda, then the full run, refitted once more at full length if its held-out L0
misses the target by more than 10%.

The function the peer's module computes, and how it is written in saepipe's names (exact: the
test compares both on fresh rows):

    batch_top_k   f = relu(z) * (relu(z) > theta),  z = W (x - b_dec) + b_enc,  x_hat = W_dec f + b_dec
                  W_enc = encoder.weight, b_lat = encoder.bias, W_dec = decoder.weight.T,
                  b_pre = b_dec, threshold = theta (>= 0, so relu(z)*(relu(z)>theta) = z*(z>theta)),
                  threshold_weight = 1
    matryoshka    the same with W_enc.T, b_enc, W_dec (already [n, d]); prefixes = the group sizes'
                  running sums / n
    jumprelu      f = relu(z * (z > theta)),  z = W_enc^T x + b_enc (b_dec NOT subtracted)
                  b_lat = b_enc + W_enc^T b_dec (so W(x - b_pre) + b_lat = W x + b_enc), W_enc.T,
                  W_dec, b_pre = b_dec; theta stored as log_threshold = log(max(theta, 1e-37)) / rate
                  with our rate buffer, nudged by ulps so exp(rate * log_threshold) is theta's float32
    gdm           pi = W (x - b_dec) + gate_bias, mag = exp(r_mag) * W (x - b_dec) + mag_bias,
                  f = 1[pi > 0] relu(mag): W_enc = encoder.weight, b_lat = gate_bias, b_mag, r_mag,
                  W_dec = decoder.weight.T, b_pre = decoder_bias
    standard      f = relu(W (x - bias) + b): W_enc = encoder.weight, b_lat = encoder.bias,
                  W_dec = decoder.weight.T, b_pre = bias

Decoder rows are left as trained (unit norm up to the package's eps; cfg.json records the largest
deviation): rescaling them would change f, and saepipe's encode/decode do not assume it.

Writes FOLDER as pipeline.saes.base.Dictionary.save does (sae.safetensors, cfg.json, then the
`done` marker with the weights' sha256 and size), and prints one JSON line last:
{"trainer", "seconds", "l0_train_last", ...}. Imports nothing of saepipe.
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

# python puts this script's folder first on sys.path, and bench/ holds modules (kernel_speed.py, eval.py, ...)
# named like packages transformers imports: drop it, so every import is the peer venv's.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
os.environ.setdefault("TQDM_DISABLE", "1")  # trainSAE's progress bars
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

VERSION = "0.1.0"
ARCH = {"batch_top_k": "batchtopk", "matryoshka_batch_top_k": "matryoshka", "jumprelu": "jumprelu",
        "gdm": "gated", "standard": "relu"}
GROUP_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]  # dictionary_learning's demo
L1_START = {"standard": 0.03, "gdm": 0.04}  # mid-range of the demo's sweeps (standard 0.012-0.06, gated 0.012-0.08)
JUMPRELU_MIN_THETA = 1e-37  # theta <= 0 fires on z > 0: the same as a threshold this small


# --------------------------------------------------------------------------- training
def schedule(steps: int) -> dict:
    """The run-length-dependent parts of the recipe (module docstring)."""
    warmup = min(1000, steps // 10)
    sparsity_warmup = min(2000, steps // 5)
    decay = int(0.8 * steps)
    if not (decay > warmup and decay > sparsity_warmup and decay < steps):
        decay = None
    start = min(1000, steps // 10)
    return {"warmup_steps": warmup, "sparsity_warmup_steps": sparsity_warmup, "decay_start": decay,
            "threshold_start_step": start, "threshold_beta": 1 - 1 / max(10, start)}


def trainer_config(name: str, d: int, n: int, l0: int, steps: int, seed: int, lr, l1) -> dict:
    from dictionary_learning.trainers import BatchTopKTrainer, GatedSAETrainer, JumpReluTrainer, StandardTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    s = schedule(steps)
    cfg = {"steps": steps, "activation_dim": d, "dict_size": n, "layer": 0, "lm_name": "saepipe-bench",
           "device": "cpu", "seed": seed, "warmup_steps": s["warmup_steps"], "decay_start": s["decay_start"]}
    if name in ("batch_top_k", "matryoshka_batch_top_k"):
        cfg.update(k=l0, threshold_start_step=s["threshold_start_step"], threshold_beta=s["threshold_beta"])
        if name == "batch_top_k":
            cfg["trainer"] = BatchTopKTrainer
        else:
            cfg.update(trainer=MatryoshkaBatchTopKTrainer, group_fractions=list(GROUP_FRACTIONS))
    elif name == "jumprelu":
        cfg.update(trainer=JumpReluTrainer, target_l0=float(l0), sparsity_warmup_steps=s["sparsity_warmup_steps"])
    elif name == "gdm":
        cfg.update(trainer=GatedSAETrainer, l1_penalty=l1, sparsity_warmup_steps=s["sparsity_warmup_steps"])
    elif name == "standard":
        cfg.update(trainer=StandardTrainer, l1_penalty=l1, sparsity_warmup_steps=s["sparsity_warmup_steps"])
    if lr is not None:
        cfg["lr"] = lr
    return cfg


class Batches:
    """`steps` batches of `batch` rows, each epoch a fresh seeded permutation; re-iterable (trainSAE
    iterates it once for the norm factor, then again to train), the same batches each time."""

    def __init__(self, rows: torch.Tensor, batch: int, steps: int, seed: int):
        self.rows, self.batch, self.steps, self.seed = rows, batch, steps, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        order, pos = torch.randperm(len(self.rows), generator=g), 0
        for step in range(self.steps):
            if pos + self.batch > len(order):
                order, pos = torch.randperm(len(self.rows), generator=g), 0
            x = self.rows[order[pos:pos + self.batch]]
            if step == self.steps - 1:
                self.last = x.clone()  # trainSAE divides the batch by its norm factor in place
            yield x
            pos += self.batch


def train(name: str, rows: torch.Tensor, n: int, l0: int, tokens: int, batch: int, seed: int, lr=None, l1=None):
    """(the trained module taking raw rows, its trainer, wall seconds, the last batch)."""
    from dictionary_learning.training import trainSAE

    batch = min(batch, len(rows))
    steps = max(2, tokens // batch)
    cfg = trainer_config(name, rows.shape[1], n, l0, steps, seed, lr, l1)
    data = Batches(rows, batch, steps, seed)
    torch.manual_seed(seed)  # JumpReluTrainer takes a seed but does not use it: its init draws from here
    t0 = time.perf_counter()
    out = sys.stdout
    sys.stdout = sys.stderr  # trainSAE prints the norm factor: stdout is kept for our one JSON line
    try:
        # trainSAE builds the trainer itself (config["trainer"]); it is found again through a hook below
        made = []
        cls = cfg["trainer"]

        def build(**kw):
            tr = cls(**kw)
            made.append(tr)
            return tr

        cfg["trainer"] = build
        trainSAE(data=data, trainer_configs=[cfg], steps=steps, normalize_activations=True, device="cpu",
                 save_dir=None)
    finally:
        sys.stdout = out
    seconds = time.perf_counter() - t0
    return made[0].ae.eval(), made[0], seconds, data.last


# --------------------------------------------------------------------------- the peer's own forward
@torch.no_grad()
def peer_encode(name: str, ae, x: torch.Tensor) -> torch.Tensor:
    """Dense latents [B, n] by the peer module's own encode (inference form)."""
    if name in ("batch_top_k", "matryoshka_batch_top_k"):
        return ae.encode(x, use_threshold=True)
    return ae.encode(x)


@torch.no_grad()
def peer_decode(ae, f: torch.Tensor) -> torch.Tensor:
    return ae.decode(f)


def l0_of(name: str, ae, x: torch.Tensor) -> float:
    return float((peer_encode(name, ae, x) != 0).float().sum(1).mean())


# --------------------------------------------------------------------------- L1 search (standard, gdm)
def search_l1(name: str, rows: torch.Tensor, held: torch.Tensor, n: int, l0: int, tokens: int, batch: int,
              seed: int, lr, frac: float, probes: int) -> tuple[float, list, float]:
    """lambda giving held-out L0 near l0 after a run of frac * tokens; (lambda, [(lambda, L0)], log-log slope).

    log L0 is about linear in log lambda: start at the demo's mid-range lambda, step by the current
    slope estimate (first guess -1; then the secant of the two probes nearest the target, kept in
    [-4, -0.1], a step at most x8) until a probe is within 5% of the target or `probes` have run."""
    probe_tokens = max(batch * 2, int(tokens * frac))
    lam, slope, seen = L1_START[name], -1.0, []
    for _ in range(probes):
        ae = train(name, rows, n, l0, probe_tokens, batch, seed, lr, lam)[0]
        got = max(l0_of(name, ae, held), 0.05)  # all silent: push lambda down hard, not to -inf
        seen.append((lam, got))
        print(f"peer_dictionary_learning: {name} lambda {lam:.5g} -> held-out L0 {got:.2f} (target {l0})",
              file=sys.stderr)
        if abs(got / l0 - 1) < 0.05:
            break
        if len(seen) >= 2 and flat(seen[-2:]):
            # lambda moved x8 and L0 did not follow: the run is too short (or the lr too low) for the
            # penalty to act; more probes would only drive lambda off to infinity
            print(f"peer_dictionary_learning: {name}: L0 does not respond to lambda in {probe_tokens} tokens; "
                  "the L1 search stops (raise --tokens or --lr)", file=sys.stderr)
            break
        slope = fit_slope(seen, l0, slope)
        step = (math.log(l0) - math.log(got)) / slope
        lam = lam * math.exp(max(-math.log(8), min(math.log(8), step)))
    best = min(seen, key=lambda p: abs(math.log(p[1] / l0)))
    # the best probe, moved along the slope to the target (probes rarely land exactly)
    step = (math.log(l0) - math.log(best[1])) / slope
    return best[0] * math.exp(max(-math.log(8), min(math.log(8), step))), seen, slope


def flat(pair: list) -> bool:
    """Two probes whose L0 differs by under 5% though lambda differs by x4 or more."""
    (l1a, a), (l1b, b) = pair
    return abs(math.log(l1a / l1b)) >= math.log(4) and abs(math.log(a / b)) < math.log(1.05)


def fit_slope(seen: list, target: float, prior: float) -> float:
    """d log L0 / d log lambda from the two probes nearest the target (prior with fewer than two)."""
    if len(seen) < 2:
        return prior
    a, b = sorted(seen, key=lambda p: abs(math.log(p[1] / target)))[:2]
    if a[0] == b[0] or a[1] == b[1]:
        return prior
    s = (math.log(a[1]) - math.log(b[1])) / (math.log(a[0]) - math.log(b[0]))
    return max(-4.0, min(-0.1, s))


# --------------------------------------------------------------------------- saepipe's folder
def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().cpu()


def jumprelu_log_threshold(theta: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """log_threshold [n] float32 with exp(log_threshold * rate) (saepipe's float32 formula) equal to
    theta's float32 where a nearby float32 gives it exactly, else the closest of the +-8 ulps tried."""
    theta = f32(theta).clamp_min(JUMPRELU_MIN_THETA)
    base = (theta.double().log() / rate.double()).float()
    best, err = base.clone(), ((base * rate).exp() - theta).abs()
    for direction in (math.inf, -math.inf):
        cand = base.clone()
        for _ in range(8):
            cand = torch.nextafter(cand, torch.full_like(cand, direction))
            e = ((cand * rate).exp() - theta).abs()
            better = e < err
            best, err = torch.where(better, cand, best), torch.where(better, e, err)
    return best


def convert(name: str, ae, d: int, n: int, l0: int, l1) -> tuple[dict, dict]:
    """(saepipe tensors in state_dict order, the architecture's cfg.json settings) for the trained module."""
    if name in ("batch_top_k", "matryoshka_batch_top_k"):
        if name == "batch_top_k":
            W_enc, b_lat, W_dec = ae.encoder.weight, ae.encoder.bias, ae.decoder.weight.T
        else:
            W_enc, b_lat, W_dec = ae.W_enc.T, ae.b_enc, ae.W_dec
        theta = float(ae.threshold)
        if theta < 0:
            raise SystemExit(f"peer_dictionary_learning: {name} ended without a threshold (the run is too short "
                             "for its estimate to start); give it more tokens")
        tensors = {"W_enc": f32(W_enc), "b_lat": f32(b_lat), "W_dec": f32(W_dec), "b_pre": f32(ae.b_dec),
                   "threshold": torch.tensor(theta, dtype=torch.float32),
                   "threshold_weight": torch.tensor(1.0, dtype=torch.float32)}
        settings = {"k": int(l0)}
        if name == "matryoshka_batch_top_k":
            sizes = [int(s) for s in ae.group_sizes.tolist()]
            ends = np.cumsum(sizes).tolist()
            settings = {"k": int(l0), "prefixes": [e / n for e in ends], "prefix_sizes": [int(e) for e in ends]}
        return tensors, settings
    if name == "jumprelu":
        W = ae.W_enc.detach().double()  # [d, n]
        b_lat = ae.b_enc.detach().double()
        if not getattr(ae, "apply_b_dec_to_input", False):
            b_lat = b_lat + ae.b_dec.detach().double() @ W  # W (x - b_dec) + b_lat = W x + b_enc
        rate = torch.tensor(math.sqrt(d) / 2, dtype=torch.float32)  # saepipe's threshold_rate(d)
        tensors = {"W_enc": f32(ae.W_enc.T), "b_lat": f32(b_lat), "W_dec": f32(ae.W_dec), "b_pre": f32(ae.b_dec),
                   "log_threshold": jumprelu_log_threshold(ae.threshold, rate), "threshold_rate": rate}
        return tensors, {"sparsity": "target_l0", "target_l0": int(l0)}
    lam = torch.tensor(float(l1), dtype=torch.float32)
    if name == "gdm":
        tensors = {"W_enc": f32(ae.encoder.weight), "b_lat": f32(ae.gate_bias), "W_dec": f32(ae.decoder.weight.T),
                   "b_pre": f32(ae.decoder_bias), "b_mag": f32(ae.mag_bias), "r_mag": f32(ae.r_mag),
                   "l1_lambda": lam, "l0_error": torch.tensor(0.0)}
    else:
        tensors = {"W_enc": f32(ae.encoder.weight), "b_lat": f32(ae.encoder.bias), "W_dec": f32(ae.decoder.weight.T),
                   "b_pre": f32(ae.bias), "l1_lambda": lam, "l0_error": torch.tensor(0.0)}
    return tensors, {"l1_coefficient": float(l1), "target_l0": None}


def safetensors_bytes(tensors: dict) -> bytes:
    """The safetensors serialisation (safetensors.torch.save where the venv has it)."""
    try:
        import safetensors.torch
        return safetensors.torch.save(tensors)
    except ImportError:
        pass
    header, blobs, offset = {}, [], 0
    for key in sorted(tensors):
        t = tensors[key]
        raw = t.numpy().tobytes()
        header[key] = {"dtype": {torch.float32: "F32", torch.float64: "F64"}[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_folder(folder: Path, arch: str, d: int, n: int, tensors: dict, settings: dict, extra: dict):
    """saepipe's Dictionary.save: weights, cfg.json, then the `done` marker (removed first)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": arch, "d_in": d, "n_latents": n, **settings, "normalize": "none", **extra}
    blob = safetensors_bytes(tensors)
    (folder / "done").unlink(missing_ok=True)
    write_atomic(folder / "sae.safetensors", blob)
    write_atomic(folder / "cfg.json", json.dumps(cfg, indent=2).encode())
    marker = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "format": 1}
    write_atomic(folder / "done", json.dumps(marker).encode())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def decoder_norm_dev(name: str, ae) -> float:
    W = {"batch_top_k": lambda: ae.decoder.weight.T, "standard": lambda: ae.decoder.weight.T,
         "gdm": lambda: ae.decoder.weight.T}.get(name, lambda: ae.W_dec)()
    return float((W.detach().norm(dim=1) - 1).abs().max())


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", required=True)
    ap.add_argument("--trainer", required=True, choices=sorted(ARCH))
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, default=None, help="default: the trainer class's")
    ap.add_argument("--l1", type=float, default=None, help="standard/gdm: the L1 coefficient (default: searched)")
    ap.add_argument("--search-frac", type=float, default=0.25, help="each L1 probe's share of --tokens")
    ap.add_argument("--search-probes", type=int, default=6)
    ap.add_argument("--check", default=None, help="rows [M, d] to run the peer's own encode/decode on")
    ap.add_argument("--check-out", default=None, help=".npz for --check: acts [M, n], recon [M, d]")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if (a.check is None) != (a.check_out is None):
        ap.error("--check and --check-out go together")

    rows = torch.from_numpy(np.ascontiguousarray(np.load(a.rows), dtype=np.float32))
    d, n, name = rows.shape[1], a.width, a.trainer
    steps = max(2, a.tokens // min(a.batch, len(rows)))
    recipe = {"steps": steps, **schedule(steps)}
    l1, search, search_seconds = a.l1, None, 0.0
    train_rows = rows
    if name in ("standard", "gdm"):
        # a held-out tail for measuring L0 (never trained on, also by the final run)
        h = max(256, min(4096, len(rows) // 10))
        train_rows, held = rows[:-h], rows[-h:]
        if l1 is None:
            t0 = time.perf_counter()
            l1, seen, slope = search_l1(name, train_rows, held, n, a.l0, a.tokens, a.batch, a.seed, a.lr,
                                        a.search_frac, a.search_probes)
            search = {"probes": [[lam, got] for lam, got in seen], "slope": slope, "held_out_rows": h,
                      "probe_tokens": max(a.batch * 2, int(a.tokens * a.search_frac))}
            search_seconds = time.perf_counter() - t0
    ae, trainer, seconds, last = train(name, train_rows, n, a.l0, a.tokens, a.batch, a.seed, a.lr, l1)
    if name in ("standard", "gdm"):
        got = max(l0_of(name, ae, held), 0.05)
        if search is not None and abs(got / a.l0 - 1) > 0.10:
            # the full run lands elsewhere than the short probes: one refit at full length
            search["full_run"] = [l1, got]
            l1 = l1 * math.exp(max(-math.log(8), min(math.log(8), (math.log(a.l0) - math.log(got)) / search["slope"])))
            search_seconds += seconds  # the first full run was part of the search
            ae, trainer, seconds, last = train(name, train_rows, n, a.l0, a.tokens, a.batch, a.seed, a.lr, l1)
            got = max(l0_of(name, ae, held), 0.05)
        recipe["l1_penalty"] = l1
        recipe["l0_held_out"] = got
        if search is not None:
            recipe["l1_search"] = search
    recipe["lr"] = float(trainer.lr)

    tensors, settings = convert(name, ae, d, n, a.l0, l1)
    extra = {"peer": f"dictionary_learning {VERSION} {name}", "train_seconds": seconds,
             "peer_recipe": recipe, "peer_decoder_norm_dev": decoder_norm_dev(name, ae)}
    if search_seconds:
        extra["peer_search_seconds"] = search_seconds
    save_folder(Path(a.out), ARCH[name], d, n, tensors, settings, extra)

    if a.check:
        x = torch.from_numpy(np.ascontiguousarray(np.load(a.check), dtype=np.float32))
        acts = peer_encode(name, ae, x)
        np.savez(a.check_out, acts=acts.numpy(), recon=peer_decode(ae, acts).numpy())

    out = {"trainer": name, "seconds": seconds, "l0_train_last": l0_of(name, ae, last)}
    if "l0_held_out" in recipe:
        out["l0_held_out"] = recipe["l0_held_out"]
        out["l1_penalty"] = l1
    if search_seconds:
        out["search_seconds"] = search_seconds
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
