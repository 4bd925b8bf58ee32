"""Parallelism applied from outside the model: the (dp, tp) mesh, Megatron tensor parallelism with autograd
collectives, sequence parallelism, the RNG tracker, activation checkpointing and FSDP2.

Names are imported on first use (:mod:`seer._lazy`): the config (:mod:`.config`) needs no torch.
``parallelize`` lives in :mod:`.apply` (a submodule of the function's own name would replace the function
on the package once imported)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"ParallelConfig": "config", "ParallelDims": "dims", "validate_parallel_config": "dims",
            "ColumnParallelLinear": "layers", "RowParallelLinear": "layers", "TPLayerNorm": "layers",
            "TPLayerScale": "layers", "parallelize": "apply", "RNGStatesTracker": "random",
            "get_rng_tracker": "random", "seed_parallel_rng": "random", "SyncBatchNorm1d": "sync_batch_norm",
            "convert_sync_batch_norm": "sync_batch_norm", "full_gradients": "state",
            "full_state_dict": "state", "unshard": "state", "apply_tensor_parallel": "tensor_parallel",
            "model_parts": "tensor_parallel", "tensor_parallel_group": "tensor_parallel",
            "tensor_parallel_params": "tensor_parallel", "validate_tensor_parallel": "tensor_parallel"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see
    from .apply import parallelize
    from .config import ParallelConfig
    from .dims import ParallelDims, validate_parallel_config
    from .layers import ColumnParallelLinear, RowParallelLinear, TPLayerNorm, TPLayerScale
    from .random import RNGStatesTracker, get_rng_tracker, seed_parallel_rng
    from .state import full_gradients, full_state_dict, unshard
    from .sync_batch_norm import SyncBatchNorm1d, convert_sync_batch_norm
    from .tensor_parallel import (apply_tensor_parallel, model_parts, tensor_parallel_group, tensor_parallel_params,
                                  validate_tensor_parallel)
