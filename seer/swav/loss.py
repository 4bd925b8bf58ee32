r"""The SwAV swapped-prediction loss (seer_spec.md 1.7).

For crops v = 0..V-1 of B images with prototype scores S_v (B, K), assignment crops A (the global crops):

    q_a = Sinkhorn(S_a)  (no gradient; with a queue, Sinkhorn sees [queue scores; S_a] and q_a keeps the
                          batch rows)
    L = 1/|A| sum_{a in A} 1/(V-1) sum_{v != a} 1/B sum_i H(q_{a,i}, softmax(S_{v,i} / tau))

Cross-entropy is linear in its targets, so each crop's predictions are scored once, against the mixed
target T_v = sum_{a in A, a != v} q_a / (|A| (V-1)):  L = 1/B sum_v sum_i H(T_{v,i}, softmax(S_{v,i} / tau)),
where H(t, p) = -sum_k t_k log p_k. That is one log-softmax per crop instead of one per (a, v) pair, and under
tensor parallelism one set of small all-reduces in the forward and none in the backward.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import seer_kernels

from ..parallel.cross_entropy import soft_cross_entropy


def _validate(scores, crops_for_assign, temperature, queue_scores) -> tuple[int, int]:
    if isinstance(scores, Tensor) or not isinstance(scores, Sequence) or len(scores) < 2:
        raise ValueError("swav_loss: 'scores' must be a list with one (B, K) tensor per crop (at least 2 crops)")
    for v, s in enumerate(scores):
        if not isinstance(s, Tensor) or s.dim() != 2:
            raise ValueError(f"swav_loss: scores[{v}] must be a 2-D (B, K) tensor, got "
                             f"{type(s).__name__ if not isinstance(s, Tensor) else tuple(s.shape)}")
        if s.shape != scores[0].shape:
            raise ValueError(f"swav_loss: every crop's scores must have the same (B, K) shape; scores[0] is "
                             f"{tuple(scores[0].shape)}, scores[{v}] is {tuple(s.shape)}")
    n_crops = len(scores)
    if not crops_for_assign or len(set(crops_for_assign)) != len(crops_for_assign) or any(
            isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 0 <= a < n_crops
            for a in crops_for_assign):
        raise ValueError(f"swav_loss: 'crops_for_assign' must be distinct crop indices in [0, {n_crops}), got "
                         f"{tuple(crops_for_assign)!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"swav_loss: 'temperature' must be a finite number > 0, got {temperature!r}")
    if queue_scores is not None:
        if len(queue_scores) != len(crops_for_assign):
            raise ValueError(f"swav_loss: 'queue_scores' must hold one (Q, K) tensor per assignment crop "
                             f"({len(crops_for_assign)}), got {len(queue_scores)}")
        for i, q in enumerate(queue_scores):
            if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[1] != scores[0].shape[1]:
                raise ValueError(f"swav_loss: queue_scores[{i}] must be (Q, {scores[0].shape[1]}), got "
                                 f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
    return n_crops, scores[0].shape[0]


def swav_loss(scores: Sequence[Tensor], *, crops_for_assign: Sequence[int] = (0, 1), temperature: float = 0.1,
              epsilon: float = 0.05, iterations: int = 3, queue_scores: Optional[Sequence[Tensor]] = None,
              group: Optional[dist.ProcessGroup] = None, prototype_group: Optional[dist.ProcessGroup] = None,
              check_finite: bool = False) -> Tensor:
    """The SwAV loss (module doc), a float32 scalar differentiable with respect to ``scores``.

    Args:
        scores: one (B, K) tensor of prototype scores per crop, in crop order (K/T columns under tensor
            parallelism).
        crops_for_assign: crops whose Sinkhorn codes are the targets.
        temperature: tau.
        epsilon, iterations: Sinkhorn's (``seer_kernels.sinkhorn``).
        queue_scores: optional list with one (Q, K) tensor per assignment crop: queued embeddings scored by
            the current prototypes, placed before the batch for Sinkhorn (as SwAV does).
        group: the data-parallel group: Sinkhorn normalises over the global batch. The loss is this rank's
            mean over its B images; averaging gradients over ranks (FSDP) makes it the global mean.
        prototype_group: the tensor-parallel group when K is split; the loss is then identical on those
            ranks (not to be averaged over them again).
        check_finite: let Sinkhorn raise on NaN/inf scores (a device-to-host sync); off in the hot path,
            where non-finite scores give a NaN loss instead.
    """
    n_crops, batch = _validate(scores, crops_for_assign, temperature, queue_scores)
    weight = 1.0 / (len(crops_for_assign) * (n_crops - 1))
    codes = []
    with torch.no_grad():
        for i, a in enumerate(crops_for_assign):
            s = scores[a].detach()
            if queue_scores is not None:
                s = torch.cat([queue_scores[i].detach().to(s.dtype), s])
            q = seer_kernels.sinkhorn(s, epsilon, iterations, group=group, prototype_group=prototype_group,
                                      check_finite=check_finite)
            codes.append(q[-batch:])
        targets = []
        for v in range(n_crops):
            mixed = [q for a, q in zip(crops_for_assign, codes) if a != v]
            # A crop that is the only assignment crop predicts nothing (its target is zero).
            t = torch.stack(mixed).sum(0) * weight if mixed else torch.zeros_like(codes[0])
            targets.append(t)
    logits = torch.cat([s.float() for s in scores]) / temperature
    return soft_cross_entropy(logits, torch.cat(targets), prototype_group).sum() / batch
