"""One writer per output: an exclusive ``flock`` on the ``.part`` file an output is written through.

``seer features`` and ``seer export`` write their outputs under ``.part`` names and rename them into place.
Two processes writing the same output at once would truncate each other's ``.part`` files and rename a mix
into place (rows past a file's data, weights beside another export's JSON); the second one is refused
instead (:class:`OutputBusyError`). The lock is held on the open file, so the kernel drops it when its holder
dies: a killed writer's ``.part`` is simply replaced by the next one. Torch-free.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)


class OutputBusyError(FileExistsError):
    """Another process is writing the same output (its ``.part`` file is locked)."""


_locked: set[int] = set()  # the descriptors holding a lock in this process
# Opens of a lock file that a holder renamed or removed under us before we got to lock it: each retry means
# another process took and dropped the lock meanwhile; a bound where the filesystem's fstat and stat disagree.
_ATTEMPTS = 100


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: a flock belongs to the
    open file, which fork shares, so a worker outliving its parent would keep the ``.part`` (or the run's
    folder) locked. Closing a copy does not unlock the parent's."""
    for fd in list(_locked):
        try:
            os.close(fd)
        except OSError:
            pass
    _locked.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_part(path: Path, busy: str | Callable[[int], str], *,
              unlocked: str = "make sure no other process writes the same output") -> Optional[int]:
    """Create (or open) ``path`` and hold an exclusive lock on it; the descriptor to hand to
    :func:`unlock_part`, None where the filesystem has no locks (a warning ending in ``unlocked``). Raises
    :class:`OutputBusyError` with the message ``busy`` when another process holds it (a callable: given the
    open descriptor, to read what the holder wrote into the file). Every lock of this process (the run lock
    of seer.train.lock too) is taken here, so that one fork handler drops them all in a child."""
    import fcntl
    attempts = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    message = busy(fd) if callable(busy) else busy
                finally:
                    os.close(fd)
                raise OutputBusyError(message) from None
            os.close(fd)
            log.warning("cannot lock %s (%s): this filesystem has no file locks; %s", path, e, unlocked)
            return None
        # The holder may have renamed or removed the file between our open and our lock: lock the file at path.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        attempts += 1
        if same or attempts == _ATTEMPTS:
            if not same:  # (a filesystem whose fstat and stat disagree on the file: never the same)
                log.warning("cannot tell whether the lock on %s is on the file at that path (its fstat and stat "
                            "disagree); %s", path, unlocked)
            _locked.add(fd)
            return fd
        os.close(fd)


def unlock_part(fd: Optional[int]) -> None:
    """Release :func:`lock_part`'s lock (closing its descriptor); None: nothing to release."""
    if fd is not None and fd in _locked:
        _locked.discard(fd)
        os.close(fd)


@contextlib.contextmanager
def lock_file(path: Path, busy: str) -> Iterator[None]:
    """Hold :func:`lock_part`'s lock on ``path``, a file of its own (created, and removed on the way out),
    for the block."""
    fd = lock_part(path, busy)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiter that then locks it sees it gone and retries
        unlock_part(fd)
