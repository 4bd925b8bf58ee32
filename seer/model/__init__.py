"""The ViT trunk: config and presets, the single-device model, its initialisation."""
from .config import PRESET_NAMES, UnknownPresetError, ViTConfig, validate_vit_config, vit_preset
from .init import init_weights_
from .vit import VisionTransformer, resolution_groups

__all__ = ["PRESET_NAMES", "UnknownPresetError", "ViTConfig", "VisionTransformer", "init_weights_",
           "resolution_groups", "validate_vit_config", "vit_preset"]
