"""What ``seer attention-maps`` writes: per image, the maps of :func:`seer.eval.attention.attention_maps` as
NPY and as one PNG row, in numpy alone (no plotting package).

The PNG of an S x S input is S high and S * (heads + 2) wide: the cropped input the backbone saw, the mean
of the heads' maps, then each head's map in head order, each map upsampled to S x S by repeating each
patch's value over its p x p pixels and coloured relative to its own maximum (0 black, max pale yellow).
"""
from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import DataConfig
from ..data.sources import printable
from .attention import attention_maps
from .datasets import autocast_to, channel_stats, check_image_size, preprocess, read_image

log = logging.getLogger(__name__)

# A dark-to-bright ramp (black, purple, red, orange, pale yellow) at evenly spaced stops: brightness grows
# monotonically, so the ranking of patches reads the same in greyscale.
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colorize(values: np.ndarray) -> np.ndarray:
    """(h, w) values >= 0 -> uint8 RGB (h, w, 3), ``values / max`` through the ramp (all zero: black)."""
    top = float(values.max()) if values.size else 0.0
    t = values / top if top > 0 else np.zeros_like(values, dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(_STOPS))
    rgb = np.stack([np.interp(t, pos, _STOPS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 (h, w, 3) -> a PNG file (8-bit RGB, no filtering: each row prefixed by filter type 0)."""
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB), deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) \
        + chunk(b"IEND", b"")


def figure(image: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The PNG's row (module doc): ``image`` uint8 (H, W, 3), ``maps`` (heads, gh, gw) with H, W multiples of
    gh, gw -> uint8 (H, W * (heads + 2), 3)."""
    h, w = image.shape[:2]
    ry, rx = h // maps.shape[1], w // maps.shape[2]
    tiles = [image] + [colorize(np.repeat(np.repeat(m, ry, 0), rx, 1)) for m in (maps.mean(0), *maps)]
    return np.concatenate(tiles, axis=1)


def output_names(paths: Sequence[str]) -> list[str]:
    """``<index>_<stem>`` of each path, the index zero-padded to the same width so the files sort in order."""
    width = len(str(max(len(paths) - 1, 0)))
    return [f"{i:0{width}d}_{Path(p).stem}" for i, p in enumerate(paths)]


def check_out_dir(out: str, *, overwrite: bool) -> None:
    """FileExistsError where ``out`` is a file, or a non-empty folder without ``overwrite`` (which replaces only
    files of the names it writes)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"--out {out!r} is a file; expected a folder (created if missing)")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out!r} is not empty: give an empty or new folder, or --overwrite to write "
                              f"into it (replacing only files of the names written)")


@dataclass
class AttentionMapsResult:
    """``written``: the name (``<index>_<stem>``) of each image's pair of files; ``skipped``: (path, reason) of
    each unreadable image."""
    written: list[str]
    skipped: list[tuple[str, str]]


def save_attention_maps(backbone: nn.Module, paths: Sequence[str], out: str, *, image_size: int, mean, std,
                        layer: int = -1, device: Optional[torch.device] = None,
                        max_pixels: int = DataConfig.max_image_pixels, batch_size: int = 16,
                        autocast_dtype: Optional[torch.dtype] = None,
                        max_bytes: int = DataConfig.max_image_bytes) -> AttentionMapsResult:
    """For each readable image of ``paths``, resized and centre-cropped to ``image_size`` and normalised as
    ``seer features`` does: ``out/<index>_<stem>.npy`` (float32 (heads, gh, gw) maps of block ``layer``) and
    ``out/<index>_<stem>.png`` (module doc). ``out`` is created; unreadable images are skipped with a warning.
    ``batch_size`` images per forward pass (the maps of an image do not depend on the others in its batch, up
    to the rounding of batched matmuls); ``autocast_dtype``: the blocks run under autocast to it (the scores
    are formed in float32 from the q and k it gives, as the kernel forms them), None: as the parameters."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"save_attention_maps: argument 'batch_size' must be a positive integer, got {batch_size!r}")
    check_image_size(image_size, backbone.patch_size)
    mean_t, std_t = channel_stats(mean, std)  # (both before --out is made)
    device = device or next(backbone.parameters()).device
    Path(out).mkdir(parents=True, exist_ok=True)
    written, skipped, batch = [], [], []

    def flush() -> None:
        x = torch.stack([b[2] for b in batch])
        with autocast_to(device, autocast_dtype):
            maps = attention_maps(backbone, x.to(device), layer=layer).numpy()
        for (path, name, crop), m in zip(batch, maps):
            _write(out, path, name, crop, m, mean_t, std_t)
            written.append(name)
        batch.clear()

    for path, name in zip(paths, output_names(paths)):
        image, reason = read_image(path, max_pixels, max_bytes)
        if image is None:
            log.warning("skipping unreadable image %s (%s)", printable(path), reason)
            skipped.append((path, reason))
            continue
        batch.append((path, name, preprocess(image, image_size, mean_t, std_t)))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return AttentionMapsResult(written, skipped)


def _write(out: str, path: str, name: str, x: torch.Tensor, maps: np.ndarray, mean_t, std_t) -> None:
    """One image's pair of files: the maps as NPY, the figure as PNG."""
    if not np.isfinite(maps).all():  # (a diverged checkpoint: the PNG would show black tiles without a word)
        log.warning("the attention maps of %s are not finite (NaN or inf: a diverged checkpoint?); %s.png shows "
                    "them black", printable(path), name)
    # The crop as the backbone saw it: the normalisation undone.
    shown = ((x * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.save(Path(out) / f"{name}.npy", maps)
    (Path(out) / f"{name}.png").write_bytes(png_bytes(figure(shown, maps)))
