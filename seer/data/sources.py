"""Where unlabelled images come from: a folder (recursive), a list file, webdataset-style tar shards, or a
built-in set made in memory ('digits', 'synthetic': nothing to index).

Each source is first *indexed* into files under a cache folder (normally OUT/data): the sorted list of
image paths, or for tar shards the shard, byte offset and size of every image member. Training reads only
the index, memory-mapped (:mod:`seer.data.mapped`), so that

* millions of entries cost no Python objects and no per-worker copies;
* the order is fixed for the whole run: images added to the folder later do not shift the data order of
  a resumed run (delete OUT/data to re-index).

An index entry is not checked when it is written; unreadable files are found, skipped and logged when they
are read (:mod:`seer.data.dataset`) or ahead of time by ``seer data check``.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import gc
import glob
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import posixpath
import stat
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

import numpy as np

from ..host import usable_cpus as _usable_cpus  # (a name of this module: what tests stand in for)
from ..out_paths import special_kind
from . import tarscan
from .mapped import MappedArray, StringList, normalise_list_file, save_array, write_lines

if TYPE_CHECKING:  # not imported at run time: a process indexing tar shards starts without torch
    import torch

    from .exclude import ExcludeList  # (which imports this module)

log = logging.getLogger("seer.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class DataSourceError(ValueError):
    """``data.source`` cannot be used (missing, empty, or of an unknown kind)."""


# data.source values that name a built-in set rather than a path (and are their own data.format).
BUILT_IN = ("digits", "synthetic")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageSource:
    """N images addressed by index: ``read(i)`` gives the encoded bytes (or a decoded uint8 (3, H, W)
    tensor for in-memory sources) and ``name(i)`` what to print when image i is unreadable."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> Union[bytes, torch.Tensor]:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError


class FileSource(ImageSource):
    """Image files listed in a :class:`StringList` (paths relative to ``root`` unless absolute); a file of more
    than ``max_bytes`` bytes is refused unread (:func:`read_regular_file`; 0 = no limit)."""

    def __init__(self, paths: StringList, root: str = "", max_bytes: int = 0):
        self.paths = paths
        self.root = root
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i]) if self.root else self.paths[i]

    def read(self, i: int) -> bytes:
        return read_regular_file(self.name(i), self.max_bytes)


