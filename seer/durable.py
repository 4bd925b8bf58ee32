"""Files that survive a kill or a crash: written whole under a temporary name, synced, then renamed over the
final name, and the folder synced where the rename itself must last (a checkpoint's)."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# What a filesystem that cannot sync a folder answers (some network and FUSE filesystems; EROFS and EINVAL are
# fsync(2)'s "does not support synchronization"), or a folder that cannot be opened for it: nothing more can
# be done there, and failing the write over it (whose rename is made already) would lose more than the sync
# protects. Said once per folder.
_CANNOT_SYNC_FOLDER = frozenset({errno.EINVAL, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                                 errno.EBADF, errno.EACCES, errno.EPERM})
_told: set[str] = set()


def write_atomic(path: Path, write: Callable[[Path], None], *, suffix: str = ".part") -> None:
    """``write(tmp)`` (``tmp`` = ``path`` + ``suffix``), tmp fsynced, then renamed to ``path``: a kill leaves the
    old file or the new one, never a part."""
    tmp = path.with_name(path.name + suffix)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync_file(path: Path) -> None:
    """fsync the file at ``path`` (appended to through another descriptor, or by another process): its bytes
    so far last through a crash of the machine."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """fsync ``folder``: the renames and removals in it last through a crash. Where the filesystem cannot sync
    a folder (``_CANNOT_SYNC_FOLDER``) this passes; any other OSError (EIO, ENOENT) is raised."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC_FOLDER:
            raise
        _passed_over(folder, e)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC_FOLDER:
            raise
        _passed_over(folder, e)
    finally:
        os.close(fd)


def _passed_over(folder: Path, e: OSError) -> None:
    if str(folder) not in _told:
        _told.add(str(folder))
        log.warning("cannot fsync the folder %s (%s): the renames in it may not outlast a crash of the machine "
                    "(a kill of the process is fine)", folder, e.strerror or e)
