"""Parallelism applied from outside the model: the (dp, tp) mesh, Megatron tensor parallelism with autograd
collectives, sequence parallelism, the RNG tracker, activation checkpointing and FSDP2."""
from .dims import ParallelConfig, ParallelDims, validate_parallel_config
from .layers import ColumnParallelLinear, RowParallelLinear, TPLayerNorm, TPLayerScale
from .parallelize import parallelize
from .random import RNGStatesTracker, get_rng_tracker, seed_parallel_rng
from .state import full_gradients, full_state_dict, unshard
from .tensor_parallel import (apply_tensor_parallel, model_parts, tensor_parallel_group, tensor_parallel_params,
                              validate_tensor_parallel)

__all__ = ["ColumnParallelLinear", "ParallelConfig", "ParallelDims", "RNGStatesTracker", "RowParallelLinear",
           "TPLayerNorm", "TPLayerScale", "apply_tensor_parallel", "full_gradients", "full_state_dict",
           "get_rng_tracker", "model_parts", "parallelize", "seed_parallel_rng", "tensor_parallel_group",
           "tensor_parallel_params", "unshard", "validate_parallel_config", "validate_tensor_parallel"]
