"""``parallelize``: the one place where a single-device model becomes a distributed one.

Fixed order (torchtitan's): tensor parallelism -> activation checkpointing -> torch.compile -> FSDP2.
TP must see the plain modules it replaces; checkpointing wraps what TP produced; compile then traces a
block including its recomputation; FSDP2 wraps last so that its hooks surround everything per block.
"""
from __future__ import annotations

import itertools
from typing import Optional

from torch import nn

from ..model.init import DTensor
from .checkpointing import apply_activation_checkpointing
from .dims import ParallelConfig, ParallelDims, validate_parallel_config
from .fsdp import FSDPModule, apply_fsdp
from .random import RNGStatesTracker, get_rng_tracker
from .sync_batch_norm import convert_sync_batch_norm
from .tensor_parallel import apply_tensor_parallel, model_parts, split_module, validate_tensor_parallel


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Optional[ParallelConfig] = None, *,
                tracker: Optional[RNGStatesTracker] = None) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 to a VisionTransformer or SwAVModel, in place.

    The model may live on the meta device (then call ``model.to_empty(device=...)`` and
    :func:`seer.model.init_weights_`). Returns ``model``. Every error is raised before anything is changed:

    - ``dims`` must be a :class:`ParallelDims` and ``cfg`` (default ``dims.cfg``) a valid :class:`ParallelConfig`
      with the layout ``dims`` was built with (same tp and dp); its other fields (sequence parallelism,
      checkpointing, compile, FSDP dtypes) are this model's and may differ from ``dims.cfg``'s;
    - the model must split ``dims.tp`` ways (heads, MLP width, prototypes) and not be parallelised yet;
    - with tensor parallelism and no FSDP (tp > 1, dp == 1) its tensors must be on the meta device or on
      ``dims.device_type`` (FSDP2 moves them to its mesh's device itself).
    """
    cfg = _checked_config(dims, cfg)
    trunk, head = model_parts(model)
    validate_tensor_parallel(trunk.cfg, head.cfg if head is not None else None, dims.tp)
    _check_not_parallelized(model)
    _check_device(model, dims)
    random_in_tp = dims.tp > 1 and (trunk.cfg.dropout > 0 or trunk.cfg.drop_path_rate > 0)
    if random_in_tp and cfg.compile and cfg.activation_checkpointing != "none":
        raise ValueError("parallel.compile=true with activation checkpointing and dropout/drop-path under tensor "
                         "parallelism is not supported: torch.compile cannot trace the checkpoint hook that "
                         "replays the RNG streams. Set model.dropout and model.drop_path_rate to 0 (SEER uses "
                         "neither), or turn compile or checkpointing off")
    tracker = tracker if tracker is not None else get_rng_tracker()

    if dims.tp > 1:
        apply_tensor_parallel(model, group=dims.tp_group, tp_rank=dims.tp_rank, tp_size=dims.tp,
                              sequence_parallel=cfg.sequence_parallel, tracker=tracker)
    apply_activation_checkpointing(trunk.blocks, cfg.activation_checkpointing, tracker if random_in_tp else None)
    if cfg.compile:
        for block in trunk.blocks:
            block.compile()
    if dims.dp > 1:
        if head is not None and head.cfg.batch_norm:
            _sync_batch_norm(head, dims)
        apply_fsdp(model, dims.dp_mesh, cfg)
    return model


def _checked_config(dims: ParallelDims, cfg: Optional[ParallelConfig]) -> ParallelConfig:
    if not isinstance(dims, ParallelDims):
        raise TypeError(f"parallelize: dims must be a ParallelDims (the mesh built from a ParallelConfig), "
                        f"got {type(dims).__name__}")
    cfg = cfg if cfg is not None else dims.cfg
    if not isinstance(cfg, ParallelConfig):
        raise TypeError(f"parallelize: cfg must be a ParallelConfig or None (= dims.cfg), got {type(cfg).__name__}")
    dp = validate_parallel_config(cfg, dims.world_size)
    # TP and FSDP below follow dims' mesh and groups, never cfg.tp / cfg.dp: a cfg with another layout would
    # be half-applied without a word (dims' split and shards with cfg's sequence parallelism and checkpointing).
    if (cfg.tp, dp) != (dims.tp, dims.dp):
        raise ValueError(f"parallelize: cfg has parallel.tp={cfg.tp}, parallel.dp={dp} but dims was built with "
                         f"tp={dims.tp}, dp={dims.dp}: pass cfg=None to use dims.cfg, or build ParallelDims "
                         f"from this config")
    return cfg


def _check_not_parallelized(model: nn.Module) -> None:
    # A second pass would silently cut every TP shard into tp smaller ones and re-wrap what checkpointing and
    # FSDP2 already wrapped (fully_shard then fails half-way): each step expects the plain modules.
    found = _parallelized_part(model)
    if found is not None:
        raise ValueError(f"parallelize: the model is already parallelised ({found}); call parallelize once, "
                         f"on the single-device (or meta-device) model")


def _parallelized_part(model: nn.Module) -> Optional[str]:
    """The first thing an earlier parallelize left in ``model``; None for a plain model."""
    found = split_module(model)
    if found is not None:
        return found
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            return f"{name or 'the model'} (FSDP2)"
        if "_ac_context_fn" in vars(module):
            return f"{name} (activation checkpointing)"
    return next((f"{n} (DTensor)" for n, p in model.named_parameters() if isinstance(p, DTensor)), None)


def _check_device(model: nn.Module, dims: ParallelDims) -> None:
    # FSDP2 (dp > 1) moves every tensor to its mesh's device; without it the tensor-parallel collectives run
    # on dims' backend as the tensors are (NCCL takes no CPU tensors, gloo only some CUDA ones). One process: no
    # collectives, any device.
    if dims.world_size == 1 or dims.dp > 1:
        return
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.device.type not in ("meta", dims.device_type):
            raise ValueError(f"parallelize: {name} is on {t.device} but dims.device_type is "
                             f"{dims.device_type!r} (tensor parallelism without FSDP does not move the model): "
                             f"move the model there, build it on the meta device, or build ParallelDims with "
                             f"device_type={t.device.type!r}")


def _sync_batch_norm(head: nn.Module, dims: ParallelDims) -> None:
    # SwAV synchronises the head's BatchNorm statistics over data-parallel ranks, so that dp ranks compute
    # what one process computes on the global batch. PyTorch's SyncBatchNorm only runs on accelerators; on CPU
    # (gloo) our own SyncBatchNorm1d does it with the same parameters, buffers and state_dict keys.
    if dims.device_type == "cpu":
        head.projection = convert_sync_batch_norm(head.projection, dims.dp_group)
        return
    head.projection = nn.SyncBatchNorm.convert_sync_batchnorm(head.projection, process_group=dims.dp_group)
