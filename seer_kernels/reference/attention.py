"""Attention, the pure-torch specification: softmax(q k^T * scale) v, non-causal, with log-sum-exp rows.

Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D); out (B, H, Nq, D); lse (B, H, Nq) with

    s_ij   = scale * q_i . k_j
    lse_i  = log sum_j exp(s_ij)                       (natural log)
    p_ij   = exp(s_ij - lse_i)
    out_i  = sum_j p_ij v_j

Backward, from the saved lse (P is recomputed, never stored by the forward):

    dv_j   = sum_i p_ij dout_i
    dp_ij  = dout_i . v_j
    delta_i = sum_j p_ij dp_ij = dout_i . out_i        (the cheap form every fused kernel uses)
    ds_ij  = p_ij (dp_ij - delta_i)
    dq_i   = scale * sum_j ds_ij k_j
    dk_j   = scale * sum_i ds_ij q_i

Math in float32 (float64 for float64 inputs); out, dq, dk, dv in the input dtype; lse in float32
(float64 for float64 inputs). Every backend of :mod:`seer_kernels.ops.attention` returns exactly these
tensors, in the layouts of :func:`new_out` and :func:`new_grads`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import autocast_off


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_out(q: Tensor, v: Tensor) -> Tensor:
    """The output buffer, (B, H, Nq, D) viewed on (B, Nq, H, D) memory.

    This is the layout of torch's flash SDPA: the ViT's following ``out.transpose(1, 2).reshape(B, N, H*D)``
    is then a free view instead of a copy of the whole activation.
    """
    b, h, n, _ = q.shape
    d = v.shape[-1]
    # empty_strided, not empty((b, n, h, d)).transpose(1, 2): one call on the eager path's host time
    return torch.empty_strided((b, h, n, d), (n * h * d, d, h * d, 1), dtype=q.dtype, device=q.device)


def new_lse(q: Tensor) -> Tensor:
    return torch.empty(q.shape[:-1], dtype=compute_dtype(q.dtype), device=q.device)


@autocast_off
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    ct = compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = new_out(q, v)
    out.copy_(torch.matmul(p, v.to(ct)))
    return out, lse


@autocast_off
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous) from the saved log-sum-exp."""
    ct = compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    p = torch.exp(torch.matmul(qc, kc.transpose(-1, -2)) * scale - lse.to(ct).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    delta = (doc * out.to(ct)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kc)
    dk = torch.matmul(ds.transpose(-1, -2), qc)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous())
