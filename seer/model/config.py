"""ViT configuration and its named presets.

``ViTConfig`` is a plain typed dataclass (no logic), so that a run config can nest it and override fields
from YAML or ``model.depth=2`` style strings. Presets are complete configs returned by :func:`vit_preset`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class ViTConfig:
    """A pre-norm Vision Transformer (timm's ``VisionTransformer`` layout, class-token pooling).

    Attributes:
        img_size: side of the global crop the position embedding is learned for; other crop sizes use an
            interpolated embedding.
        patch_size: side of the square patches (crop sides must be multiples of it).
        in_chans: image channels.
        embed_dim: width d of the residual stream.
        depth: number of blocks L.
        num_heads: attention heads (head dim = embed_dim / num_heads).
        mlp_dim: hidden width m of the MLP (4 d in every preset but giant, ViT-g's 6144).
        qkv_bias: bias on the fused q/k/v projection.
        qk_norm: LayerNorm on queries and keys per head (ViT-22B's fix for attention-logit growth at scale).
        layer_scale_init: initial LayerScale value (CaiT); None disables LayerScale.
        drop_path_rate: stochastic depth rate of the last block (linearly increasing from 0 at the first).
        dropout: dropout after the attention projection and in the MLP.
        norm_eps: LayerNorm epsilon.
        init_std: std of the truncated-normal initialisation of weights and position embedding.
    """
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: Optional[float] = None
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02


# name -> (embed_dim, depth, num_heads, mlp_dim, patch_size, extra fields)
_PRESETS: dict[str, tuple[int, int, int, int, int, dict]] = {
    # Seconds on a CPU: the test model (32 px crops, 16 px local crops, 17 and 5 tokens).
    "tiny": (64, 2, 4, 256, 8, {"img_size": 32}),
    "small": (384, 12, 6, 1536, 16, {}),
    "base": (768, 12, 12, 3072, 16, {}),
    "large": (1024, 24, 16, 4096, 16, {}),
    "huge": (1280, 32, 16, 5120, 14, {}),
    "giant": (1408, 40, 16, 6144, 14, {}),
    # seer_spec.md 3.3: 48 x 4096, 32 heads of 128, MLP 16384, patch 14: 9.67B trunk parameters. QK-norm
    # on, because ViT-22B saw attention logits diverge from about 8B parameters (adds 24,576 parameters).
    "vit-10b": (4096, 48, 32, 16384, 14, {"qk_norm": True}),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


class UnknownPresetError(ValueError):
    pass


def suggest(name: str, choices, *, cutoff: float = 0.4) -> str:
    """' (did you mean 'x' or 'y'?)' for the (at most 3) closest names in ``choices``, or '' if none is close
    (difflib similarity ratio below ``cutoff``)."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def vit_preset(name: str, **overrides) -> ViTConfig:
    """The ViT config named ``name`` (one of :data:`PRESET_NAMES`), with optional field overrides."""
    if name not in _PRESETS:
        raise UnknownPresetError(f"unknown ViT preset {name!r}{suggest(name, _PRESETS)}; "
                                 f"available: {', '.join(PRESET_NAMES)}")
    d, depth, heads, mlp, patch, extra = _PRESETS[name]
    cfg = ViTConfig(embed_dim=d, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch, **extra)
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    for key in overrides:
        if key not in fields:
            raise TypeError(f"vit_preset: unknown ViTConfig field {key!r}{suggest(key, fields)}")
    return dataclasses.replace(cfg, **overrides)


def validate_vit_config(cfg: ViTConfig) -> None:
    """Raise ValueError naming the field for a config the model cannot be built from."""
    positive = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim")
    for name in positive:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"ViTConfig.embed_dim ({cfg.embed_dim}) must be divisible by num_heads "
                         f"({cfg.num_heads})")
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"ViTConfig.img_size ({cfg.img_size}) must be a multiple of patch_size "
                         f"({cfg.patch_size})")
    for name in ("qkv_bias", "qk_norm"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"ViTConfig.{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("drop_path_rate", "dropout", "norm_eps", "init_std", "layer_scale_init"):
        value = getattr(cfg, name)
        if value is None and name == "layer_scale_init":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"ViTConfig.{name} must be a finite number{' or None' if name == 'layer_scale_init' else ''}"
                             f", got {value!r}")
    for name in ("drop_path_rate", "dropout"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value!r}")
    if cfg.norm_eps <= 0 or cfg.init_std <= 0:
        raise ValueError("ViTConfig.norm_eps and ViTConfig.init_std must be > 0")
