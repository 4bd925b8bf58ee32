"""Megatron-style communication between tensor-parallel regions, as autograd functions whose backward is
the dual collective of their forward (Megatron-Core ``tensor_parallel/mappings.py``).

Names follow where the tensor goes: a *tensor-parallel region* holds a per-rank slice of the heads / MLP
columns / prototypes; a *sequence region* (sequence parallelism) holds 1/T of the token sequences.

========================================  ==========================  ==========================
function                                  forward                     backward
========================================  ==========================  ==========================
copy_to_tensor_parallel_region            identity                    all-reduce
reduce_from_tensor_parallel_region        all-reduce                  identity
gather_from_tensor_parallel_region        all-gather (last dim)       split (last dim)
scatter_to_sequence_region                split (dim 0)               all-gather (dim 0)
gather_from_sequence_region               all-gather (dim 0)          reduce-scatter (dim 0), or
                                                                      split when the consumer is
                                                                      replicated
reduce_scatter_to_sequence_region         reduce-scatter (dim 0)      all-gather (dim 0)
========================================  ==========================  ==========================

The sequence shard is taken over dim 0 of the (B, N, d) activations, i.e. whole token sequences: ViT
sequence lengths (257, 50, 197 tokens) are rarely divisible by the tensor-parallel size, and drop-path acts
per sequence. Norms, dropout, drop-path and residual adds between the blocks' matmuls then run on 1/T of
the tokens, which divides that activation memory by T.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm

Group = Optional[dist.ProcessGroup]


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce (the input feeds every rank's slice of the weights)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return comm.all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce (sum the ranks' partial products); backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather the last dim; backward: keep this rank's slice of the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return comm.split(g, ctx.group, dim=-1), None


class _ScatterToSequence(torch.autograd.Function):
    """forward: keep this rank's 1/T of dim 0; backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split(x, group, dim=0)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, dim=0), None


class _GatherFromSequence(torch.autograd.Function):
    """forward: all-gather dim 0; backward: reduce-scatter dim 0 if the gathered tensor feeds tensor-parallel
    compute (each rank's gradient is partial), else split (the consumer is replicated: gradients agree)."""

    @staticmethod
    def forward(ctx, x, group, to_tensor_parallel):
        ctx.group, ctx.to_tp = group, to_tensor_parallel
        return comm.all_gather(x, group, dim=0)

    @staticmethod
    def backward(ctx, g):
        if ctx.to_tp:
            return comm.reduce_scatter(g, ctx.group, dim=0), None, None
        return comm.split(g, ctx.group, dim=0), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """forward: reduce-scatter dim 0 (sum partial products, keep 1/T of the sequences); backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter(x, group, dim=0)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, dim=0), None


def _active(group: Group) -> bool:
    return comm.group_size(group) > 1


def copy_to_tensor_parallel_region(x: Tensor, group: Group) -> Tensor:
    return _CopyToTP.apply(x, group) if _active(group) else x


def reduce_from_tensor_parallel_region(x: Tensor, group: Group) -> Tensor:
    return _ReduceFromTP.apply(x, group) if _active(group) else x


def gather_from_tensor_parallel_region(x: Tensor, group: Group) -> Tensor:
    return _GatherFromTP.apply(x, group) if _active(group) else x


def scatter_to_sequence_region(x: Tensor, group: Group) -> Tensor:
    return _ScatterToSequence.apply(x, group) if _active(group) else x


def gather_from_sequence_region(x: Tensor, group: Group, *, to_tensor_parallel: bool = True) -> Tensor:
    return _GatherFromSequence.apply(x, group, to_tensor_parallel) if _active(group) else x


def reduce_scatter_to_sequence_region(x: Tensor, group: Group) -> Tensor:
    return _ReduceScatterToSequence.apply(x, group) if _active(group) else x
