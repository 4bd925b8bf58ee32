"""The public attention op (PLACEHOLDER from the foundation: reference backend only).

Issue 3 replaces this with the Triton kernels, the SDPA backends, the benchmark-driven selector table and
full validation; the public signature ``attention(q, k, v, *, scale=None)`` stays.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import attention as ref


@torch.library.custom_op("seer::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return ref.attention_fwd(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("seer::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return ref.attention_bwd(dout, q, k, v, out, lse, scale)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.seer.attention_bwd(dout.contiguous(), q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) tensors; scale defaults to 1/sqrt(D)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = torch.ops.seer.attention_fwd(q, k, v, float(scale))
    return out
