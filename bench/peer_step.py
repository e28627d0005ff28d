"""Time one peer's SAE training step, in the peer's own venv (bench/peers.py); imports nothing of saepipe.

    bench/.peers/sparsify/bin/python bench/peer_step.py sparsify N D K BATCH STEPS

A step is what bench/train.py times for saepipe: forward, loss, backward, Adam
(torch.optim.Adam, the default the issue's table used), the decoder
constraint, on random fp32 rows, CPU. Prints the JSON list of each step's
seconds after two untimed ones (which also allocate Adam's state).

- sparsify 1.3.3: SparseCoder with its eager (embedding-bag) decoder
  (SPARSIFY_DISABLE_TRITON=1 is set by the caller), FVU loss, decoder rows put
  to unit norm and the parallel gradient removed, as its Trainer does.
- saelens 6.x: TopKTrainingSAE's training_forward_pass (MSE plus its AuxK term
  with no dead latents), the loss its trainer backpropagates.
"""

import json
import sys
import time

import torch


def sparsify_step(n, d, k, x):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), "cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def saelens_step(n, d, k, x):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device="cpu", dtype="float32"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(n, dtype=torch.bool)

    def step():
        out = sae.training_forward_pass(step_input=TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                                  n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def main():
    peer, n, d, k, batch, steps = sys.argv[1], *map(int, sys.argv[2:7])
    torch.manual_seed(0)
    x = torch.randn(batch, d)
    step = {"sparsify": sparsify_step, "saelens": saelens_step}[peer](n, d, k, x)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    print(json.dumps(times))


if __name__ == "__main__":
    main()
