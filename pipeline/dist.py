"""torch.distributed for the stages: which process this is under torchrun, and barriers.

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it
starts. A stage that runs on several ranks opens `group()` once; inside it,
`barrier()` waits until every rank has reached the same point,
`all_reduce_()` sums a tensor over the ranks, and `all_gather()` and `gather()`
collect every rank's tensor on every rank or on rank 0 (latent sharding,
pipeline.shard). The group is NCCL when the ranks compute on CUDA devices
(train's gradients and counters live there), else gloo (CPU training, and
harvest, whose barriers move no tensors). Without torchrun (WORLD_SIZE unset or
1) they are all no-ops, so the one-process path is the same code.
"""

from __future__ import annotations

import datetime
import math
import os
from contextlib import contextmanager
from typing import Iterator

TIMEOUT_S = 1800  # how long a barrier waits for a rank that died before giving up


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks) as torchrun set them; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def backend_for(device=None) -> str:
    """The collective backend for ranks whose tensors live on `device` (a torch.device; None: CPU)."""
    import torch.distributed as td

    return "nccl" if device is not None and device.type == "cuda" and td.is_nccl_available() else "gloo"


@contextmanager
def group(device=None) -> Iterator[None]:
    """The process group of this torchrun launch while the `with` holds (nothing for one process);
    `device`: where the tensors it reduces live (this rank's GPU picks NCCL)."""
    import torch.distributed as td

    _, world = rank_world()
    if world == 1 or td.is_initialized():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":  # bind this rank's GPU, so barriers and collectives run there
        import torch

        torch.cuda.set_device(device)
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S), device_id=device)
    else:
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        yield
    finally:
        td.destroy_process_group()


def barrier():
    """Wait for every rank (inside group(); a no-op for one process)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        if td.get_backend() == "nccl":
            import torch

            td.barrier(device_ids=[torch.cuda.current_device()])
        else:
            td.barrier()


def all_reduce_(t, group=None):
    """Sum `t` over the ranks, in place (inside group(); a no-op for one process). Returns t."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.all_reduce(t, group=group)
    return t


def all_gather(t, group=None) -> list:
    """Every rank's `t` (the same shape and dtype on each), in rank order (inside group(); [t] for one process)."""
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return [t]
    out = [torch.empty_like(t) for _ in range(td.get_world_size(group))]
    td.all_gather(out, t.contiguous(), group=group)
    return out


def gather(t, group=None) -> list | None:
    """Every rank's `t` (the same shape and dtype on each) on rank 0, in rank order; None on the others
    (inside group(); [t] for one process)."""
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return [t]
    main = td.get_rank(group) == 0
    out = [torch.empty_like(t) for _ in range(td.get_world_size(group))] if main else None
    td.gather(t.contiguous(), out, dst=0, group=group)
    return out


def side_group():
    """A gloo group of every rank for collectives a background thread runs (the batch loader's),
    so they never interleave with the main thread's on the main group; None for one process.
    Every rank must call it at the same point."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return None
    return td.new_group(backend="gloo")


def all_gather_rows(x, n_rows: list[int], group) -> list:
    """Every rank's rows: `x` [n_rows[rank], ...] here, n_rows[r] rows on rank r (any dtype, as raw
    bytes, padded to the longest). Returns the W tensors, rank order."""
    import torch

    flat = x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous().view(torch.uint8)
    pad = torch.zeros(max(n_rows), flat.shape[1], dtype=torch.uint8)
    pad[:flat.shape[0]] = flat
    return [o[:n].view(x.dtype).reshape(n, *x.shape[1:]) for o, n in zip(all_gather(pad, group), n_rows)]
