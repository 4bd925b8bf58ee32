"""``parallelize``: the one place where a single-device model becomes a distributed one.

Fixed order (torchtitan's): tensor parallelism -> activation checkpointing -> torch.compile -> FSDP2.
TP must see the plain modules it replaces; checkpointing wraps what TP produced; compile then traces a
block including its recomputation; FSDP2 wraps last so that its hooks surround everything per block.
"""
from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from .checkpointing import apply_activation_checkpointing
from .dims import ParallelConfig, ParallelDims, validate_parallel_config
from .fsdp import apply_fsdp
from .random import RNGStatesTracker, get_rng_tracker
from .tensor_parallel import apply_tensor_parallel, model_parts, validate_tensor_parallel

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Optional[ParallelConfig] = None, *,
                tracker: Optional[RNGStatesTracker] = None) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 to a VisionTransformer or SwAVModel, in place.

    The model may live on the meta device (then call ``model.to_empty(device=...)`` and
    :func:`seer.model.init_weights_` with a seed). Every configuration error is raised before anything
    is changed. Returns ``model``.
    """
    cfg = cfg if cfg is not None else dims.cfg
    trunk, head = model_parts(model)
    validate_tensor_parallel(trunk.cfg, head.cfg if head is not None else None, dims.tp)
    validate_parallel_config(cfg, dims.world_size)
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


def _sync_batch_norm(head: nn.Module, dims: ParallelDims) -> None:
    # SwAV synchronises the head's BatchNorm statistics over data-parallel ranks. PyTorch's SyncBatchNorm
    # only runs on accelerators; on CPU every rank keeps its own statistics (as with SyncBN group size 1).
    if dims.device_type == "cpu":
        log.warning("head BatchNorm statistics are per rank on CPU (SyncBatchNorm needs a GPU)")
        return
    head.projection = nn.SyncBatchNorm.convert_sync_batchnorm(head.projection, process_group=dims.dp_group)
