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

import os
import socket
import threading
import weakref
from pathlib import Path

from ..part_lock import OutputBusyError, lock_part, unlock_part

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
    """A forked child (a DataLoader worker) starts with no share of any lock: the descriptors themselves are
    closed by seer.part_lock's fork handler, which took them (a flock belongs to the open file, which fork
    shares, so a child outliving rank 0, or its release, would keep the folder locked)."""
    global _mutex
    _mutex = threading.Lock()  # another thread of the parent may have held it at the fork
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
            unlock_part(entry[0])  # closing the descriptor releases the flock


def _acquire(out: Path):
    """The descriptor holding the exclusive lock on OUT/.lock, None where the filesystem has no locks."""
    def busy(fd: int) -> str:
        return (f"{out} is in use by another seer run ({_read_holder(fd) or 'holder unknown'}): two runs writing "
                f"one folder overwrite each other's checkpoints and metrics. Wait for it to end or stop it (a "
                f"rerun of the same command then continues where it saved), or use another --out (or "
                f"checkpoint.dir)")

    try:
        fd = lock_part(out / LOCK_NAME, busy, unlocked=f"make sure no other run writes to {out}")
    except OutputBusyError as e:
        raise RunLockedError(str(e)) from None
    if fd is not None:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        return ""
