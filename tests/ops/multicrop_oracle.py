"""Test helpers for the multi-crop op: real photos, the torchvision oracle and the issue's tolerance."""
from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
from torch import Tensor

import seer_kernels
from seer_kernels import CropParams, use_backend

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Beyond the tolerance, our float32 paths agree with torchvision's to float rounding (in [0, 1] units):
# a much tighter bound that catches small semantic slips the tolerance would let through.
EXACT = 1e-4


def chw(a: np.ndarray) -> Tensor:
    """An (H, W, 3) array as a contiguous uint8 (3, H, W) tensor (a copy)."""
    return torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def synthetic_photo(h: int, w: int, seed: int) -> Tensor:
    """A photo-like uint8 (3, h, w) image: smooth colour fields, hard-edged shapes and fine noise.

    Used only where scikit-image, scikit-learn or Pillow are missing (the GPU test machine has just torch):
    the GPU tests compare kernels with each other there, which any image content exercises.
    """
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 3, h // 16 + 2, w // 16 + 2, generator=g)
    x = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)[0]
    for _ in range(6):
        y0, x0 = int(torch.randint(0, h, (), generator=g)), int(torch.randint(0, w, (), generator=g))
        x[:, y0:y0 + h // 4 + 1, x0:x0 + w // 5 + 1] = torch.rand(3, 1, 1, generator=g)
    x = x + 0.04 * torch.randn(3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


SHAPES = {"astronaut": (512, 512), "coffee": (400, 600), "chelsea_portrait": (451, 300), "rocket": (427, 640),
          "china": (427, 640), "strip": (41, 640), "tiny": (23, 31)}


@functools.lru_cache(maxsize=None)
def photos() -> dict[str, Tensor]:
    """Real photographs as uint8 (3, H, W): several sizes and aspect ratios, including a strip and a tiny one
    (synthetic stand-ins of the same shapes where the packages that ship the photos are not installed)."""
    try:
        from PIL import Image
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError:
        return {k: synthetic_photo(h, w, i) for i, (k, (h, w)) in enumerate(SHAPES.items())}

    china = load_sample_images().images[0]
    out = {
        "astronaut": data.astronaut(),            # 512 x 512
        "coffee": data.coffee(),                  # 400 x 600
        "chelsea_portrait": np.rot90(data.chelsea()),  # 451 x 300
        "rocket": data.rocket(),                  # 427 x 640
        "china": china,                           # 427 x 640
        "strip": data.rocket()[200:241],          # 41 x 640: aspect ratio far outside (3/4, 4/3)
        "tiny": np.asarray(Image.fromarray(data.coffee()).resize((31, 23), Image.LANCZOS)),  # 23 x 31
    }
    return {k: chw(v) for k, v in out.items()}


def jpeg_bytes(image: Tensor, quality: int = 90, subsampling: int = -1) -> bytes:
    import pytest

    Image = pytest.importorskip("PIL.Image")

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def torchvision_crop(image: Tensor, p: CropParams, size: int, mean=MEAN, std=STD) -> Tensor:
    """One crop (3, S, S) by torchvision.transforms.v2.functional on image / 255, in the issue's order.

    Skips the calling test where torchvision is not installed (the GPU machine: there the CUDA kernels are
    compared with the C++ CPU kernel, which the CPU suite compares with torchvision).
    """
    import pytest

    F = pytest.importorskip("torchvision.transforms.v2.functional")

    x = image.cpu().float() / 255
    top, left, h, w = (int(v) for v in p.box[0])
    x = F.resized_crop(x, top, left, h, w, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if bool(p.flip[0]):
        x = F.hflip(x)
    if bool(p.jitter[0]):
        f = [float(v) for v in p.jitter_factors[0]]
        ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
        for op in p.jitter_order[0].tolist():
            x = ops[op](x, f[op])
    if bool(p.grayscale[0]):
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    sigma = float(p.blur_sigma[0])
    if sigma > 0:
        k = 2 * math.ceil(3 * sigma) + 1
        x = F.gaussian_blur(x, [k, k], [sigma, sigma])
    if bool(p.solarize[0]):
        x = F.solarize(x, 0.5)
    return F.normalize(x, list(mean), list(std))


def torchvision_crops(image: Tensor, params: CropParams, size: int, mean=MEAN, std=STD) -> Tensor:
    return torch.stack([torchvision_crop(image, params[i], size, mean, std) for i in range(len(params))])


def assert_within_tolerance(got: Tensor, want: Tensor, std=STD, *, exact: float | None = EXACT,
                            what: str = "crops") -> None:
    """The issue's tolerance per crop in [0, 1] pixel units: mean |diff| <= 1/255, 99.9th pct <= 4/255.

    With ``exact``, also max |diff| <= exact (our float32 paths match torchvision to rounding).
    """
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    d = ((got.detach().cpu().double() - want.detach().cpu().double()) * s).abs().flatten(1)
    assert torch.isfinite(d).all(), f"{what}: non-finite values in the output"
    mean = d.mean(1)
    p999 = torch.quantile(d.float(), 0.999, dim=1).double()
    bad = (mean > 1 / 255) | (p999 > 4 / 255)
    assert not bad.any(), (f"{what}: crops {bad.nonzero().flatten().tolist()} out of tolerance: mean x255 "
                           f"{(mean[bad] * 255).tolist()}, p99.9 x255 {(p999[bad] * 255).tolist()}")
    if exact is not None:
        worst = float(d.max())
        assert worst <= exact, f"{what}: max |diff| {worst:.2e} > {exact:.0e} (crop {int(d.amax(1).argmax())})"


# Every way to run the op: dispatcher backends plus the CPU emulation of the CUDA stages.
def apply(backend: str, images, packed: Tensor, size: int, mean=MEAN, std=STD, out_dtype=torch.float32) -> Tensor:
    images = list(images)
    if backend == "emulated":
        return torch.ops.seer_C.multicrop_apply_emulated(images, packed, size, list(mean), list(std), out_dtype)
    with use_backend(backend, op="multicrop"):
        return torch.ops.seer.multicrop_apply(images, packed, size, list(mean), list(std), out_dtype)


def crops(backend: str, image: Tensor, params: CropParams, size: int, device: str = "cpu", **kw) -> Tensor:
    return apply(backend, [image.to(device)], params.pack(), size, **kw)


def random_params(image_hw, n, scale, generator, **options) -> CropParams:
    return seer_kernels.sample_crop_params(image_hw, n, scale, generator, **options)
