"""The public multi-crop ops: ``augment_crops``, ``augment_crops_batch``, ``multicrop`` and the custom op
``torch.ops.seer.multicrop_apply`` behind them.

Semantics (torchvision.transforms.v2 on float images): seer_kernels/reference/multicrop.py. Backends:
CUDA C++ (up to five launches per resolution, each over every crop of the batch), C++ CPU (one task per
crop, vectorised rows) and the batched pure-torch reference. Parameters are drawn by
seer_kernels.multicrop_params and passed as a packed float32 CPU matrix, so GPU calls never wait for the host.

Use in DataLoader workers (CPU)::

    class Crops(torch.utils.data.Dataset):
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(epoch_seed * len(self) + i)  # or one generator per worker
            return seer_kernels.multicrop([self.jpeg_bytes[i]], SPEC, g)  # [(2, 3, 224, 224), (6, 3, 96, 96)]

A worker runs the op on one thread (the DataLoader sets torch.set_num_threads(1) in workers); to give
workers more, call torch.set_num_threads(k) in worker_init_fn *and* use multiprocessing_context="spawn"
(GNU OpenMP cannot start threads in a process forked from one that already ran them: that hangs any torch
op). Returning a whole batch from one worker call (a batch sampler) gives crop-major tensors directly.

On the GPU: decode to uint8 (3, H, W) CUDA tensors, then ``multicrop(list_of_cuda_images, SPEC, g)`` (or
``augment_crops_batch`` with parameters drawn elsewhere) returns one CUDA tensor per resolution,
(count N, 3, size, size), crop-major, ready for the trunk.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .. import _native, decode
from .._backend import Backend, Dispatcher, plain_eager
from ..multicrop_params import (COL, MAX_SIGMA, PACK_COLUMNS, CropDraw, CropParams, MultiCropSpec, check_mean_std,
                                generator_text)
from ..reference import multicrop as ref
from . import constant_outputs

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

DISPATCH = Dispatcher("multicrop")


def _native_apply(images, params, size, mean, std, out_dtype):
    return torch.ops.seer_C.multicrop_apply(images, params, size, mean, std, out_dtype)


DISPATCH.register(Backend(
    "cuda", _native_apply, ("cuda",), (torch.uint8,),
    available=lambda d: _native.unavailable_reason("multicrop_apply", "CUDA")))
DISPATCH.register(Backend(
    "cpp", _native_apply, ("cpu",), (torch.uint8,),
    available=lambda d: _native.unavailable_reason("multicrop_apply", "CPU")))
DISPATCH.register(Backend("reference", ref.multicrop_apply, ("cuda", "cpu"), (torch.uint8,)))


@torch.library.custom_op("seer::multicrop_apply", mutates_args=())
def _apply_op(images: list[Tensor], params: Tensor, size: int, mean: list[float], std: list[float],
              out_dtype: torch.dtype) -> Tensor:
    # Checked here, before dispatch, so that every backend refuses the same input with the same message
    # (the reference would otherwise read uninitialised rows or return NaN; the native kernels check too,
    # for direct calls of torch.ops.seer_C).
    _check_apply_args("seer::multicrop_apply", images, params, size, mean, std, out_dtype)
    backend = DISPATCH.select(images[0].device, images[0].dtype)
    return backend.impl(images, params, size, mean, std, out_dtype)


def _apply_checked(images: list[Tensor], params: Tensor, size: int, mean: list[float], std: list[float],
                   out_dtype: torch.dtype) -> Tensor:
    """The op for arguments that a public function has checked: in plain eager mode the selected backend
    directly (neither torch.library's per-call wrapper nor a second check), else the custom op."""
    if plain_eager(params, *images):
        _check_not_capturing("seer::multicrop_apply", images[0])
        return DISPATCH.select(images[0].device, images[0].dtype).impl(images, params, size, mean, std, out_dtype)
    return torch.ops.seer.multicrop_apply(images, params, size, mean, std, out_dtype)


@_apply_op.register_fake
def _(images, params, size, mean, std, out_dtype):
    if not images:
        raise ValueError("seer::multicrop_apply: argument 'images' must be a non-empty list of uint8 (3, H, W) "
                         "tensors")
    return images[0].new_empty((params.shape[0], 3, size, size), dtype=out_dtype)


constant_outputs(_apply_op)  # the crops of given pixels and drawn parameters: no gradient to either


# ---------------------------------------------------------------------------------------------------------
# Validation (messages name the argument).

def _check_image(where: str, name: str, image) -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"{where}: argument '{name}' must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"{where}: argument '{name}' must be uint8 (decoded pixels in 0..255), got {image.dtype}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: argument '{name}' must have shape (3, H, W) (RGB, channels first), "
                         f"got {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{where}: argument '{name}' must be non-empty, got shape {tuple(image.shape)}")
    if max(image.shape[1:]) > MAX_SIDE:  # every backend: the native kernels' float32 pixel positions
        raise ValueError(f"{where}: argument '{name}' sides must be below 2^24 pixels, got shape "
                         f"{tuple(image.shape)}")
    _check_not_capturing(where, image)


