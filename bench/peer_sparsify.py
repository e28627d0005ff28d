"""Train an SAE with EleutherAI sparsify's own parts and its default recipe; run by the peer venv's python.

    bench/.peers/sparsify/bin/python bench/peer_sparsify.py ROWS.npy OUT.pt --n 3072 --k 32 --batch 2048 \
        --tokens 1000000 [--seed 0]

This is sparsify 1.3.3's Trainer loop with the model left out (the rows are
already activations): SparseCoder (tied init), b_dec set to the mean of the
first batch, the decoder renormalised before every forward, FVU loss (AuxK off
by default, as there), the parallel decoder gradient removed, and
ScheduleFreeWrapper(SignSGD, momentum 0.95) at lr 5e-3 / sqrt(n / 2**14).
After the loop the wrapper's eval() puts the averaged weights in place, as
sparsify does before it saves. Rows are visited in a fresh random order each
epoch. Imports nothing of saepipe. Writes the weights in saepipe's names
(W_enc, b_lat, W_dec, b_pre) and the loop's wall seconds.
"""

import argparse
import os
import sys
import time

# python puts this script's folder first on sys.path, and bench/ holds modules (kernel_speed.py, eval.py, ...)
# named like packages transformers imports (hub `kernels`): drop it, so every import is the peer venv's.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from schedulefree import ScheduleFreeWrapper  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.sign_sgd import SignSGD  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    x_all = torch.from_numpy(np.load(a.rows))
    torch.manual_seed(a.seed)
    sae = SparseCoder(x_all.shape[1], SparseCoderConfig(num_latents=a.n, k=a.k), "cpu", dtype=torch.float32)
    lr = 5e-3 / (a.n / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    g = torch.Generator().manual_seed(a.seed)
    steps, pos, order = a.tokens // a.batch, 0, torch.randperm(len(x_all), generator=g)
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + a.batch > len(order):
            pos, order = 0, torch.randperm(len(x_all), generator=g)
        x = x_all[order[pos:pos + a.batch]]
        pos += a.batch
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()
    wall = time.perf_counter() - t0
    torch.save({"W_enc": sae.encoder.weight.detach().clone(), "b_lat": sae.encoder.bias.detach().clone(),
                "W_dec": sae.W_dec.detach().clone(), "b_pre": sae.b_dec.detach().clone(), "wall_s": wall,
                "lr": lr, "steps": steps}, a.out)


if __name__ == "__main__":
    main()
