"""The built-in dataset: scikit-learn's 1,797 handwritten digits (8 x 8, 17 grey levels), upscaled.

Pretraining sees only the images of the fixed training split (labels hidden); evaluation uses the same
split: kNN and linear probe fit on the 1,200 training images and score the 597 others
(demo_notes.md). The split is a fixed permutation (seed 0), identical on every machine.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

N_TRAIN = 1200


@functools.lru_cache(maxsize=4)
def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..deps import require
    d = require("sklearn.datasets", "the built-in 'digits' dataset", "scikit-learn").load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x, y, perm


def digits_split(size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (images, labels), 'test': (images, labels)}: uint8 (N, 3, size, size) and int64 labels."""
    x, y, perm = _digits(size)
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def digits_images(size: int = 32, split: str = "train") -> torch.Tensor:
    """Unlabelled pretraining images: the training split ('train') or all 1,797 ('all')."""
    if split == "all":
        return _digits(size)[0]
    if split != "train":
        raise ValueError(f"data.digits_split must be 'train' or 'all', got {split!r}")
    return digits_split(size)["train"][0]
