"""Tensor-parallel layers (Megatron's column/row split), built from the single-device modules they replace
with the same parameter names, so that state dicts keep their keys.

ColumnParallelLinear: Y = X A^T with A split by rows (output features) [A_1; ...; A_T]; rank r computes
Y_r = X A_r^T, its own output columns. RowParallelLinear: A split by columns (input features); rank r
computes X_r A_r^T, a partial sum of Y that is all-reduced (or reduce-scattered under sequence parallelism).
Column then Row needs one all-reduce in the forward and one in the backward (Megatron's MLP/attention).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.layers import LayerNorm, LayerScale
from . import comm
from .mappings import (copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region,
                       reduce_scatter_to_sequence_region)


def _check_split(rows: int, size: int, what: str, chunks: int = 1) -> None:
    """ValueError naming the dimension when ``rows`` cannot be cut into ``chunks`` blocks of ``size`` equal
    parts: the slices below would silently leave the remainder out."""
    if rows % chunks:
        raise ValueError(f"tensor parallelism: {what}={rows} is not divisible into {chunks} fused blocks")
    if (rows // chunks) % size:
        blocks = f" ({chunks} fused blocks of {rows // chunks} rows)" if chunks > 1 else ""
        raise ValueError(f"tensor parallelism: {what}={rows}{blocks} is not divisible by tp_size={size}")


def shard_rows(t: Tensor, rank: int, size: int, chunks: int = 1, what: str = "dim 0") -> Tensor:
    """Rank ``rank``'s rows of ``t`` (dim 0), taken from each of ``chunks`` equal blocks.

    A fused q/k/v weight is [Wq; Wk; Wv]: sharding it naively would give rank 0 all of Wq. With chunks=3 each
    rank gets [Wq_r; Wk_r; Wv_r], its own heads of each. ``what`` names dim 0 in the error for sizes that do
    not split.
    """
    _check_split(t.shape[0], size, what, chunks)
    n = t.shape[0] // chunks
    part = n // size
    blocks = t.detach().reshape(chunks, n, *t.shape[1:])[:, rank * part:(rank + 1) * part]
    return blocks.reshape(chunks * part, *t.shape[1:]).clone()


def shard_cols(t: Tensor, rank: int, size: int, what: str = "dim 1") -> Tensor:
    _check_split(t.shape[1], size, what)
    part = t.shape[1] // size
    return t.detach()[:, rank * part:(rank + 1) * part].clone()


def _param(t: Optional[Tensor], like: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(t, requires_grad=like.requires_grad if like is not None else True)


def _check_group(layer: nn.Module) -> None:
    """ValueError for a layer split ``tp_size`` ways without a process group (apply_tensor_parallel(group=None)
    only reshapes): the collectives would be no-ops and its output this rank's partial result, silently."""
    if layer.tp_size > 1 and layer.tp_group is None:
        raise ValueError(f"{type(layer).__name__}: this layer holds 1/{layer.tp_size} of its weight but has no "
                         f"process group (apply_tensor_parallel(group=None) only reshapes): its forward needs the "
                         f"tensor-parallel group, without it the output would be a partial result")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _SequenceParallelColumnLinear(torch.autograd.Function):
    """Y = all_gather(X_local) A_r^T + b_r, saving only X_local (1/T of the sequences).

    backward: all-gather X_local again for dA_r = dY^T X; dX = reduce_scatter(dY A_r) (every rank's dY A_r is
    a partial sum over the output columns). Saving the gathered X instead would keep T times the memory that
    sequence parallelism is there to divide. Under autocast the matmuls run in the autocast dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        device_type = x.device.type
        dtype = _autocast_dtype(device_type) or weight.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        b_c = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            y = F.linear(comm.all_gather(x_c, group, dim=0), w_c, b_c)
        ctx.save_for_backward(x_c, w_c)
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        x_local, w = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(w.dtype)
            x_full = comm.all_gather(x_local, ctx.group, dim=0)
            grad_x = comm.reduce_scatter(grad.matmul(w), ctx.group, dim=0)
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_w = g2.t().matmul(x_full.reshape(-1, x_full.shape[-1]))
            grad_b = g2.sum(0).to(b_dtype) if ctx.has_bias else None
        return grad_x.to(x_dtype), grad_w.to(w_dtype), grad_b, None


class ColumnParallelLinear(nn.Linear):
    """An ``nn.Linear`` whose output features are split over the tensor-parallel group (module doc).

    The input is replicated (identity forward / all-reduce backward) or, with ``sequence_parallel``, holds
    1/T of the sequences and is all-gathered (reduce-scattered in the backward). The output stays split.
    """

    tp_split_params = ("weight", "bias")
    tp_split_dim = 0

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, group, tp_rank: int, tp_size: int,
                 chunks: int = 1, sequence_parallel: bool = False):
        nn.Module.__init__(self)  # the parameters exist already: skip nn.Linear's allocation and init
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)
        self.tp_group, self.tp_rank, self.tp_size = group, tp_rank, tp_size
        self.tp_chunks = chunks  # 3 for a fused q/k/v projection (see shard_rows)
        self.sequence_parallel = sequence_parallel

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group, tp_rank: int, tp_size: int, chunks: int = 1,
                    sequence_parallel: bool = False) -> "ColumnParallelLinear":
        w = _param(shard_rows(linear.weight, tp_rank, tp_size, chunks, "out_features"), linear.weight)
        b = _param(shard_rows(linear.bias, tp_rank, tp_size, chunks, "out_features")
                   if linear.bias is not None else None, linear.bias)
        return cls(w, b, group=group, tp_rank=tp_rank, tp_size=tp_size, chunks=chunks,
                   sequence_parallel=sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        _check_group(self)
        if self.sequence_parallel and self.tp_size > 1:
            return _SequenceParallelColumnLinear.apply(x, self.weight, self.bias, self.tp_group)
        return F.linear(copy_to_tensor_parallel_region(x, self.tp_group), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (of {self.out_features * self.tp_size}), "
                f"bias={self.bias is not None}, tp_rank={self.tp_rank}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Linear):
    """An ``nn.Linear`` whose input features are split; partial outputs are all-reduced (or reduce-scattered
    over the sequences with ``sequence_parallel``). The bias is replicated and added once, after the sum."""

    tp_split_params = ("weight",)
    tp_split_dim = 1
    tp_chunks = 1

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, group, tp_rank: int, tp_size: int,
                 sequence_parallel: bool = False):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)
        self.tp_group, self.tp_rank, self.tp_size = group, tp_rank, tp_size
        self.sequence_parallel = sequence_parallel

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group, tp_rank: int, tp_size: int,
                    sequence_parallel: bool = False) -> "RowParallelLinear":
        w = _param(shard_cols(linear.weight, tp_rank, tp_size, "in_features"), linear.weight)
        b = _param(linear.bias.detach().clone(), linear.bias) if linear.bias is not None else None
        return cls(w, b, group=group, tp_rank=tp_rank, tp_size=tp_size, sequence_parallel=sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        _check_group(self)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.tp_group)
            # Added on this rank's sequences only: its gradient is a partial sum, completed over the group.
            bias = copy_to_tensor_parallel_region(self.bias, self.tp_group) if self.bias is not None else None
        else:
            y = reduce_from_tensor_parallel_region(y, self.tp_group)
            bias = self.bias
        if bias is None:
            return y
        # In y's dtype, as nn.Linear adds its bias inside the (autocast bf16) matmul: a float32 bias made the
        # output, and from there the residual stream, float32 under tensor parallelism alone (float32
        # checkpointed inputs and backward all-reduces, where the single-device model stays bf16).
        return y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (of {self.in_features * self.tp_size}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, tp_rank={self.tp_rank}, "
                f"sequence_parallel={self.sequence_parallel}")


class TPLayerNorm(LayerNorm):
    """A LayerNorm with replicated parameters applied to rank-specific data (a sequence shard, or a subset of
    the heads for QK-norm): each rank's parameter gradient is a partial sum, completed by an all-reduce
    (identity forward / all-reduce backward on the parameters)."""

    tp_group: Optional[dist.ProcessGroup] = None

    def forward(self, x: Tensor) -> Tensor:
        return self._norm(x, copy_to_tensor_parallel_region(self.weight, self.tp_group),
                          copy_to_tensor_parallel_region(self.bias, self.tp_group))


class TPLayerScale(LayerScale):
    """LayerScale on a sequence shard: gamma's gradient is all-reduced over the group (see TPLayerNorm)."""

    tp_group: Optional[dist.ProcessGroup] = None

    def forward(self, x: Tensor) -> Tensor:
        return x * copy_to_tensor_parallel_region(self.gamma, self.tp_group).to(x.dtype)  # (LayerScale.forward)


def make_tensor_parallel_replicated(module: nn.Module, group) -> nn.Module:
    """Turn a LayerNorm / LayerScale into its TP version in place: same object, same parameters, a subclass
    whose forward completes the parameter gradients over ``group`` (FSDP2 swaps classes the same way)."""
    cls = {LayerNorm: TPLayerNorm, LayerScale: TPLayerScale}.get(type(module))
    if cls is None:
        raise TypeError(f"no tensor-parallel version of {type(module).__name__}")
    module.__class__ = cls
    module.tp_group = group
    return module
