"""Floating-point dtype names, as configs spell them, and what each means to torch and to the store.

    name       short  torch           stored as    bytes
    float32    fp32   torch.float32   float32      4
    float16    fp16   torch.float16   float16      2
    bfloat16   bf16   torch.bfloat16  uint16       2

model.dtype and harvest.storage_dtype take the names; train.autocast the short
forms. numpy (so zarr) has no bfloat16, so the store keeps its bits as uint16
(the array attribute `logical_dtype` says what they are); the round trip is
bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str
    short: str
    torch: torch.dtype
    stored: torch.dtype  # the torch dtype of the bits the store holds: same size, numpy has it

    @property
    def numpy(self) -> np.dtype:
        """The dtype of the store's arrays."""
        return torch.empty(0, dtype=self.stored).numpy().dtype

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize


_TABLE = (
    DType("float32", "fp32", torch.float32, torch.float32),
    DType("float16", "fp16", torch.float16, torch.float16),
    DType("bfloat16", "bf16", torch.bfloat16, torch.uint16),
)
_BY_NAME = {d.name: d for d in _TABLE} | {d.short: d for d in _TABLE}

NAMES = tuple(d.name for d in _TABLE)  # what model.dtype and harvest.storage_dtype accept
SHORT_NAMES = tuple(d.short for d in _TABLE)


def lookup(name: str) -> DType:
    """The entry for a name or its short form; configs validate names first, so a miss is a bug."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {NAMES + SHORT_NAMES}") from None


def torch_dtype(name: str) -> torch.dtype:
    return lookup(name).torch


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype the store writes for `name` (uint16 for bfloat16)."""
    return lookup(name).numpy


def itemsize(name: str) -> int:
    return lookup(name).itemsize

