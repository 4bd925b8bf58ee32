"""The Vision Transformer: single-device, readable like timm's ``VisionTransformer``.

Multi-crop input (SwAV): ``model([crop_0, ..., crop_{V-1}])`` with crops (B, C, H_v, W_v). Consecutive crops
of the same resolution are concatenated and go through the trunk in one pass (as swav's ResNet does); the
output is the class token of every crop after the final norm, concatenated crop-major: (V*B, d), rows
v*B ... (v+1)*B-1 for crop v. Each resolution uses the position embedding interpolated to its patch grid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .config import ViTConfig, validate_vit_config
from .init import init_weights_
from .layers import Block, LayerNorm, PatchEmbed, interpolate_pos_embed


def resolution_groups(crops: Sequence[Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive crops with the same (H, W)."""
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


def block_indices(n: Union[int, Sequence[int]], depth: int) -> list[int]:
    """The blocks ``n`` names for :meth:`VisionTransformer.get_intermediate_layers`: an int, the last ``n`` of
    ``depth`` (earliest first); a sequence, those indices (0-based, distinct, in its order)."""
    if isinstance(n, int) and not isinstance(n, bool):
        if not 1 <= n <= depth:
            raise ValueError(f"get_intermediate_layers: argument 'n' must be between 1 and the depth {depth} "
                             f"(the last n blocks), got {n}")
        return list(range(depth - n, depth))
    idx = list(n) if isinstance(n, Sequence) and not isinstance(n, str) else None
    if not idx or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in idx) \
            or len(set(idx)) != len(idx):
        raise ValueError(f"get_intermediate_layers: argument 'n' must be an int or a non-empty sequence of distinct "
                         f"block indices in [0, {depth - 1}] (depth {depth}), got {n!r}")
    return idx


class VisionTransformer(nn.Module):
    """Patch embedding + class token + learned position embedding, ``depth`` pre-norm blocks, final norm.

    Args:
        cfg: the architecture (:class:`ViTConfig`; presets from :func:`seer.model.vit_preset`).
        device: where to create the parameters. ``"meta"`` allocates nothing (for the 10B model): move the
            model with ``to_empty(device=...)`` (after :func:`seer.parallel.parallelize`, so that each rank only
            materialises its shard) and then call :func:`seer.model.init_weights_`.
    """

    def __init__(self, cfg: ViTConfig, *, device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        validate_vit_config(cfg)
        self.cfg = cfg
        self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.base_grid = cfg.img_size // cfg.patch_size
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        with torch.device(device if device is not None else torch.get_default_device()):
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid ** 2, cfg.embed_dim))
            # Identity hook point: where sequence parallelism scatters the tokens (seer.parallel).
            self.norm_pre = nn.Identity()
            self.blocks = nn.ModuleList([
                Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                      layer_scale_init=cfg.layer_scale_init, drop_path=dpr[i], dropout=cfg.dropout,
                      norm_eps=cfg.norm_eps)
                for i in range(cfg.depth)])
            self.norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.init_weights()

    def init_weights(self, seed: Optional[int] = None) -> None:
        """(Re-)initialise all parameters (see :mod:`seer.model.init`); a no-op for tensors on the meta device."""
        init_weights_(self, std=self.cfg.init_std, seed=seed)

    def _embed(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():  # uint8 pixels would be cast, not normalised: meaningless features
            raise TypeError(f"VisionTransformer: argument 'x' must be floating-point images normalised as in "
                            f"training ((x / 255 - mean) / std), got {x.dtype}")
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        return x + interpolate_pos_embed(self.pos_embed, grid, self.base_grid).to(x.dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + H/p * W/p, d), class token first."""
        x = self.norm_pre(self._embed(x))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def get_intermediate_layers(self, x: Tensor, n: Union[int, Sequence[int]] = 1, *, norm: bool = True,
                                return_class_token: bool = False, reshape: bool = False) -> tuple:
        """Tokens of some blocks' outputs (DINOv2's method): one entry per block ``n`` names, in its order.

        Args:
            x: images (B, C, H, W), H and W multiples of the patch size (other sizes than the training crop use
                the interpolated position embedding, as :meth:`forward`).
            n: an int, the last ``n`` blocks (earliest first); or a sequence of distinct block indices (0-based).
            norm: apply the final norm to each block's output (``get_intermediate_layers(x)[0]`` is then
                ``forward_features(x)[:, 1:]``).
            return_class_token: give (patch tokens, class token (B, D)) pairs instead of patch tokens.
            reshape: patch tokens as a map (B, D, H/p, W/p) instead of (B, H/p * W/p, D).

        Only the blocks up to the last one named run. ValueError for a bad ``n``, and for ``norm=False`` on a
        sequence-parallel trunk (seer.parallel).
        """
        wanted = block_indices(n, len(self.blocks))
        if not norm and getattr(self, "sequence_parallel_size", 1) > 1:
            # Each rank holds 1/T of the sequences between norm_pre and the final norm, whose hook gathers them.
            raise ValueError(f"get_intermediate_layers: argument 'norm' must be True under sequence parallelism "
                             f"(the blocks' outputs are split over {self.sequence_parallel_size} ranks and only "
                             f"the final norm gathers them)")
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.norm_pre(self._embed(x))
        taken = {}
        for i, block in enumerate(self.blocks[:max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                taken[i] = self.norm(x) if norm else x
        out = []
        for i in wanted:
            patches = taken[i][:, 1:]
            if reshape:  # (patches' own batch: under sequence parallelism x holds this rank's share alone)
                patches = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid).contiguous()
            out.append((patches, taken[i][:, 0]) if return_class_token else patches)
        return tuple(out)

    def forward_head(self, x: Tensor) -> Tensor:
        """Tokens -> the class token (B, d)."""
        return x[:, 0]

    def forward(self, x: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """Images (B, C, H, W) -> (B, d), or a list of crops -> (sum of B_v, d), crop-major (see module doc)."""
        if isinstance(x, Tensor):
            return self.forward_head(self.forward_features(x))
        crops = list(x)
        if not crops or not all(isinstance(c, Tensor) and c.dim() == 4 for c in crops):
            raise ValueError("VisionTransformer: expected a tensor (B, C, H, W) or a non-empty list of them")
        out = []
        for start, end in resolution_groups(crops):
            batch = torch.cat(crops[start:end]) if end - start > 1 else crops[start]
            out.append(self.forward_head(self.forward_features(batch)))
        return torch.cat(out) if len(out) > 1 else out[0]
