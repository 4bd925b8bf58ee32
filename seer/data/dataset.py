"""Datasets that never stop on a bad file.

An image that cannot be read or decoded (missing, truncated, corrupt, not an image, too many pixels) is
replaced by the next index of the dataset, deterministically, and its name and the reason travel with the
batch, so that the trainer counts and logs it (OUT/skipped_files.txt) while every batch keeps its size (the
SwAV queue and the data-parallel ranks need equal batches). More than ``max_consecutive_bad`` failures in a
row mean the source itself is wrong, which is an error.

Items are addressed by (epoch, index) so that the augmentation generator can be seeded from them (see
:mod:`seer.data.augment`).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from seer_kernels import MultiCropSpec
from seer_kernels import decode as _decode

from ..config import CropsConfig
from .augment import multicrop_images
from .sampler import mix_seed
from .sources import ImageSource


class DataError(RuntimeError):
    """The data cannot be used at all (not a single bad file: those are skipped)."""


@dataclass
class Skipped:
    name: str
    reason: str


def check_pixels(data: Union[bytes, Tensor], max_pixels: int) -> tuple[int, int]:
    """(H, W) from the header, or ValueError for an image with more than ``max_pixels`` pixels."""
    if isinstance(data, Tensor):
        return int(data.shape[-2]), int(data.shape[-1])
    _defer_pillow_limit(max_pixels)
    with _pillow_refusal_named(max_pixels):
        return _check_hw(_decode.image_size(data), max_pixels)


def _defer_pillow_limit(max_pixels: int) -> None:
    """Let ``max_pixels`` decide which images are too large, not Pillow's own guard. Pillow refuses to open an
    image of more than 2 x ``Image.MAX_IMAGE_PIXELS`` pixels (DecompressionBombError, from the header): with
    data.max_image_pixels at or above that (its default, 178,956,970, is that bound), every larger image was
    skipped as 'not an image Pillow can read', and raising the setting for large photos changed nothing. Its
    bound goes to 2 x ``max_pixels`` in this process (only ever raised): opening reads the header alone, and
    :func:`_check_hw` refuses what is over ``max_pixels`` before any pixel is decoded."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and 2 * limit <= max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


@contextlib.contextmanager
def _pillow_refusal_named(max_pixels: int):
    """Opening an image Pillow refuses from its header as a decompression bomb (more than 2 x
    ``Image.MAX_IMAGE_PIXELS`` pixels, which :func:`_defer_pillow_limit` keeps above ``max_pixels``) raises the
    error :func:`_check_hw` gives, naming data.max_image_pixels: the reason 'not an image Pillow can read' left
    the setting unnamed for exactly the largest images, the real bombs (a 50000 x 50000 PNG at the default)."""
    from PIL import Image

    try:
        yield
    except ValueError as exc:
        cause = exc.__cause__
        found = re.search(r"\((\d+) pixels\)", str(cause)) if isinstance(cause, Image.DecompressionBombError) else None
        if found is None or int(found[1]) <= max_pixels:  # (not over ours: Pillow's words stand)
            raise
        raise ValueError(f"{int(found[1])} pixels exceed data.max_image_pixels={max_pixels} (decompression-bomb "
                         f"guard)") from None


def _check_hw(hw: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    h, w = hw
    if h * w > max_pixels:
        raise ValueError(f"{w} x {h} pixels exceed data.max_image_pixels={max_pixels} (decompression-bomb guard)")
    if h == 0 or w == 0:
        raise ValueError("the image is empty")
    return h, w


def decode(data: Union[bytes, Tensor]) -> Tensor:
    """uint8 (3, H, W) from encoded bytes (or a decoded tensor, returned as is)."""
    if isinstance(data, Tensor):
        return data
    return _decode.decode_image(data)[0]


def decode_checked(data: Union[bytes, Tensor], max_pixels: int) -> Tensor:
    """:func:`check_pixels`, then :func:`decode`, with the same errors, opening the encoded image once."""
    if isinstance(data, Tensor):
        return data
    _defer_pillow_limit(max_pixels)
    with _pillow_refusal_named(max_pixels):
        image = _decode.EncodedImage(data)
    with image:
        _check_hw(image.hw, max_pixels)
        return image.decode()[0]


def _reason(exc: BaseException) -> str:
    """The first line of the error, without object addresses (PIL's "cannot identify image file
    <_io.BytesIO object at 0x7f...>"), which would make every report of the same file differ, nor tabs (the
    reports are tab-separated)."""
    text = str(exc).strip().splitlines()[0].replace("\t", " ") if str(exc).strip() else ""
    text = re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", text)
    return f"{type(exc).__name__}: {text}"[:300]


class _RobustDataset(Dataset):
    def __init__(self, source: ImageSource, *, max_pixels: int, max_consecutive_bad: int = 50):
        self.source = source
        self.max_pixels = max_pixels
        self.max_consecutive_bad = max_consecutive_bad

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, epoch: int, index: int):
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        skipped: list[Skipped] = []
        n = len(self.source)
        # A source smaller than the limit is tried once round: going on would only report its files again (each
        # once more per lap) and call the whole source 'max_consecutive_bad images in a row'.
        tries = min(self.max_consecutive_bad, n)
        for attempt in range(tries):
            j = (index + attempt) % n
            try:
                return self._load(epoch, j), skipped
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # anything a bad file can raise: OSError, ValueError, SyntaxError (PIL) ...
                skipped.append(Skipped(self.source.name(j), _reason(exc)))
        what = f"all {n} images of data.source are unreadable" if tries == n else \
            f"{tries} unreadable images in a row from {skipped[0].name!r}"
        raise DataError(f"{what}: is data.source right? first error: {skipped[0].name!r}: {skipped[0].reason}; last "
                        f"error: {skipped[-1].reason}")


