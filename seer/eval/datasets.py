"""Labelled evaluation data: the built-in digits, or an image folder with one subfolder per class.

A folder either has ``train/`` and ``val/`` (or ``validation/``, or ``test/``) subfolders, each with one
subfolder per class, or just one subfolder per class, which is split into train and test by a fixed seeded
permutation (``eval.test_fraction``, ``eval.split_seed``). Split folders without their partner (only
``train/``, or only held-out ones) are refused: read as class folders, the splits would become the classes
(a class named ``train`` among others, as in CIFAR-100, is a class). Unreadable images are skipped and
logged (once per file), as in training.
"""
from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..config import DataConfig
from ..data.dataset import _reason, decode_checked
from ..data.sources import check_max_bytes, followed_is, printable, read_regular_file, scan_folder

log = logging.getLogger(__name__)


@dataclass
class LabelledSplit:
    """``images``: a uint8 tensor (N, 3, H, W) or a list of N file paths; ``labels``: int64 (N,)."""
    images: Union[Tensor, list[str]]
    labels: Tensor
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> "LabelledSplit":
        imgs = self.images[idx] if isinstance(self.images, Tensor) else [self.images[int(i)] for i in idx]
        return LabelledSplit(imgs, self.labels[idx], self.classes)


TRAIN_SPLIT = "train"
HELD_OUT_SPLITS = ("val", "validation", "valid", "test")  # the first one present is the test split


def _subfolders(folder: Path) -> list[str]:
    """The names of ``folder``'s sub-folders (links followed, hidden ones left out), sorted."""
    return sorted(e.name for e in os.scandir(folder) if followed_is(e, "dir") and not e.name.startswith("."))