def not_regular(mode: int) -> Optional[str]:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file ('a fifo', ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return "a folder" if stat.S_ISDIR(mode) else special_kind(mode) or "not a regular file"


def check_image_bytes(size: int, max_bytes: int) -> None:
    """ValueError naming data.max_image_bytes where an image file (or tar member) of ``size`` bytes is larger
    than ``max_bytes`` (0 = no limit): such a file (a video or a disk image named .jpg, a tar member of a huge
    size) counts as unreadable, as a corrupt one does, instead of being read whole into memory, once per
    DataLoader worker that meets it."""
    if max_bytes and size > max_bytes:
        raise ValueError(f"{size} bytes exceed data.max_image_bytes={max_bytes} (not read)")


def check_max_bytes(max_bytes, setting: str = "max_bytes") -> None:
    """ValueError naming ``setting`` unless ``max_bytes`` is a limit :func:`read_regular_file` takes: an integer
    >= 0 (0 = no limit)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"{setting} must be an integer >= 0 (bytes; 0 = no limit), got {max_bytes!r}")


# How much a file that outgrows its fstat size is read at a time, up to the limit (a single read of the
# limit would allocate all of it first, whatever the file holds).
READ_CHUNK = 1 << 20


def read_regular_file(path: str, max_bytes: int = 0) -> bytes:
    """The bytes of the regular file ``path`` (a symbolic link followed), or OSError for anything else. A list
    file may name, or a link lead to, a fifo, whose open waits for a writer forever (a hung worker stops the
    run at data.timeout_s, and again on every resume), or a device such as /dev/zero, whose read never ends
    (memory runs out); so the file is opened without waiting (O_NONBLOCK, which regular files ignore) and
    read only once fstat says it is a regular file.

    ``max_bytes`` (``data.max_image_bytes``; 0 = no limit): a file whose fstat size is larger is refused
    unread (:func:`check_image_bytes`); and at most ``max_bytes`` + 1 bytes are read, so that a file that grows
    while it is read, or whose size fstat does not know (0 for the files of /proc and of some FUSE mounts), is
    refused as soon as it passes the limit, not read to its end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        what = not_regular(st.st_mode)
        if what is not None:
            raise OSError(errno.EINVAL, f"not a regular file ({what})", path)
        check_image_bytes(st.st_size, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        if not max_bytes:
            return f.read()
        # One read of the size fstat gave, plus a byte to see the end; past that, the rest in chunks (each
        # f.read(n) allocates n bytes first: one read of a large limit would allocate the whole limit).
        want = min(st.st_size, max_bytes) + 1
        data = f.read(want)
        if len(data) < want:
            return data
        data = bytearray(data)
        while len(data) <= max_bytes:
            chunk = f.read(min(READ_CHUNK, max_bytes + 1 - len(data)))
            if not chunk:
                return bytes(data)
            data += chunk
    raise ValueError(f"more than {max_bytes} bytes (the file grew while it was read, or its size was not known "
                     f"beforehand) exceed data.max_image_bytes={max_bytes} (read no further)")


class TarSource(ImageSource):
    """Image members of uncompressed tar shards, read by seeking to their recorded offsets.

    Each process keeps at most ``MAX_OPEN_SHARDS`` shards open, the most recently read: the data order
    visits every shard within a few batches, and a handle kept per shard ran a worker out of file
    descriptors (ulimit -n, often 1024) once there were more shards than that, after which every read of
    another shard failed and its images were skipped as unreadable. Reopening costs ~10 us, a decode ms.

    A member of more than ``max_bytes`` bytes (its size from the tar header, recorded in the index) is refused
    without a read (:func:`check_image_bytes`; 0 = no limit)."""

    MAX_OPEN_SHARDS = 64

    def __init__(self, shards: list[str], shard_id: MappedArray, offset: MappedArray, size: MappedArray,
                 members: StringList, max_bytes: int = 0):
        self.shards, self.shard_id, self.offset, self.size, self.members = shards, shard_id, offset, size, members
        self.max_bytes = max_bytes
        # shard id -> open file, least recent first
        self._files: collections.OrderedDict[int, object] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.shard_id[i])]}:{self.members[i]}"

    def read(self, i: int) -> bytes:
        check_image_bytes(int(self.size[i]), self.max_bytes)  # (before the shard is opened: nothing read)
        sid = int(self.shard_id[i])
        f = self._files.get(sid)
        if f is None:  # workers open their own handles after unpickling
            while len(self._files) >= self.MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
            # Unbuffered: a buffered handle answered a read that fell inside its last 8 KiB from that buffer,
            # the shard's old bytes once it had been rewritten in place.
            f = self._files[sid] = open(self.shards[sid], "rb", buffering=0)
        else:
            self._files.move_to_end(sid)
        offset, size = int(self.offset[i]), int(self.size[i])
        data = _pread_all(f.fileno(), size, offset)
        if len(data) != size:  # else the decoder's "not an image" would hide that the shard changed
            raise OSError(f"the shard ends {len(data)} bytes into this member ({size} bytes at offset {offset} when "
                          f"it was indexed): the shard was truncated or rewritten since; delete the index (OUT/data) "
                          f"to index data.source again")
        return data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = collections.OrderedDict()
        return state


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes of ``fd`` from ``offset``, fewer only at the end of the file (one read may return less:
    Linux stops one at 2 GiB)."""
    parts, got = [], 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class TensorSource(ImageSource):
    """Decoded uint8 images (N, 3, H, W) held in memory (the built-in digits)."""

    def __init__(self, images: torch.Tensor, label: str = "tensor"):
        self.images = images
        self.label = label

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, i: int) -> torch.Tensor:
        return self.images[i]

    def name(self, i: int) -> str:
        return f"{self.label}[{i}]"


# ---------------------------------------------------------------------------------------------------------
# Scanning and indexing.

def scan_folder(root: str | os.PathLike, setting: str = "data.source") -> Iterator[str]:
    """Image files under ``root`` (recursive, symlinked folders followed once each), as paths relative to it,
    in a deterministic order: each folder's entries sorted by name, sub-folders visited in that order.
    Streams; never holds more than one folder listing.

    A folder that cannot be listed raises :class:`DataSourceError` naming it (skipping it would train on
    part of the data without a word); a file name with a newline, which the index cannot hold, and a symbolic
    link named like an image whose target is missing are left out with a warning. A symlinked folder seen
    before (a loop, or two links to one folder) is visited once.
    ``setting``: what the errors and warnings call the folder (the config key or flag the user gave it by)."""
    root = os.fspath(root)
    stack = [""]
    seen: set[tuple[int, int]] = set()
    while stack:
        rel = stack.pop()
        where = os.path.join(root, rel)
        try:
            st = os.stat(where)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(where), key=lambda e: e.name)
        except OSError as e:
            raise DataSourceError(f"{setting}: cannot list folder {where!r} ({type(e).__name__}: {e.strerror}): "
                                  f"fix its permissions or move it out of the source") from None
        subdirs = []
        for e in entries:
            path = os.path.join(rel, e.name) if rel else e.name
            if "\n" in e.name:
                log.warning("%s: leaving out %r (a newline in its name)", setting, path)
                continue
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # following a link
            except OSError as exc:
                if exc.errno != errno.ELOOP:  # a link to what cannot be read: as a folder that cannot be listed
                    raise DataSourceError(f"{setting}: cannot read {os.path.join(root, path)!r} "
                                          f"({type(exc).__name__}: {exc.strerror})") from None
                log.warning("%s: leaving out %r (a symbolic link loop)", setting, path)
                continue
            if is_dir:
                subdirs.append(path)
            elif is_file and is_image_name(e.name):
                yield path
            elif not is_file and is_image_name(e.name) and e.is_symlink():  # is_file() follows it: to nothing
                log.warning("%s: leaving out %r (a symbolic link to a missing file)", setting, path)
        stack.extend(reversed(subdirs))


def index_tar_shards(shards: list[str], cache: Path, stats: Optional[list] = None, workers: int = 1,
                     exclude: Optional[ExcludeList] = None) -> int:
    """Record shard, offset and size of every image member of ``shards`` under ``cache``; return the count.
    ``stats``, if given, receives each shard's [st_size, st_mtime_ns], taken before it is read (a shard
    rewritten while or after it is read then differs from them). ``exclude``: members it names
    (``SHARD:MEMBER``) are left out of the index (``data.exclude``).

    ``workers``: processes that read the shards, 1 = this process only, 0 = automatic (:func:`index_workers`).
    Shards go to a pool of that many spawned processes once the time it would save on the shards left,
    estimated from those read so far, exceeds its start (``POOL_START_S``); until then they are read here.
    The index files, the warnings (logged by this process, in shard order) and the errors are the same
    whatever ``workers`` is; a shard that cannot be read raises :class:`DataSourceError` naming it.

    webdataset layout: a sample is the run of members sharing a key, the member name up to the first dot of
    its base name ('dir/key.jpg', 'dir/key.json', 'dir/key.mask.png'); the first image member of each sample
    is used, other members (a second image such as a mask, metadata) are ignored.

    An image member is a member named like an image that extraction turns into a file: a regular member, a
    hard link or a symbolic link. A link is indexed with its target's offset and size, so it reads the
    bytes that extracting the shard gives under the link's name; it counts as an image of its own sample
    (by its own name) like a regular member. Resolution follows tar: a hard link names a member earlier in
    the same shard (the last one of that name before it); a symbolic link is relative to its own folder and
    names the last member of that path in the shard. A member that cannot be read in place is left out of
    the index with a warning naming the shard and the member, and its sample gets no image (a further image
    such as 'key.mask.png' does not stand in for it):

    * a link whose target is missing, not a file, outside the shard (an absolute path, '..' above the
      shard's root) or a loop of symbolic links; a hard link to a symbolic link (GNU tar links the symbolic
      link itself, whose target then resolves from the hard link's folder; Python's tarfile reads the
      symbolic link's target);
    * a sparse member (GNU ``--sparse``), or a link to one: its stored bytes are the file's data blocks
      without the holes, so reading them in place would give wrong bytes.

    Directories are not images; devices, fifos and members of unknown type named like images are left out
    with a warning, and their sample gets no image either.
    """
    workers = index_workers(workers, len(shards))
    ids, offs, sizes = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]

    def member_names(results: Iterator[_ShardIndex]) -> Iterator[str]:
        t0 = time.perf_counter()
        report, count = t0 + PROGRESS_EVERY_S, 0
        for sid, (shard_stat, names, offsets, lengths) in enumerate(results):
            if stats is not None:
                stats.append(shard_stat)
            if exclude is not None:
                keep = exclude.keep(names, prefix=f"{shards[sid]}:")  # TarSource.name's form
                if not keep.all():
                    names = [n for n, k in zip(names, keep.tolist()) if k]
                    offsets, lengths = offsets[keep], lengths[keep]
            ids.append(np.full(len(names), sid, np.int32))
            offs.append(offsets)
            sizes.append(lengths)
            count += len(names)
            yield from names
            if time.perf_counter() >= report:  # rank 0 indexes while every other rank waits: say how far
                report += PROGRESS_EVERY_S
                log.info("data.source: indexed %d of %d tar shards (%d images) in %.0f s", sid + 1, len(shards),
                         count, time.perf_counter() - t0)

    with contextlib.ExitStack() as pool:  # shuts a worker pool down here, also on an error or Ctrl-C
        results = _shard_results(shards, workers, stats is not None, pool)
        names = write_lines(member_names(results), cache / "members.txt", cache / "members.offsets.npy")
    save_array(cache / "shard_id.npy", np.concatenate(ids))
    save_array(cache / "offset.npy", np.concatenate(offs))
    save_array(cache / "size.npy", np.concatenate(sizes))
    return len(names)


# index_workers(0): at most this many processes, a cap rather than a measured optimum (only 2 cores were at
# hand): with many processes the shards' storage rather than the CPUs bounds indexing, and each spawned
# worker costs its start-up and ~30 MB (more while it holds a shard's names).
POOL_MAX_WORKERS = 32

# What starting a pool of index workers is taken to cost, in seconds: shards go to a pool once the time it
# would save on the shards left (the mean time per shard so far x the shards left x (1 - 1/workers)) is at
# least this. Measured on the 2-core development machine, 2 workers: 0.2 s when they import only this module
# (python -m seer, torchrun -m seer, pytest: spawn does not re-import a __main__ module), and 0.2 s too when
# spawn has each re-import the `seer` console script (seer.cli imports no torch since its packages import
# lazily; 4 s before). Taken at 1 s, for slower machines and file systems: a pool starts where it saves
# time (e.g. 2 s of indexing left, 2 workers).
POOL_START_S = 1.0

# Shards submitted per pool worker ahead of the merge (_pooled): enough to keep every worker busy.
POOL_AHEAD = 4

# How often a long indexing logs how far it is (INFO).
PROGRESS_EVERY_S = 60.0

# One shard indexed: its [st_size, st_mtime_ns] (or None), then the name, offset and size of each image member.
_ShardIndex = tuple


def index_workers(workers: int, shards: int) -> int:
    """The processes :func:`index_tar_shards` uses for ``shards`` shards: ``workers`` (1 = this process only)
    or for 0 the CPUs this process may use, capped at ``POOL_MAX_WORKERS``; never more than the shards."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0 = automatic, 1 = this process only), got {workers!r}")
    if workers == 0:
        workers = min(_usable_cpus(), POOL_MAX_WORKERS)
    return max(1, min(workers, shards))


