"""SwAV: projection head and prototypes, the swapped-prediction loss, the queue, prototype freezing."""
from .config import SwAVHeadConfig, SwAVLossConfig, seer_head, seer_loss
from .head import SwAVHead
from .loss import swav_loss
from .model import SwAVModel, SwAVOutput, build_swav_model
from .prototypes import PrototypeFreezer, normalize_prototypes, prototype_weights
from .queue import SwAVQueue

__all__ = ["PrototypeFreezer", "SwAVHead", "SwAVHeadConfig", "SwAVLossConfig", "SwAVModel", "SwAVOutput",
           "SwAVQueue", "build_swav_model", "normalize_prototypes", "prototype_weights", "seer_head", "seer_loss", "swav_loss"]
