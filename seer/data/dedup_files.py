"""The files ``seer data dedup`` writes: KEEP.txt (a list file that ``data.source`` takes) and the report.

KEEP.txt holds one absolute path a line, in the source's order. Absolute, because a list file's relative
entries are taken from the list file's own folder (:func:`seer.data.mapped.normalise_list_file`) and the
images need not be under it; and because every name the index gives is absolute already (a folder's root
and a list file's folder are made absolute when indexed), so the line is the very string training opened.
Such a line cannot be mistaken for a '#' comment or a blank line, nor lose a byte-order mark. Names that are
not UTF-8 are written as their own bytes (surrogate escapes), as the index reads them back. A name holding a
carriage return cannot be listed (list files are read with universal newlines, which end a line there): it is
left out of KEEP.txt and counted (:attr:`Groups.unlisted`), never written as two other paths.

The report (``--report``), tab-separated, for reading and for scripts: one line ``dup_path<TAB>kept_path``
per duplicate, grouped by the kept image (groups in the order of their kept image, duplicates in source
order), then one line ``#unreadable<TAB>path<TAB>reason`` per file that could not be read. Paths are
printable there (:func:`seer.data.sources.printable`, tabs as ``\\t``, line breaks as ``\\n`` and ``\\r``): the report is not opened as paths, but
``data.exclude`` takes it as it is, matching names in that printable form too (:mod:`seer.data.exclude`: the
way to train on tar shards without their duplicates). Every data line starts with '/' (absolute paths; a tar
member is ``/abs/shard.tar:member``), so ``grep -v '^#'`` keeps the duplicate pairs.

Both files are written to a temporary name beside them and renamed into place once complete; an existing file
is replaced only with ``overwrite``, also one that appeared while the command ran (it is not replaced, and the
finished output is kept under the temporary name, named in the error), and never a file the command reads
(a list or shard of SOURCE, --exclude, FEATS.npy or FEATS.txt) nor the other output under another path.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TextIO

import numpy as np

from ..out_paths import check_file_paths
from .sources import printable

log = logging.getLogger("seer.data")


@dataclass
class Groups:
    """Duplicate groups over N images. ``keep[i]``: image i goes into KEEP.txt. ``members[bounds[g]:bounds[g+1]]``:
    group g (two images or more), its kept image first, then its duplicates in source order; groups in the order
    of their kept image. ``unlisted``: kept images left out of KEEP.txt (set when it is written)."""
    keep: np.ndarray
    members: np.ndarray
    bounds: np.ndarray
    unlisted: int = 0

    @property
    def groups(self) -> int:
        return len(self.bounds) - 1

    @property
    def duplicates(self) -> int:
        return int(self.bounds[-1]) - self.groups if len(self.bounds) else 0


@dataclass
class DedupResult:
    """What ``seer data dedup`` found: ``total`` images (rows of FEATS.npy), ``groups`` (duplicates, kept image
    first), ``unreadable`` of them not read, the first few as (name, reason) in ``shown``; near duplicates:
    ``zero_rows`` without a direction."""
    total: int
    groups: Groups
    unreadable: int = 0
    zero_rows: int = 0
    seconds: float = 0.0
    shown: list = field(default_factory=list)
    relative_to: Optional[str] = None  # near duplicates: the folder FEATS.txt's relative paths were taken from

    @property
    def kept(self) -> int:
        return int(self.groups.keep.sum())


def groups_from_roots(root: np.ndarray, keep: Optional[np.ndarray] = None) -> Groups:
    """:class:`Groups` from ``root[i]``, the index of the image that image i duplicates (itself for a kept one;
    a root is the lowest index of its group). ``keep`` defaults to ``root == arange``; pass it to leave images
    out (unreadable ones, their own roots). O(N) memory, no Python object per image."""
    n = len(root)
    own = root == np.arange(n)
    keep = own if keep is None else keep
    dup = ~own
    grouped = np.zeros(n, bool)
    grouped[root[dup]] = True  # roots with a duplicate
    nodes = np.flatnonzero(grouped[root])  # every member of such a group, ascending
    members = nodes[np.argsort(root[nodes], kind="stable")]  # by root, then index: the root (lowest) first
    r = root[members]
    bounds = np.concatenate([[0], np.flatnonzero(r[1:] != r[:-1]) + 1, [len(members)]]) if len(members) \
        else np.zeros(1, np.int64)
    return Groups(keep, members, bounds.astype(np.int64))


def check_outputs(out: Optional[str], report: Optional[str], overwrite: bool,
                  inputs: Callable[[], Iterable[tuple[str, str]]] = tuple) -> None:
    """ValueError naming the argument unless ``out`` (--out) and ``report`` (--report) can be written: at least
    one of them, not the same file, and neither one of the files this command reads (``inputs()``: (what, path)
    pairs, asked only where an output exists), not even with ``overwrite`` (checked before the work, not
    after it)."""
    if out is None and report is None:
        raise ValueError("nothing to write: give --out KEEP.txt and/or --report DUPS.tsv")
    # realpath and samefile, not abspath alone: through a linked folder or a hard link both names are one file,
    # and the report, written second, would replace KEEP.txt with --overwrite (each said to be written).
    if out is not None and report is not None and _same_file(out, report):
        raise ValueError("--out and --report name the same file")
    check_output(out, "--out", overwrite)
    check_output(report, "--report", overwrite)
    for flag, path in (("--out", out), ("--report", report)):
        if path is not None and os.path.exists(path):  # (--overwrite replaces an earlier output, never an input)
            for what, given in inputs():
                if _same_file(path, given):
                    raise ValueError(f"{flag} {path!r} is {what}, which this command reads: write to another file")


def _same_file(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (links followed), existing or not."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist: then the real paths decide)
        return False


def check_output(path: Optional[str], flag: str, overwrite: bool) -> None:
    """ValueError naming ``flag`` where ``path`` may not or cannot be written (checked before the work)."""
    if path is None:
        return
    check_file_paths(flag, path)  # (made there under a temporary name, then renamed)
    if Path(path).exists() and not overwrite:
        raise ValueError(f"{flag} {path!r} exists: pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_text(path: str, flag: str, overwrite: bool) -> Iterator[TextIO]:
    """A text file written to ``path.tmp-PID`` and renamed to ``path`` when the block ends without an error
    (removed on one). Without ``overwrite`` it is linked into place, which fails rather than replace a file
    that appeared meanwhile: ValueError naming ``flag`` and the temporary file, kept."""
    tmp = f"{path}.tmp-{os.getpid()}"
    f = open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n")
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ValueError(f"{flag} {path!r} appeared while seer data dedup ran and is not replaced without "
                         f"--overwrite; the result is in {tmp!r}") from None
    except OSError as e:  # a filesystem without hard links: the check and the rename are two steps there
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.exists(path):
            raise ValueError(f"{flag} {path!r} appeared while seer data dedup ran and is not replaced without "
                             f"--overwrite; the result is in {tmp!r}") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_keep_list(path: str, names: Callable[[int], str], groups: Groups, *, overwrite: bool) -> None:
    """KEEP.txt: the absolute path of every kept image, in source order (module doc); sets ``groups.unlisted``."""
    unlisted = 0
    with atomic_text(path, "--out", overwrite) as f:
        for i in np.flatnonzero(groups.keep).tolist():
            name = names(i)
            if not os.path.isabs(name):  # (every caller passes absolute names: a relative one would move)
                raise ValueError(f"internal error: {name!r} is not an absolute path")
            if "\r" in name:
                unlisted += 1
                log.warning("--out: leaving out %r (a carriage return in its name, which a list file cannot hold)",
                            name)
                continue
            f.write(name + "\n")
    groups.unlisted = unlisted


def cell(name: str) -> str:
    """A path as a report cell: printable, one field on one line (module doc): a tab as '\\t', a line feed as
    '\\n', a carriage return as '\\r'."""
    return printable(name).translate(_ONE_CELL)


_ONE_CELL = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def write_report(path: str, names: Callable[[int], str], groups: Groups, *, overwrite: bool,
                 extra: Iterable[str] = ()) -> None:
    """The report (module doc): the duplicate pairs, then the lines of ``extra`` (the unreadable files)."""
    m, b = groups.members, groups.bounds
    with atomic_text(path, "--report", overwrite) as f:
        for g in range(groups.groups):
            kept = cell(names(int(m[b[g]])))
            for i in m[b[g] + 1:b[g + 1]].tolist():
                f.write(f"{cell(names(i))}\t{kept}\n")
        for line in extra:
            f.write(line)