def _shard_results(shards: list[str], workers: int, want_stat: bool,
                   pool: contextlib.ExitStack) -> Iterator[_ShardIndex]:
    """:func:`_index_shard` of each shard, in shard order: indexed here until a pool of ``workers`` processes
    looks worth its start (``POOL_START_S``), then by that pool, which ``pool`` shuts down."""
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        left = len(shards) - i
        n = min(workers, left)
        rest = (time.perf_counter() - t0) / i * left if i else 0.0  # seconds the shards left take here
        if n > 1 and rest * (1 - 1 / n) >= POOL_START_S:
            yield from _pooled(shards[i:], n, want_stat, pool)
            return
        yield _index_shard(shard, want_stat)


def _pooled(shards: list[str], workers: int, want_stat: bool, pool: contextlib.ExitStack) -> Iterator[_ShardIndex]:
    """:func:`_index_shard` of each shard by ``workers`` spawned processes, in shard order; each shard's log
    records are logged here before its result is given (or its error raised)."""
    log.info("data.source: indexing %d tar shards in %d processes (data.index_workers)", len(shards), workers)
    # spawn, not fork: this process may have CUDA initialised and threads running (a forked child inherits
    # their locks, held). A spawned worker imports this module (not torch: seer.data imports lazily) and the
    # main script, if there is one (POOL_START_S).
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_start, initargs=(log.getEffectiveLevel(),))
    # Pending shards are dropped, the running ones finish (one shard each) and the workers are joined: none
    # is left behind, also when Ctrl-C or an error ends the indexing.
    pool.callback(executor.shutdown, wait=True, cancel_futures=True)
    # At most POOL_AHEAD shards per worker in flight: submitted all at once, the workers would run ahead of
    # the merge here (with many workers the merge is the slower side) and their results (every name of every
    # shard: ~100 GB at 10^9 images) would pile up in this process.
    pending = iter(shards)
    futures = collections.deque(executor.submit(_index_shard_in_worker, s, want_stat)
                                for s in itertools.islice(pending, POOL_AHEAD * workers))
    for shard in shards:
        try:
            records, result = futures.popleft().result()  # popped: each result is freed once merged
            for nxt in itertools.islice(pending, 1):
                futures.append(executor.submit(_index_shard_in_worker, nxt, want_stat))
        except BrokenProcessPool:
            raise RuntimeError(f"data.source: a process indexing tar shards ended abruptly before shard {shard!r} "
                               f"was indexed: killed (e.g. out of memory), or it failed to start (a script that "
                               f"indexes when it is imported needs an 'if __name__ == \"__main__\":' guard: spawned "
                               f"processes import it); set data.index_workers=1 to index in this process") from None
        for record in records:
            logging.getLogger(record.name).handle(record)
        if isinstance(result, DataSourceError):
            raise result from None  # as the serial path raises it
        yield result


