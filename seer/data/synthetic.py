"""The built-in 'synthetic' source: random images made on the fly, to measure training without storage or decoding.

Image i of a run seeded s is the 3·H·W bytes

    x_i = first 3·H·W bytes of PCG64(SeedSequence([s mod 2^64, SALT, i])).random_raw(ceil(3·H·W / 8))

(little-endian words), viewed as a uint8 (3, H, W) tensor: uniform noise, a pure function of (s, i). NumPy's
compatibility policy fixes both the SeedSequence hash and the PCG64 stream, so image i is the same in every
process, worker and resumed run, on any machine. Nothing is stored: ``data.synthetic_count`` images cost no
memory until read.

The images enter the data path where decoded ones do (:class:`SyntheticSource` is an
:class:`~seer.data.sources.ImageSource` whose ``read`` returns a tensor, which ``decode`` passes through), so the
multi-crop, the DataLoader workers and the copies to the device are those of a real run; only reading and
decoding are left out. Making a 256 x 256 image takes 0.08 ms on one core of the 2-core development machine,
against 0.6-0.8 ms to read and decode a 20 KB JPEG of that size (docs/training.md, "Is the data pipeline the
bottleneck?").
"""
from __future__ import annotations

import re

import numpy as np
import torch

from .sources import ImageSource

# Keeps these streams apart from any other use of SeedSequence([seed, ...]) ('SYNT').
SALT = 0x53594E54


def parse_size(text: str) -> tuple[int, int]:
    """(H, W) of ``data.synthetic_size``: 'S' (square) or 'HxW'; ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", str(text))
    if not m:
        raise ValueError(f"expected a side 'S' or 'HxW' in pixels (e.g. 256 or 240x320), got {text!r}")
    h = int(m[1])
    w = int(m[2]) if m[2] is not None else h
    if h < 1 or w < 1:
        raise ValueError(f"expected sides >= 1 pixel, got {text!r}")
    return h, w


def synthetic_image(seed: int, index: int, size: tuple[int, int]) -> torch.Tensor:
    """Image ``index`` of the synthetic set of ``seed``: uint8 (3, H, W) (module doc)."""
    h, w = size
    n = 3 * h * w
    bits = np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, SALT, int(index)]))
    words = bits.random_raw((n + 7) // 8).astype("<u8", copy=False)  # the bytes in one order on every machine
    return torch.from_numpy(words.view(np.uint8)[:n].reshape(3, h, w))


class SyntheticSource(ImageSource):
    """``count`` synthetic images of ``size`` (H, W) for ``seed`` (module doc)."""

    def __init__(self, count: int, size: tuple[int, int], seed: int):
        self.count, self.size, self.seed = int(count), (int(size[0]), int(size[1])), int(seed)

    def __len__(self) -> int:
        return self.count

    def read(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(f"synthetic image {i} outside [0, {self.count})")
        return synthetic_image(self.seed, i, self.size)

    def name(self, i: int) -> str:
        return f"synthetic[{i}]"
