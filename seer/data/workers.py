"""A DataLoader whose workers hang stops with an error instead of waiting forever (``data.timeout_s``).

Shared by training (:class:`seer.data.TrainData`) and ``seer data check``. torch's DataLoader takes a
``timeout`` for worker processes only and, when no batch comes in time, raises a bare
``RuntimeError('DataLoader timed out after N seconds')`` and leaves the workers running. :func:`next_batch`
turns that into a :class:`DataTimeoutError` naming the setting and the likely cause, once the workers are
killed and reaped.

Why killed: a worker blocked in a read from a hung NFS or FUSE mount sleeps in the kernel until the read
returns or a fatal signal comes. torch's own shutdown asks each worker to leave and waits 5 s, then sends
SIGTERM, which such a worker never handles (and a worker that can handle it defers it for
``WORKER_STOP_GRACE_S``, :func:`seer.data.dataset.worker_init`), and waits 5 s more: per stuck worker 10 s,
then a process left behind. SIGKILL ends them at once; their state is worthless (they only read and decode).
"""
from __future__ import annotations

import math
import time
from typing import Iterator

from torch.utils.data._utils import signal_handling

from .dataset import DataError

# How long to wait for the killed workers to be gone (SIGKILL ends a process in a killable wait at once; one
# stuck beyond it, in an uninterruptible kernel wait, is named in the error instead of waited for).
KILL_WAIT_S = 10.0


class DataTimeoutError(DataError):
    """No batch came from the DataLoader workers within the timeout (``data.timeout_s``)."""


def check_timeout(timeout_s, name: str) -> None:
    """ValueError naming ``name`` unless ``timeout_s`` is a finite number of seconds >= 0 (0 = no timeout)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0 (seconds; 0 = no timeout), got {timeout_s!r}")


def loader_timeout(timeout_s: float, num_workers: int) -> float:
    """DataLoader's ``timeout`` for ``timeout_s``: torch has one for worker processes only (0 = none)."""
    return float(timeout_s) if num_workers > 0 else 0.0


def next_batch(it: Iterator, timeout_s: float, *, setting: str, where: str):
    """``next(it)`` of a DataLoader iterator; on torch's timeout, the workers are killed and reaped and
    :class:`DataTimeoutError` names ``setting`` (its value ``timeout_s``) and ``where`` (which batch). The
    iterator is unusable afterwards: make a new one to go on."""
    try:
        return next(it)
    except RuntimeError as e:
        if not str(e).startswith("DataLoader timed out"):  # torch's only sign of its timeout is the message
            raise
        left = kill_workers(it)
        stuck = (f" Worker process(es) {', '.join(map(str, left))} did not end after SIGKILL (stuck in the "
                 f"kernel on the read) and may stay until that read returns." if left else "")
        raise DataTimeoutError(
            f"no batch from the DataLoader workers within {setting}={timeout_s:g} s ({where}): a worker is stuck "
            f"or very slow, most likely on a read from a hung or overloaded filesystem (a stuck NFS mount, a FUSE "
            f"filesystem that does not answer). The workers were stopped.{stuck} Check the filesystem that holds "
            f"the images (read a file from it by hand), then raise {setting}, or set it to 0 to wait without "
            f"limit") from e


def kill_workers(it) -> list[int]:
    """SIGKILL the worker processes of DataLoader iterator ``it``, reap them, then let torch release the rest
    (queues, the pin-memory thread). Returns the pids of workers that are still there after KILL_WAIT_S."""
    workers = list(getattr(it, "_workers", ()))
    # torch's SIGCHLD handler would raise "DataLoader worker (pid ...) is killed by signal" in this process:
    # it stops watching them first (as its own shutdown does before its last resort, SIGTERM).
    if getattr(it, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in workers:
        w.kill()
    deadline = time.monotonic() + KILL_WAIT_S
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.monotonic()))  # reaps it: no zombie
    it._shutdown_workers()
    return [w.pid for w in workers if w.is_alive()]