def _index_shard(shard: str, want_stat: bool) -> _ShardIndex:
    """One shard's [st_size, st_mtime_ns] (``want_stat``; taken before it is read, else None), then the
    name, offset and size of each of its image members (:func:`_read_shard`)."""
    try:
        st = os.stat(shard)
        # A fifo matched by the pattern (or a link to one) would block the open, and so rank 0, forever.
        what = not_regular(st.st_mode)
        if what is not None:
            raise OSError(errno.EINVAL, f"not a regular file ({what})")
        stats = [st.st_size, st.st_mtime_ns] if want_stat else None
        entries = _read_shard(shard)
    except (tarfile.TarError, OSError) as e:
        raise DataSourceError(f"data.source: cannot read tar shard {shard!r}: {e} (tar shards must be "
                              f"uncompressed .tar files in the webdataset layout)") from None
    return (stats, [e[0] for e in entries], np.array([e[1] for e in entries], np.int64),
            np.array([e[2] for e in entries], np.int64))


# An indexing worker's log records of the shard at hand.
_kept_records: list[logging.LogRecord] = []


class _KeepRecords(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        # As text: the arguments and an exception need not pickle.
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        _kept_records.append(record)


def _worker_start(level: int) -> None:
    """Initializer of an indexing worker: its records of the ``seer.data`` logger at the parent's ``level``
    are kept for the parent (a spawned process has no log handlers; its warnings would reach stderr only,
    unordered, and not the run's log)."""
    log.setLevel(level)
    log.propagate = False
    log.addHandler(_KeepRecords())
    # A worker waits for shards on a queue whose write end it holds itself, so it never sees the parent go: a
    # parent killed without its clean-up (SIGTERM during set-up, which torchrun forwards to it alone; the
    # out-of-memory killer) left its workers waiting forever. They leave when the parent's pipe closes.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), name="seer-index-parent", daemon=True
                         ).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready once the parent has ended
    os._exit(1)


def _index_shard_in_worker(shard: str, want_stat: bool) -> tuple[list[logging.LogRecord], object]:
    """:func:`_index_shard` in a worker: the shard's log records and its result, or the
    :class:`DataSourceError` it raised (returned, not raised: the parent raises it as the serial path
    would, without the worker's traceback attached)."""
    _kept_records.clear()
    try:
        result = _index_shard(shard, want_stat)
    except DataSourceError as e:
        result = e
    records = list(_kept_records)
    _kept_records.clear()
    return records, result


def _read_shard(shard: str) -> list[tuple[str, int, int]]:
    """:func:`_shard_image_members` of one shard, its headers read by :mod:`.tarscan` (~6x faster than
    tarfile), or by tarfile where the shard holds what tarscan leaves to it (then with tarfile's errors)."""
    if tarscan.usable():
        try:
            members = tarscan.scan(shard)
        except tarscan.Unhandled as e:
            log.debug("data.source: reading %s with tarfile (%s)", shard, e)
        except OSError:  # tarfile's own error, below, is the one reported
            pass
        else:
            return _shard_image_members(members, shard)
    with tarfile.open(shard, "r:") as tf:
        members = _shard_image_members(tf, shard)
        _warn_if_cut_short(tf, shard)
    return members


def _warn_if_cut_short(tf: tarfile.TarFile, shard: str) -> None:
    """tarfile ends a shard without an error at a damaged header after the first (its checksum or a number
    field): the members from there on are not indexed. Say so, naming the shard and what is left out; an
    end-of-archive block (zeros) or the end of the file where the iteration stopped is a proper end."""
    tf.fileobj.seek(tf.offset)
    if tf.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
        log.warning("data.source: tar shard %r has a damaged header at byte %d; its members from there on (%d "
                    "bytes of the shard) are not indexed", shard, tf.offset, os.path.getsize(shard) - tf.offset)


