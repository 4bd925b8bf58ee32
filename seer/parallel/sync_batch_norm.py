"""BatchNorm1d whose training statistics cover every rank of a process group, on any backend (gloo included).

``nn.SyncBatchNorm`` only runs on accelerators; SwAV's projection head synchronises its BatchNorm over the
data-parallel ranks, so a CPU run with dp ranks must normalise with the statistics of the whole global batch
to compute what one process computes on that batch.

Forward (training). Rank r holds n_r rows (rows = N·L of an (N, C, L) input) with per-channel mean m_r and
sum of squared deviations M2_r. One all-gather of (n_r, m_r, M2_r) and the parallel-variance formula
(Chan et al.), every term non-negative, so nothing cancels:

    n = Σ n_r,   μ = Σ n_r m_r / n,   M2 = Σ M2_r + Σ n_r (m_r − μ)²,
    σ² = M2 / n (normalisation),   M2 / (n − 1) (running variance, as nn.BatchNorm1d),
    x̂ = (x − μ) / √(σ² + eps),   y = w x̂ + b.

Backward. With L = Σ_r L_r the sum of the ranks' losses and g = ∂L_r/∂y on each rank, one all-reduce of the
per-channel Σ g and Σ g x̂ over the group gives the exact gradient through the global statistics:

    ∂L/∂x = (w / √(σ² + eps)) · (g − (1/n) Σ g − x̂ (1/n) Σ g x̂)      (sums over all ranks' rows),
    ∂L_r/∂w = Σ_local g x̂,   ∂L_r/∂b = Σ_local g                      (local).

Summed over ranks the weight and bias gradients are those of L; FSDP averages gradients over the dp ranks,
i.e. the gradient of L / dp, which with each rank's loss a mean over its own images is the single-process
loss on the global batch (seer.swav.swav_loss), exactly as for every other parameter.

Statistics are accumulated in float32 (float64 for float64 input) and combined over ranks in float64; the
output has the input's dtype. Every rank of the group must call forward in training mode, and backward when
the input requires a gradient, as for any collective. Eval mode, and a group of one rank, are
``nn.BatchNorm1d`` itself: no collective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import comm

Group = Optional[dist.ProcessGroup]


def _rows(x: Tensor) -> tuple[int, ...]:
    """The dims the statistics run over: 0 of (N, C), 0 and 2 of (N, C, L)."""
    return (0,) if x.dim() == 2 else (0, 2)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast against ``x``: (1, C) or (1, C, 1)."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def global_moments(x: Tensor, group: Group) -> tuple[float, Tensor, Tensor]:
    """(n, mean, M2) per channel of ``x`` (N, C) or (N, C, L) over every rank of ``group`` (one all-gather);
    mean and M2 in float64. A rank may hold no rows (it adds nothing)."""
    channels, rows = x.shape[1], x.numel() // max(x.shape[1], 1)
    if rows:
        var, mean = torch.var_mean(x.to(_acc_dtype(x)), dim=_rows(x), correction=0)
        m2 = var * rows
    else:  # var_mean of nothing is NaN; a rank without rows has weight 0 in the sums below
        mean = m2 = x.new_zeros(channels, dtype=_acc_dtype(x))
    local = torch.cat([mean.new_full((1,), rows), mean, m2]).to(torch.float64)
    ranks = comm.all_gather(local.unsqueeze(0), group, dim=0)  # (world, 1 + 2C)
    counts, means, m2s = ranks[:, :1], ranks[:, 1:1 + channels], ranks[:, 1 + channels:]
    n = float(counts.sum())
    mean = (counts * means).sum(0) / max(n, 1.0)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return n, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    """forward: normalise with the group's statistics (all-gather); backward: all-reduce of Σ g and Σ g x̂."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, group):
        n, mean64, m2 = global_moments(x, group)
        if n <= 1:  # every rank sees the same n: all of them raise, none waits in a collective
            raise ValueError(f"SyncBatchNorm1d: expected more than 1 value per channel over the process group "
                             f"when training, got {n:.0f} (this rank's input size {tuple(x.shape)})")
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(mean64.to(running_mean.dtype), alpha=factor)
                running_var.mul_(1 - factor).add_((m2 / (n - 1)).to(running_var.dtype), alpha=factor)
        acc = _acc_dtype(x)
        mean = _per_channel(mean64.to(acc), x)
        invstd = _per_channel(torch.rsqrt(m2 / n + eps).to(acc), x)
        y = (x.to(acc) - mean) * invstd
        if weight is not None:
            y = y * _per_channel(weight.to(acc), x) + _per_channel(bias.to(acc), x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n, ctx.group = n, group
        # Computed in x's own shape: a view of a tensor made here could not be modified in place (ReLU(inplace)).
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable  # a double backward raises instead of differentiating through the collective
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        xhat = (x.to(acc) - mean) * invstd
        g = grad.to(acc)
        sum_g, sum_g_xhat = g.sum(_rows(x)), (g * xhat).sum(_rows(x))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            both = comm.all_reduce(torch.cat([sum_g, sum_g_xhat]), ctx.group)
            mean_g, mean_g_xhat = (both / ctx.n).chunk(2)
            scale = invstd if weight is None else invstd * _per_channel(weight.to(acc), x)
            grad_x = ((g - _per_channel(mean_g, x) - xhat * _per_channel(mean_g_xhat, x)) * scale).to(x.dtype)
        if weight is not None:
            grad_w, grad_b = sum_g_xhat.to(weight.dtype), sum_g.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def sync_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], factor: float, eps: float, group: Group) -> Tensor:
    """Training-mode batch normalisation of ``x`` (N, C) or (N, C, L) with the statistics of every rank of
    ``group`` (None: this process alone); updates ``running_mean``/``running_var`` (if given) in place with
    weight ``factor`` as ``F.batch_norm`` does. Differentiable once (module doc)."""
    return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, factor, eps, group)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are those of all ranks of ``process_group`` (module doc).

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm1d`` (a checkpoint of either loads into
    the other). ``process_group=None`` or a group of one rank: plain ``nn.BatchNorm1d``. Unlike
    ``nn.SyncBatchNorm``, None means no communication, not the default group (seer.parallel.comm's rule).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Group = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = _checked_group(process_group)

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm1d, process_group: Group = None) -> "SyncBatchNorm1d":
        """A SyncBatchNorm1d holding ``bn``'s own parameters and buffers (shared, not copied: an optimizer
        built on ``bn`` keeps working), settings and train/eval mode."""
        if not isinstance(bn, nn.BatchNorm1d):
            raise TypeError(f"SyncBatchNorm1d.from_batch_norm: bn must be an nn.BatchNorm1d, got {type(bn).__name__}")
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
                  device="meta")  # placeholders, replaced below: no memory allocated twice
        for name in ("weight", "bias"):
            setattr(out, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(bn, name))
        return out.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or comm.group_size(self.process_group) == 1:
            return super().forward(x)
        if x.shape[1] != self.num_features:  # checked before the collective: F.batch_norm would say it later
            raise ValueError(f"SyncBatchNorm1d: expected {self.num_features} channels (input dim 1), "
                             f"got input of shape {tuple(x.shape)}")
        # nn.BatchNorm1d's momentum semantics: momentum=None is the cumulative average 1 / num_batches_tracked.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        track = self.track_running_stats and self.running_mean is not None
        return sync_batch_norm(x, self.weight, self.bias, self.running_mean if track else None,
                               self.running_var if track else None, factor, self.eps, self.process_group)

    def extra_repr(self) -> str:  # no torch.distributed call: printable after the process group is gone
        return super().extra_repr() + (", process_group set" if self.process_group is not None else "")


def convert_sync_batch_norm(module: nn.Module, process_group: Group) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` (itself included) by a :class:`SyncBatchNorm1d` over
    ``process_group`` holding the same parameters and buffers, in place; returns ``module`` or, if ``module`` is
    itself a BatchNorm1d, its replacement. Names, hence state_dict keys and checkpoints, are unchanged. Other
    norms (BatchNorm2d, nn.SyncBatchNorm, existing SyncBatchNorm1d) are left as they are."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batch_norm: module must be an nn.Module, got {type(module).__name__}")
    process_group = _checked_group(process_group)
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm1d):
        return SyncBatchNorm1d.from_batch_norm(module, process_group)
    for name, child in list(module.named_children()):
        new = convert_sync_batch_norm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module


def _checked_group(group) -> Group:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"SyncBatchNorm1d: process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    return group
