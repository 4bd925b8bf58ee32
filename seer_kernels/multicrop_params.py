r"""Multi-crop parameters as data: :class:`CropParams`, the sampler with SwAV's distributions
(:func:`sample_crop_params`) and the recipe of a whole multi-crop (:class:`MultiCropSpec`).

Every random choice of a crop is drawn up front from an explicit ``torch.Generator``; applying given
parameters (:func:`seer_kernels.augment_crops`) is deterministic. The distributions are SwAV's
(src/multicropdataset.py), with torchvision's semantics:

* **RandomResizedCrop** (image of H x W, area A = HW): up to 10 tries of
  ``a ~ U(scale) * A``, ``r = exp(U(log ratio))``, ``w = round(sqrt(a r))``, ``h = round(sqrt(a / r))``;
  the first try with ``0 < w <= W`` and ``0 < h <= H`` wins, placed uniformly:
  ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``. If all 10 fail: the centred crop of the whole image,
  narrowed to the nearest allowed aspect ratio (``w = W, h = round(W / min(ratio))`` if
  ``W/H < min(ratio)``; ``h = H, w = round(H max(ratio))`` if ``W/H > max(ratio)``; else the image).
  ``round`` is Python's (half to even).
* **flip** with probability ``flip_p`` (0.5).
* **colour jitter** with probability ``jitter_p`` (0.8): brightness, contrast and saturation factors
  ``U[max(0, 1 - s), 1 + s]`` for strengths s = 0.8, hue shift ``U[-0.2, 0.2]``, in a uniformly random
  order (a permutation of the op ids 0 brightness, 1 contrast, 2 saturation, 3 hue). A strength of 0
  gives the identity factor (1, or 0 for hue). Crops without jitter get the identity factors.
* **grayscale** with probability ``grayscale_p`` (0.2), 3-channel output.
* **Gaussian blur** with probability ``blur_p`` (0.5), ``sigma ~ U(blur_sigma)`` = U(0.1, 2.0) in pixels
  of the output crop (PIL's radius in SwAV); 0 = no blur.
* **solarize** with probability ``solarize_p`` (0: SwAV and SEER do not solarize).

A probability p applies an op when ``u < p`` for a uniform u in [0, 1), so p = 0 never and p = 1 always
applies it. All uniforms of n crops come from one ``torch.rand((n, 36), generator=..., dtype=float64)``
call, row r for crop r (columns: ``U_*`` below), so a sampler call always consumes the same amount of the
generator's stream. Since one (N n, 36) draw is exactly N consecutive (n, 36) draws from the same generator,
:meth:`MultiCropSpec.sample` (and :func:`seer_kernels.multicrop`) draws every crop of a whole batch in one
call, group after group, and still gives exactly what :func:`sample_crop_params` gives called group by
group, image by image. The arithmetic on the uniforms runs in numpy, vectorised over every crop of the
call (about 40 small array operations per call whatever the number of crops and groups): tens of
microseconds per call, not per crop.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)
MAX_SIGMA = 1000.0  # largest blur sigma the kernels take, in output pixels
MAX_STRENGTH = 1e38  # largest jitter strength: its factor 1 + s stays finite in float32, the kernels' arithmetic

# Columns of CropParams.pack(); must match csrc/include/seer/multicrop.h.
PACK_COLUMNS = ("image", "top", "left", "height", "width", "flip", "jitter", "brightness", "contrast",
                "saturation", "hue", "order0", "order1", "order2", "order3", "grayscale", "sigma", "solarize")
COL = {name: i for i, name in enumerate(PACK_COLUMNS)}

_TRIES = 10  # torchvision's RandomResizedCrop tries before its fallback
_UNIFORMS = 2 * _TRIES + 16

# Columns of a crop's row of uniforms (the draw order is part of the sampler's contract: fixed seeds must
# keep giving the same parameters).
U_AREA = slice(0, _TRIES)  # RandomResizedCrop: area fraction of each try
U_LOG_RATIO = slice(_TRIES, 2 * _TRIES)  # and its log aspect ratio
U_POS = slice(2 * _TRIES, 2 * _TRIES + 2)  # top, left placement
U_FLAGS = [22, 23, 32, 33, 35]  # flip, jitter, grayscale, blur, solarize (op applied when u < p)
U_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
U_ORDER = slice(28, 32)  # argsort -> jitter order
U_SIGMA = 34


@dataclass
class CropParams:
    """The parameters of n crops of one image, as CPU tensors (see the module docstring for their law).

    Fields:
        box: (n, 4) int64: top, left, height, width in source pixels.
        flip: (n,) bool: horizontal flip.
        jitter: (n,) bool: whether the colour jitter is applied.
        jitter_factors: (n, 4) float32: brightness, contrast, saturation factors and hue shift.
        jitter_order: (n, 4) int64: a permutation of 0..3 (brightness, contrast, saturation, hue): the
            order in which the four jitter ops are applied.
        grayscale: (n,) bool.
        blur_sigma: (n,) float32: Gaussian blur sigma in output pixels, 0 = no blur.
        solarize: (n,) bool: solarize with threshold 0.5.
    """

    box: Tensor
    flip: Tensor
    jitter: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    def __len__(self) -> int:
        return int(self.box.shape[0])

    def __getitem__(self, index) -> "CropParams":
        """The parameters of a subset of the crops (an integer, slice, index tensor or mask); an integer keeps
        the crop dim (one crop) and must be in range, as for a list."""
        if isinstance(index, (bool, np.bool_)):
            raise TypeError("CropParams: an index must be an integer, a slice, an index tensor or a mask, got a bool")
        if isinstance(index, Tensor) and index.dim() == 0 and not index.is_floating_point() \
                and index.dtype != torch.bool:
            index = int(index)  # a 0-d integer tensor is one crop, as an int
        elif isinstance(index, np.ndarray) and index.ndim > 0:
            index = torch.as_tensor(index)  # an index array or mask (operator.index refuses it)
        elif not isinstance(index, (slice, Tensor)) and hasattr(index, "__index__"):
            index = operator.index(index)  # int, numpy integers
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"CropParams: index {index} is out of range for {n} crops")
            index %= n
            index = slice(index, index + 1)
        return CropParams(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @staticmethod
    def cat(params: Sequence["CropParams"]) -> "CropParams":
        """The crops of several CropParams, in order."""
        if not params:
            raise ValueError("CropParams.cat: argument 'params' must hold at least one CropParams")
        return CropParams(**{f.name: torch.cat([getattr(p, f.name) for p in params])
                             for f in dataclasses.fields(CropParams)})

    @staticmethod
    def identity(boxes: Union[Tensor, Sequence[Sequence[int]]]) -> "CropParams":
        """Plain resized crops of the given (n, 4) integer boxes: no flip, jitter, grayscale, blur or solarize."""
        given = torch.as_tensor(boxes)
        # The cast to int64 truncated a fractional box (10.7 -> 10) without a word: boxes are whole pixels.
        if given.is_floating_point() and not bool((given == given.floor()).all()):
            bad = given[given != given.floor()].reshape(-1)[0].item()  # NaN and inf included
            raise ValueError(f"CropParams.identity: argument 'boxes' must hold integers (whole pixels), got {bad}")
        box = given.to(torch.int64).reshape(-1, 4)
        n = box.shape[0]
        return CropParams(
            box=box, flip=torch.zeros(n, dtype=torch.bool), jitter=torch.zeros(n, dtype=torch.bool),
            jitter_factors=torch.tensor(IDENTITY_FACTORS, dtype=torch.float32).repeat(n, 1),
            jitter_order=torch.arange(4).repeat(n, 1), grayscale=torch.zeros(n, dtype=torch.bool),
            blur_sigma=torch.zeros(n, dtype=torch.float32), solarize=torch.zeros(n, dtype=torch.bool))

    def replace(self, **fields) -> "CropParams":
        return dataclasses.replace(self, **fields)

    def validate(self, image_hw: Optional[tuple[int, int]] = None, *, name: str = "params",
                 where: str = "augment_crops", values: bool = True) -> None:
        """Raise TypeError/ValueError naming argument ``name`` if the fields are malformed.

        With ``values`` (skipped while compiling: the native op checks values itself), also checks the
        values: boxes non-empty and inside an image of ``image_hw``, orders permutations, factors in range.
        """
        n = len(self) if isinstance(self.box, Tensor) and self.box.dim() >= 1 else -1
        spec = {"box": ((n, 4), "int"), "flip": ((n,), "bool"), "jitter": ((n,), "bool"),
                "jitter_factors": ((n, 4), "float"), "jitter_order": ((n, 4), "int"),
                "grayscale": ((n,), "bool"), "blur_sigma": ((n,), "float"), "solarize": ((n,), "bool")}
        for fname, (shape, kind) in spec.items():
            t = getattr(self, fname)
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: argument '{name}': field '{fname}' must be a torch.Tensor, "
                                f"got {type(t).__name__}")
            ok_kind = {"int": not t.is_floating_point() and t.dtype != torch.bool and not t.is_complex(),
                       "bool": t.dtype == torch.bool, "float": t.is_floating_point()}[kind]
            if not ok_kind:
                raise TypeError(f"{where}: argument '{name}': field '{fname}' must be a {kind} tensor, "
                                f"got {t.dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: argument '{name}': field '{fname}' must have shape {shape} "
                                 f"(n = {n} crops), got {tuple(t.shape)}")
        for fname in ("jitter_factors", "blur_sigma"):
            t = getattr(self, fname)
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise TypeError(f"{where}: argument '{name}': field '{fname}' must be float16, bfloat16, float32 "
                                f"or float64, got {t.dtype}")
        if not values or n == 0:
            return
        # In int64 whatever the field's integer dtype: in uint8, h - height wraps (a 20-pixel box passed as
        # fitting a 10-pixel side, and the reference cropped clamped pixels), and numpy refuses an image side
        # that the dtype cannot hold (OverflowError for a 300-pixel image and a uint8 box).
        box = self.box.detach().cpu().numpy().astype(np.int64)
        if (box[:, 2:] <= 0).any():
            raise ValueError(f"{where}: argument '{name}': every box needs height and width > 0, got "
                             f"{box[(box[:, 2:] <= 0).any(1)][0].tolist()}")
        if image_hw is not None:
            h, w = image_hw
            # top > h - height, not top + height > h: the sum of two huge int64 values wraps around.
            bad = (box[:, 0] < 0) | (box[:, 1] < 0) | (box[:, 0] > h - box[:, 2]) | (box[:, 1] > w - box[:, 3])
            if bad.any():
                raise ValueError(f"{where}: argument '{name}': box {box[bad][0].tolist()} (top, left, height, width) "
                                 f"lies outside the image of size {h}x{w}")
        order = self.jitter_order.detach().cpu().numpy()
        if not (np.sort(order, axis=1) == np.arange(4)).all():
            raise ValueError(f"{where}: argument '{name}': every jitter_order row must be a permutation of "
                             f"0..3, got {order.tolist()}")
        # As the kernels read them: float32 (a float64 factor of 1e39 is finite, and inf once packed).
        f = self.jitter_factors.detach().cpu().float().numpy().astype(np.float64)
        if not np.isfinite(f).all() or (f[:, :3] < 0).any() or (np.abs(f[:, 3]) > 0.5).any():
            raise ValueError(f"{where}: argument '{name}': jitter_factors must be finite in float32 (|x| < 3.4e38), "
                             f"brightness, contrast and saturation >= 0 and hue in [-0.5, 0.5]")
        sig = self.blur_sigma.detach().cpu().double().numpy()
        if not np.isfinite(sig).all() or (sig < 0).any() or (sig > MAX_SIGMA).any():
            raise ValueError(f"{where}: argument '{name}': blur_sigma must lie in [0, 1000] (0 = no blur)")

    def pack(self, image_index=0, reduce=1.0) -> Tensor:
        """The (n, 18) float32 CPU matrix the native ops read (columns: ``PACK_COLUMNS``).

        ``image_index``: the crops' image in the op's image list (an int, or one per crop). ``reduce``
        divides the boxes (a float, or one per crop): the source image was decoded at 1/reduce of its size
        (JPEG draft mode).
        """
        return torch.from_numpy(pack_fields(self.to_numpy(), image_index, reduce))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The fields as numpy arrays (CPU; shared memory for CPU tensors, bfloat16 as float32, which numpy
        lacks): the inverse of :meth:`from_numpy`."""
        out = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name).detach().cpu()
            out[f.name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        return out

    @staticmethod
    def from_numpy(fields: dict) -> "CropParams":
        """CropParams sharing the memory of numpy arrays (the fields as :func:`draw_fields` returns them)."""
        return CropParams(**{name: torch.from_numpy(a) for name, a in fields.items()})


def pack_fields(fields: dict, image_index=0, reduce=1.0) -> np.ndarray:
    """:meth:`CropParams.pack` of CropParams fields given as numpy arrays: the (n, 18) float32 matrix."""
    box = fields["box"]
    out = np.empty((len(box), len(PACK_COLUMNS)), dtype=np.float32)
    out[:, COL["image"]] = image_index
    reduce = np.asarray(reduce, dtype=np.float64)
    out[:, COL["top"]:COL["width"] + 1] = _windows32(box, reduce[:, None] if reduce.ndim else reduce)
    out[:, COL["flip"]] = fields["flip"]
    out[:, COL["jitter"]] = fields["jitter"]
    out[:, COL["brightness"]:COL["hue"] + 1] = fields["jitter_factors"]
    out[:, COL["order0"]:COL["order3"] + 1] = fields["jitter_order"]
    out[:, COL["grayscale"]] = fields["grayscale"]
    out[:, COL["sigma"]] = fields["blur_sigma"]
    out[:, COL["solarize"]] = fields["solarize"]
    return out


def _windows32(box: np.ndarray, reduce) -> np.ndarray:
    """(top, left, height, width) / reduce in float32, each window ending no later than its box does.

    Rounded one by one, start and length can end past the box's end by an ulp when reduce does not divide
    them (box (1, 0, 29, 30) at reduce 3: 0.33333334 + 9.666667 > 10), and the kernels then refuse a box
    that fits its image (the image decoded at 1/reduce). There the length is the largest float32 that ends
    at or before the rounded end, which lies inside the image when the box does (rounding is monotone and
    the image's side is an integer). Exact where reduce divides the box (1, 2, 4, 8: the JPEG reductions).

    The arithmetic stays in float64 on values that :func:`_round24` put on float32's grid, so the final
    cast is exact and nothing converts float32 back to float64: torch.compile traces this numpy code
    (augment_crops_batch packs inside the graph), and torch 2.11's Inductor folds a float64 -> float32 ->
    float64 round trip into the identity, which had made compiled windows differ from eager ones by an ulp.
    """
    b = box.astype(np.float64)
    start = _round24(b[:, :2] / reduce)
    length = _round24(b[:, 2:] / reduce)
    end = _round24((b[:, :2] + b[:, 2:]) / reduce)
    # Sums and differences of these values are exact in float64 (24-bit significands, exponents close).
    # No `if over.any()`: a branch on data breaks fullgraph=True.
    over = start + length > end
    fit = _round24(end - start)
    fit = np.where(start + fit > end, _below24(fit), fit)
    return np.concatenate([start, np.where(over, fit, length)], axis=1).astype(np.float32)


# 2^29 + 1: Veltkamp's splitter for float64's 53-bit significand, leaving a 24-bit (float32) high part.
_SPLIT24 = float(2 ** 29 + 1)


def _round24(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to nearest on float32's grid, in float64 (Veltkamp: c = x (2^29 + 1), hi = c - (c - x)
    keeps the 24 leading bits of x, rounded), for 0 <= x < 2^994 and x that float32 represents as a normal
    number or 0 (here: image coordinates). Casting the result to float32 is exact."""
    c = x * _SPLIT24
    return c - (c - x)


def _below24(g: np.ndarray) -> np.ndarray:
    """The float32 grid's value just below ``g`` (> 0, on that grid), in float64. With g in [2^e, 2^(e+1)),
    g (1 - 2^-24) is exact in float64 and lies g 2^-24 under g: the whole spacing below 2^e, more than half
    of the spacing 2^(e-23) below any other g, so rounding to nearest lands on the value below."""
    return _round24(g * (1.0 - 2.0 ** -24))


# ---------------------------------------------------------------------------------------------------------
# The sampler.

def generator_text(generator) -> str:
    """What a refused ``generator`` is, for messages: its device for a torch.Generator (a CUDA one), else its
    type ("got Generator" or the object's repr said nothing of what was wrong)."""
    if isinstance(generator, torch.Generator):
        return f"a torch.Generator on {generator.device}"
    return type(generator).__name__


def _check_range(where: str, name: str, value, lo: float = 0.0, hi: float = math.inf, positive: bool = False):
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if ok:
        a, b = float(value[0]), float(value[1])
        ok = lo <= a <= b <= hi and (a > 0 or not positive)
    if not ok:
        bound = f"{'0 <' if positive else f'{lo} <='} min <= max <= {hi}"
        raise ValueError(f"{where}: argument '{name}' must be a (min, max) pair with {bound}, got {value!r}")
    return float(value[0]), float(value[1])


def _check_number(where: str, name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (lo <= value <= hi):
        raise ValueError(f"{where}: argument '{name}' must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def rrc_boxes(image_hw, area_frac, log_ratio, pos, ratio) -> np.ndarray:
    """torchvision's RandomResizedCrop box from given uniforms: (n, 4) int64 top, left, height, width.

    ``image_hw``: (height, width) of the image, or an (n, 2) array with one per crop; ``area_frac`` (n, T):
    target area / image area per try; ``log_ratio`` (n, T): log aspect ratio (width / height) per try;
    ``pos`` (n, 2): uniforms in [0, 1) placing the box (arrays or tensors); ``ratio``: the (min, max)
    aspect ratio the fallback narrows to, or an (n, 2) array with one pair per crop. See the module docstring.
    """
    area_frac, log_ratio, pos = (np.asarray(a, dtype=np.float64) for a in (area_frac, log_ratio, pos))
    hw = np.asarray(image_hw, dtype=np.float64).reshape(-1, 2)  # (1 or n, 2)
    height, width = hw[:, :1], hw[:, 1:]  # columns, to broadcast against the tries
    target = (height * width) * area_frac
    aspect = np.exp(log_ratio)
    with np.errstate(over="ignore"):  # an extreme ratio's inf side fails the test below, as it should
        w = np.rint(np.sqrt(target * aspect))  # rint: half to even, like Python's round
        h = np.rint(np.sqrt(target / aspect))
    ok = (np.minimum(w, h) > 0) & (w <= width) & (h <= height)
    rows = np.arange(len(ok))
    first = ok.argmax(axis=1)  # the first successful try (0 when none: replaced below)
    box = np.empty((len(ok), 4))
    box[:, 2] = h[rows, first]
    box[:, 3] = w[rows, first]
    free = hw - box[:, 2:]  # top ~ U{0..H-h}, left ~ U{0..W-w}
    box[:, :2] = np.minimum(np.floor(pos * (free + 1)), free)
    found = ok.any(axis=1)
    if not found.all():  # rare with useful scales: most calls skip the fallback's arithmetic
        box = np.where(found[:, None], box, _fallback_boxes(hw, ratio))
    return box.astype(np.int64)


def _fallback_boxes(hw: np.ndarray, ratio) -> np.ndarray:
    """torchvision's fallback box: the centred crop of the whole image at the nearest allowed aspect ratio."""
    ratio = np.asarray(ratio, dtype=np.float64).reshape(-1, 2)
    lo, hi = ratio.min(axis=1), ratio.max(axis=1)
    height, width = hw[:, 0], hw[:, 1]
    in_ratio = width / height
    # At least 1 pixel: an extreme ratio (10 on a 5 x 5 image) rounds the narrow side to 0, an empty box.
    with np.errstate(over="ignore"):  # np.where computes both branches: an inf one is never taken
        fw = np.where(in_ratio > hi, np.maximum(np.rint(height * hi), 1), width)
        fh = np.where(in_ratio < lo, np.maximum(np.rint(width / lo), 1), height)
    return np.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], axis=1)


# Columns of CropLaw.coef: each law as one float64 row, so that a draw mixing several laws (the groups of
# a MultiCropSpec) gathers one row per crop and maps every uniform with array arithmetic.
K_AREA, K_LOG_RATIO, K_SIGMA = (0, 1), (2, 3), (4, 5)  # (lo, span): value = lo + span * u
K_PROBS = slice(6, 11)  # flip, jitter, grayscale, blur, solarize (the order of U_FLAGS)
K_FACTOR_LO, K_FACTOR_SPAN = slice(11, 15), slice(15, 19)
K_RATIO = slice(19, 21)  # (min, max) aspect ratio of the fallback


def _affine(coef: np.ndarray, k: tuple[int, int], u: np.ndarray) -> np.ndarray:
    """lo + span * u with (lo, span) = columns k of coef, one row per crop (or one for all)."""
    lo, span = coef[:, k[0]], coef[:, k[1]]
    if u.ndim == 2:
        lo, span = lo[:, None], span[:, None]
    return lo + span * u


def draw_fields(coef: np.ndarray, image_hw, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    """The CropParams fields, as numpy arrays, of n crops from one ``torch.rand((n, 36))`` call.

    Crop r follows the law whose :attr:`CropLaw.coef` is ``coef[r]`` (``coef`` (n, K), or (1, K): one law
    for all) on an image of ``image_hw[r]`` (an (n, 2) array, or one (height, width) for all). Arguments
    are not checked: callers pass validated laws.
    """
    u = torch.rand((n, _UNIFORMS), generator=generator, dtype=torch.float64).numpy()
    box = rrc_boxes(image_hw, _affine(coef, K_AREA, u[:, U_AREA]), _affine(coef, K_LOG_RATIO, u[:, U_LOG_RATIO]),
                    u[:, U_POS], coef[:, K_RATIO])
    flip, jitter, grayscale, blur, solarize = np.ascontiguousarray((u[:, U_FLAGS] < coef[:, K_PROBS]).T)
    factors = coef[:, K_FACTOR_LO] + coef[:, K_FACTOR_SPAN] * u[:, U_FACTORS]
    sigma = np.where(blur, _affine(coef, K_SIGMA, u[:, U_SIGMA]), 0.0)
    return dict(box=box, flip=flip, jitter=jitter,
                jitter_factors=np.where(jitter[:, None], factors, IDENTITY_FACTORS).astype(np.float32),
                jitter_order=np.argsort(u[:, U_ORDER], axis=1).astype(np.int64, copy=False),  # uniform permutation
                grayscale=grayscale, blur_sigma=sigma.astype(np.float32), solarize=solarize)


_FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
_FLOAT32_MAX = 3.4028234663852886e+38  # torch.finfo(torch.float32).max


def check_mean_std(where: str, mean, std) -> tuple[list[float], list[float]]:
    """``mean`` and ``std`` as lists of 3 floats (finite in float32; std non-zero), or ValueError naming the
    argument."""
    out = []
    for name, v in (("mean", mean), ("std", std)):
        if isinstance(v, (Tensor, np.ndarray)):  # e.g. a dataset's channel means (an array was refused as
            v = v.tolist()                       # not holding 3 finite numbers although it did)
        # The kernels compute in float32: a value past its range is inf there (every crop -inf or NaN).
        ok = (isinstance(v, (tuple, list)) and len(v) == 3
              and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and abs(x) <= _FLOAT32_MAX
                      for x in v))
        # The kernels multiply by 1 / std in float32: a std below the smallest normal float32 makes it inf.
        if not ok or (name == "std" and any(abs(x) < _FLOAT32_TINY for x in v)):
            what = f"non-zero (|std| >= {_FLOAT32_TINY:g}) " if name == "std" else ""
            raise ValueError(f"{where}: argument '{name}' must hold 3 {what}numbers finite in float32 (|x| <= "
                             f"{_FLOAT32_MAX:g}), one per channel, got {v!r}")
        out.append([float(x) for x in v])
    return out[0], out[1]


def _factor_range(where: str, name: str, strength) -> tuple[float, float]:
    s = _check_number(where, name, strength, 0.0, MAX_STRENGTH)
    return max(0.0, 1.0 - s), 1.0 + s


def sample_crop_params(image_hw: tuple[int, int], n: int, scale: tuple[float, float],
                       generator: torch.Generator, *, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       flip_p: float = 0.5, jitter_p: float = 0.8, brightness: float = 0.8, contrast: float = 0.8,
                       saturation: float = 0.8, hue: float = 0.2, jitter_strength: Optional[float] = None,
                       grayscale_p: float = 0.2, blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0),
                       solarize_p: float = 0.0) -> CropParams:
    """Draw the parameters of ``n`` crops of an image of ``image_hw`` = (H, W) with SwAV's distributions.

    Args:
        image_hw: (height, width) of the source image in pixels (of the full-size image, also when it will
            be decoded at reduced size).
        n: number of crops (>= 0).
        scale: RandomResizedCrop area range, e.g. (0.14, 1.0) for SwAV's global and (0.05, 0.14) for its
            local crops.
        generator: the CPU ``torch.Generator`` every choice is drawn from.
        ratio: aspect ratio (width / height) range.
        flip_p, jitter_p, grayscale_p, blur_p, solarize_p: probabilities of the ops.
        brightness, contrast, saturation, hue: jitter strengths (torchvision's ColorJitter arguments).
        jitter_strength: if given, SimCLR's strength s: brightness = contrast = saturation = 0.8 s,
            hue = 0.2 s (overrides the four above).
        blur_sigma: range of the blur sigma, in output pixels.

    Returns:
        :class:`CropParams` of the n crops (CPU tensors).
    """
    where = "sample_crop_params"
    if (not isinstance(image_hw, (tuple, list, torch.Size)) or len(image_hw) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in image_hw)):
        raise ValueError(f"{where}: argument 'image_hw' must be a (height, width) pair of integers > 0, "
                         f"got {image_hw!r}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{where}: argument 'n' must be an integer >= 0, got {n!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"{where}: argument 'generator' must be a CPU torch.Generator, got {generator_text(generator)}")
    law = CropLaw.make(where, scale, ratio=ratio, flip_p=flip_p, jitter_p=jitter_p, brightness=brightness,
                       contrast=contrast, saturation=saturation, hue=hue, jitter_strength=jitter_strength,
                       grayscale_p=grayscale_p, blur_p=blur_p, blur_sigma=blur_sigma, solarize_p=solarize_p)
    return law.draw((int(image_hw[0]), int(image_hw[1])), int(n), generator)


@dataclass(frozen=True)
class CropLaw:
    """The validated distribution of one crop group (what :func:`sample_crop_params` draws from)."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    log_ratio: tuple[float, float]
    probs: tuple[float, ...]  # flip, jitter, grayscale, blur, solarize
    factor_lo: np.ndarray
    factor_hi: np.ndarray
    sigma: tuple[float, float]

    @staticmethod
    def make(where: str, scale, *, ratio, flip_p, jitter_p, brightness, contrast, saturation, hue, jitter_strength,
             grayscale_p, blur_p, blur_sigma, solarize_p) -> "CropLaw":
        scale = _check_range(where, "scale", scale, positive=True)
        ratio = _check_range(where, "ratio", ratio, positive=True)
        probs = tuple(_check_number(where, k, v, 0.0, 1.0) for k, v in
                      (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p),
                       ("solarize_p", solarize_p)))
        if jitter_strength is not None:
            s = _check_number(where, "jitter_strength", jitter_strength, 0.0, 2.5)
            brightness = contrast = saturation = 0.8 * s
            hue = 0.2 * s
        ranges = [_factor_range(where, "brightness", brightness), _factor_range(where, "contrast", contrast),
                  _factor_range(where, "saturation", saturation)]
        h = _check_number(where, "hue", hue, 0.0, 0.5)
        ranges.append((-h, h))
        sigma = _check_range(where, "blur_sigma", blur_sigma, hi=MAX_SIGMA, positive=True)
        return CropLaw(scale, ratio, (math.log(ratio[0]), math.log(ratio[1])), probs,
                       np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges]), sigma)

    @functools.cached_property
    def coef(self) -> np.ndarray:
        """This law as one row of numbers (columns ``K_*``), the form :func:`draw_fields` takes."""
        (s0, s1), (r0, r1), (g0, g1) = self.scale, self.log_ratio, self.sigma
        # The spans are the differences the scalar formulas lo + (hi - lo) u use: draws stay bit-identical.
        return np.concatenate([[s0, s1 - s0, r0, r1 - r0, g0, g1 - g0], self.probs, self.factor_lo,
                               self.factor_hi - self.factor_lo, self.ratio])

    def draw(self, image_hw, n: int, generator: torch.Generator) -> CropParams:
        """Parameters of n crops of an image of image_hw (arguments already validated); ``image_hw`` may
        also be an (n, 2) array, one image size per crop (several images drawn in one call)."""
        return CropParams.from_numpy(draw_fields(self.coef[None], image_hw, n, generator))


# ---------------------------------------------------------------------------------------------------------
# A whole multi-crop recipe.

@dataclass(frozen=True)
class CropGroup:
    """``count`` crops of ``size`` x ``size`` pixels with RandomResizedCrop area range ``scale``."""

    count: int
    size: int
    scale: tuple[float, float]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
VISSL_STD = (0.229, 0.224, 0.225)  # VISSL and every SEER config
SWAV_STD = (0.228, 0.224, 0.225)  # the swav repository


@dataclass(frozen=True)
class MultiCropSpec:
    """A multi-crop recipe: crop groups plus the augmentation distributions and the normalisation.

    The default is SwAV's 2 x 224 (0.14, 1) + 6 x 96 (0.05, 0.14) with VISSL's std; see
    :meth:`swav` (the swav repository's std 0.228) and :meth:`seer_10b` (2 x 160 + 4 x 96).
    """

    groups: tuple[CropGroup, ...] = (CropGroup(2, 224, (0.14, 1.0)), CropGroup(6, 96, (0.05, 0.14)))
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = VISSL_STD
    out_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        where = "MultiCropSpec"
        if not self.groups or not all(isinstance(g, CropGroup) for g in self.groups):
            raise ValueError(f"{where}: argument 'groups' must be a non-empty tuple of CropGroup, got {self.groups!r}")
        for g in self.groups:
            if isinstance(g.count, bool) or not isinstance(g.count, int) or g.count < 1:
                raise ValueError(f"{where}: argument 'groups': count must be an integer >= 1, got {g.count!r}")
            if isinstance(g.size, bool) or not isinstance(g.size, int) or not 1 <= g.size <= 16384:
                raise ValueError(f"{where}: argument 'groups': size must be an integer in [1, 16384], got {g.size!r}")
            _check_range(where, "groups' scale", g.scale, positive=True)
        mean, std = check_mean_std(where, self.mean, self.std)
        # Kept as tuples of floats: an array or tensor given here would reach the op's list[float] schema as
        # numpy or 0-d tensor elements, and make specs unequal-comparable (== raised on tensors).
        object.__setattr__(self, "mean", tuple(mean))
        object.__setattr__(self, "std", tuple(std))
        if self.out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{where}: argument 'out_dtype' must be float32, bfloat16 or float16, got {self.out_dtype}")
        self.laws  # validates the distributions: a bad spec fails at construction

    @classmethod
    def swav(cls, **overrides) -> "MultiCropSpec":
        """SwAV (facebookresearch/swav): 2 x 224 + 6 x 96, std (0.228, 0.224, 0.225)."""
        return cls(**{"std": SWAV_STD, **overrides})

    @classmethod
    def seer_10b(cls, **overrides) -> "MultiCropSpec":
        """SEER 10B (VISSL regnet10B.yaml): 2 x 160 (0.14, 1) + 4 x 96 (0.05, 0.14)."""
        groups = (CropGroup(2, 160, (0.14, 1.0)), CropGroup(4, 96, (0.05, 0.14)))
        return cls(**{"groups": groups, **overrides})

    @functools.cached_property
    def laws(self) -> tuple[CropLaw, ...]:
        """The validated distribution of each group (cached: multicrop draws from these directly)."""
        opts = self.sampler_options()
        return tuple(CropLaw.make("MultiCropSpec", g.scale, jitter_strength=None, **opts) for g in self.groups)

    @functools.cached_property
    def coef(self) -> np.ndarray:
        """(G, K): the law of each group as one row (:attr:`CropLaw.coef`), gathered per crop by :meth:`draw`."""
        return np.stack([law.coef for law in self.laws])

    def draw(self, image_hw, generator: torch.Generator) -> "CropDraw":
        """Every crop of N images of sizes ``image_hw`` ((N, 2) ints, not checked) in one ``torch.rand`` call:
        see :class:`CropDraw` for the row order and :meth:`sample` for the semantics."""
        layout = row_layout(tuple(g.count for g in self.groups), len(image_hw))
        hw = np.asarray(image_hw, dtype=np.int64)[layout.image]
        return CropDraw(layout, draw_fields(self.coef[layout.group], hw, layout.rows, generator))

    def sample(self, image_hw: Sequence[tuple[int, int]], generator: torch.Generator) -> list[list[CropParams]]:
        """The parameters ``multicrop(images, self, generator)`` draws for N images of sizes ``image_hw``
        ((height, width) each): ``params[i][g]``, the crops of group g of image i.

        The whole batch comes from one ``torch.rand`` call, group after group, image after image within a
        group: exactly what :func:`sample_crop_params` gives called for group 0 of image 0, ..., group 0 of
        image N - 1, group 1 of image 0, ... with this recipe's options, from the same generator.
        """
        where = "MultiCropSpec.sample"
        hw = np.asarray(image_hw) if isinstance(image_hw, (list, tuple)) and image_hw else None
        if (hw is None or hw.ndim != 2 or hw.shape[1] != 2 or not np.issubdtype(hw.dtype, np.integer)
                or (hw <= 0).any()):
            raise ValueError(f"{where}: argument 'image_hw' must be a non-empty list of (height, width) pairs of "
                             f"integers > 0, got {image_hw!r}")
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"{where}: argument 'generator' must be a CPU torch.Generator, got {generator_text(generator)}")
        return self.draw(hw, generator).params()

    def sampler_options(self) -> dict:
        """Keyword arguments of :func:`sample_crop_params` for this recipe."""
        return dict(ratio=self.ratio, flip_p=self.flip_p, jitter_p=self.jitter_p, brightness=self.brightness,
                    contrast=self.contrast, saturation=self.saturation, hue=self.hue,
                    grayscale_p=self.grayscale_p, blur_p=self.blur_p, blur_sigma=self.blur_sigma,
                    solarize_p=self.solarize_p)


# ---------------------------------------------------------------------------------------------------------
# A batched draw: every crop of a batch in one array per field.

@dataclass(frozen=True)
class RowLayout:
    """The rows of a batched draw of N images (:meth:`MultiCropSpec.draw`): group after group, image after
    image within a group, crop after crop within an image (row ``bounds[g][0] + i count_g + v`` = crop v of
    group g of image i). Arrays are read-only: layouts are cached and shared."""

    counts: tuple[int, ...]
    n_images: int
    group: np.ndarray  # (R,) group of each row
    image: np.ndarray  # (R,) image of each row
    crop_major: np.ndarray  # (R,) the rows as the ops take them: in group g, row v N + i = crop v of image i
    bounds: tuple[tuple[int, int], ...]  # rows [start, stop) of each group, in both orders

    @property
    def rows(self) -> int:
        return len(self.group)

    def of(self, image: int, group: int) -> slice:
        """The rows of one image's crops of one group."""
        start = self.bounds[group][0] + image * self.counts[group]
        return slice(start, start + self.counts[group])


@functools.lru_cache(maxsize=64)
def row_layout(counts: tuple[int, ...], n_images: int) -> RowLayout:
    """The :class:`RowLayout` of ``n_images`` images with ``counts[g]`` crops in group g (cached: a data
    loader asks for the same few batch sizes over and over)."""
    group, image, crop_major, bounds, start = [], [], [], [], 0
    for g, c in enumerate(counts):
        group.append(np.full(c * n_images, g))
        image.append(np.repeat(np.arange(n_images), c))
        crop_major.append(start + (np.arange(n_images)[None, :] * c + np.arange(c)[:, None]).ravel())
        bounds.append((start, start + c * n_images))
        start += c * n_images
    arrays = [np.concatenate(a) for a in (group, image, crop_major)]
    for a in arrays:
        a.setflags(write=False)
    return RowLayout(tuple(counts), n_images, *arrays, tuple(bounds))


@dataclass(frozen=True)
class CropDraw:
    """The parameters of every crop of a batch (:meth:`MultiCropSpec.draw`): the CropParams fields as numpy
    arrays, one row per crop in ``layout`` order. Nothing per crop or per image is built until asked for."""

    layout: RowLayout
    fields: dict

    def params(self) -> list[list[CropParams]]:
        """``params[i][g]``: the CropParams of group g of image i (views of one set of tensors)."""
        every, lay = CropParams.from_numpy(self.fields), self.layout
        return [[every[lay.of(i, g)] for g in range(len(lay.counts))] for i in range(lay.n_images)]

    def packed(self, reduce) -> list[Tensor]:
        """For each group, the (count N, 18) matrix the native op reads (:meth:`CropParams.pack`), crop-major
        (row v N + i = crop v of image i), the boxes of image i divided by ``reduce[i]``."""
        lay = self.layout
        rows = pack_fields(self.fields, lay.image, np.asarray(reduce, dtype=np.float64)[lay.image])[lay.crop_major]
        every = torch.from_numpy(rows)
        return [every[start:stop] for start, stop in lay.bounds]
