"""Small helpers of the loop: the backbone of a (possibly sharded) SwAV model as a module of its own, and
NVTX ranges."""
from __future__ import annotations

import contextlib

from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.distributed._composable.fsdp import FSDPModule

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is optional
    _nvtx = None


class BackboneView(nn.Module):
    """``model.backbone`` as a callable (N, 3, H, W) -> (N, d) class-token features.

    Under FSDP2 the root unit (patch and position embeddings, final norm) belongs to the SwAV model, whose
    forward hook gathers it; calling the backbone directly therefore gathers and frees the root's shards
    around the call. The view holds no parameters of its own (it is not registered as a submodule).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)

    def forward(self, x: Tensor) -> Tensor:
        model = self._model
        if isinstance(model, FSDPModule):
            model.unshard()
            try:
                return model.backbone(x)
            finally:
                model.reshard()
        return model.backbone(x)

    def train(self, mode: bool = True):
        self._model.backbone.train(mode)
        return self

    @property
    def training(self) -> bool:  # type: ignore[override]
        return self._model.backbone.training

    @training.setter
    def training(self, value: bool) -> None:
        pass


def nvtx_range(name: str, enabled: bool = True):
    """An NVTX range in the 'seer' domain (visible in Nsight Systems); a no-op when disabled or unavailable."""
    if not enabled or _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain="seer")
