"""torch.distributed for the stages: which process this is under torchrun, and barriers.

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it
starts. A stage that runs on several ranks opens `group()` once; inside it,
`barrier()` waits until every rank has reached the same point. The group is
gloo, which runs everywhere (barriers move no tensors worth a GPU backend).
Without torchrun (WORLD_SIZE unset or 1) both are no-ops, so the one-process
path is the same code.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator

TIMEOUT_S = 1800  # how long a barrier waits for a rank that died before giving up


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks) as torchrun set them; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextmanager
def group() -> Iterator[None]:
    """The process group of this torchrun launch while the `with` holds (nothing for one process)."""
    import torch.distributed as td

    _, world = rank_world()
    if world == 1 or td.is_initialized():
        yield
        return
    td.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        yield
    finally:
        td.destroy_process_group()


def barrier():
    """Wait for every rank (inside group(); a no-op for one process)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()


def all_reduce_(t):
    """Sum `t` over the ranks, in place (inside group(); a no-op for one process). Returns t."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.all_reduce(t)
    return t
