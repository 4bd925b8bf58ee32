"""``seer data dedup SOURCE``: find images whose encoded bytes are identical, keep the first of each group.

Every image is read through the sources training uses (:func:`seer.data.sources.open_source`: a folder, a list
file, tar shards), in DataLoader worker processes as ``seer data check`` does, and hashed: SHA-256 of its
bytes, truncated to its first 128 bits (:data:`DIGEST_BYTES`). Two images are duplicates when their digests
are equal. With b = 128 bits the chance that any two of N different files share a digest is at most
N^2 / 2^(b+1): 1.5e-21 for N = 10^9, far below the rate of undetected disk or memory errors, so equal digests
are taken as equal bytes without comparing the files. SHA-256 rather than BLAKE2b: OpenSSL computes it with
the CPU's SHA instructions (x86 SHA-NI, ARMv8 crypto), 1.9 GB/s against BLAKE2b's 1.0 GB/s on the 2-core
development machine, both well above what storage delivers per core; and anyone can check a digest with
``sha256sum``. An image that cannot be read (missing, no permission, a shard cut short, larger than
``data.max_image_bytes``: not read) is reported, not fatal, and is neither kept nor a duplicate. Nothing is
decoded: a file that is not an image is hashed like any other (``seer data check`` finds those).

Grouping holds no Python object per image: the digests are an (N, 16) uint8 array, viewed as 16-byte void
scalars and sorted with a stable argsort, so equal digests form runs in which the images keep their source
order; the first of each run is kept. While reading, 17 bytes per image (its digest and a readable flag); while
grouping, about 36 more at the peak (the permutation, the run starts, the per-image root index): 10^7 digests
group in 5.7 s with 347 MiB beyond their 153 MiB on the 2-core development machine, so 10^8 images take about
5 GB and a minute, 10^9 about 50 GB.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .dataset import _reason
from .dedup_files import DedupResult, Groups, cell, check_outputs, groups_from_roots, write_keep_list, write_report
from .sources import BUILT_IN, DataSourceError, check_max_bytes, detect_format, open_source, tar_shards
from .workers import check_timeout, loader_timeout, next_batch

log = logging.getLogger("seer.data")

DIGEST_BYTES = 16  # the first 128 bits of SHA-256 (module doc)
HASH_BATCH = 256  # images per DataLoader item: one IPC message per batch, not per image
PROGRESS_EVERY_S = 60.0
SHOWN_UNREADABLE = 20  # unreadable files printed with the summary (all are in the report)


def digest(data: bytes) -> bytes:
    """The 16-byte digest of an image's encoded bytes (module doc)."""
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def check_source_format(source: str, fmt: str) -> str:
    """The format of ``source`` (``fmt`` or detected), refusing the built-in sets (nothing read to compare)."""
    if fmt not in ("auto", "folder", "list", "tar"):
        raise ValueError(f"--format must be one of auto, folder, list, tar, got {fmt!r}")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt in BUILT_IN:
        raise DataSourceError(f"data.source {source!r} is a built-in set made in memory, not files to deduplicate; "
                              f"for a folder of that name, give it as './{source}'")
    return fmt


def group_digests(digests: np.ndarray, ok: Optional[np.ndarray] = None, chunk: int = 1 << 20) -> Groups:
    """:class:`Groups` of the rows of ``digests`` (N, DIGEST_BYTES) uint8 that are equal, among those where
    ``ok`` (default: all); the lowest index of each group is kept, rows not ``ok`` are neither kept nor grouped.
    ``chunk``: rows compared at a time (bounds the temporary copies)."""
    n = len(digests)
    ok = np.ones(n, bool) if ok is None else ok
    idx = np.flatnonzero(ok)
    keys = np.ascontiguousarray(digests).view(np.dtype((np.void, digests.shape[1]))).ravel()
    if len(idx) < n:
        keys = keys[idx]
    order = np.argsort(keys, kind="stable")  # equal digests: a run in ascending index, so its first is the earliest
    m = len(order)
    start = np.ones(m, bool)  # whether sorted position p starts a run
    for c in range(1, m, chunk):
        e = min(m, c + chunk)
        start[c:e] = keys[order[c:e]] != keys[order[c - 1:e - 1]]
    del keys
    order = idx[order]  # the image at each sorted position
    del idx
    first = np.arange(m)  # becomes: the position where p's run starts, per sorted position p
    first[~start] = 0
    np.maximum.accumulate(first, out=first)
    root = np.arange(n)
    root[order] = order[first]
    return groups_from_roots(root, keep=ok & (root == np.arange(n)))


