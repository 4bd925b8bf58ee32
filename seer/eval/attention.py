"""The class token's attention over the patches, per head: what a block of the backbone looks at (DINO's
attention-map figures).

The attention kernel (``seer_kernels.attention``) never materialises the probabilities, so they are
recomputed here from the block's input, exactly as :class:`seer.model.layers.Attention` forms its scores:

    h = norm1(x);  [q | k | v] = qkv(h), split into heads of D = d / heads;  q, k = q_norm(q), k_norm(k)
    a[b, i, :] = softmax_j(q[b, i, 0] . k[b, i, j] / sqrt(D))   over all 1 + gh * gw tokens j

and the map is a[b, i, 1:] (the class-token column dropped) on the (gh, gw) patch grid, so each map sums to
1 - a[b, i, 0]. The softmax runs in float32 whatever the backbone's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class _Captured(Exception):
    """Raised by the pre-hook once it holds the block's input: the later blocks need not run."""


def block_index(layer: int, depth: int, what: str = "attention_maps: argument 'layer'") -> int:
    """``layer`` (python-style, in [-depth, depth)) as a block index in [0, depth); ValueError naming it as
    ``what`` (the CLI's: '--layer')."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
        raise ValueError(f"{what} must be an integer in [{-depth}, {depth}) (the backbone's depth is {depth}), "
                         f"got {layer!r}")
    return layer % depth


def _check_images(backbone: nn.Module, images: Tensor) -> None:
    p = backbone.patch_size
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1 \
            or images.shape[-1] % p or images.shape[-2] % p or min(images.shape[-2:]) < p:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"attention_maps: argument 'images' must be a tensor (B, 3, H, W), B >= 1, with H and W "
                         f"positive multiples of the patch size {p}, got {shape}")
    if not images.is_floating_point():  # (uint8 pixels: the backbone expects normalised floats)
        raise TypeError(f"attention_maps: argument 'images' must be floating-point images normalised as in "
                        f"training, got {images.dtype}")


def _block_input(backbone: nn.Module, images: Tensor, index: int) -> Tensor:
    """The tokens entering block ``index`` as the backbone's own forward computes them (embedding, position
    embedding, earlier blocks), the forward stopped there."""
    seen = []

    def grab(module, args):
        seen.append(args[0])
        raise _Captured

    handle = backbone.blocks[index].register_forward_pre_hook(grab)
    try:
        backbone.forward_features(images)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def attention_maps(backbone: nn.Module, images: Tensor, *, layer: int = -1) -> Tensor:
    """Class-token attention maps (module doc) of block ``layer``: float32 (B, heads, H/p, W/p) on the CPU.

    Args:
        backbone: a :class:`seer.model.VisionTransformer` (``seer.load_pretrained``); run in eval mode, its
            mode restored afterwards.
        images: (B, 3, H, W) normalised as in training, on the backbone's device; H and W multiples of the
            patch size p (need not be equal: the position embedding is interpolated as in the forward).
        layer: the block, python-style (-1: the last).
    """
    index = block_index(layer, len(backbone.blocks))
    _check_images(backbone, images)
    grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
    was_training = backbone.training
    backbone.eval()
    try:
        x = _block_input(backbone, images, index)
        block = backbone.blocks[index]
        attn = block.attn
        qkv = attn.qkv(block.norm1(x))
        # The same split as Attention.forward: rows of qkv.weight are [q heads | k heads | v heads].
        q, k, _ = qkv.unflatten(-1, (3, -1, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, D)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # Autocast off for the scores alone: under a caller's bf16 autocast the matmul would cast q and k back to
        # bf16 and round the scores to bf16 (~1% off in the probabilities), while the kernel forms the scores of
        # these same bf16 q and k in float32. (norm1, qkv and the qk-norm above do run under it, as in the block.)
        with torch.autocast(q.device.type, enabled=False):
            scores = q[:, :, :1].float() @ k.float().transpose(-1, -2) * attn.head_dim ** -0.5  # (B, heads, 1, N)
            probs = scores.softmax(-1)[:, :, 0, 1:]
    finally:
        backbone.train(was_training)
    return probs.reshape(*probs.shape[:2], *grid).cpu()