# What a path of a shard holds, as :func:`_shard_image_members` tracks it: ("data", offset, size) for bytes
# that can be read in place, ("sym", path) for a symbolic link to a path inside the shard (resolved once the
# whole shard is read, as extraction does), or ("bad", why) for anything else.
_Entry = tuple

# Members named in the warning about those left out of one shard.
_NAMED_IN_WARNING = 10

# Linux's limit on symbolic links followed in one path lookup (MAXSYMLINKS); more is taken as a loop.
_MAX_SYMLINK_HOPS = 40


def _tar_path(name: str) -> str:
    """The path a member name (or a hard link's target) extracts to, relative to the shard's root:
    'a.jpg', './a.jpg', '/a.jpg' and 'd/../a.jpg' are the same file."""
    return posixpath.normpath(name).lstrip("/")


def _symlink_target(member: tarfile.TarInfo | tarscan.Member) -> Optional[str]:
    """The shard path a symbolic link member points to, or None where it points outside the shard."""
    if member.linkname.startswith("/"):  # the host's file system, not the shard
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(_tar_path(member.name)), member.linkname))
    return None if target == ".." or target.startswith("../") else target


def _member_entry(member: tarfile.TarInfo | tarscan.Member, table: dict[str, _Entry]) -> _Entry:
    """What ``member`` holds, given what the members before it left (``table``)."""
    if member.isreg():  # regular and contiguous files, and sparse ones
        if member.issparse():
            return ("bad", "a sparse member: its stored bytes are not the file's bytes in order")
        return ("data", member.offset_data, member.size)
    if member.islnk():
        # The target as it is now: a later member of the target's name does not change the link.
        target = table.get(_tar_path(member.linkname))
        if target is None:
            return ("bad", f"a hard link to {member.linkname!r}, which is not a member earlier in the shard")
        if target[0] == "sym":  # GNU tar links the symlink itself (its target then read from the hard link's
            # folder), Python's tarfile the symlink's target: no one right answer
            return ("bad", f"a hard link to the symbolic link {member.linkname!r} (extractors differ on what it "
                           f"reads)")
        return ("bad", f"a hard link to {member.linkname!r}: {target[1]}") if target[0] == "bad" else target
    if member.issym():
        target = _symlink_target(member)
        if target is None:
            return ("bad", f"a symbolic link to {member.linkname!r}, outside the shard")
        return ("sym", target)
    if member.isdir():
        return ("bad", "a folder")
    kind = _NOT_FILES.get(member.type, f"of tar member type {member.type.decode('ascii', 'replace')!r}")
    return ("bad", f"not a file ({kind})")


_NOT_FILES = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a fifo"}


def _resolve(entry: _Entry, table: dict[str, _Entry]) -> _Entry:
    """Follow symbolic links in the finished shard's ``table``: a ("data", ...) or a ("bad", why) entry."""
    for _ in range(_MAX_SYMLINK_HOPS):
        if entry[0] != "sym":
            return entry
        path = entry[1]
        target = table.get(path)
        if target is None:
            return ("bad", f"a symbolic link to {path!r}, which is not in the shard")
        entry = ("bad", f"a symbolic link to {path!r}: {target[1]}") if target[0] == "bad" else target
    return entry if entry[0] != "sym" else ("bad", "a loop of symbolic links")


def _shard_image_members(tf, shard: str) -> list[tuple[str, int, int]]:
    """(member name, offset, size) of the image of each sample of one shard, in member order, with the
    rules of :func:`index_tar_shards`; warns about the members left out. ``tf``: the shard's members in
    order, an open ``tarfile.TarFile`` or :func:`.tarscan.scan`'s list."""
    table: dict[str, _Entry] = {}  # shard path -> what extraction leaves there so far (later members win)
    samples: list[tuple[str, _Entry]] = []
    last_key, dropped, left_out = None, [], []
    for m in tf:
        entry = _member_entry(m, table)
        # Links resolve by path, so every member is recorded, image or not ('blob' may be a link's target).
        table[_tar_path(m.name)] = entry
        if m.isdir() or not is_image_name(m.name):
            continue
        key = sample_key(m.name)
        if key == last_key:  # another image of the same sample
            dropped.append(m.name)
            continue
        last_key = key
        if not (m.isreg() or m.islnk() or m.issym()):  # a device, a fifo: its sample gets no image
            left_out.append((m.name, entry[1]))
            continue
        if "\n" in m.name:
            log.warning("data.source: leaving out member %r of %s (a newline in its name)", m.name, shard)
            continue
        samples.append((m.name, entry))
    if dropped:  # said, not silent: names like 'clip/frame.0001.png' share a key too
        log.warning("data.source: %d image members of %s left out as further images of a webdataset sample "
                    "(members sharing the name up to the first dot, e.g. %r after its sample's first image); "
                    "rename them if each is an image of its own", len(dropped), shard, dropped[0])
    out = []
    # Symbolic links are resolved only now: one may point to a member further on in the shard.
    for name, entry in samples:
        entry = _resolve(entry, table)
        if entry[0] == "data":
            out.append((name, entry[1], entry[2]))
        else:
            left_out.append((name, entry[1]))
    if left_out:  # one warning per shard naming the first members: a shard of 10^4 links is one line
        shown = "; ".join(f"{name!r}: {why}" for name, why in left_out[:_NAMED_IN_WARNING])
        more = f"; and {len(left_out) - _NAMED_IN_WARNING} more" if len(left_out) > _NAMED_IN_WARNING else ""
        log.warning("data.source: %d image members of %s cannot be read in place and are left out (%s%s); to "
                    "keep them, write the shard with each image as a plain file (GNU tar: --dereference "
                    "--hard-dereference, no --sparse)", len(left_out), shard, shown, more)
    return out


