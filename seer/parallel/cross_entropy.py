"""Cross-entropy against soft targets with the classes (prototypes) optionally split over a process group.

    loss_i = -sum_k t_ik log softmax(l_i)_k = lse(l_i) * sum_k t_ik - sum_k t_ik l_ik

With the K columns split over ranks (a column-parallel prototype layer), the row max, the sum of
exponentials, sum_k t_ik and sum_k t_ik l_ik are all-reduced in the forward; the gradient
dL/dl_ik = g_i (softmax_ik * sum_k t_ik - t_ik) only needs this rank's columns, so the backward has no
communication (Megatron's vocab-parallel cross-entropy, extended to soft targets).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group):
        logits = logits.float()
        targets = targets.float()
        # The max only shifts the exponent for range; it is a constant of the gradient.
        row_max = comm.all_reduce(logits.amax(dim=1), group, "max")
        exp = torch.exp(logits - row_max.unsqueeze(1))
        sum_exp = comm.all_reduce(exp.sum(dim=1), group)
        sums = comm.all_reduce(torch.stack([targets.sum(dim=1), (targets * logits).sum(dim=1)]), group)
        t_sum, t_dot = sums[0], sums[1]
        lse = torch.log(sum_exp) + row_max
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(1)), targets, t_sum)
        return lse * t_sum - t_dot

    @staticmethod
    def backward(ctx, grad):
        softmax, targets, t_sum = ctx.saved_tensors
        return grad.unsqueeze(1) * (softmax * t_sum.unsqueeze(1) - targets), None, None


def soft_cross_entropy(logits: Tensor, targets: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Per-row cross-entropy (N,) float32 of softmax(``logits``) against ``targets`` (both (N, K_local)).

    ``targets`` are constants (no gradient flows to them). With ``group``, each rank passes its own K columns
    and gets the same full-K losses; the gradient reaches only its own columns.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"soft_cross_entropy: logits and targets must be the same (N, K) shape, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return _SoftCrossEntropy.apply(logits, targets.detach(), group)
