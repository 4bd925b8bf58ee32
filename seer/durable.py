"""Files that survive a kill or a crash: written whole under a temporary name, synced, then renamed over the
final name, and the folder synced where the rename itself must last (a checkpoint's)."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

# What a filesystem that cannot sync a folder answers (some network and FUSE filesystems): nothing more can be
# done there, and refusing the write over it would lose more than the sync protects.
_CANNOT_SYNC_FOLDER = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF,
                                 errno.EISDIR, errno.EACCES, errno.EPERM})


def write_atomic(path: Path, write: Callable[[Path], None], *, suffix: str = ".part") -> None:
    """``write(tmp)`` (``tmp`` = ``path`` + ``suffix``), tmp fsynced, then renamed to ``path``: a kill leaves the
    old file or the new one, never a part."""
    tmp = path.with_name(path.name + suffix)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync_folder(folder: Path) -> None:
    """fsync ``folder``: the renames and removals in it last through a crash. Where the filesystem cannot sync
    a folder (``_CANNOT_SYNC_FOLDER``) this passes; any other OSError (EIO, ENOENT) is raised."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        if e.errno in _CANNOT_SYNC_FOLDER:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC_FOLDER:
            raise
    finally:
        os.close(fd)
