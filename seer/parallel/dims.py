"""The parallel layout: a typed config and the 2-D (data x tensor) device mesh built from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AC_MODES_HELP = "'none', 'full' (every block) or 'every-N' (every N-th block, N >= 1)"


@dataclass
class ParallelConfig:
    """How the model is split over ``world_size = dp * tp`` processes.

    Attributes:
        tp: tensor-parallel size T (inside a node): heads, MLP columns and prototypes split T ways.
        dp: data-parallel size; -1 = world_size / tp.
        sequence_parallel: keep the activations between the blocks' matmuls on 1/T of the token sequences.
        fsdp: shard parameters, gradients and optimizer state over the data-parallel ranks with FSDP2
            (``fully_shard`` per block, the prototypes in float32 as a unit of their own).
        fsdp_reshard_after_forward: free gathered block parameters after the forward (re-gather in backward).
        param_dtype: FSDP2 compute/communication dtype of the parameters ("bfloat16" or "float32").
        reduce_dtype: FSDP2 dtype of the gradient reduce-scatter.
        activation_checkpointing: recompute block activations in the backward: 'none', 'full' (every
            block) or 'every-N' (every N-th block).
        compile: ``torch.compile`` each block (in place, parameter names unchanged).
    """
    tp: int = 1
    dp: int = -1
    sequence_parallel: bool = False
    fsdp: bool = True
    fsdp_reshard_after_forward: bool = True
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    activation_checkpointing: str = "none"
    compile: bool = False


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def checkpoint_every(mode: str) -> int:
    """0 for 'none', 1 for 'full', N for 'every-N'; ValueError naming the setting otherwise."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    if isinstance(mode, str) and mode.startswith("every-") and mode[6:].isdigit() and int(mode[6:]) >= 1:
        return int(mode[6:])
    raise ValueError(f"parallel.activation_checkpointing must be {AC_MODES_HELP}, got {mode!r}")


def checkpointed_blocks(depth: int, mode: str) -> list[int]:
    """Indices of the blocks (of ``depth``) that ``mode`` checkpoints: every N-th block from block 0 (none for
    'none'); ValueError naming the setting for an invalid mode."""
    every = checkpoint_every(mode)
    return [i for i in range(depth) if every and i % every == 0]


def validate_parallel_config(cfg: ParallelConfig, world_size: int) -> int:
    """Check ``cfg`` against ``world_size`` before any process group or model work; return dp."""
    if isinstance(cfg.tp, bool) or not isinstance(cfg.tp, int) or cfg.tp < 1:
        raise ValueError(f"parallel.tp must be a positive integer, got {cfg.tp!r}")
    if world_size % cfg.tp:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp={cfg.tp}: the mesh is "
                         f"(dp, tp) = (world_size / tp, tp); launch a multiple of {cfg.tp} processes or change tp")
    dp = world_size // cfg.tp if cfg.dp == -1 else cfg.dp
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1 or dp * cfg.tp != world_size:
        raise ValueError(f"parallel.dp={cfg.dp} x parallel.tp={cfg.tp} must equal the world size {world_size} "
                         f"(use dp=-1 to infer it)")
    if dp > 1 and not cfg.fsdp:
        raise ValueError(f"parallel.fsdp=false with dp={dp}: data parallelism is implemented with FSDP2 "
                         f"(set parallel.fsdp=true, or use a single data-parallel rank)")
    if cfg.sequence_parallel and cfg.tp == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")
    for name in ("param_dtype", "reduce_dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise ValueError(f"parallel.{name} must be one of {sorted(DTYPES)}, got {getattr(cfg, name)!r}")
    checkpoint_every(cfg.activation_checkpointing)
    return dp


class ParallelDims:
    """The validated layout plus, when world_size > 1, the ("dp", "tp") device mesh and its groups.

    Args:
        cfg: the layout.
        device_type: "cuda" or "cpu" (the mesh's device type; NCCL or gloo groups). On GPUs call
            ``torch.cuda.set_device(LOCAL_RANK)`` first.
        world_size: defaults to the initialised process group's size, else 1.
    """

    def __init__(self, cfg: ParallelConfig, device_type: str = "cuda", world_size: Optional[int] = None):
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.cfg = cfg
        self.world_size = world_size
        self.tp = cfg.tp
        self.dp = validate_parallel_config(cfg, world_size)
        self.device_type = device_type
        self.mesh: Optional[DeviceMesh] = None
        if world_size > 1:
            if not dist.is_initialized():
                raise RuntimeError(f"world size {world_size} needs torch.distributed to be initialised first "
                                   f"(torchrun + init_process_group)")
            self.mesh = init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))

    @property
    def tp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh["tp"].get_group() if self.mesh is not None and self.tp > 1 else None

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dp > 1 else None

    @property
    def dp_mesh(self) -> Optional[DeviceMesh]:
        return self.mesh["dp"] if self.mesh is not None else None

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    def __repr__(self) -> str:
        return (f"ParallelDims(world_size={self.world_size}, dp={self.dp}, tp={self.tp}, "
                f"sequence_parallel={self.cfg.sequence_parallel})")
