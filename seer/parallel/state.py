"""Full (logical) tensors from a parallelised model (for export, for checks, for comparing layouts), and into
one (weights that another layout wrote: continued pretraining from a checkpoint or an export).

Collective calls: every rank of the model's groups must call them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..model.init import DTensor, local_tensor
from . import comm
from .layers import shard_cols, shard_rows


def unshard(t: Tensor, module: nn.Module, name: str) -> Tensor:
    """The full tensor behind ``t``, the parameter ``name`` of ``module`` (or its gradient): FSDP2 shards are
    all-gathered over their mesh, tensor-parallel slices over the TP group (q/k/v blocks put back in order)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    size = getattr(module, "tp_size", 1)
    if size == 1 or name not in getattr(module, "tp_split_params", ()):
        return t
    if module.tp_group is None:  # (comm.all_gather would return this rank's slice as if it were the whole)
        raise ValueError(f"unshard: {type(module).__name__}.{name} is split over tp_size={size} but its layer has "
                         f"no process group (apply_tensor_parallel(group=None) only reshapes): the other ranks' "
                         f"slices cannot be gathered")
    dim = module.tp_split_dim
    gathered = comm.all_gather(t.contiguous(), module.tp_group, dim=dim)
    chunks = module.tp_chunks
    if chunks > 1:  # [rank 0: q0 k0 v0 | rank 1: q1 k1 v1] -> [q0 q1 | k0 k1 | v0 v1]
        part = t.shape[0] // chunks
        gathered = gathered.reshape(size, chunks, part, *t.shape[1:]).transpose(0, 1).reshape(
            size * t.shape[0], *t.shape[1:])
    return gathered


def shard_reduce_groups(t: Tensor, tp_group: Optional[dist.ProcessGroup] = None) -> tuple:
    """The process groups over which a per-rank sum over ``t`` (a squared norm) must be all-reduced to cover
    the full logical tensor, in reduction order: the mesh groups of the FSDP2 shard dimensions of ``t`` (a
    DTensor), then ``tp_group`` (pass it for a tensor-parallel slice, else None). Groups of size 1 are
    dropped, so a replicated tensor gets ``()`` and is counted once."""
    out = []
    if isinstance(t, DTensor):
        out += [t.device_mesh.get_group(dim) for dim, pl in enumerate(t.placements) if pl.is_shard()]
    if tp_group is not None:
        out.append(tp_group)
    return tuple(g for g in out if comm.group_size(g) > 1)


def _named(model: nn.Module, grads: bool) -> dict[str, Optional[Tensor]]:
    out = {}
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            fqn = f"{mod_name}.{name}" if mod_name else name
            t = p.grad if grads else p
            out[fqn] = unshard(t.detach(), module, name) if t is not None else None
    return out


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Parameter name -> full tensor (names as in the single-device model), plus the buffers."""
    out = _named(model, grads=False)
    for name, b in model.named_buffers():
        out[name] = b.full_tensor() if isinstance(b, DTensor) else b
    return out


def full_gradients(model: nn.Module) -> dict[str, Optional[Tensor]]:
    """Parameter name -> full gradient (None where the gradient is None)."""
    return _named(model, grads=True)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, Tensor]) -> None:
    """Copy full (single-device) tensors into a parallelised model's parameters and buffers, in place: each
    rank keeps its tensor-parallel slice of a split parameter (q/k/v blocks taken in order, as
    :func:`seer.parallel.layers.shard_rows`), then its FSDP2 shard of that (DTensor's own split, cut locally
    without communication). ``full``: name -> tensor, names as in the single-device model; it may cover part
    of the model (the rest is left as it is), but each name must be one of the model's, with its full shape.
    Not collective."""
    left = set(full)
    for mod_name, module in model.named_modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            fqn = f"{mod_name}.{name}" if mod_name else name
            if fqn not in full:
                continue
            left.discard(fqn)
            src = full[fqn]
            size = getattr(module, "tp_size", 1)
            if size > 1 and name in getattr(module, "tp_split_params", ()):
                src = shard_rows(src, module.tp_rank, size, module.tp_chunks, fqn) if module.tp_split_dim == 0 \
                    else shard_cols(src, module.tp_rank, size, fqn)
            if isinstance(t, DTensor):
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"{fqn}: the tensor has shape {tuple(src.shape)}, the model's "
                                     f"{tuple(t.shape)}")
                src = _local_shard(src.to(t.device), t)
            dest = local_tensor(t)
            if tuple(src.shape) != tuple(dest.shape):
                raise ValueError(f"{fqn}: the tensor has shape {tuple(full[fqn].shape)}, which does not fit the "
                                 f"model's {tuple(dest.shape)} on this rank")
            dest.copy_(src)
    if left:
        raise KeyError(f"tensors the model does not have: {', '.join(sorted(left)[:5])}"
                       f"{' ...' if len(left) > 5 else ''}")


def _local_shard(src: Tensor, like: DTensor) -> Tensor:
    """This rank's part of the full tensor ``src`` when laid out as the DTensor ``like`` (its mesh and
    placements): the slice DTensor itself would hold, cut from ``src`` on every rank alike."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(src, like.device_mesh, like.placements, src_data_rank=None).to_local()
