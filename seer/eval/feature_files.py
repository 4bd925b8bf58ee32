"""The files ``seer features`` writes: FEATS.npy (float32 (N, F)) and FEATS.txt (row i's image path on line i).

Both are written in full under ``.part`` names and then renamed, the old ``.txt`` removed first, so that an
interrupted run never leaves new features beside another run's list of paths (at worst a ``.npy`` without
its ``.txt``). An existing FEATS.npy is replaced only when asked (``overwrite``); a FEATS.txt is replaced only
when it is the partner of FEATS.npy (as many lines as it has rows), never a user's file that happens to be
there.

Two ways to the same bytes: :func:`write_outputs` saves features held in memory (``np.save``);
:func:`create_rows_file`, :class:`RowWriter` and :func:`drop_rows` stream them: FEATS.npy.part is created
as np.save would write an (n, F) array, one row per path, filled as batches arrive (by any number of
processes: rows are disjoint), then the rows of unreadable images are removed in place and the header's
row count lowered. np.save pads the header so that the row count can grow to 21 digits without moving the
data (numpy's GROWTH_AXIS_MAX_DIGITS), so the final header has the same length and the file is byte for
byte np.save's (a numpy that pads otherwise is refused with an error, never given a different file).

One run per FEATS.npy: the process that creates FEATS.npy.part holds an exclusive ``flock`` on it
(:func:`lock_rows_file`) until the files are renamed; a second ``seer features`` on the same ``--out`` is
refused (:class:`seer.part_lock.OutputBusyError`) instead of truncating the first one's rows, which it would otherwise
do, while the first one kept writing into the file it then renamed. The kernel drops the lock when its
holder dies, so the ``.part`` of a killed run is taken over by the next (resumed or replaced:
:mod:`seer.eval.save_features`).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..out_paths import check_file_paths
from ..part_lock import lock_part, unlock_part
from .extract import ImageFeatures


def lock_rows_file(path: Path, out: str | os.PathLike) -> Optional[int]:
    """Create (or open) ``path``, FEATS.npy.part, and hold an exclusive lock on it (module doc;
    :func:`seer.part_lock.lock_part`); :class:`seer.part_lock.OutputBusyError` naming ``--out`` (``out``) when
    another process holds it."""
    return lock_part(path, f"--out {str(out)!r} is being written by another seer features ({str(path)!r} is "
                           f"locked): two runs on one --out would overwrite each other's rows. Wait for it to end "
                           f"or stop it, or choose another --out")


def check_outputs(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``out`` as a Path, or ValueError naming ``--out`` where the outputs may not or cannot be written."""
    npy = Path(out)
    txt = npy.with_suffix(".txt")
    if npy.suffix != ".npy":
        raise ValueError(f"--out must end with .npy, got {str(out)!r}")
    check_file_paths("--out", out, (npy, txt))  # (created there and renamed into place)
    if npy.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r} exists: pass --overwrite to replace it (and its .txt)")
    if txt.exists() and not _partners(npy, txt):
        raise ValueError(f"--out {str(out)!r}: {str(txt)!r} exists and was not written by seer features (it is not "
                         f"the list of {npy.name}'s rows); the command writes its image paths there: move it or "
                         f"choose another --out")
    return npy


def _partners(npy: Path, txt: Path) -> bool:
    """Whether ``txt`` is the list of paths written with ``npy``: one line per row of a 2-D float32 array."""
    try:
        rows = np.load(npy, mmap_mode="r")
        if rows.ndim != 2 or rows.dtype != np.float32:
            return False
        with open(txt, "rb") as f:
            return sum(1 for _ in f) == rows.shape[0]
    except (OSError, ValueError, EOFError):  # (an empty or truncated .npy: EOFError)
        return False


def check_path_lines(paths) -> None:
    """ValueError naming the first path with a newline: FEATS.txt holds one path a line (row i, line i), which
    such a path would break (a folder's scan leaves those names out; a single --images file may have one)."""
    for i, p in enumerate(paths):
        if "\n" in p:
            raise ValueError(f"image path {i} ({p!r}) contains a newline: FEATS.txt lists one path a line; rename "
                             f"the file")


