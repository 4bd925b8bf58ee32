"""One run per output folder: an advisory lock that a second process writing the same OUT meets.

Two runs on one folder (the same command rerun while the first still lives, e.g. ranks orphaned by a killed
torchrun) destroy each other's work: the second one's start removes the first one's checkpoint in progress,
and its metrics log replaces the file the first one appends to. Rank 0 therefore holds an exclusive
``flock`` on ``OUT/.lock``, and on ``.lock`` in the checkpoint folder (``checkpoint.dir``, by default
``OUT/checkpoints``, which another run may name as its own), while a Trainer writes there; the kernel drops
it when the process dies, so a killed run never leaves a stale lock. Trainers of one process share the lock (what one process does with
two Trainers on one folder is its own business); it is released when the last of them finishes ``fit`` or
is garbage-collected.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import weakref
from pathlib import Path

log = logging.getLogger("seer.train")

LOCK_NAME = ".lock"

_held: dict[str, list] = {}  # resolved OUT -> [fd, holders]
_mutex = threading.Lock()


class RunLockedError(FileExistsError):
    """Another process is running on this output folder."""


class RunLock:
    """This process's share of the lock on one output folder (see the module docstring)."""

    def __init__(self, out: Path):
        self.key = str(Path(out).resolve())
        with _mutex:
            entry = _held.get(self.key)
            if entry is None:
                entry = _held[self.key] = [_acquire(Path(self.key)), 0]
            entry[1] += 1
        self._released = False
        self._finalizer = weakref.finalize(self, _drop, self.key)

    def release(self) -> None:
        """Give up this share (idempotent); the last share unlocks the folder."""
        if not self._released:
            self._released = True
            self._finalizer()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: a flock belongs to the
    open file, which fork shares, so a child outliving rank 0 (or its release) would keep the folder locked.
    Closing a copy does not unlock the parent's."""
    global _mutex
    _mutex = threading.Lock()  # another thread of the parent may have held it at the fork
    for fd, _ in _held.values():
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _drop(key: str) -> None:
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            if entry[0] is not None:
                os.close(entry[0])  # closing the descriptor releases the flock


def _acquire(out: Path):
    """The descriptor holding the exclusive lock on OUT/.lock, None where the filesystem has no locks."""
    import fcntl
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockedError(
                f"{out} is in use by another seer run ({holder or 'holder unknown'}): two runs writing one folder "
                f"overwrite each other's checkpoints and metrics. Wait for it to end or stop it (a rerun of the "
                f"same command then continues where it saved), or use another --out (or checkpoint.dir)") from None
        log.warning("cannot lock %s (%s): this filesystem has no file locks; make sure no other run writes to %s",
                    path, e, out)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        return ""
