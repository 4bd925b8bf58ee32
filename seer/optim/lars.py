r"""LARS (apex's LARC, as SwAV and SEER use it) on top of SGD with momentum, as one multi-tensor step.

Per parameter tensor w with gradient g (seer_spec.md 1.10), when ||w|| > 0 and ||g|| > 0:

    eta = trust * ||w|| / (||g|| + wd * ||w|| + eps)         (clip: eta = min(eta / lr, 1))
    d   = (g + wd * w) * eta
otherwise (a zero tensor, e.g. a fresh bias) d = g: no adaptation *and no weight decay* (apex zeroes the
group's weight decay for the inner step). Parameters in a group with ``lars=False`` (the optional
bias/norm exclusion) get plain SGD: d = g + wd * w. Then SGD with momentum m, no dampening, no Nesterov:

    buf = d (first step), buf = m * buf + d (later);   w = w - lr * buf

Norms are those of the full logical tensor: for an FSDP2 shard (a DTensor) the per-shard squared norms are
all-reduced over the mesh dimensions it is sharded on; for a tensor-parallel slice over the TP group.
Replicated tensors are not reduced, so nothing is counted twice. The norms of a step take one all-reduce
per sharding group, and no value is copied to the host. Parameters whose grad is None are skipped entirely
(frozen prototypes).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..model.init import local_tensor
from ..parallel import comm
from ..parallel.state import shard_reduce_groups
from ..parallel.tensor_parallel import tensor_parallel_group, tensor_parallel_params


class LARS(Optimizer):
    """SGD + LARC (module doc). Param-group keys: lr, momentum, weight_decay, trust_coefficient, eps, clip,
    lars (adapt this group), tensor_parallel (this group's tensors are split over ``tensor_parallel_group``).

    Args:
        params: parameters or param groups (see :func:`lars_param_groups` for the usual grouping).
        tensor_parallel_group: the group over which ``tensor_parallel=True`` groups are split.
    """

    def __init__(self, params, lr: float = 4.8, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, clip: bool = False, *,
                 tensor_parallel_group: Optional[dist.ProcessGroup] = None):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coefficient", trust_coefficient), ("eps", eps)):
            if not value >= 0:
                raise ValueError(f"LARS: '{name}' must be >= 0, got {value!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, clip=clip, lars=True, tensor_parallel=False)
        super().__init__(params, defaults)
        self.tensor_parallel_group = tensor_parallel_group

    def _reduce_groups(self, group: dict, p: Tensor) -> tuple:
        """The process groups over which ``p``'s squared norms must be summed (possibly none)."""
        return shard_reduce_groups(p, self.tensor_parallel_group if group["tensor_parallel"] else None)

    def _squared_norms(self, entries: list[tuple[dict, Tensor, Tensor, Tensor]]) -> Tensor:
        """(2, n) float32: squared norms of the full logical weights (row 0) and gradients (row 1).

        ``entries``: (param group, parameter, its local tensor, its gradient's local tensor) per column.

        Tensors are bucketed by the groups they are sharded over; each bucket's norms go through one
        all-reduce per group (one bucket for FSDP alone, two for FSDP x TP).
        """
        buckets: dict[tuple, list[int]] = {}
        for i, (group, p, _, _) in enumerate(entries):
            buckets.setdefault(self._reduce_groups(group, p), []).append(i)
        columns: list[Tensor] = [None] * len(entries)  # type: ignore[list-item]
        for groups, idx in buckets.items():
            ws = [entries[i][2] for i in idx]
            gs = [entries[i][3] for i in idx]
            sq = torch.stack([torch.stack([n.float() for n in torch._foreach_norm(ws)]),
                              torch.stack([n.float() for n in torch._foreach_norm(gs)])]).square()
            for pg in groups:
                sq = comm.all_reduce(sq, pg)
            for j, i in enumerate(idx):
                columns[i] = sq[:, j]
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        groups = [(g, ps) for g, ps in groups if ps]
        if not groups:
            return loss
        # Local tensors (the shards of DTensors), built once per step for the norms and the update.
        local = [([local_tensor(p) for p in ps], [local_tensor(p.grad) for p in ps]) for _, ps in groups]
        norms = self._squared_norms([(g, p, w, gr) for (g, ps), (ws, gs) in zip(groups, local)
                                     for p, w, gr in zip(ps, ws, gs)]).sqrt()
        start = 0
        for (group, params), (ws, gs) in zip(groups, local):
            wn, gn = norms[:, start:start + len(params)]
            start += len(params)
            self._update(group, params, ws, gs, wn, gn)
        return loss

    def _update(self, group: dict, params: list[Tensor], ws: list[Tensor], gs: list[Tensor], wn: Tensor,
                gn: Tensor) -> None:
        """One group's step; ``ws`` / ``gs``: the local tensors of ``params`` and of their gradients."""
        # Hyper-parameters are Python numbers (kernel arguments): no host-to-device copy, no sync.
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        if group["lars"]:
            adapt = (wn > 0) & (gn > 0)
            eta = group["trust_coefficient"] * wn / (gn + wd * wn + group["eps"])
            if group["clip"]:
                eta = (eta / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(eta)
            eta = torch.where(adapt, eta, torch.ones_like(eta))
            # Per-tensor factors stay on the device as 0-d tensors (no host sync); d = eta*g + wd*eta*w.
            d = torch._foreach_mul(gs, list(eta.unbind()))
            if wd != 0:
                torch._foreach_addcmul_(d, ws, list((adapt.float() * (wd * eta)).unbind()))
        else:
            d = torch._foreach_add(gs, ws, alpha=wd) if wd != 0 else [g.clone() for g in gs]
        all_bufs, bufs, fresh = [], [], []
        for p, u in zip(params, d):
            state = self.state[p]
            new = "momentum_buffer" not in state
            if new:
                # Same type as the parameter (a DTensor under FSDP2), so that distributed checkpoints shard
                # it like the parameter; updated through its local tensor.
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = local_tensor(state["momentum_buffer"])
            (fresh if new else bufs).append((buf, u))
            all_bufs.append(buf)
        if fresh:
            torch._foreach_copy_([b for b, _ in fresh], [u for _, u in fresh])
        if bufs:
            torch._foreach_mul_([b for b, _ in bufs], momentum)
            torch._foreach_add_([b for b, _ in bufs], [u for _, u in bufs])
        torch._foreach_add_(ws, all_bufs, alpha=-lr)


def lars_param_groups(model: nn.Module, *, exclude_bias_and_norm: bool = False) -> list[dict]:
    """Param groups for :class:`LARS`: tensor-parallel slices vs replicated tensors, and, with
    ``exclude_bias_and_norm``, 1-D tensors (biases, norm and LayerScale weights) in groups with no weight
    decay and no adaptation (lightly/solo-learn's choice; SwAV and SEER exclude nothing)."""
    tp_ids = {id(p) for p in tensor_parallel_params(model)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        excluded = exclude_bias_and_norm and p.dim() <= 1
        groups.setdefault((id(p) in tp_ids, excluded), []).append(p)
    out = []
    for (tp, excluded), params in sorted(groups.items()):
        group = {"params": params, "tensor_parallel": tp}
        if excluded:
            group.update(weight_decay=0.0, lars=False)
        out.append(group)
    return out


def build_lars(model: nn.Module, *, lr: float = 4.8, momentum: float = 0.9, weight_decay: float = 1e-6,
               trust_coefficient: float = 0.001, eps: float = 1e-8, clip: bool = False,
               exclude_bias_and_norm: bool = False) -> LARS:
    """LARS over ``model`` with its tensor-parallel group found from its layers."""
    return LARS(lars_param_groups(model, exclude_bias_and_norm=exclude_bias_and_norm), lr=lr, momentum=momentum,
                weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, clip=clip,
                tensor_parallel_group=tensor_parallel_group(model))
