r"""Decoding encoded images for the multi-crop op, with JPEG draft mode (Pillow).

**Draft mode.** libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size by running a smaller inverse
DCT per 8 x 8 block (Pillow: ``Image.draft``). That skips most of the IDCT, colour conversion and chroma
upsampling work (the entropy decoding remains), so a 1/2-size decode costs well under half of a full one.
Pixel k of the image decoded at 1/r covers the full-size pixels [k r, (k + 1) r), so a crop box
(top, left, h, w) becomes the window (top, left, h, w) / r of the reduced image, which the kernels
resample with the same triangle filter (the box is sampled from the full-size image first, so the
random crops do not depend on the decoding).

**Its effect.** The result differs slightly from decoding at full size and then resampling: the scaled
IDCT is a different low-pass filter than the part of the antialiasing triangle it replaces, and, more
stubbornly, the colour path differs: a full-size decode upsamples subsampled chroma (4:2:0, the JPEG
default) and converts YCbCr to RGB with clipping per full-size pixel, a reduced decode converts averaged
values. Averaging by the later downscale shrinks the first difference but not the second (measured on
the photos of scikit-image and scikit-learn: a few grey levels in saturated regions even after a 16x
reduction), and the colour jitter multiplies any difference by its brightness, contrast and saturation
factors (up to 1.8 each). The rule therefore reduces by r only when, for **every** crop of the image,
``min(h, w) / size >= DRAFT_MARGIN * r * gain`` with ``gain`` the product of the crop's brightness,
contrast and saturation factors above 1, and never by r = 2 when the chroma is subsampled (at 1/2 the
chroma planes are not filtered at all). Measured on real photos with SwAV's augmentations, crops then
stay within the op's tolerance (mean |diff| <= 1/255, 99.9th percentile <= 4/255 per crop; test:
tests/ops/test_multicrop.py::test_draft_decode_within_tolerance).

In practice the rule fires for large photos and small crops (e.g. r = 4 for 96-pixel crops of boxes
of >= 1728 pixels); with SwAV's 224-pixel global crops, photos up to about 4000 pixels decode at full
size. ``multicrop(..., draft=False)`` turns it off.
"""
from __future__ import annotations

import io
import numbers
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .multicrop_params import CropParams

DRAFT_FACTORS = (8, 4, 2)
DRAFT_MARGIN = 4.5

Encoded = Union[bytes, bytearray, memoryview]


def _open(data: Encoded):
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode: argument 'data' must be bytes, bytearray or memoryview, got {type(data).__name__}")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ...
        raise ValueError(f"decode: argument 'data' is not an image Pillow can read ({exc})") from exc


class EncodedImage:
    """An encoded image opened once: its size and the draft reductions it allows come from the header,
    then :meth:`decode` decodes it from the same open file, at the reduction the caller picked meanwhile
    (``multicrop`` samples the crops in between). Use as a context manager, or call :meth:`close`."""

    def __init__(self, data: Encoded):
        self._im = _open(data)
        self.hw = (self._im.height, self._im.width)  # (height, width) at full size
        self.reductions = _draft_reductions(self._im)

    def decode(self, reduce: int = 1) -> tuple[Tensor, int]:
        """:func:`decode_image` of this image (which can then be decoded no more), and close it."""
        im, r = self._im, 1
        try:
            if isinstance(reduce, (bool, np.bool_)) or not isinstance(reduce, numbers.Integral) \
                    or reduce not in (1, 2, 4, 8):
                raise ValueError(f"decode_image: argument 'reduce' must be 1, 2, 4 or 8, got {reduce!r}")
            try:
                if reduce > 1 and im.format == "JPEG":
                    width, height = im.size
                    drafted = im.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
                    if drafted is not None:
                        r = int(round(width / drafted[1][2]))
                if im.mode in HIGH_BIT_DEPTH_MODES:
                    im = _to_8_bit(im)
                if im.mode != "RGB":
                    im = im.convert("RGB")
                pixels = np.array(im)  # (h, w, 3), writable: the one copy out of Pillow's 4-byte pixels
            except (OSError, SyntaxError, EOFError) as exc:
                # The header was read (the image opened), its pixels not: a truncated or damaged file, or
                # a format whose decoder is missing here (EPS without Ghostscript). Pillow raises OSError
                # ("image file is truncated"), some plugins SyntaxError or EOFError.
                raise ValueError(f"decode: argument 'data' is an image whose pixels Pillow cannot decode "
                                 f"({type(exc).__name__}: {exc})") from exc
        finally:
            self.close()
        return torch.from_numpy(pixels).permute(2, 0, 1), r

    def close(self) -> None:
        self._im.close()

    def __enter__(self) -> "EncodedImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Pillow's single-channel modes of more than 8 bits. Its convert("RGB") clips their values to 255 instead of
