"""FSDP2 over the data-parallel mesh dimension: parameters, gradients and optimizer state sharded over the
DP ranks, gathered one block at a time for compute.

Units: every block; the head's projection MLP; the prototypes on their own in float32 (VISSL does the
same: bf16 prototype scores lose the precision Sinkhorn needs, seer_spec.md 1.5); the root (patch and
position embeddings, final norm). Tensor-parallel parameters are plain per-rank tensors, so FSDP2 simply
shards each rank's slice over its DP group.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

try:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .dims import DTYPES, ParallelConfig
from .tensor_parallel import model_parts


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, cfg: ParallelConfig) -> nn.Module:
    trunk, head = model_parts(model)
    param_dtype, reduce_dtype = DTYPES[cfg.param_dtype], DTYPES[cfg.reduce_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    reshard = cfg.fsdp_reshard_after_forward
    for block in trunk.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    if head is not None:
        fully_shard(head.projection, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(head.prototypes, mesh=dp_mesh, mp_policy=fp32, reshard_after_forward=reshard)
    # The root does not cast its inputs: the images are cast by the patch embedding, and queued embeddings
    # must reach the float32 prototypes without a detour through bf16.
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=root_mp, reshard_after_forward=reshard)
    return model