def _class_folder(root: Path) -> tuple[list[str], Tensor, list[str]]:
    classes = _subfolders(root)
    if len(classes) < 2:
        raise ValueError(f"eval.dataset {str(root)!r} must hold one subfolder per class (at least 2), found "
                         f"{len(classes)}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        found = [str(root / name / p) for p in scan_folder(root / name, "eval.dataset")]
        paths += found
        labels += [c] * len(found)
    if not paths:
        raise ValueError(f"eval.dataset {str(root)!r} has class folders but no images")
    return paths, torch.tensor(labels, dtype=torch.int64), classes


def load_labelled(dataset: str, *, test_fraction: float = 0.33, split_seed: int = 0, digits_size: int = 32,
                  max_images: int = 0) -> dict[str, LabelledSplit]:
    """{'train': LabelledSplit, 'test': LabelledSplit} for ``eval.dataset``."""
    if dataset == "digits":
        from ..data.digits import digits_split
        d = digits_split(digits_size)
        out = {k: LabelledSplit(x, y, [str(i) for i in range(10)]) for k, (x, y) in d.items()}
    else:
        root = Path(dataset).expanduser()  # '~/val' from a YAML file or a quoted --set, which no shell expanded
        if not root.is_dir():
            raise ValueError(f"eval.dataset {dataset!r} is neither 'digits' nor a folder")
        from ..deps import require
        # (preprocess resizes with it: checked here, before a training run whose end evaluates the folder)
        require("torchvision.transforms.v2.functional", "evaluation on an image folder", "torchvision")
        subfolders = set(_subfolders(root))
        val = next((root / n for n in HELD_OUT_SPLITS if n in subfolders), None)
        # A split folder holds class folders; a class folder named like a split (CIFAR-100's 'train') images.
        split = TRAIN_SPLIT in subfolders and val is not None and bool(_subfolders(root / TRAIN_SPLIT))
        # Only split names next to each other but one split missing: read as class folders, the splits would
        # be the classes.
        if not split and subfolders and subfolders <= {TRAIN_SPLIT, *HELD_OUT_SPLITS}:
            has, lacks = ((f"a '{TRAIN_SPLIT}/' folder", f"a held-out one ({', '.join(HELD_OUT_SPLITS)})")
                          if val is None else (f"a '{val.name}/' folder", f"a '{TRAIN_SPLIT}/' one"))
            raise ValueError(f"eval.dataset {dataset!r} has {has} but not {lacks} next to it: give both splits, "
                             f"each with one subfolder per class, or only class folders (then split by "
                             f"eval.test_fraction)")
        if split:
            # Compared before either split's own checks: a held-out split lacking all classes but one was
            # refused as "at least 2 class folders, found 1", which did not say which one it lacks.
            classes, classes_te = _subfolders(root / TRAIN_SPLIT), _subfolders(val)
            if classes_te != classes:
                # (the labels are the class folders' sorted positions: one extra folder shifts every later class)
                only = [f"{where} alone: {_names(sorted(set(a) - set(b)))}" for where, a, b in
                        ((val.name, classes_te, classes), (TRAIN_SPLIT, classes, classes_te)) if set(a) - set(b)]
                raise ValueError(f"eval.dataset: {root / TRAIN_SPLIT} and {val} have different class folders "
                                 f"({'; '.join(only)}): give both splits the same class folders (an empty one "
                                 f"where a split has no image of a class)")
            tr, ytr, classes = _class_folder(root / TRAIN_SPLIT)
            te, yte, _ = _class_folder(val)
            out = {"train": LabelledSplit(tr, ytr, classes), "test": LabelledSplit(te, yte, classes)}
        else:
            paths, labels, classes = _class_folder(root)
            if len(paths) < 2:
                raise ValueError(f"eval.dataset {dataset!r} has {len(paths)} image; split by eval.test_fraction it "
                                 f"needs at least 2 (one to train on, one to test)")
            perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(split_seed))
            # At least one image on each side: an empty train split was reported as "every image unreadable".
            n_test = min(max(1, int(round(len(paths) * test_fraction))), len(paths) - 1)
            full = LabelledSplit(paths, labels, classes)
            out = {"train": full.subset(perm[n_test:]), "test": full.subset(perm[:n_test])}
    if max_images:
        for k, s in out.items():
            if len(s) > max_images:
                out[k] = s.subset(_stratified(s.labels, max_images, split_seed))
                # Said: the scores are those of the sample (the tiny preset caps at 200), not of the whole split.
                log.info("eval.max_images=%d: the %s split of %s scored on %d of its %d images (a stratified "
                         "sample; 0 = all)", max_images, k, dataset, max_images, len(s))
    return out


def _names(names: list[str], most: int = 5) -> str:
    """The first ``most`` of ``names``, quoted, and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(repr(n) for n in names[:most]) + more


def _stratified(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` indices of ``labels`` drawn by a seeded permutation, the classes taking turns (as evenly as
    their sizes allow), in ascending order. The first ``count`` would hold only the first classes of a
    folder dataset (its files are listed class by class)."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    ranked = labels[perm]
    # Each image's position among its class's images in the permutation (its turn): grouped by a stable sort,
    # the turn is the distance to the start of its group. (A loop over the classes took a minute for 10,000
    # classes of 200,000 images.)
    grouped = torch.sort(ranked, stable=True).indices
    pos = torch.arange(len(ranked))
    starts = torch.ones(len(ranked), dtype=torch.bool)
    starts[1:] = ranked[grouped][1:] != ranked[grouped][:-1]
    turn = torch.empty_like(perm)
    turn[grouped] = pos - torch.cummax(torch.where(starts, pos, 0), 0).values
    order = torch.sort(turn, stable=True).indices
    return perm[order[:count]].sort().values


def channel_stats(mean, std) -> tuple[Tensor, Tensor]:
    """The per-channel normalisation ``mean`` and ``std`` (3 numbers each) as float32 (3, 1, 1) tensors, the
    shape :func:`preprocess` takes them in. ValueError naming ``mean`` or ``std`` where it is not 3 finite
    numbers (``std`` > 0): a std of 0 made every feature inf or NaN without an error, 2 numbers a torch
    reshape error."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            t = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or t.numel() != 3 or not torch.isfinite(t).all() or (name == "std" and not (t > 0).all()):
            positive = " (all > 0)" if name == "std" else ""
            raise ValueError(f"{name} must be 3 finite numbers, one per RGB channel{positive}, got {value!r}")
        out.append(t.reshape(3, 1, 1))
    return out[0], out[1]


