"""Features of any images from a pretrained ViT, in file order: what ``seer features`` writes.

Images are decoded, checked against the pixel limit, resized and normalised exactly as ``seer eval`` does
(:func:`seer.eval.datasets.read_image` and :func:`~seer.eval.datasets.preprocess`), in DataLoader worker
processes (decoding, not the forward pass, bounds a large folder on the CPU); the rows keep the order of the
paths, whatever the number of workers. Unreadable files are skipped and reported with their reason; rows with
a NaN or inf are kept as computed and the images named in a warning.

Features (``tokens``, ``layers``): per block, the class token and/or the mean of the patch tokens, both
after the final norm, of the last ``layers`` blocks; the row is the class tokens of those blocks (earliest
first), then their patch means in the same order. ``layers=1, tokens="cls"`` is ``backbone(x)``: the
features ``seer eval`` scores.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..data.sources import check_max_bytes, is_image_name, printable, scan_folder
from ..data.workers import check_timeout, loader_timeout, next_batch
from .datasets import autocast_to, channel_stats, check_image_size, preprocess, read_image

log = logging.getLogger(__name__)

TOKENS = ("cls", "patch-mean", "cls+patch-mean")

PROGRESS_EVERY_S = 60.0  # how often a long extraction logs how far it is (INFO)


@dataclass
class ImageFeatures:
    """``features``: float32 (M, F) on the CPU, row i of image ``paths[i]``; ``skipped``: (path, reason) of
    each unreadable image, in path order."""
    features: Tensor
    paths: list[str]
    skipped: list[tuple[str, str]]


def image_paths(source: str | os.PathLike, *, setting: str = "source") -> list[str]:
    """The images of ``source``: a folder's image files (recursive, sorted as :func:`seer.data.sources.
    scan_folder` lists them; joined to ``source``), a list file's entries (one path a line, blank lines and
    '#' comments skipped, relative paths taken from the list file's folder, as a training list file), or a
    single image file. ``setting``: what a folder's errors and warnings call it (the CLI: '--images')."""
    from ..data.mapped import normalise_list_file
    src = os.fspath(source)
    if os.path.isdir(src):
        return [os.path.join(src, rel) for rel in scan_folder(src, setting)]
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src!r} does not exist")
    if is_image_name(src):
        return [src]
    return list(normalise_list_file(src, base=Path(os.path.abspath(src)).parent))


def feature_dim(backbone: nn.Module, layers: int = 1, tokens: str = "cls") -> int:
    """F, the width of :func:`token_features`' rows."""
    return backbone.embed_dim * layers * len(tokens.split("+"))


def check_image_args(backbone: nn.Module, image_size: int, mean, std) -> tuple[Tensor, Tensor]:
    """The normalisation as :func:`~seer.eval.datasets.channel_stats` gives it; ValueError naming
    ``image_size``, ``mean`` or ``std`` where the images cannot be prepared for the backbone with them."""
    check_image_size(image_size, backbone.patch_size)
    return channel_stats(mean, std)


def check_feature_args(backbone: nn.Module, layers: int, tokens: str) -> None:
    """ValueError naming ``layers`` or ``tokens`` when the backbone cannot give them."""
    depth = len(backbone.blocks)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= depth:
        raise ValueError(f"layers must be an integer between 1 and the backbone's depth {depth}, got {layers!r}")
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")


def token_features(backbone: nn.Module, x: Tensor, *, layers: int = 1, tokens: str = "cls") -> Tensor:
    """Normalised images (B, 3, H, W) -> features (B, F) in float32 (module doc); ``backbone`` a
    :class:`seer.model.VisionTransformer`."""
    blocks = backbone.get_intermediate_layers(x, layers, return_class_token=True)
    kinds = tokens.split("+")
    parts = [cls.float() for _, cls in blocks] if "cls" in kinds else []
    if "patch-mean" in kinds:  # averaged in float32: a bf16 sum over hundreds of tokens loses digits
        parts += [patches.float().mean(1) for patches, _ in blocks]
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def check_batching(batch_size: int, workers: int = 0, timeout_s: float = DataConfig.timeout_s) -> None:
    """ValueError naming ``batch_size``, ``workers`` or ``timeout_s`` where it is not one the loader takes."""
    for name, value, low in (("batch_size", batch_size, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    check_timeout(timeout_s, "timeout_s")


class _Images(Dataset):
    """Image i of ``paths`` -> (i, preprocessed (3, S, S) or None, None or the reason it is unreadable)."""

    def __init__(self, paths: Sequence[str], image_size: int, mean: Tensor, std: Tensor, max_pixels: int,
                 max_bytes: int):
        self.paths, self.image_size, self.mean, self.std = paths, image_size, mean, std
        self.max_pixels, self.max_bytes = max_pixels, max_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image, reason = read_image(self.paths[i], self.max_pixels, self.max_bytes)
        return i, None if image is None else preprocess(image, self.image_size, self.mean, self.std), reason


def _collate(items):  # in the worker: the batch crosses to the main process as one stacked tensor
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    return [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, bad


def extract_image_features(backbone: nn.Module, paths: Sequence[str], *, image_size: int, mean, std,
                           layers: int = 1, tokens: str = "cls", batch_size: int = 64, workers: int = 0,
                           device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None,
                           max_pixels: int = DataConfig.max_image_pixels,
                           timeout_s: float = DataConfig.timeout_s,
                           max_bytes: int = DataConfig.max_image_bytes) -> ImageFeatures:
    """Features (module doc) of the images at ``paths``, in that order, unreadable ones skipped, held in
    memory (M x F floats: :func:`seer.eval.save_features.save_image_features` writes a large set to a file
    as it goes instead).

    Args:
        backbone: a :class:`seer.model.VisionTransformer` (``seer.load_pretrained``), already on ``device``
            (default: where its parameters are); run in eval mode, its mode restored afterwards.
        image_size, mean, std: the evaluation side and the training normalisation (the run's
            ``eval.image_size`` or ``data.crops.global_size``, ``data.crops.mean/std``; an export's JSON has
            ``image_size``, ``mean`` and ``std``).
        layers, tokens: which blocks and tokens (module doc; ``tokens`` one of :data:`TOKENS`).
        batch_size: images per forward pass.
        workers: decoding processes (0: this process).
        autocast_dtype: autocast the forward passes to this dtype (None: as the backbone's parameters).
        max_pixels: larger images are skipped (``data.max_image_pixels``, the decompression-bomb guard).
        max_bytes: larger files are skipped without being read (``data.max_image_bytes``; 0 = no limit).
        timeout_s: :class:`seer.data.workers.DataTimeoutError` when the workers deliver no batch for this long
            (a hung read); 0 = no limit.
    """
    check_feature_args(backbone, layers, tokens)
    # Rows filled in place: a list of batches concatenated at the end would hold every feature twice.
    out = torch.empty(len(paths), feature_dim(backbone, layers, tokens))
    kept: list[int] = []

    def keep(idx: list[int], rows: Tensor) -> None:
        out[len(kept):len(kept) + len(idx)] = rows
        kept.extend(idx)

    skipped = stream_image_features(backbone, paths, keep, image_size=image_size, mean=mean, std=std, layers=layers,
                                    tokens=tokens, batch_size=batch_size, workers=workers, device=device,
                                    autocast_dtype=autocast_dtype, max_pixels=max_pixels, timeout_s=timeout_s,
                                    max_bytes=max_bytes)
    return ImageFeatures(out[:len(kept)], [paths[i] for i in kept], [(paths[i], why) for i, why in skipped])


@torch.no_grad()
def stream_image_features(backbone: nn.Module, paths: Sequence[str], write: Callable[[list[int], Tensor], None], *,
                          image_size: int, mean, std, part: Optional[range] = None, layers: int = 1,
                          tokens: str = "cls", batch_size: int = 64, workers: int = 0,
                          device: Optional[torch.device] = None, autocast_dtype: Optional[torch.dtype] = None,
                          max_pixels: int = DataConfig.max_image_pixels,
                          timeout_s: float = DataConfig.timeout_s, skip: Collection[int] = (),
                          after_batch: Optional[Callable[[range, list[tuple[int, str]]], None]] = None,
                          max_bytes: int = DataConfig.max_image_bytes) -> list[tuple[int, str]]:
    """The features of ``paths[i]`` for i in ``part`` (default: all), handed batch by batch to
    ``write(indices, rows)`` (the path indices of the readable images of the batch, increasing, and their
    float32 (len(indices), F) CPU rows) instead of kept; returns (index, reason) of each unreadable image.

    Batches are ``part.start + k * batch_size`` onwards: a part that starts at a multiple of ``batch_size``
    (:func:`seer.eval.save_features.batch_share`) runs the same batches as the whole list does, so that its
    rows are the same bytes (a batch's size can change the kernels a device picks). ``skip``: the first path
    index of each batch not to run (written by an interrupted run); ``after_batch(batch, unreadable)``: called
    once each batch is handed to ``write`` (also one without readable images), with the batch's path indices
    and its (index, reason) pairs. The other arguments are :func:`extract_image_features`'.
    """
    check_feature_args(backbone, layers, tokens)
    check_batching(batch_size, workers, timeout_s)
    check_max_bytes(max_bytes)
    mean_t, std_t = check_image_args(backbone, image_size, mean, std)
    part = range(len(paths)) if part is None else part
    if not isinstance(part, range) or part.step != 1 or not 0 <= part.start <= part.stop <= len(paths):
        raise ValueError(f"part must be a range of path indices (step 1) within 0..{len(paths)}, got {part!r}")
    device = device or next(backbone.parameters()).device
    images = _Images(paths, image_size, mean_t, std_t, max_pixels, max_bytes)
    # (ranges, not lists: 10^6 paths would be 10^6 ints held for the whole run)
    batches = [range(i, min(i + batch_size, part.stop)) for i in range(part.start, part.stop, batch_size)
               if i not in skip]
    loader = DataLoader(images, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        timeout=loader_timeout(timeout_s, workers))
    skipped = []
    non_finite: list[int] = []  # path indices whose row holds a NaN or inf
    was_training = backbone.training
    backbone.eval()
    t0 = report = time.perf_counter()
    done, total = 0, sum(map(len, batches))
    try:
        it = iter(loader)
        for batch in batches:
            where = f"images {batch[0] + 1}-{batch[-1] + 1} of {len(paths)}"
            idx, x, bad = next_batch(it, timeout_s, setting="timeout_s (--timeout-s)", where=where)
            for i, reason in bad:
                skipped.append((i, reason))
                log.warning("skipping unreadable image %s (%s)", printable(paths[i]), reason)
            if x is not None:
                with autocast_to(device, autocast_dtype):
                    rows = token_features(backbone, x.to(device), layers=layers, tokens=tokens).cpu()
                non_finite += [idx[j] for j in (~torch.isfinite(rows)).any(1).nonzero().flatten().tolist()]
                write(idx, rows)
            if after_batch is not None:
                after_batch(batch, bad)
            done += len(batch)
            if time.perf_counter() - report >= PROGRESS_EVERY_S:
                report = time.perf_counter()
                log.info("features: %d of %d images in %.0f s", done, total, report - t0)
    finally:
        backbone.train(was_training)
    if non_finite:
        # (seer eval drops such rows, with a warning; here they are the images' rows, kept, but never unsaid: one
        # NaN row is every other row's nearest neighbour in a search that does not check)
        log.warning("%d images (of the %d read here) gave features with NaN or inf (an fp16 overflow, a diverged "
                    "checkpoint?), written as computed: %s%s", len(non_finite), total - len(skipped),
                    ", ".join(printable(paths[i]) for i in non_finite[:5]), " ..." if len(non_finite) > 5 else "")
    return skipped
