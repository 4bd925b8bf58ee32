"""The parallel layout's typed config and its activation-checkpointing modes (no torch: ``seer.config`` reads
them without importing it)."""
from __future__ import annotations

from dataclasses import dataclass

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


DTYPE_NAMES = ("bfloat16", "float32", "float16")  # parallel.param_dtype / reduce_dtype


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
