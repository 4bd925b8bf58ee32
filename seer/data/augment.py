"""Multi-crop for training: the ``seer_kernels`` multi-crop op configured from ``data.crops``, plus the two
optional extras (rotation, pixel noise) used by the digits demo.

The op draws every random choice from an explicit generator. Here that generator is seeded from
(seed, epoch, image index) in the worker path and from (seed, epoch, position, rank) in the device path,
so augmentations are a pure function of the data position: a resumed run, whatever its number of
workers, produces the same crops with no worker RNG state to save.

Crops come out as a list of V tensors (B, 3, S_v, S_v), global crops first, which is what
:class:`seer.swav.SwAVModel` takes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import seer_kernels
from seer_kernels import CropGroup, MultiCropSpec

from ..config import CropsConfig


def crop_spec(c: CropsConfig) -> MultiCropSpec:
    """The ``seer_kernels.MultiCropSpec`` of a ``data.crops`` section."""
    groups = [CropGroup(c.global_count, c.global_size, tuple(c.global_scale))]
    if c.local_count:
        groups.append(CropGroup(c.local_count, c.local_size, tuple(c.local_scale)))
    return MultiCropSpec(groups=tuple(groups), ratio=tuple(c.ratio), flip_p=c.flip_p, jitter_p=c.jitter_p,
                         brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue,
                         grayscale_p=c.grayscale_p, blur_p=c.blur_p, blur_sigma=tuple(c.blur_sigma),
                         solarize_p=c.solarize_p, mean=tuple(c.mean), std=tuple(c.std))


def rotate(crops: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each crop (N, C, S, S) by its own angle ~ U(-degrees, degrees) about its centre (bilinear;
    the corners take the nearest border pixel, i.e. background for centred objects such as digits)."""
    n = crops.shape[0]
    angle = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    theta = theta.to(device=crops.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(crops.shape), align_corners=False)
    return F.grid_sample(crops.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).to(crops.dtype)


def add_noise(crops: Tensor, std_pixels: float, channel_std: Sequence[float], gen: torch.Generator) -> Tensor:
    """Add Gaussian noise of ``std_pixels`` in [0, 1] pixel units to normalised crops (divided by each
    channel's normalisation std so that it is that many pixel units after un-normalising)."""
    noise = torch.randn(crops.shape, generator=gen, dtype=torch.float32).to(crops.device)
    scale = torch.tensor([std_pixels / s for s in channel_std], device=crops.device).view(1, -1, 1, 1)
    return (crops.float() + noise * scale).to(crops.dtype)


def apply_extras(groups: list[Tensor], c: CropsConfig, gen: torch.Generator) -> list[Tensor]:
    if c.rotation_degrees > 0:
        groups = [rotate(g, c.rotation_degrees, gen) for g in groups]
    if c.noise_std > 0:
        groups = [add_noise(g, c.noise_std, c.std, gen) for g in groups]
    return groups


def multicrop_images(images: list, spec: MultiCropSpec, c: CropsConfig, gen: torch.Generator) -> list[Tensor]:
    """Crops of several images: one tensor per group, crop-major (count * N, 3, S, S), extras applied.

    ``images``: uint8 (3, H, W) tensors on one device, or encoded bytes (decoded on the CPU by the op)."""
    return apply_extras(seer_kernels.multicrop(images, spec, gen), c, gen)


def split_crops(groups: list[Tensor], spec: MultiCropSpec, batch: int) -> list[Tensor]:
    """Crop-major group tensors -> the list of V crop tensors (batch, 3, S, S), in crop order."""
    out = []
    for g, t in zip(spec.groups, groups):
        out.extend(t.view(g.count, batch, *t.shape[1:]).unbind(0))
    return out