def sample_key(member: str) -> str:
    """webdataset's sample key of a tar member: its name up to the first dot of the base name."""
    head, _, base = member.rpartition("/")
    return f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0]


def _is_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def _compressed_tar(name: str) -> bool:
    return name.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst"))


def _is_glob(source: str) -> bool:
    """A pattern of tar shards: wildcards in a path that does not exist as written ('photos [2020]' may)."""
    return any(ch in source for ch in "*?[") and not os.path.exists(source)


def detect_format(source: str) -> str:
    """'digits', 'synthetic', 'folder', 'list' or 'tar' for a ``data.source`` value (the built-in names win
    over a folder of that name in the current directory, which './NAME' reaches)."""
    if source in BUILT_IN:
        return source
    if not source:
        raise DataSourceError("data.source is empty: set it to a folder of images, a text file of image paths, "
                              "tar shards (e.g. 'shards/*.tar'), 'digits' or 'synthetic'")
    if _is_glob(source):
        return "tar"
    p = Path(source)
    if p.is_dir():
        try:
            files = [e.name for e in os.scandir(p) if followed_is(e, "file")]
        except OSError as e:
            raise DataSourceError(f"data.source: cannot list folder {source!r} ({type(e).__name__}: "
                                  f"{e.strerror})") from None
        tars = any(map(_is_tar, files))
        # The folder format reads images in sub-folders too: with shards at the top, look for the first one
        # (one listing when there are no sub-folders, the usual folder of shards).
        image = next((f for f in files if is_image_name(f)), None) or (_first_image(p) if tars else None)
        if tars and image:  # which one the user meant is not ours to guess: either would drop the other
            raise DataSourceError(f"data.source {source!r} holds both image files (e.g. {printable(image)!r}) and "
                                  f".tar shards: set data.format=folder (the .tar files are ignored) or "
                                  f"data.format=tar (the images are ignored)")
        return "tar" if tars else "folder"
    if p.is_file():
        if _compressed_tar(p.name):
            raise DataSourceError(f"data.source {source!r} is a compressed tar: tar shards must be uncompressed "
                                  f".tar files (their members are read in place)")
        return "tar" if _is_tar(p.name) else "list"
    raise DataSourceError(f"data.source {source!r} does not exist (expected a folder of images, a text file of "
                          f"image paths, tar shards, 'digits' or 'synthetic')")


def followed_is(entry: os.DirEntry, kind: str) -> bool:
    """``entry.is_file()`` or ``entry.is_dir()`` (``kind``), False for a link that cannot be followed (a
    loop), which scan_folder leaves out with a warning."""
    try:
        return entry.is_file() if kind == "file" else entry.is_dir()
    except OSError:
        return False


def _first_image(root: Path) -> Optional[str]:
    """The first image file under ``root`` in scan_folder's order, or None (also where a folder cannot be
    listed: the folder format would say so when it reads them)."""
    try:
        return next(iter(scan_folder(root)), None)
    except DataSourceError:
        return None


