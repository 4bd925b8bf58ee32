"""Per-block activation checkpointing that keeps parameter names (no wrapper module in the path).

A checkpointed block stores only its input; its activations are recomputed during the backward. The block's
``forward`` is rebound to a checkpointing version on that instance, so ``blocks.3.attn.qkv.weight`` stays
``blocks.3.attn.qkv.weight``, ``Module.compile`` still compiles the block with the checkpoint inside it, and
FSDP2's hooks still wrap the whole block (the order torchtitan uses: TP, AC, compile, FSDP).
"""
from __future__ import annotations

import types
from typing import Optional

import torch.utils.checkpoint as ckpt
from torch import Tensor, nn

from .dims import checkpointed_blocks
from .random import RNGStatesTracker, checkpoint_context_fn


def _checkpointed_forward(self: nn.Module, x: Tensor) -> Tensor:
    if self._ac_context_fn is None:  # (torch.compile traces checkpoint only without a custom context_fn)
        return ckpt.checkpoint(type(self).forward, self, x, use_reentrant=False)
    return ckpt.checkpoint(type(self).forward, self, x, use_reentrant=False, context_fn=self._ac_context_fn)


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str,
                                   tracker: Optional[RNGStatesTracker] = None) -> list[int]:
    """Checkpoint the blocks selected by ``mode`` ('none', 'full', 'every-N'); return their indices.

    ``tracker``: the RNG tracker whose streams dropout/drop-path use inside the blocks (tensor parallelism);
    its states are restored for the recomputation so that masks are identical.
    """
    chosen = checkpointed_blocks(len(blocks), mode)
    context_fn = checkpoint_context_fn(tracker) if tracker is not None else None
    for i in chosen:
        block = blocks[i]
        block._ac_context_fn = context_fn
        block.forward = types.MethodType(_checkpointed_forward, block)
    return chosen
