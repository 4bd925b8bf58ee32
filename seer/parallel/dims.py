"""The parallel layout: the 2-D (data x tensor) device mesh built from its config (:mod:`.config`, re-exported
here), and the checks of that config against the world size."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import AC_MODES_HELP, DTYPE_NAMES, ParallelConfig, checkpoint_every, checkpointed_blocks  # noqa: F401

# the torch dtypes of parallel.param_dtype / reduce_dtype
DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float32, torch.float16)))


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
    # A string from code ("false") would be truthy: sequence parallelism or compile switched on without a word.
    for name in ("sequence_parallel", "fsdp", "fsdp_reshard_after_forward", "compile"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"parallel.{name} must be true or false, got {getattr(cfg, name)!r}")
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