def dedup_source(source: str, *, out: Optional[str] = None, report: Optional[str] = None, fmt: str = "auto",
                 workers: int = 4, timeout_s: float = DataConfig.timeout_s, overwrite: bool = False,
                 exclude: str = "", max_bytes: int = DataConfig.max_image_bytes) -> DedupResult:
    """Exact duplicates of ``source`` (module doc): write KEEP.txt to ``out`` and/or the report to ``report``
    (:mod:`seer.data.dedup_files`). A tar source takes no ``out``: its members are not files a list can name;
    its report, given to ``data.exclude``, leaves the duplicates out of training. ``exclude``: images left out
    before hashing, as ``data.exclude`` leaves them out (e.g. the report of an earlier pass). ``max_bytes``:
    a larger file is unreadable, not read, as training skips it (``data.max_image_bytes``; 0 = no limit)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be an integer >= 0, got {workers!r}")
    check_timeout(timeout_s, "--timeout-s")
    check_max_bytes(max_bytes, "--max-image-bytes")
    fmt = check_source_format(source, fmt)
    if out is not None and fmt == "tar":
        raise ValueError("--out: the images of tar shards are members inside the shards, which a list file (whose "
                         "entries are opened as files) cannot name; give --report DUPS.tsv alone, which names them "
                         "as SHARD:MEMBER, and train with data.exclude=DUPS.tsv to leave the duplicates out")
    check_outputs(out, report, overwrite, inputs=lambda: _inputs(source, fmt, exclude))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seer-index-") as cache, \
            tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape") as spill:
        src = open_source(source, fmt, cache, exclude=exclude, max_bytes=max_bytes)
        digests, ok, shown = _hash_all(src, workers, timeout_s, spill)
        if len(ok) and not ok.any():  # (an empty KEEP.txt would only fail later, as a source without images)
            first = f" (the first: {shown[0][0]}: {shown[0][1]})" if shown else ""
            raise DataSourceError(f"data.source {source!r}: none of its {len(ok)} images could be read{first}; "
                                  f"nothing was written")
        groups = group_digests(digests, ok)
        del digests
        res = DedupResult(len(src), groups, int(len(ok) - ok.sum()), shown=shown)
        if out is not None:
            write_keep_list(out, src.name, groups, overwrite=overwrite)
        if report is not None:
            spill.seek(0)
            write_report(report, src.name, groups, overwrite=overwrite, extra=spill)
    res.seconds = time.perf_counter() - t0
    return res


def _inputs(source: str, fmt: str, exclude: str) -> list[tuple[str, str]]:
    """The files dedup_source reads that an output must not replace: a list file, the tar shards, --exclude."""
    source = os.path.expanduser(source)
    files = [("SOURCE", source)] if fmt == "list" else [("a shard of SOURCE", s) for s in tar_shards(source)] \
        if fmt == "tar" else []
    return files + ([("the --exclude file", os.path.expanduser(exclude))] if exclude else [])


def _hash_all(src, workers: int, timeout_s: float, spill) -> tuple[np.ndarray, np.ndarray, list]:
    """(digests (N, DIGEST_BYTES), readable mask (N,), the first unreadable (name, reason)); every unreadable
    file's report line goes to ``spill`` as it comes (not held in memory)."""
    n = len(src)
    digests = np.zeros((n, DIGEST_BYTES), np.uint8)
    ok = np.ones(n, bool)
    shown: list = []
    loader = DataLoader(_HashBatches(src), batch_size=None, num_workers=workers, collate_fn=_as_is,
                        timeout=loader_timeout(timeout_s, workers))
    it = iter(loader)
    t0 = time.perf_counter()
    report_at = t0 + PROGRESS_EVERY_S
    for k in range(len(loader)):
        lo, got, bad = next_batch(it, timeout_s, setting="--timeout-s",
                                  where=f"images {k * HASH_BATCH + 1}-{min((k + 1) * HASH_BATCH, n)} of {n}")
        digests[lo:lo + len(got)] = got
        for i, why in bad:
            ok[i] = False
            name = src.name(i)
            spill.write(f"#unreadable\t{cell(name)}\t{why}\n")
            if len(shown) < SHOWN_UNREADABLE:
                shown.append((name, why))
        if time.perf_counter() >= report_at:
            report_at += PROGRESS_EVERY_S
            log.info("seer data dedup: hashed %d of %d images in %.0f s", lo + len(got), n, time.perf_counter() - t0)
    return digests, ok, shown


class _HashBatches(Dataset):
    """Item k: (first index, digests of images [k*B, (k+1)*B), [(index, reason) of the unreadable ones])."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return -(-len(self.source) // HASH_BATCH)

    def __getitem__(self, k: int):
        lo = k * HASH_BATCH
        hi = min(len(self.source), lo + HASH_BATCH)
        out = np.zeros((hi - lo, DIGEST_BYTES), np.uint8)
        bad = []
        for i in range(lo, hi):
            try:
                out[i - lo] = np.frombuffer(digest(self.source.read(i)), np.uint8)
            except Exception as e:  # anything a read can raise: reported, as training skips such files
                bad.append((i, _reason(e)))
        return lo, out, bad


def _as_is(item):  # module-level: workers started by forkserver or spawn pickle it
    return item