def check_image_size(image_size, patch_size: int) -> None:
    """ValueError naming ``image_size`` unless it is a positive integer multiple of the backbone's
    ``patch_size`` (what the images are resized and centre-cropped to: 0 or a negative size was a torch
    error from the resize, a float a TypeError, 30 at patch 8 the patch embedding's error about the batch)."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1 \
            or image_size % patch_size:
        raise ValueError(f"image_size must be a positive integer multiple of the patch size {patch_size}, got "
                         f"{image_size!r}")


def autocast_to(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """Autocast of the evaluation tools' forward passes: to ``dtype`` on ``device``'s type, off where None
    (the backbone then runs as its parameters are)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def resize_side(size: int) -> int:
    """The side :func:`preprocess` resizes an image's shorter side to before its centre crop of ``size``:
    size * 8/7 rounded (DINO's 256 for 224)."""
    return round(size * 8 / 7)


def preprocessing_text(size: int) -> str:
    """What :func:`preprocess` does to an image, in words, for an export's JSON: whoever runs the export
    outside seer must repeat it to get seer's features ("resized and centre-cropped to 224" reads as a resize
    to 224, which is not what seer eval and seer features feed the backbone)."""
    return (f"RGB; the shorter side resized to {resize_side(size)} px (bicubic, antialiased), then centre-cropped "
            f"to {size} x {size} (an image of exactly {size} x {size} is used as it is); scaled to [0, 1], then "
            f"(x - mean) / std per channel")


def preprocess(image: Tensor, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (3, H, W) -> normalised float (3, size, size): resize the shorter side to size * 8/7 (DINO's
    256 for 224; skipped when the image already is size x size), centre crop, normalise."""
    from ..deps import require
    TF = require("torchvision.transforms.v2.functional", "evaluation on an image folder", "torchvision")
    if tuple(image.shape[1:]) != (size, size):
        image = TF.resize(image, [resize_side(size)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [size, size])
    return (image.float() / 255 - mean) / std


_REPORTED: set[str] = set()  # unreadable files already logged (periodic evaluation meets them again)


def read_image(path: str, max_pixels: int = DataConfig.max_image_pixels,
               max_bytes: int = DataConfig.max_image_bytes) -> tuple[Optional[Tensor], Optional[str]]:
    """(decoded uint8 (3, H, W), None), or (None, the reason) if the file cannot be read, has more than
    ``max_pixels`` pixels (a decompression bomb, as in training: data.max_image_pixels) or more than
    ``max_bytes`` bytes (not read, as in training: data.max_image_bytes; 0 = no limit). Read as training reads
    its files (:func:`~seer.data.sources.read_regular_file`: a fifo or a device is refused, not waited on or
    read without end). Logs nothing."""
    check_max_bytes(max_bytes)  # (a wrong limit is the caller's error, not every image's)
    try:
        return decode_checked(read_regular_file(path, max_bytes), max_pixels), None
    except Exception as e:  # a bad file: skipped and counted by the caller
        return None, _reason(e)


def load_image(path: str, max_pixels: int = DataConfig.max_image_pixels,
               max_bytes: int = DataConfig.max_image_bytes) -> Optional[Tensor]:
    """:func:`read_image`'s image, or None (the reason logged the first time)."""
    image, reason = read_image(path, max_pixels, max_bytes)
    if image is None and path not in _REPORTED:
        _REPORTED.add(path)
        log.warning("evaluation skips unreadable image %s (%s)", printable(path), reason)
    return image
