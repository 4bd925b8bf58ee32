"""``seer data check DIR``: read and fully decode every image of a dataset and report the unreadable ones.

Uses the same sources and decoder as training (so what it reports is exactly what training would skip),
in parallel worker processes. Prints a summary (count, formats, size range) and one line per bad file. A
batch the workers do not deliver within ``timeout_s`` (a hung read) stops the check with an error, as in
training (``data.timeout_s``).
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .dataset import _reason, decode_checked
from .dedup_files import cell
from .sources import DataSourceError, ImageSource, check_max_bytes, detect_format, is_image_name, open_source
from .workers import check_timeout, loader_timeout, next_batch


@dataclass
class CheckReport:
    total: int
    bad: list[tuple[str, str]]
    formats: dict[str, int]
    min_hw: Optional[tuple[int, int]]
    max_hw: Optional[tuple[int, int]]
    seconds: float

    @property
    def ok(self) -> int:
        return self.total - len(self.bad)

    def format(self, limit: int = 50) -> str:
        lines = [f"{self.total} images, {self.ok} readable, {len(self.bad)} unreadable ({self.seconds:.1f} s)"]
        if self.formats:
            lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        if self.min_hw:
            lines.append(f"smallest {self.min_hw[1]} x {self.min_hw[0]}, largest {self.max_hw[1]} x {self.max_hw[0]} "
                         f"(width x height)")
        for name, reason in self.bad[:limit]:
            lines.append(f"BAD {cell(name)}\t{reason}")  # (one line, as the report writes it)
        if len(self.bad) > limit:
            lines.append(f"... and {len(self.bad) - limit} more (see the report file)")
        if self.bad:
            lines.append("training skips these files (and logs them); remove them to silence the warnings")
        return "\n".join(lines)


class _CheckDataset(Dataset):
    def __init__(self, source: ImageSource, max_pixels: int):
        self.source, self.max_pixels = source, max_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        name = self.source.name(i)
        try:
            data = self.source.read(i)
            fmt = _format_of(data)
            img = decode_checked(data, self.max_pixels)
            return name, None, fmt, (int(img.shape[1]), int(img.shape[2]))
        except Exception as e:  # report anything a file can raise
            return name, _reason(e), None, None


def _format_of(data) -> str:
    if isinstance(data, torch.Tensor):
        return "tensor"
    from PIL import Image
    import io
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format or "unknown"
    except Exception:
        return "not an image"


def _as_list(items):  # a module-level function: workers started by forkserver or spawn pickle it
    return items


def check_dataset(source: str, *, fmt: str = "auto", workers: int = 4, max_pixels: int = DataConfig.max_image_pixels,
                  timeout_s: float = DataConfig.timeout_s, exclude: str = "",
                  max_bytes: int = DataConfig.max_image_bytes) -> CheckReport:
    """Decode every image of ``source`` (less those ``exclude`` names, as ``data.exclude``) and tally them; a file
    of more than ``max_bytes`` bytes (``data.max_image_bytes``, 0 = no limit) is unreadable, not read."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be an integer >= 0, got {workers!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"--max-image-pixels must be an integer >= 1, got {max_pixels!r}")
    check_max_bytes(max_bytes, "--max-image-bytes")
    check_timeout(timeout_s, "--timeout-s")
    if (detect_format(source) if fmt == "auto" else fmt) == "synthetic":
        # Its images are made, not read: none can be unreadable, and decoding 1.28 million of them would
        # time only the generator.
        raise DataSourceError("data.source 'synthetic' is generated on the fly (random images from train.seed, "
                              "data.synthetic_count and data.synthetic_size), not read from storage: there is "
                              "nothing to check; for a folder named 'synthetic', give it as './synthetic'")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seer-index-") as cache:  # the index lives as long as the check
        src = open_source(source, fmt, cache, exclude=exclude, max_bytes=max_bytes)
        loader = DataLoader(_CheckDataset(src, max_pixels), batch_size=64, num_workers=workers,
                            collate_fn=_as_list, timeout=loader_timeout(timeout_s, workers))
        return _tally(src, loader, t0, timeout_s)


def check_report_path(report: str, source: str, fmt: str = "auto", exclude: str = "") -> None:
    """ValueError naming --report where it is a file that the check of ``source`` reads (a list SOURCE, a tar
    shard, an image of a folder SOURCE, the --exclude file): the report, written in place, would replace it
    (as seer data dedup refuses its outputs)."""
    from .dedup import _inputs
    from .dedup_files import _same_file
    if not os.path.exists(report):
        return
    fmt = detect_format(source) if fmt == "auto" else fmt
    for what, given in _inputs(source, fmt, exclude):
        if _same_file(report, given):
            raise ValueError(f"--report {report!r} is {what}, which this command reads: write to another file")
    folder = os.path.realpath(os.path.expanduser(source))
    if fmt == "folder" and is_image_name(report) and os.path.realpath(report).startswith(folder + os.sep):
        raise ValueError(f"--report {report!r} is an image of SOURCE, which this command reads: write to another "
                         f"file")


def _tally(src, loader, t0: float, timeout_s: float) -> CheckReport:
    bad, formats = [], collections.Counter()
    min_hw = max_hw = None
    it, size = iter(loader), loader.batch_size
    for i in range(len(loader)):
        batch = next_batch(it, timeout_s, setting="--timeout-s",
                           where=f"images {i * size + 1}-{min((i + 1) * size, len(src))} of {len(src)}")
        for name, reason, f, hw in batch:
            if reason is not None:
                bad.append((name, reason))
                continue
            formats[f] += 1
            area = hw[0] * hw[1]
            if min_hw is None or area < min_hw[0] * min_hw[1]:
                min_hw = hw
            if max_hw is None or area > max_hw[0] * max_hw[1]:
                max_hw = hw
    return CheckReport(len(src), bad, dict(formats), min_hw, max_hw, time.perf_counter() - t0)