def printable(name: str) -> str:
    """A path as text that any output can take: the bytes of a name that is not UTF-8 (kept by the index as
    surrogate escapes, so that the file can be opened) as backslash escapes, e.g. 'a\\xff.jpg'."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def tar_shards(source: str) -> list[str]:
    if _is_glob(source):
        shards = sorted(glob.glob(source))
    elif Path(source).is_dir():
        shards = sorted(str(Path(source) / e.name) for e in os.scandir(source) if _is_tar(e.name))
    else:
        shards = [source]
    if not shards:
        raise DataSourceError(f"data.source {source!r} matches no .tar shards")
    return [os.path.abspath(s) for s in shards]


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the block (back as it was after). Indexing allocates
    millions of small tuples and lists that reference counting frees (no cycles), and their allocation keeps
    triggering collections that walk the whole heap of a training process (torch, the model): tar indexing
    took 1.5x as long with them (16 shards x 30,000 members, torch and seer imported, the 2-core Xeon:
    2.0 s against 1.36 s)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@_gc_paused()
def build_index(source: str, fmt: str, cache: str | os.PathLike, *, check_shards: bool = True,
                workers: int = 0, built_in: Optional[dict] = None, exclude: str = "") -> dict:
    """Index ``source`` into ``cache`` (once: an existing index of the same source is kept); return its
    description. Call on one process, then :func:`open_index` on all. ``workers``: processes that index tar
    shards (``data.index_workers``; :func:`index_tar_shards`).

    An existing index of tar shards is checked against the shards' sizes and modification times recorded
    when it was written (``check_shards``; one stat per shard, so the processes that only read the index
    the writer has checked pass False): a shard rewritten since would read other bytes at its members'
    offsets.

    ``built_in``: the config keys that make a built-in set's images (``digits_size``, ``synthetic_size``, ...
    without the ``data.`` prefix); those of the set's format are recorded in its index and must be the same
    when it is used again (a resumed run would otherwise train on other images than its checkpoints did, with
    nothing to say so: the data position checks only their count).

    ``exclude``: a file naming images to leave out of the index (``data.exclude``, :mod:`seer.data.exclude`;
    '' = none). index.json records it (path, size, modification time, SHA-256, counts), and an index made with
    another file, or before it changed, is refused (``check_shards`` False: only whether one was given)."""
    from .exclude import ExcludeList, check_unchanged  # (it imports this module)
    index_workers(workers, 1)  # a bad value is refused whatever the source
    source = os.path.expanduser(source)  # '~/images' from a YAML file or a quoted --set, which no shell expanded
    fmt = detect_format(source) if fmt == "auto" else fmt
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / "index.json"
    # A pattern made absolute too ('shards/*.tar' from another folder matches other shards): kept relative, a
    # run started elsewhere with the same --out reused the first folder's index without a word.
    source_abs = source if fmt in BUILT_IN else os.path.abspath(source)
    if meta_path.is_file():
        meta = _read_index_meta(cache)
        if meta.get("source") == source and source != source_abs and _is_glob(source):
            meta["source"] = source_abs  # written before patterns were made absolute: its folder is not known
        if meta.get("source") == source_abs and meta.get("format") == fmt:
            _check_built_in(meta, _built_in_params(fmt, built_in), cache)
            check_unchanged(meta, exclude, cache, check_file=check_shards)
            _check_index_files(meta, cache)
            if fmt == "tar" and check_shards:
                _check_shards(meta, cache)
            return meta
        if meta.get("source") == source_abs:  # the same source read as another format: say which
            raise DataSourceError(f"{cache} holds the index of data.source {source_abs!r} read as data.format="
                                  f"{meta.get('format')}, not {fmt}: set data.format={meta.get('format')}, use another "
                                  f"output folder, or delete {cache} to index the source as {fmt}")
        raise DataSourceError(f"{cache} holds the index of data.source {meta.get('source')!r}, not {source_abs!r}: "
                              f"use another output folder, or delete {cache} to index the new source")
    # What an indexing killed part-way left: write_lines' and save_array's temporary files are named by their
    # writer's pid, so no later build writes over them, and an images.txt of a billion names is tens of GB.
    # (The cache is one run's own, OUT/data, written under its run lock by one process.)
    for stale in (p for p in cache.glob("*.tmp-*") if p.is_file()):
        log.info("removing %s, left by an indexing that was interrupted", stale)
        stale.unlink(missing_ok=True)
    meta = {"source": source_abs, "format": fmt}
    if exclude and fmt in BUILT_IN:
        raise DataSourceError(f"data.exclude leaves out images of files; data.source {source!r} is a built-in set "
                              f"made in memory: set data.exclude=''")
    drop = ExcludeList(exclude) if exclude else None  # read first: a bad file fails before the indexing
    names = drop.filter if drop else (lambda it, prefix="": it)
    if fmt in BUILT_IN:  # nothing to index: the images are made when the index is opened
        meta["count"] = 0
        meta["params"] = _built_in_params(fmt, built_in)
    elif fmt == "folder":
        if not Path(source).is_dir():
            raise DataSourceError(f"data.source {source!r} is not a folder")
        meta["root"] = source_abs
        meta["count"] = len(write_lines(names(scan_folder(source), os.path.join(source_abs, "")),
                                        cache / "images.txt", cache / "images.offsets.npy"))
    elif fmt == "list":
        if not Path(source).is_file():
            raise DataSourceError(f"data.source {source!r} is not a list file")
        meta["root"] = ""
        meta["count"] = len(write_lines(names(normalise_list_file(source, base=Path(source_abs).parent)),
                                        cache / "images.txt", cache / "images.offsets.npy"))
    elif fmt == "tar":
        meta["shards"] = tar_shards(source)
        meta["shard_stats"] = []  # [st_size, st_mtime_ns] per shard, checked when the index is used again
        meta["count"] = index_tar_shards(meta["shards"], cache, meta["shard_stats"], workers, drop)
    else:
        raise DataSourceError(f"data.format {fmt!r} is not one of 'auto', 'folder', 'list', 'tar', 'digits', "
                              f"'synthetic'")
    if fmt not in BUILT_IN and meta["count"] == 0:
        if drop is not None and drop.excluded:
            raise DataSourceError(f"data.exclude {drop.path!r} leaves out all {drop.excluded} images of data.source "
                                  f"{source!r}: nothing is left to train on")
        raise DataSourceError(f"data.source {source!r} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if drop is not None:
        meta["exclude"] = drop.finish(source_abs)
    # The files' sizes, checked whenever the index is opened (a truncated images.txt read as other paths),
    # and their bytes on disk before index.json says the index is complete.
    meta["files"] = {}
    for name in _INDEX_FILES[fmt]:
        with open(cache / name, "rb") as f:
            os.fsync(f.fileno())
            meta["files"][name] = os.fstat(f.fileno()).st_size
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # the index is complete only once index.json exists
    return meta


def _built_in_params(fmt: str, built_in: Optional[dict]) -> dict:
    """The keys of ``built_in`` that make the images of format ``fmt`` (``synthetic_*`` for 'synthetic')."""
    return {k: v for k, v in (built_in or {}).items() if fmt in BUILT_IN and k.startswith(f"{fmt}_")}


def _check_built_in(meta: dict, params: dict, cache: Path) -> None:
    """DataSourceError naming the keys where a built-in set's index was made with other values than
    ``params`` (an index written before they were recorded, or a caller that gives none, passes)."""
    was = meta.get("params") or {}
    diffs = [f"data.{k}: index {was[k]!r}, config {v!r}" for k, v in params.items() if k in was and was[k] != v]
    if diffs:
        raise DataSourceError(f"{cache} holds the index of the built-in data.source {meta.get('source')!r} made with "
                              f"other images than this config's ({'; '.join(diffs)}): a resumed run would train on "
                              f"other images than its checkpoints did; set them back, use another output folder, "
                              f"or delete {cache} to go on with the new images")


# The files of an index, per format.
_INDEX_FILES = {"digits": (), "synthetic": (), "folder": ("images.txt", "images.offsets.npy"),
                "list": ("images.txt", "images.offsets.npy"),
                "tar": ("members.txt", "members.offsets.npy", "shard_id.npy", "offset.npy", "size.npy")}


def _damaged(cache: Path, what: str) -> DataSourceError:
    return DataSourceError(f"the data index in {cache} is damaged ({what}): delete {cache} and the next run "
                           f"indexes data.source again")


def _read_index_meta(cache: Path) -> dict:
    try:
        meta = json.loads((cache / "index.json").read_text())
    except (ValueError, OSError) as e:
        raise _damaged(cache, f"index.json: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in _INDEX_FILES:
        raise _damaged(cache, "index.json is not an index description")
    return meta


def _check_index_files(meta: dict, cache: Path) -> None:
    """Every file of the index is there at the size it was written (indexes written before sizes were
    recorded: there)."""
    sizes = meta.get("files") or dict.fromkeys(_INDEX_FILES[meta["format"]])
    for name, size in sizes.items():
        try:
            got = os.path.getsize(cache / name)
        except OSError as e:
            raise _damaged(cache, f"{name}: {type(e).__name__}: {e.strerror}") from None
        if size is not None and got != size:
            raise _damaged(cache, f"{name} has {got} bytes, {size} when it was written")


def _check_shards(meta: dict, cache: Path) -> None:
    """Every tar shard is there with the size and modification time it had when it was indexed. Indexes
    written before these were recorded (no ``shard_stats``) are used unchecked, with a warning."""
    stats = meta.get("shard_stats")
    if stats is None:
        log.warning("data.source: the index in %s records no sizes or modification times of its tar shards "
                    "(written by an older seer), so a shard rewritten since cannot be detected; delete %s to "
                    "index data.source again with them", cache, cache)
        return
    if not isinstance(stats, list) or len(stats) != len(meta.get("shards", ())):
        raise _damaged(cache, "index.json: shard_stats does not match shards")
    unreachable = []
    for shard, (size, mtime_ns) in zip(meta["shards"], stats):
        try:
            st = os.stat(shard)
        except OSError as e:
            # A shard that is gone (or its storage unreachable now) reads no wrong bytes: its images are skipped
            # as unreadable, as a missing file's are ("bad files never stop a run"), and counted.
            unreachable.append(f"{shard!r} ({type(e).__name__}: {e.strerror})")
            continue
        if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
            continue
        what = (f"{st.st_size} bytes, {size} when indexed" if st.st_size != size else
                f"modified at {st.st_mtime_ns} ns, {mtime_ns} when indexed; same size")
        raise DataSourceError(f"data.source: tar shard {shard!r} changed since it was indexed into {cache} ({what}): "
                              f"the index would read other bytes at its members' offsets; delete {cache} and the "
                              f"next run indexes data.source again") from None
    if unreachable:
        log.warning("data.source: %d tar shard(s) indexed into %s cannot be opened now; their images will be "
                    "skipped as unreadable: %s", len(unreachable), cache, ", ".join(unreachable[:5])
                    + (", ..." if len(unreachable) > 5 else ""))


def open_index(meta: dict, cache: str | os.PathLike, *, digits_size: int = 32, digits_split: str = "train",
               synthetic_count: int = 1_281_167, synthetic_size: tuple[int, int] = (256, 256),
               seed: int = 0, max_bytes: int = 0) -> ImageSource:
    """The source of an index that :func:`build_index` described in ``meta``. The keywords shape the built-in
    sources: ``digits_*`` the digits, ``synthetic_*`` and ``seed`` (the run's) the synthetic images;
    ``max_bytes`` (``data.max_image_bytes``, 0 = no limit) is the largest image file or tar member that the
    sources of files read (a larger one is refused unread, as an unreadable file)."""
    check_max_bytes(max_bytes)
    cache = Path(cache)
    fmt = meta["format"]
    _check_index_files(meta, cache)  # every process: the one that built the index may not share this disk
    if fmt == "digits":
        from .digits import digits_images
        return TensorSource(digits_images(digits_size, digits_split), label="digits")
    if fmt == "synthetic":
        from .synthetic import SyntheticSource
        return SyntheticSource(synthetic_count, synthetic_size, seed)
    if fmt in ("folder", "list"):
        return FileSource(StringList(cache / "images.txt", cache / "images.offsets.npy"), meta.get("root", ""),
                          max_bytes)
    return TarSource(meta["shards"], MappedArray(cache / "shard_id.npy"), MappedArray(cache / "offset.npy"),
                     MappedArray(cache / "size.npy"), StringList(cache / "members.txt", cache / "members.offsets.npy"),
                     max_bytes)


def open_source(source: str, fmt: str = "auto", cache: Optional[str | os.PathLike] = None, *, workers: int = 0,
                exclude: str = "", **kw) -> ImageSource:
    """Index (if needed) and open ``source`` in one process (tests, ``seer data check``); ``workers`` and
    ``exclude`` as :func:`build_index`'s, the keywords (``max_bytes``, ...) :func:`open_index`'s."""
    import tempfile
    if cache is None:
        cache = tempfile.mkdtemp(prefix="seer-index-")
    return open_index(build_index(source, fmt, cache, workers=workers, exclude=exclude), cache, **kw)
