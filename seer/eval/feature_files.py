"""The files ``seer features`` writes: FEATS.npy (float32 (N, F)) and FEATS.txt (row i's image path on line i).

Both are written in full under ``.part`` names and then renamed, the old ``.txt`` removed first, so that an
interrupted run never leaves new features beside another run's list of paths (at worst a ``.npy`` without
its ``.txt``). An existing FEATS.npy is replaced only when asked (``overwrite``); a FEATS.txt is replaced only
when it is the partner of FEATS.npy (as many lines as it has rows), never a user's file that happens to be
there.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .extract import ImageFeatures


def check_outputs(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``out`` as a Path, or ValueError naming ``--out`` where the outputs may not or cannot be written."""
    npy = Path(out)
    txt = npy.with_suffix(".txt")
    if npy.suffix != ".npy":
        raise ValueError(f"--out must end with .npy, got {str(out)!r}")
    for p in (npy, txt):
        if p.is_dir():
            raise ValueError(f"--out {str(out)!r}: {str(p)!r} is a folder; expected a file path")
    if not npy.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: the folder {str(npy.parent)!r} does not exist")
    if not os.access(npy.parent, os.W_OK | os.X_OK):  # the files are created there and renamed into place
        raise ValueError(f"--out {str(out)!r}: cannot create files in {str(npy.parent)!r}")
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


def write_outputs(out: str | os.PathLike, result: ImageFeatures, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``result`` to OUT.npy and OUT.txt (module doc); return both paths. The outputs are checked
    again (:func:`check_outputs`): the extraction may have taken hours, during which files appear."""
    npy = check_outputs(out, overwrite=overwrite)
    txt = npy.with_suffix(".txt")
    parts = (npy.with_name(npy.name + ".part"), txt.with_name(txt.name + ".part"))
    try:
        with open(parts[0], "wb") as f:  # (np.save given a name adds .npy to it)
            np.save(f, result.features.numpy().astype(np.float32, copy=False))
            f.flush()
            os.fsync(f.fileno())
        # A name that is not UTF-8 keeps its own bytes, so that the line opens the file (as list files are read).
        with open(parts[1], "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            f.writelines(p + "\n" for p in result.paths)
            f.flush()
            os.fsync(f.fileno())
        txt.unlink(missing_ok=True)  # first: a crash between the renames leaves features without paths, not
        os.replace(parts[0], npy)     # new features beside the old paths
        os.replace(parts[1], txt)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    return npy, txt
