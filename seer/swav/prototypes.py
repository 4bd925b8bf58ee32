"""Keeping the prototypes on the unit sphere, and frozen at the start of training (seer_spec.md 1.9)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.init import local_tensor
from .head import SwAVHead


def prototype_weights(model: nn.Module) -> list[Tensor]:
    """The prototype matrices of every :class:`SwAVHead` in ``model`` (the parameter objects)."""
    weights = [m.prototypes.weight for m in model.modules() if isinstance(m, SwAVHead)]
    if not weights:
        raise ValueError(f"no SwAVHead found in {type(model).__name__}")
    return weights


@torch.no_grad()
def normalize_prototypes(model: nn.Module) -> None:
    """c_k <- c_k / ||c_k||_2 for every prototype row, in place, without gradient.

    Call it once before the first forward and after every optimizer step. Rows are whole on every rank both
    under tensor parallelism (K is split) and under FSDP2 (dim 0 is sharded), so the norms are local.
    """
    for w in prototype_weights(model):
        t = local_tensor(w)
        t.copy_(F.normalize(t.float(), dim=1).to(t.dtype))


class PrototypeFreezer:
    """Drops the prototypes' gradients (grad = None) during the first ``iterations`` optimizer steps, so the
    optimizer skips them entirely (no update, no weight decay, no momentum), as swav does.

    Call :meth:`after_backward` once per step between backward and the optimizer step. Its counter is part
    of the checkpoint (:meth:`state_dict`).
    """

    def __init__(self, model: nn.Module, iterations: int = 313):
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"PrototypeFreezer: 'iterations' must be a non-negative integer, got {iterations!r}")
        self.model = model
        self.iterations = iterations
        self.step = 0
        prototype_weights(model)  # fail now, not at step 1, if there is no head

    @property
    def frozen(self) -> bool:
        return self.step < self.iterations

    def after_backward(self) -> bool:
        """Apply this step's rule; True if the prototypes were frozen this step."""
        frozen = self.frozen
        if frozen:
            for w in prototype_weights(self.model):
                w.grad = None
        self.step += 1
        return frozen

    def skip(self) -> None:
        """A step without an update (its loss was not finite): it still counts as one of the ``iterations``,
        as it does for the learning-rate schedule (SwAV counts iterations, not updates)."""
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "iterations": self.iterations}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
