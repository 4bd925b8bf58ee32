r"""Multi-crop augmentation in pure torch, batched over the crops of each image: the specification of
the op (seer_kernels.augment_crops), its fallback backend and an oracle of the tests.

Semantics: torchvision.transforms.v2.functional on the image converted to float32 in [0, 1] (x / 255),
with the parameters of each crop (columns of the packed matrix: seer_kernels.multicrop_params), in order:

1. ``resized_crop(top, left, height, width, [S, S], bilinear, antialias=True)``. Separable: the crop
   is ``Wy X Wx^T`` with, for output i of an axis whose window [start, start + len) is resized to S,
   the triangle filter
       ``W[i, j] ∝ max(0, 1 - |(j + 0.5 - c_i) / s|)``,  ``c_i = start + (len / S)(i + 0.5)``,
       ``s = max(len / S, 1)``,
   over the source pixels j of the window (crop first: taps outside the box do not exist), each row
   normalised to sum 1. That is torch's antialiased ``interpolate`` (PIL's): the tent widens with the
   downscale factor and is plain linear interpolation when upsampling. ``start``/``len`` may be
   fractional (a box in a JPEG decoded at reduced size); the taps are then the pixels overlapping it,
   each weight also multiplied by the fraction of its pixel inside the window.
2. ``hflip`` if flip.
3. if jitter, in ``order``: brightness ``clamp(f x)``; contrast ``clamp(f x + (1 - f) m)`` with m the
   mean grey level of the current crop; saturation ``clamp(f x + (1 - f) gray(x))``; hue: shift H by f
   in HSV (torchvision's _rgb_to_hsv/_hsv_to_rgb). ``clamp`` is to [0, 1];
   ``gray = 0.2989 r + 0.587 g + 0.114 b``. Identity factors (1, and hue 0) are skipped.
4. ``rgb_to_grayscale(num_output_channels=3)`` if grayscale.
5. ``gaussian_blur(kernel 2 ceil(3 sigma) + 1, sigma)`` if sigma > 0: weights ∝ exp(-k² / 2σ²),
   separable, reflect padding (folded again when the radius exceeds the crop).
6. ``solarize(threshold 0.5)``: x >= 0.5 -> 1 - x, if solarize.
7. ``normalize(mean, std)`` and the cast to the output dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..multicrop_params import COL
from . import autocast_off

GRAY = (0.2989, 0.587, 0.114)
NARROWEST_WINDOW = 2.0**-64  # pixels; see axis_weights


def axis_weights(start: Tensor, length: Tensor, size: int, out: int, taps: int) -> tuple[Tensor, Tensor]:
    """Resampling of one axis for k crops: (index (k, taps) of source pixels, weights (k, out, taps)).

    ``start``/``length`` (k,) float64 windows in an axis of ``size`` pixels; the window's pixels are
    lo + arange(taps) with lo = floor(start), padded (zero weight, clamped index) up to ``taps``.
    """
    lo = torch.floor(start).clamp(min=0)
    # at least one pixel: a width below float64 resolution at an integer start has start + length == start
    hi = torch.minimum(torch.maximum(torch.ceil(start + length), lo + 1), torch.full_like(start, size))
    j = torch.arange(taps, dtype=torch.float64, device=start.device)
    scale = (length / out)[:, None, None]
    center = (start - lo)[:, None, None] + scale * (torch.arange(out, dtype=torch.float64, device=start.device)
                                                   [None, :, None] + 0.5)
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    w = (1 - ((j + 0.5 - center) * inv).abs()).clamp(min=0)
    # pixel coverage of a fractional window (1 for an integer one); 0 beyond the window's pixels
    beg, end = (start - lo)[:, None], (start + length - lo)[:, None]
    # A window narrower than NARROWEST_WINDOW pixel, or one whose end rounds onto its start (a width below
    # float64 resolution at a fractional start), lies inside one pixel: it is widened to that pixel, which
    # gets all the weight (the exact limit; without this every coverage is 0 and the weights 0 / 0).
    # The kernels apply the same rule (kNarrowestWindow in csrc/include/seer/image_ops.h).
    empty = ~(end - beg >= NARROWEST_WINDOW)
    beg = torch.where(empty, torch.floor(beg), beg)
    end = torch.where(empty, beg + 1, end)
    cover = (torch.minimum(j + 1, end) - torch.maximum(j, beg)).clamp(0, 1) * (j < (hi - lo)[:, None])
    w = w * cover[:, None, :]
    w = w / w.sum(-1, keepdim=True)
    index = (lo[:, None] + j).clamp(max=size - 1).long()
    return index, w


def resample(image: Tensor, windows: Tensor, size: int) -> Tensor:
    """Antialiased bilinear crops (k, 3, S, S) in [0, 1] of a uint8 (3, H, W) image for (k, 4) CPU windows."""
    _, height, width = image.shape
    win = windows.cpu().to(torch.float64)
    taps_y = max(int((torch.ceil(win[:, 0] + win[:, 2]) - torch.floor(win[:, 0])).max()), 1)
    taps_x = max(int((torch.ceil(win[:, 1] + win[:, 3]) - torch.floor(win[:, 1])).max()), 1)
    dev = image.device
    iy, wy = (t.to(dev) for t in axis_weights(win[:, 0], win[:, 2], height, size, taps_y))
    ix, wx = (t.to(dev) for t in axis_weights(win[:, 1], win[:, 3], width, size, taps_x))
    x = image.float().div(255)[:, iy[:, :, None], ix[:, None, :]].transpose(0, 1)  # (k, 3, taps_y, taps_x)
    x = torch.matmul(x, wx.float().transpose(1, 2)[:, None])  # (k, 3, taps_y, S)
    return torch.matmul(wy.float()[:, None], x)  # (k, 3, S, S)


def gray(x: Tensor) -> Tensor:
    """Grey level (k, 1, S, S) of RGB crops (k, 3, S, S)."""
    r, g, b = x.unbind(1)
    return (r * GRAY[0] + g * GRAY[1] + b * GRAY[2]).unsqueeze(1)


def _blend(x: Tensor, y: Tensor, f: Tensor) -> Tensor:
    return (x * f + y * (1 - f)).clamp(0, 1)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Shift the hue of crops x (k, 3, S, S) by f (k, 1, 1, 1) through HSV."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    rng = maxc - minc
    s = rng / torch.where(eqc, torch.ones_like(maxc), maxc)
    div = torch.where(eqc, torch.ones_like(rng), rng)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2) - bc, (gc + 4) - rc))
    h = torch.fmod(h / 6 + 1, 1.0)
    h = torch.remainder(h + f[:, 0], 1.0)
    h6 = h * 6
    i = torch.floor(h6)
    fr = h6 - i
    i = torch.remainder(i.long(), 6)
    v = maxc
    p = ((1 - s) * v).clamp(0, 1)
    q = ((1 - s * fr) * v).clamp(0, 1)
    t = ((s * fr + (1 - s)) * v).clamp(0, 1)
    vpqt = torch.stack([v, p, q, t], 1)  # sector -> (r, g, b) as indices into (v, p, q, t):
    table = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=x.device)
    return vpqt.gather(1, table[i].permute(0, 3, 1, 2))


def jitter_op(op: int, x: Tensor, f: Tensor) -> Tensor:
    """Jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with factors f (k, 1, 1, 1)."""
    if op == 0:
        return (x * f).clamp(0, 1)
    if op == 1:
        return _blend(x, gray(x).mean((1, 2, 3), keepdim=True), f)
    if op == 2:
        return _blend(x, gray(x), f)
    return adjust_hue(x, f)


def reflect_index(i: Tensor, n: int) -> Tensor:
    """torch's 'reflect' padding index (edge not repeated), folded for any distance."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    m = torch.remainder(i, period)
    return torch.where(m < n, m, period - m)


def blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur of crops (k, 3, S, S), sigma (k,) > 0, kernel 2 ceil(3 sigma) + 1, reflect padding."""
    size = x.shape[-1]
    radii = [math.ceil(3 * float(s)) for s in sigma.cpu()]
    radius = max(radii)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    sig = sigma.to(device=x.device, dtype=torch.float64)[:, None]
    w = torch.exp(-0.5 * (k / sig) ** 2) * (k.abs() <= torch.tensor(radii, device=x.device)[:, None])
    w = (w / w.sum(1, keepdim=True)).float()
    idx = reflect_index(torch.arange(-radius, size + radius, device=x.device), size)
    rows = x[..., idx].unfold(-1, 2 * radius + 1, 1)  # (k, 3, S, S, taps)
    x = torch.einsum("kcyxt,kt->kcyx", rows, w)
    cols = x[..., idx, :].unfold(-2, 2 * radius + 1, 1)  # (k, 3, S, S, taps) windows along y
    return torch.einsum("kcyxt,kt->kcyx", cols, w)


def augment(image: Tensor, p: Tensor, size: int) -> Tensor:
    """Crops (k, 3, S, S) in [0, 1] of one image for its packed parameter rows p (k, 18), before normalise."""
    x = resample(image, p[:, COL["top"]:COL["width"] + 1], size)
    dev = x.device
    flip = p[:, COL["flip"]].bool().to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    jitter = p[:, COL["jitter"]].bool()
    factors = p[:, COL["brightness"]:COL["hue"] + 1]
    order = p[:, COL["order0"]:COL["order3"] + 1].long()
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    for pos in range(4):
        for op in range(4):
            sel = jitter & (order[:, pos] == op) & (factors[:, op] != identity[op])
            if sel.any():
                idx = sel.nonzero().squeeze(1).to(dev)
                f = factors[sel, op].to(dev)[:, None, None, None]
                x = x.index_copy(0, idx, jitter_op(op, x[idx], f))
    g = p[:, COL["grayscale"]].bool().to(dev)
    x = torch.where(g[:, None, None, None], gray(x).expand_as(x), x)
    sigma = p[:, COL["sigma"]]
    if (sigma > 0).any():
        idx = (sigma > 0).nonzero().squeeze(1)
        x = x.index_copy(0, idx.to(dev), blur(x[idx.to(dev)], sigma[idx]))
    sol = p[:, COL["solarize"]].bool().to(dev)[:, None, None, None]
    return torch.where(sol & (x >= 0.5), 1 - x, x)


@autocast_off
def multicrop_apply(images: Sequence[Tensor], params: Tensor, size: int, mean: Sequence[float],
                    std: Sequence[float], out_dtype: torch.dtype) -> Tensor:
    """Crops (n, 3, S, S) of ``out_dtype`` for the packed CPU parameter matrix ``params`` (n, 18).

    Row r of the output is the crop of row r of ``params``, taken from ``images[params[r, 0]]``.
    """
    dev = images[0].device
    n = params.shape[0]
    out = torch.empty((n, 3, size, size), dtype=out_dtype, device=dev)
    m = torch.tensor(mean, dtype=torch.float32, device=dev)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=dev)[:, None, None]
    params = params.cpu()
    for i, image in enumerate(images):
        rows = (params[:, COL["image"]] == i).nonzero().squeeze(1)
        if rows.numel():
            x = augment(image, params[rows], size)
            out[rows.to(dev)] = ((x - m) / s).to(out_dtype)
    return out