def write_outputs(out: str | os.PathLike, result: ImageFeatures, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``result`` to OUT.npy and OUT.txt (module doc); return both paths. The outputs are checked
    again (:func:`check_outputs`): the extraction may have taken hours, during which files appear."""
    npy = check_outputs(out, overwrite=overwrite)
    parts = part_paths(npy)
    lock = lock_rows_file(parts[0], out)  # (as seer features: one writer per --out)
    committed = False
    try:
        # An interrupted seer features' resume records name rows of the .part replaced here: removed first, as
        # seer features does before it replaces the .part (feature_progress' module doc).
        from .feature_progress import remove_records
        remove_records(npy)
        with open(parts[0], "wb") as f:  # (np.save given a name adds .npy to it)
            np.save(f, result.features.numpy().astype(np.float32, copy=False))
            f.flush()
            os.fsync(f.fileno())
        done = commit_outputs(npy, result.paths, overwrite=overwrite)
        committed = True
        return done
    finally:
        try:
            if not committed:  # (after the renames a new .part is another run's)
                for part in parts:
                    part.unlink(missing_ok=True)
        finally:
            unlock_part(lock)


def part_paths(npy: Path) -> tuple[Path, Path]:
    """OUT.npy.part and OUT.txt.part: where the outputs are written before they are renamed."""
    txt = npy.with_suffix(".txt")
    return npy.with_name(npy.name + ".part"), txt.with_name(txt.name + ".part")


def commit_outputs(out: str | os.PathLike, paths: list[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT.txt.part (``paths``, one a line), then rename it and the finished OUT.npy.part into place
    (module doc); the outputs are checked again first. Returns (OUT.npy, OUT.txt)."""
    check_path_lines(paths)
    npy = check_outputs(out, overwrite=overwrite)
    txt = npy.with_suffix(".txt")
    parts = part_paths(npy)
    # A name that is not UTF-8 keeps its own bytes, so that the line opens the file (as list files are read).
    with open(parts[1], "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        f.writelines(p + "\n" for p in paths)
        f.flush()
        os.fsync(f.fileno())
    txt.unlink(missing_ok=True)  # first: a crash between the renames leaves features without paths, not
    os.replace(parts[0], npy)     # new features beside the old paths
    os.replace(parts[1], txt)
    return npy, txt


def _header(shape: tuple[int, int]) -> bytes:
    """The .npy header np.save writes for a float32 C-order array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _read_header(f) -> tuple[tuple[int, ...], int]:
    """(shape, offset of the data) of an open float32 C-order .npy (ValueError otherwise)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype != np.float32 or len(shape) != 2:
        raise ValueError(f"{f.name}: expected a float32 C-order 2-D .npy, got {dtype} {shape} (fortran={fortran})")
    return shape, f.tell()


def create_rows_file(path: Path, rows: int, width: int) -> None:
    """A float32 (rows, width) .npy at ``path`` (replaced), header as np.save's, rows zero (sparse: no disk
    space until written)."""
    if rows < 1 or width < 1:
        raise ValueError(f"a rows file needs rows >= 1 and width >= 1, got ({rows}, {width})")
    rows_map = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))  # header + size
    rows_map.flush()
    del rows_map  # (unmapped: the rows are written through RowWriter)


class RowWriter:
    """Writes rows of a :func:`create_rows_file` file by index: ``writer(indices, rows)`` puts ``rows[k]``
    (float32 (len(indices), F)) at row ``indices[k]``.

    Positioned writes (``os.pwrite``), not a memory map: rows of two processes meet inside a page, and
    several nodes that write a shared file through maps can write back each other's stale half of that page
    (the write-back unit is the page); a write call sends its own bytes only.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (self.rows, self.width), self.offset = _read_header(f)
        self.fd = os.open(path, os.O_WRONLY)

    def __call__(self, indices: list[int], rows) -> None:
        data = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
        if data.shape != (len(indices), self.width):
            raise ValueError(f"expected rows of shape ({len(indices)}, {self.width}), got {data.shape}")
        row_bytes = 4 * self.width
        k = 0
        while k < len(indices):  # one write per run of consecutive rows (a batch is one, less its skipped images)
            end = k + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1:
                end += 1
            if indices[k] < 0 or indices[end - 1] >= self.rows:
                raise IndexError(f"rows {indices[k]}..{indices[end - 1]} are outside 0..{self.rows - 1}")
            _write_all(self.fd, data[k:end].tobytes(), self.offset + indices[k] * row_bytes)
            k = end

    def sync(self) -> None:
        """fsync: the rows written so far are on disk (each process its own writes: on a network filesystem
        one node cannot flush another's)."""
        os.fsync(self.fd)

    def close(self) -> None:
        """:meth:`sync` and close."""
        if self.fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:  # (pwrite may write less than asked)
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def drop_rows(path: Path, dropped: list[int], *, chunk_bytes: int = 64 << 20) -> int:
    """Remove rows ``dropped`` (increasing indices) from a :func:`create_rows_file` file in place: the rows
    after each move up, the header's row count is lowered and the file cut to its new length (module doc:
    the bytes of np.save of the remaining rows); fsync. Returns the number of rows left."""
    with open(path, "r+b") as f:
        (rows, width), offset = _read_header(f)
        if any(b <= a for a, b in zip(dropped, dropped[1:])) or (dropped and not 0 <= dropped[0] < rows) \
                or (dropped and dropped[-1] >= rows):
            raise ValueError(f"dropped must be increasing row indices within 0..{rows - 1}")
        left = rows - len(dropped)
        header = _header((left, width))
        if len(header) != offset:  # (np.save's padding for growth: module doc)
            raise RuntimeError(f"{path}: the .npy header for {left} rows is {len(header)} bytes, not {offset}: "
                               f"this numpy pads headers differently, the rows cannot be removed in place")
        row_bytes = 4 * width
        step = max(1, chunk_bytes // row_bytes)
        keep_from = [i + 1 for i in dropped]  # the kept runs: [prev dropped + 1, next dropped)
        keep_to = dropped[1:] + [rows]
        dst = dropped[0] if dropped else rows
        for start, stop in zip(keep_from, keep_to):
            # Runs move front to back, each chunk read before it is written: a destination lies before its source.
            for i in range(start, stop, step):
                n = min(step, stop - i)
                f.seek(offset + i * row_bytes)
                data = f.read(n * row_bytes)
                f.seek(offset + dst * row_bytes)
                f.write(data)
                dst += n
        f.seek(0)
        f.write(header)
        f.truncate(offset + left * row_bytes)
        f.flush()
        os.fsync(f.fileno())
    return left