# scaling them (a 16-bit PNG came out almost all white), so _to_8_bit converts them first.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8_bit(im):
    """A greyscale image of more than 8 bits as mode L, its values scaled from 16 bits: v >> 8, the high byte,
    which is also what Pillow keeps of a 16-bit RGB PNG. Mode I (32-bit integers; what Pillow made of 16-bit
    PNGs before mode I;16) is read as 16-bit data too, clipped to [0, 65535]: one rule for every image (a rule
    that looked at the values would brighten some images of a dataset and not others), so 8-bit values stored
    as 32-bit integers come out dark. Mode F (32-bit float, from TIFF)
    has no agreed range (0..1, 0..255, physical units): refused rather than guessed."""
    from PIL import Image

    if im.mode == "F":
        raise ValueError("decode: argument 'data' is a 32-bit floating-point image (Pillow mode F), whose value "
                         "range is not defined; convert it to 8 or 16 bits per channel first")
    a = np.asarray(im)  # uint16 (either byte order) for I;16*, int32 for I
    a = (np.clip(a, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    return Image.fromarray(a)  # uint8 (h, w): mode L


def _draft_reductions(im) -> tuple[int, ...]:
    """The reductions draft mode may use: none unless a JPEG, and not 2 when its chroma is subsampled."""
    from PIL import JpegImagePlugin

    if im.format != "JPEG":
        return ()
    sampling = JpegImagePlugin.get_sampling(im) if im.mode not in ("L", "1") else 0
    return DRAFT_FACTORS if sampling == 0 else tuple(r for r in DRAFT_FACTORS if r != 2)


def image_size(data: Encoded) -> tuple[int, int]:
    """(height, width) of an encoded image, from its header (nothing is decoded)."""
    with _open(data) as im:
        return im.height, im.width


def probe(data: Encoded) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(height, width) from the header, and the reductions draft mode may use for this image: none unless
    it is a JPEG, and not 2 when its chroma is subsampled (see the module docstring)."""
    with EncodedImage(data) as e:
        return e.hw, e.reductions


def _gain(jitter: np.ndarray, factors: np.ndarray) -> np.ndarray:
    f = np.maximum(factors[:, :3].astype(np.float64), 1.0)
    return np.where(jitter, f[:, 0] * f[:, 1] * f[:, 2], 1.0)


def jitter_gain(params: CropParams) -> Tensor:
    """(n,) product of the brightness, contrast and saturation factors above 1 (1 without jitter)."""
    fields = params.to_numpy()
    return torch.from_numpy(_gain(fields["jitter"], fields["jitter_factors"]))


def crop_shrink(fields: dict, sizes) -> np.ndarray:
    """(n,) ``min(h, w) / (size * gain)`` of each crop, what the draft rule compares with ``margin * r``.

    ``fields``: CropParams fields as numpy arrays (``box``, ``jitter``, ``jitter_factors``, as
    :func:`seer_kernels.multicrop_params.draw_fields` returns them); ``sizes`` (n,): output sizes.
    """
    box = fields["box"]
    side = np.minimum(box[:, 2], box[:, 3]).astype(np.float64)
    return side / (np.asarray(sizes, dtype=np.float64) * _gain(fields["jitter"], fields["jitter_factors"]))


def largest_reduction(shrink: float, allowed: Sequence[int] = DRAFT_FACTORS, margin: float = DRAFT_MARGIN) -> int:
    """The largest r in ``allowed`` with ``shrink >= margin * r`` (shrink: the smallest of the image's
    :func:`crop_shrink`), else 1."""
    for r in sorted(allowed, reverse=True):
        if shrink >= margin * r:
            return r
    return 1


def draft_factor(params: CropParams, sizes: Sequence[int], allowed: Sequence[int] = DRAFT_FACTORS,
                 margin: float = DRAFT_MARGIN) -> int:
    """The largest r in ``allowed`` with ``min(h, w) / size >= margin * r * gain`` for every crop, else 1.

    ``params``: every crop of one image (full-size boxes); ``sizes`` (n,): their output sizes.
    """
    if len(params) == 0:
        return 1
    return largest_reduction(float(crop_shrink(params.to_numpy(), sizes).min()), allowed, margin)


def decode_image(data: Encoded, reduce: int = 1) -> tuple[Tensor, int]:
    """Decode to a uint8 (3, h, w) tensor (a channels-last view) and the reduction r actually used.

    With ``reduce`` in (2, 4, 8) a JPEG is decoded in draft mode at 1/r of its size, h = ceil(H / r),
    w = ceil(W / r); other formats (and reduce = 1) decode at full size, r = 1. 16-bit greyscale keeps its
    high byte; 32-bit floating-point images raise ValueError (see ``_to_8_bit``).
    """
    with EncodedImage(data) as e:
        return e.decode(reduce)
