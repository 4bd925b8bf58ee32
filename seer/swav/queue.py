"""SwAV's queue of past embeddings, for small batches (seer_spec.md 1.8, swav's main_swav.py).

Each data-parallel rank keeps the L2-normalised embeddings z (not scores) of its last Q/W samples of every
assignment crop. Once the queue has been filled (it starts empty at ``start_epoch``), the model scores it
with the *current* prototypes every step and Sinkhorn sees [queue; batch], which enlarges the batch the
equipartition constraint is imposed on. New embeddings enter at the front, the oldest leave at the back.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class QueueShapeError(ValueError):
    """A saved queue whose shape is not this queue's (its length, embedding size or assignment crops changed)."""


class SwAVQueue:
    """Per-rank FIFO of assignment-crop embeddings.

    Args:
        length: queue length over all data-parallel ranks; rounded down to a multiple of the global batch
            (``batch_size * world_size``), as SwAV does. 0 disables the queue.
        dim: embedding dimension D.
        batch_size: images per rank per step (B).
        crops_for_assign: the crops whose embeddings are queued (their rows in the crop-major embeddings).
        start_epoch: epoch from which embeddings are pushed; the queue is used once it is full.
        world_size: number of data-parallel ranks.
    """

    def __init__(self, length: int, dim: int, *, batch_size: int, crops_for_assign: Sequence[int] = (0, 1),
                 start_epoch: int = 15, world_size: int = 1):
        for name, value in (("length", length), ("dim", dim), ("batch_size", batch_size),
                            ("start_epoch", start_epoch), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ("length",
                                                                                             "start_epoch") else 1):
                raise ValueError(f"SwAVQueue: '{name}' must be a {'non-negative' if name in ('length', 'start_epoch') else 'positive'} "
                                 f"integer, got {value!r}")
        global_batch = batch_size * world_size
        if 0 < length < global_batch:
            raise ValueError(f"SwAVQueue: queue length {length} is smaller than the global batch {global_batch} "
                             f"({batch_size} x {world_size} ranks); SwAV rounds the length down to a multiple of "
                             f"the global batch, which would leave no queue. Use 0 (no queue) or >= {global_batch}.")
        self.length = length - length % global_batch
        self.local_length = self.length // world_size
        self.dim = dim
        self.batch_size = batch_size
        self.crops_for_assign = tuple(crops_for_assign)
        self.start_epoch = start_epoch
        self.queue: Optional[Tensor] = None  # (A, local_length, D) float32, created at start_epoch
        self.filled = 0

    @property
    def enabled(self) -> bool:
        return self.local_length > 0

    @property
    def full(self) -> bool:
        return self.enabled and self.filled >= self.local_length

    def embeddings(self) -> Optional[Tensor]:
        """The (A, Q, D) queued embeddings to score this step, or None until the queue has been filled once."""
        return self.queue if self.full else None

    @torch.no_grad()
    def push(self, embeddings: Tensor, epoch: int) -> None:
        """Queue the assignment crops' rows of the crop-major ``embeddings`` (V*B, D) (from epoch ``start_epoch``)."""
        if not self.enabled or epoch < self.start_epoch:
            return
        b = self.batch_size
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or embeddings.shape[0] < b * (
                max(self.crops_for_assign) + 1):
            raise ValueError(f"SwAVQueue.push: expected crop-major embeddings (V*{b}, {self.dim}) covering crops "
                             f"{self.crops_for_assign}, got {tuple(embeddings.shape)}")
        if self.queue is None:
            self.queue = embeddings.new_zeros(len(self.crops_for_assign), self.local_length, self.dim,
                                              dtype=torch.float32)
        new = torch.stack([embeddings[a * b:(a + 1) * b] for a in self.crops_for_assign]).float()
        self.queue = torch.cat([new, self.queue[:, :self.local_length - b]], dim=1)
        self.filled = min(self.local_length, self.filled + b)

    def state_dict(self) -> dict:
        return {"queue": self.queue.clone() if self.queue is not None else None, "filled": self.filled,
                "local_length": self.local_length, "dim": self.dim}

    def to(self, device: torch.device) -> "SwAVQueue":
        """Move the stored embeddings (a checkpoint loads them on the CPU) to the training device."""
        if self.queue is not None:
            self.queue = self.queue.to(device)
        return self

    def load_state_dict(self, state: dict) -> None:
        if state["local_length"] != self.local_length or state["dim"] != self.dim:
            raise QueueShapeError(f"SwAVQueue.load_state_dict: saved queue has {state['local_length']} rows of dim "
                             f"{state['dim']} per rank, this one {self.local_length} of dim {self.dim} (queue "
                             f"length, batch size, world size or head output_dim changed)")
        saved = state["queue"]
        if saved is not None and saved.shape[0] != len(self.crops_for_assign):
            # Loaded as is, it failed later (a torch.cat size error in push, or swav_loss's queue_scores check).
            raise QueueShapeError(f"SwAVQueue.load_state_dict: saved queue holds {saved.shape[0]} assignment crops' "
                             f"embeddings, this one {len(self.crops_for_assign)} (loss.crops_for_assign changed)")
        self.queue = state["queue"].clone() if state["queue"] is not None else None
        self.filled = int(state["filled"])
