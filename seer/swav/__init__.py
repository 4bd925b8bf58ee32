"""SwAV: projection head and prototypes, the swapped-prediction loss, the queue, prototype freezing.

Names are imported on first use (:mod:`seer._lazy`): the config needs no torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"SwAVHeadConfig": "config", "SwAVLossConfig": "config", "seer_head": "config", "seer_loss": "config",
            "SwAVHead": "head", "swav_loss": "loss", "SwAVModel": "model", "SwAVOutput": "model",
            "build_swav_model": "model", "PrototypeFreezer": "prototypes", "normalize_prototypes": "prototypes",
            "prototype_weights": "prototypes", "QueueShapeError": "queue", "SwAVQueue": "queue"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see
    from .config import SwAVHeadConfig, SwAVLossConfig, seer_head, seer_loss
    from .head import SwAVHead
    from .loss import swav_loss
    from .model import SwAVModel, SwAVOutput, build_swav_model
    from .prototypes import PrototypeFreezer, normalize_prototypes, prototype_weights
    from .queue import QueueShapeError, SwAVQueue