def _check_not_capturing(where: str, image: Tensor) -> None:
    """Also checked inside the op at run time, which is where a compiled region (opaque to it) gets it."""
    if image.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        # The parameters live on the host and reach the GPU through a staging copy that a graph would
        # freeze: every replay would give the captured crops again, silently, whatever params hold then.
        raise RuntimeError(f"{where}: cannot run inside CUDA graph capture: the crop parameters are host data "
                           "drawn per call; run the augmentation outside the graph (a few launches per batch)")


def _check_size(where: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= 16384:
        raise ValueError(f"{where}: argument 'size' must be an integer in [1, 16384], got {size!r}")
    return int(size)


def _check_out_dtype(where: str, out_dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{where}: argument 'out_dtype' must be torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {out_dtype!r}")


def _check_params(where: str, name: str, params, image_hw) -> None:
    if not isinstance(params, CropParams):
        raise TypeError(f"{where}: argument '{name}' must be a seer_kernels.CropParams, got {type(params).__name__}")
    params.validate(image_hw, name=name, where=where, values=not torch.compiler.is_compiling())


# Largest image side the native kernels accept (they compute pixel positions in float32).
MAX_SIDE = (1 << 24) - 1
# Largest accepted `reduce` of augment_crops_batch. JPEG draft mode decodes at 1/2, 1/4 or 1/8; other scaled
# decoders may use other factors, but beyond 64 a box of a few pixels becomes a window of a small fraction
# of a decoded pixel: almost surely a mistake (a scale passed instead of its inverse, an unrelated number).
MAX_REDUCE = 64.0


def _check_apply_args(where: str, images, params, size, mean, std, out_dtype) -> None:
    """The checks of the native kernels (csrc/include/seer/multicrop.h), for every backend of the op."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"{where}: argument 'images' must be a non-empty list of uint8 (3, H, W) tensors")
    for i, image in enumerate(images):
        _check_image(where, f"images[{i}]", image)
        if image.device != images[0].device:
            raise ValueError(f"{where}: argument 'images' must all be on one device, images[{i}] is on "
                             f"{image.device} and images[0] on {images[0].device}")
    if not isinstance(params, Tensor):
        raise TypeError(f"{where}: argument 'params' must be a torch.Tensor, got {type(params).__name__}")
    if params.device.type != "cpu" or params.dtype != torch.float32 or params.dim() != 2 \
            or params.shape[1] != len(PACK_COLUMNS):
        raise ValueError(f"{where}: argument 'params' must be a float32 CPU tensor of shape (n, {len(PACK_COLUMNS)}) "
                         f"(CropParams.pack), got {params.dtype} on {params.device} of shape {tuple(params.shape)}")
    _check_size(where, size)
    check_mean_std(where, mean, std)
    _check_out_dtype(where, out_dtype)
    _check_packed(where, params.detach().numpy(), [tuple(im.shape[1:]) for im in images])


def _check_packed(where: str, p: np.ndarray, sizes: list[tuple[int, int]]) -> None:
    """Every row of a packed (n, 18) matrix valid for images of ``sizes``; the first bad row is named."""

    def check(bad: np.ndarray, what: str, cols: slice) -> None:
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: argument 'params': crop {r}: {what}, got {p[r, cols].tolist()}")

    if len(p) == 0:
        return
    check(~np.isfinite(p).all(1), "every value must be finite", slice(None))
    idx = p[:, COL["image"]]
    check((idx != np.floor(idx)) | (idx < 0) | (idx >= len(sizes)),
          f"the image index must be an integer in [0, {len(sizes)})", slice(0, 1))
    box = slice(COL["top"], COL["width"] + 1)
    check((p[:, COL["height"]] <= 0) | (p[:, COL["width"]] <= 0),
          "the box (top, left, height, width) must have height and width > 0", box)
    outside, hw = _boxes_outside(p.astype(np.float64), sizes)
    if outside.any():
        r = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{where}: argument 'params': crop {r}: the box (top, left, height, width) "
                         f"{p[r, box].tolist()} lies outside image {int(idx[r])} of size "
                         f"{int(hw[r, 0])}x{int(hw[r, 1])}")
    for name in ("flip", "jitter", "grayscale", "solarize"):
        check(~np.isin(p[:, COL[name]], (0.0, 1.0)), f"{name} must be 0 or 1", slice(COL[name], COL[name] + 1))
    order = slice(COL["order0"], COL["order3"] + 1)
    check((np.sort(p[:, order], axis=1) != np.arange(4)).any(1), "the jitter order must be a permutation of 0..3",
          order)
    factors = slice(COL["brightness"], COL["hue"] + 1)
    check((p[:, factors][:, :3] < 0).any(1) | (np.abs(p[:, COL["hue"]]) > 0.5),
          "the jitter factors must be >= 0 (brightness, contrast, saturation) and in [-0.5, 0.5] (hue)", factors)
    sigma = slice(COL["sigma"], COL["sigma"] + 1)
    check((p[:, COL["sigma"]] < 0) | (p[:, COL["sigma"]] > MAX_SIGMA), "the blur sigma must lie in [0, 1000]", sigma)


def _boxes_outside(p: np.ndarray, sizes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """For packed rows ``p`` (float64, valid image indices): which boxes (top, left, height, width) leave
    their image, and each row's image (height, width)."""
    hw = np.asarray(sizes, dtype=np.float64)[p[:, COL["image"]].astype(np.int64)]
    top, left, h, w = p[:, COL["top"]:COL["width"] + 1].T
    return (top < 0) | (left < 0) | (top + h > hw[:, 0]) | (left + w > hw[:, 1]), hw


def _check_windows(where: str, packed: Tensor, sizes: list[tuple[int, int]]) -> None:
    """Every packed window (box / reduce) inside its decoded image, as the native kernels require."""
    p = packed.double().numpy()
    bad, hw = _boxes_outside(p, sizes)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: argument 'params': the box of crop {r} scaled by 1/reduce, "
                         f"{p[r, 1:5].tolist()}, lies outside image {int(p[r, COL['image']])} of size "
                         f"{int(hw[r, 0])}x{int(hw[r, 1])}")


# ---------------------------------------------------------------------------------------------------------
# The public functions.

def augment_crops(image: Tensor, params: CropParams, size: int, mean: Sequence[float], std: Sequence[float],
                  out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Augmented, normalised crops (n, 3, size, size) of one uint8 image (3, H, W), on its device.

    Crop r follows ``params[r]``: resized_crop (bilinear, antialias) -> hflip -> colour jitter ops in the
    drawn order -> grayscale -> Gaussian blur -> solarize -> normalize(mean, std), exactly as
    torchvision.transforms.v2.functional on ``image / 255`` (seer_kernels/reference/multicrop.py), cast to
    ``out_dtype`` (float32, bfloat16 or float16). ``image`` may be planar (C, H, W) memory or a
    channels-last view of an (H, W, 3) array (``torch.from_numpy(a).permute(2, 0, 1)``): both are read
    in place.
    """
    where = "augment_crops"
    _check_image(where, "image", image)
    _check_params(where, "params", params, tuple(image.shape[1:]))
    size = _check_size(where, size)
    mean, std = check_mean_std(where, mean, std)
    _check_out_dtype(where, out_dtype)
    return _apply_checked([image], params.pack(0), size, mean, std, out_dtype)


def augment_crops_batch(images: Sequence[Tensor], params: Sequence, size: Union[int, Sequence[int]],
                        mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype = torch.float32, *,
                        reduce: Optional[Sequence[float]] = None) -> Union[Tensor, list[Tensor]]:
    """The crops of N images of any sizes, crop-major, one tensor per crop resolution.

    With ``size`` an int, ``params[i]`` is the CropParams of the V crops of ``images[i]`` (the same V for
    every image) and the result is (V N, 3, size, size), row v N + i = crop v of image i: the layout SwAV
    feeds its trunk for one resolution (``out.view(V, N, 3, size, size)[v]`` = crop v of the batch).
    With ``size`` a list of G sizes, ``params[i]`` is a list of G CropParams (e.g. global then local
    crops) and the result a list of G such tensors. One tensor is one launch per stage on the GPU.
    ``reduce[i]`` (default 1) says that image i was decoded at 1 / reduce[i] of the size its boxes refer
    to (JPEG draft mode, see seer_kernels.decode).
    """
    where = "augment_crops_batch"
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"{where}: argument 'images' must be a non-empty list of uint8 (3, H, W) tensors")
    grouped = isinstance(size, (list, tuple))
    sizes = [_check_size(where, s) for s in size] if grouped else [_check_size(where, size)]
    if grouped and not sizes:
        raise ValueError(f"{where}: argument 'size' must be an int or a non-empty list of ints")
    what = f"a list of {len(sizes)} CropParams (one per size)" if grouped else "a CropParams"
    if not isinstance(params, (list, tuple)) or len(params) != len(images):
        raise ValueError(f"{where}: argument 'params' must be a list with one entry per image ({len(images)}), "
                         f"each {what}")
    if grouped and not all(isinstance(p, (list, tuple)) and len(p) == len(sizes) for p in params):
        raise ValueError(f"{where}: argument 'params': every entry must be {what}")
    per_group = [[p[g] if grouped else p for p in params] for g in range(len(sizes))]
    if reduce is None:
        reduce = [1.0] * len(images)
    elif len(reduce) != len(images) or not all(isinstance(r, numbers.Real) and not isinstance(r, bool)
                                               and 1 <= r <= MAX_REDUCE for r in reduce):
        raise ValueError(f"{where}: argument 'reduce' must hold one factor in [1, {MAX_REDUCE:g}] per image "
                         f"(JPEG draft mode: 1, 2, 4 or 8), got {reduce!r}")
    for i, image in enumerate(images):
        _check_image(where, f"images[{i}]", image)
        if image.device != images[0].device:
            raise ValueError(f"{where}: argument 'images' must all be on one device, images[{i}] is on "
                             f"{image.device} and images[0] on {images[0].device}")
    for g, group in enumerate(per_group):
        for i, p in enumerate(group):
            name = f"params[{i}][{g}]" if grouped else f"params[{i}]"
            # With a reduction the windows (box / reduce) are checked against the decoded image below.
            _check_params(where, name, p, tuple(images[i].shape[1:]) if reduce[i] == 1 else None)
            if len(p) != len(group[0]):
                raise ValueError(f"{where}: argument 'params' must hold the same number of crops for every image, "
                                 f"got {len(group[0])} for image 0 and {len(p)} for image {i}")
    mean, std = check_mean_std(where, mean, std)
    _check_out_dtype(where, out_dtype)
    outs = []
    for group, s in zip(per_group, sizes):
        packed = _pack_crop_major(group, reduce)
        if any(r != 1 for r in reduce) and not torch.compiler.is_compiling():
            _check_windows(where, packed, [tuple(im.shape[1:]) for im in images])
        outs.append(_apply_checked(list(images), packed, s, mean, std, out_dtype))
    return outs if grouped else outs[0]


def _pack_crop_major(params: Sequence[CropParams], reduce: Sequence[float]) -> Tensor:
    """(V N, 18): row v N + i = crop v of image i."""
    packed = torch.stack([p.pack(i, float(r)) for i, (p, r) in enumerate(zip(params, reduce))], dim=1)
    return packed.reshape(-1, packed.shape[-1])


ImageLike = Union[Tensor, bytes, bytearray, memoryview]


def _host_only(fn):
    """fn run eagerly under torch.compile, nothing in it traced (a graph break; fullgraph=True refuses it
    with the reason)."""
    reason = (f"{fn.__name__} draws the crop parameters with numpy and decodes images on the host, which "
              "torch.compile does not trace: call it outside the compiled function, or draw with "
              "MultiCropSpec.sample and compile augment_crops_batch, which traces")
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # older torch (the argument came with pytorch#150341, 2025): no reason to show
        return torch.compiler.disable(fn)


@_host_only
def multicrop(images: Union[Sequence[ImageLike], Tensor], spec: MultiCropSpec, generator: torch.Generator, *,
              draft: bool = True, return_params: bool = False):
    """Sample the crops of ``spec`` for every image from ``generator``, then apply them.

    Args:
        images: a list of uint8 (3, H, W) tensors (any sizes, one device), of encoded images (bytes:
            decoded on the CPU with Pillow, in JPEG draft mode when every crop of the image allows it, see
            seer_kernels.decode), or a uint8 (N, 3, H, W) tensor.
        spec: the recipe (:class:`MultiCropSpec`), e.g. ``MultiCropSpec.swav()``.
        generator: CPU ``torch.Generator``; parameters are drawn group by group, each for all images in one
            call (so ``multicrop([image], ...)`` draws exactly what :func:`sample_crop_params` would, group
            after group).
        draft: allow JPEG draft mode for encoded images (see seer_kernels.decode for its rule and effect).
        return_params: also return the parameters, ``params[i][g]`` for image i and group g.

    Returns:
        One tensor per group of ``spec`` (per resolution), (count N, 3, size, size), crop-major as in
        :func:`augment_crops_batch`; with ``return_params``, ``(tensors, params)``.

    Under ``torch.compile`` this host-side function runs eagerly (a graph break), and
    ``fullgraph=True`` refuses it, saying why; the op it calls, ``seer::multicrop_apply``, traces.
    """
    where = "multicrop"
    batch = images if isinstance(images, Tensor) else None
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"{where}: argument 'images' as a tensor must be (N, 3, H, W), got {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or not images:
        got = f"a tensor of shape {tuple(batch.shape)}" if batch is not None else \
            "an empty list" if isinstance(images, (list, tuple)) else type(images).__name__
        raise TypeError(f"{where}: argument 'images' must be a non-empty list of images, got {got}")
    if not isinstance(spec, MultiCropSpec):
        raise TypeError(f"{where}: argument 'spec' must be a seer_kernels.MultiCropSpec, got {type(spec).__name__}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"{where}: argument 'generator' must be a CPU torch.Generator, got {generator_text(generator)}")
    with contextlib.ExitStack() as opened:  # encoded images stay open from their header to their decode
        sources = [_source(where, i, item, opened) for i, item in enumerate(images)]
        draw = spec.draw([s.hw if isinstance(s, decode.EncodedImage) else tuple(s.shape[1:]) for s in sources],
                         generator)
        decoded, reduce = _decode_sources(sources, draw, spec, draft)
    if any(im.device != decoded[0].device for im in decoded):
        raise ValueError(f"{where}: argument 'images' must all be on one device (encoded images decode on the CPU), "
                         f"got {sorted({str(im.device) for im in decoded})}")
    mean, std = list(spec.mean), list(spec.std)
    outs = [_apply_checked(decoded, packed, group.size, mean, std, spec.out_dtype)
            for packed, group in zip(draw.packed(reduce), spec.groups)]
    return (outs, draw.params()) if return_params else outs


def _source(where: str, i: int, item, opened: contextlib.ExitStack):
    """An encoded item opened (its header read, nothing decoded), or a checked image tensor."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return opened.enter_context(decode.EncodedImage(item))
    _check_image(where, f"images[{i}]", item)
    return item


def _decode_sources(sources: list, draw: CropDraw, spec: MultiCropSpec, draft: bool) -> tuple[list[Tensor], list[int]]:
    """The images as tensors and the reduction each was decoded at: each encoded one at the largest draft
    reduction that every one of its crops allows (seer_kernels.decode), or 1."""
    shrink = None  # per image, computed only when some image may use draft mode
    decoded, reduce = [], []
    for i, source in enumerate(sources):
        r = 1
        if isinstance(source, decode.EncodedImage):
            if draft and source.reductions:
                if shrink is None:
                    shrink = _image_shrink(draw, spec)
                r = decode.largest_reduction(float(shrink[i]), source.reductions)
            source, r = source.decode(r)
        decoded.append(source)
        reduce.append(r)
    return decoded, reduce


def _image_shrink(draw: CropDraw, spec: MultiCropSpec) -> np.ndarray:
    """(N,) the smallest :func:`seer_kernels.decode.crop_shrink` over each image's crops."""
    lay = draw.layout
    per_crop = decode.crop_shrink(draw.fields, np.array([g.size for g in spec.groups])[lay.group])
    out = np.full(lay.n_images, np.inf)
    np.minimum.at(out, lay.image, per_crop)
    return out
