"""The ViT trunk: config and presets, the single-device model, its initialisation.

Names are imported on first use (:mod:`seer._lazy`): the config needs no torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"PRESET_NAMES": "config", "UnknownPresetError": "config", "ViTConfig": "config",
            "validate_vit_config": "config", "vit_preset": "config", "init_weights_": "init",
            "VisionTransformer": "vit", "resolution_groups": "vit"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see
    from .config import PRESET_NAMES, UnknownPresetError, ViTConfig, validate_vit_config, vit_preset
    from .init import init_weights_
    from .vit import VisionTransformer, resolution_groups
