"""Generated image files for data tests: valid photos-like images, and the bad kinds training must skip."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np


def image_bytes(seed: int, size=(40, 56), fmt: str = "PNG") -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    # Smooth random colour fields (compressible, so JPEG truncation cuts real image data).
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def write_good_images(root: Path, n: int, *, nested: bool = True) -> list[Path]:
    """n valid images (PNG, JPEG and WebP) in root and, with ``nested``, in sub-folders."""
    out = []
    fmts = [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")]
    for i in range(n):
        fmt, ext = fmts[i % 3]
        folder = root / f"part{i % 3}" / "deeper" if nested and i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"img_{i:04d}{ext}"
        p.write_bytes(image_bytes(i, (32 + 8 * (i % 4), 48 - 4 * (i % 3)), fmt))
        out.append(p)
    return out


def write_bad_images(root: Path) -> dict[str, Path]:
    """One file of each bad kind, all with image extensions."""
    root.mkdir(parents=True, exist_ok=True)
    bad = {}
    good_jpeg = image_bytes(999, (64, 64), "JPEG")
    bad["truncated"] = root / "truncated.jpg"
    bad["truncated"].write_bytes(good_jpeg[: len(good_jpeg) // 2])
    bad["corrupt"] = root / "corrupt.png"
    png = bytearray(image_bytes(998, (32, 32), "PNG"))
    mid = len(png) // 2
    png[mid:mid + 24] = b"\x00" * 24  # valid header, broken pixel data (found only when decoding)
    bad["corrupt"].write_bytes(bytes(png))
    bad["text"] = root / "notes.jpg"
    bad["text"].write_text("this is not an image\n")
    bad["empty"] = root / "empty.png"
    bad["empty"].write_bytes(b"")
    return bad


def write_shard(path, members) -> str:
    """A tar shard at ``path`` holding ``members``, (name, bytes) pairs in order; its path as a string."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)
