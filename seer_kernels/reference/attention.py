"""Attention, the pure-torch specification: softmax(q k^T * scale) v, non-causal, with log-sum-exp rows.

Shapes: q (B, H, Nq, D), k and v (B, H, Nk, D); out (B, H, Nq, D); lse (B, H, Nq) float32 with
lse[i] = log sum_j exp(scale * q_i . k_j). The backward recomputes the probabilities from lse.
Math in float32 (float64 for float64 inputs); outputs in the input dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p, v.to(ct))
    return out.to(q.dtype), lse.float() if ct != torch.float64 else lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv from the saved log-sum-exp (P is recomputed, never stored by the forward)."""
    ct = _compute_dtype(q)
    qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    p = torch.exp(torch.matmul(qc, kc.transpose(-1, -2)) * scale - lse.to(ct).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    delta = (doc * out.to(ct)).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kc)
    dk = torch.matmul(ds.transpose(-1, -2), qc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
