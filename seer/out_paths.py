"""Output files checked before the work, not after it: the one rule that seer's commands share for where
they may write (``seer data check --report``, ``seer data dedup --out/--report``, ``seer features --out``,
``seer export --out``). Torch-free.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence


def check_file_paths(flag: str, given: str | os.PathLike, paths: Sequence[Path] = (), *,
                     make_folders: bool = False, in_place: bool = False) -> None:
    """ValueError naming ``flag`` and the value ``given`` where the files ``paths`` (default: ``given``
    itself; an output and the files written beside it) cannot be written:

    * one of them is a folder;
    * their folder does not exist (``make_folders``: the command creates it; then the nearest existing
      folder above it must let files be created);
    * files cannot be created in it (written under a temporary name and renamed, which needs write and
      search permission on the folder), or, ``in_place`` (written into the file itself: a report that may
      be /dev/stdout), an existing file is not writable, or a new one cannot be made.
    """
    text = str(given)
    targets = list(paths) or [Path(given)]
    for p in targets:
        where = "" if str(p) == text else f": {str(p)!r}"
        if p.is_dir():
            raise ValueError(f"{flag} {text!r}{where} is a folder; expected a file path")
        if not in_place:
            # Written under a temporary name and renamed over the path: a fifo or a device there (/dev/null,
            # /dev/stdout, or a link to one) would itself be replaced by a regular file (/dev/null, for root).
            special = _special(p)
            if special:
                raise ValueError(f"{flag} {text!r}{where} is {special}; this command writes a new file and renames "
                                 f"it into place, so it needs a regular file path")
    first = targets[0]
    if make_folders:
        existing = next(p for p in (first.parent, *first.parent.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {text!r}: cannot create files under {str(existing)!r}")
        return
    if not first.parent.is_dir():
        raise ValueError(f"{flag} {text!r}: the folder {str(first.parent)!r} does not exist")
    if in_place:
        if not os.access(first if first.exists() else first.parent, os.W_OK):
            raise ValueError(f"{flag} {text!r} is not writable")
    elif not os.access(first.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {text!r}: cannot create files in {str(first.parent)!r}")


def _special(path: Path) -> str:
    """What ``path`` (a link followed) is when it exists as something other than a regular file or a folder,
    else ''."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # (missing, or a dangling link: the rename makes a new file)
        return ""
    return special_kind(mode) or ""


def special_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it is a fifo, a device or a socket ('a fifo', ...), else
    None (also seer.data.sources' test of what it may read)."""
    kinds = ((stat.S_ISFIFO, "a fifo"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), None)