class MultiCropDataset(_RobustDataset):
    """The worker path: item -> (crops of each group (count, 3, S, S), skipped) on the CPU, with the C++ op."""

    def __init__(self, source: ImageSource, spec: MultiCropSpec, crops: CropsConfig, seed: int, *,
                 max_pixels: int, max_consecutive_bad: int = 50):
        super().__init__(source, max_pixels=max_pixels, max_consecutive_bad=max_consecutive_bad)
        self.spec, self.crops, self.seed = spec, crops, seed

    def _load(self, epoch: int, index: int) -> list[Tensor]:
        data = self.source.read(index)
        check_pixels(data, self.max_pixels)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        return multicrop_images([data], self.spec, self.crops, gen)


class DecodedDataset(_RobustDataset):
    """The device path: item -> (decoded uint8 (3, H, W), skipped); multi-crop happens on the device."""

    def _load(self, epoch: int, index: int) -> Tensor:
        return decode_checked(self.source.read(index), self.max_pixels)


@dataclass
class Batch:
    """What a loader yields: ``crops`` (V tensors (B, 3, S, S), worker path) or ``images`` (B uint8 images,
    device path), and the files skipped while assembling it."""
    crops: list[Tensor] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked tensors make the copies to the GPU asynchronous."""
        return Batch([c.pin_memory() for c in self.crops], [im.pin_memory() for im in self.images], self.skipped)


def collate_crops(items) -> Batch:
    groups = [torch.stack([crops[g] for crops, _ in items], dim=1) for g in range(len(items[0][0]))]
    crops = [c for t in groups for c in t.unbind(0)]  # (count, B, 3, S, S) -> count tensors (B, 3, S, S)
    return Batch(crops=crops, skipped=[s for _, sk in items for s in sk])


def collate_images(items) -> Batch:
    return Batch(images=[im for im, _ in items], skipped=[s for _, sk in items for s in sk])


def worker_init(_worker_id: int) -> None:
    # One intra-op thread per worker: the workers are the parallelism (the multi-crop op's own rule).
    torch.set_num_threads(1)
    # scancel and preemption send SIGTERM to every process of the job, workers included; torch's own worker
    # handler would end the worker, and the main process would then fail on the lost worker before it
    # saves the stop checkpoint. The first SIGTERM (and its echoes, below) does not end the worker: the
    # main process shuts its workers down itself after saving, and a later SIGTERM (the loader's
    # terminate() of a worker that did not stop, the job's next signal) ends the worker as usual.
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C reaches the workers too (the terminal signals its whole foreground process group): the main
    # process saves a checkpoint at the end of the step, then shuts its workers down; a worker that left at
    # once would fail the main process's next batch before that save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# How long a worker outlives that first SIGTERM before it leaves by itself (exit status 0, which the main
# process's worker watch does not count as a failure): longer than SLURM's usual grace before its SIGKILL,
# and a bound on the wait of an interpreter that exits with a loader still open (it terminates its workers
# once and joins them).
WORKER_STOP_GRACE_S = 120.0


# SIGTERMs this soon after the first are the same stop arriving again: under `srun torchrun`, SLURM signals
# every process and torchrun forwards its own SIGTERM to each rank's process group (os.killpg), so a worker
# gets two within milliseconds. Ending the worker on the echo made the rank fail before its stop checkpoint.
SIGTERM_ECHO_S = 10.0
_first_sigterm_at: list = []


def _sigterm(signum, frame) -> None:
    now = time.monotonic()
    if not _first_sigterm_at:
        _first_sigterm_at.append(now)
        timer = threading.Timer(WORKER_STOP_GRACE_S, os._exit, (0,))
        timer.daemon = True
        timer.start()
        return
    if now - _first_sigterm_at[0] < SIGTERM_ECHO_S:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a later SIGTERM: the default action, as torch would
    os.kill(os.getpid(), signal.SIGTERM)


__all__ = ["Batch", "DataError", "DecodedDataset", "MultiCropDataset", "Skipped", "check_pixels", "collate_crops",
           "collate_images", "decode", "decode_checked", "worker_init"]
