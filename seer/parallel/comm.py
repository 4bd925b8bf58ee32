"""Thin wrappers over torch's functional collectives (traceable by torch.compile; NCCL and gloo).

Every function takes ``group=None`` to mean "no communication" (a size-1 group), so callers need no
special case for the single-process path.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; the old names still exist but warn.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: Tensor, group: Optional[dist.ProcessGroup], op: str = "sum") -> Tensor:
    if group_size(group) == 1:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x, op, group))


def all_gather(x: Tensor, group: Optional[dist.ProcessGroup], dim: int = 0) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    n = group_size(group)
    if n == 1:
        return x
    out = funcol.wait_tensor(_all_gather(x.movedim(dim, 0).contiguous(), 0, group))
    return out.movedim(0, dim)


def reduce_scatter(x: Tensor, group: Optional[dist.ProcessGroup], dim: int = 0) -> Tensor:
    """Sum over ranks, then keep this rank's 1/n chunk along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    out = funcol.wait_tensor(_reduce_scatter(x.movedim(dim, 0).contiguous(), "sum", 0, group))
    return out.movedim(0, dim)


def split(x: Tensor, group: Optional[dist.ProcessGroup], dim: int = 0) -> Tensor:
    """This rank's 1/n chunk of ``x`` along ``dim`` (no communication)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    return x.chunk(n, dim)[group_rank(group)].contiguous()
