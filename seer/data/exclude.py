"""``data.exclude``: a text file naming images to leave out of the run's data index.

An entry is an image's name as the index gives it (``ImageSource.name``): the absolute path of a file (a
folder's root or a list file's folder joined with the entry, as indexed), or ``/abs/shard.tar:MEMBER`` for a
member of a tar shard. The file is read as bytes, one entry a line, so that the outputs of seer's own tools
can be given as they are:

* a line ends at '\\n' (a '\\r' before it is dropped); a UTF-8 byte-order mark at the start is ignored;
* blank lines and lines whose first non-blank character is '#' are skipped, except
* ``#unreadable<TAB>NAME<TAB>REASON`` (``seer data dedup --report``'s unreadable files): NAME;
* any other line: its text up to the first tab, or the whole line without one. That is the name of a list
  ('NAME', as KEEP.txt), the duplicate of ``seer data dedup --report``'s 'DUP<TAB>KEPT' (the kept image stays;
  a line whose DUP is KEPT's own name, a source naming one image twice, leaves out nothing, with a warning),
  and the path of ``seer data check --report``'s and ``OUT/skipped_files.txt``'s 'PATH<TAB>REASON'.

Every name is absolute (so it starts with '/', never '#'); a relative one is an error naming its line, since
no index name could match it. The name is matched as written (bytes that are not UTF-8 as themselves, as
list files and the check report hold them) and also in the printable form the dedup report writes (such
bytes as backslash escapes, a tab as '\\t', a line feed as '\\n', a carriage return as '\\r';
:func:`seer.data.dedup_files.cell`): an image whose name holds a tab or a line break is named that way alone
(seer's reports write it so: :func:`skipped_line`), and an image whose name is another's printable form (a
literal '\\xff') would be left out with it.

Memory: no Python object per name is kept. Each name is hashed to 128 bits (BLAKE2b) and the digests are held
as two sorted uint64 arrays: 16 bytes a name, ~40 at the peak while sorting. With 128 bits the chance that
any of 10^9 indexed names shares a digest with any of 10^8 excluded ones is below 10^17 / 2^128, 3e-22.
Index names are hashed the same way in chunks and looked up with a sorted search.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from .dedup_files import cell
from .sources import DataSourceError, printable

log = logging.getLogger("seer.data")

READ_BYTES = 1 << 22  # the file is read and parsed this much at a time
CHUNK = 1 << 16  # index names hashed and looked up at a time
SHOWN = 5  # names shown in the log line about those the source does not have


def _digests(names: list[bytes]) -> np.ndarray:
    """(N, 2) uint64: the 128-bit BLAKE2b digest of each name."""
    b2 = hashlib.blake2b
    raw = b"".join([b2(n, digest_size=16).digest() for n in names])
    return np.frombuffer(raw, "<u8").reshape(-1, 2)


def _printable(name: bytes) -> bytes:
    """The name as the dedup report writes it (:func:`seer.data.dedup_files.cell`), as bytes."""
    return cell(name.decode("utf-8", "surrogateescape")).encode("utf-8")


def _has_form(name: bytes) -> bool:
    """Whether ``name``'s printable form (:func:`_printable`) differs from it."""
    return not name.isascii() or b"\t" in name or b"\n" in name or b"\r" in name


def skipped_line(name: str, reason: str) -> str:
    """'NAME<TAB>REASON\\n', a line of ``seer data check --report`` and of OUT/skipped_files.txt, which this
    module reads back to NAME: the name as its own bytes (a name that is not UTF-8 too, as list files hold
    them), except one holding a tab or a line break, which would split the line: that one in its printable
    form (:func:`seer.data.dedup_files.cell`), which is matched too. The reason on one line."""
    if "\t" in name or "\n" in name or "\r" in name:
        name = cell(name)
    return f"{name}\t{' '.join(reason.split())}\n"


class ExcludeList:
    """The names of a ``data.exclude`` file (module doc), read when constructed; :meth:`keep` and :meth:`filter`
    drop an index's names found there and count them, :meth:`finish` reports and describes the result."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        sha = hashlib.sha256()
        parts = []
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())  # before reading: a file changed meanwhile differs from it later
                for names in _entries(f, self.path, sha):
                    parts.append(_digests(names))
        except OSError as e:
            raise DataSourceError(f"data.exclude: cannot read {self.path!r} ({type(e).__name__}: {e.strerror})") \
                from None
        d = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
        del parts
        order = np.lexsort((d[:, 1], d[:, 0]))
        hi, lo = d[order, 0], d[order, 1]
        del d, order
        new = np.ones(len(hi), bool)  # first of each distinct digest (a name listed twice counts once)
        new[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self.hi, self.lo = hi[new], lo[new]
        self.hit = np.zeros(len(self.hi), bool)
        self.excluded = 0
        self.stat = {"path": self.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha.hexdigest()}

    def __len__(self) -> int:
        return len(self.hi)

    def _lookup(self, d: np.ndarray) -> np.ndarray:
        """For each digest row, the index of its name among the excluded, or -1."""
        out = np.full(len(d), -1, np.int64)
        if not len(d) or not len(self.hi):
            return out
        order = np.argsort(d[:, 0], kind="stable")  # sorted queries: the search walks the keys in order
        q = d[order, 0]
        left = np.searchsorted(self.hi, q, "left")
        right = np.searchsorted(self.hi, q, "right")
        one = np.flatnonzero(right - left == 1)
        match = one[self.lo[left[one]] == d[order[one], 1]]
        out[order[match]] = left[match]
        for k in np.flatnonzero(right - left > 1).tolist():  # excluded names sharing the first 64 bits: rare
            lo = self.lo[left[k]:right[k]]  # sorted (lexsort by hi, then lo)
            j = int(np.searchsorted(lo, d[order[k], 1]))
            if j < len(lo) and lo[j] == d[order[k], 1]:
                out[order[k]] = left[k] + j
        return out

    def keep(self, names: list[str], prefix: str = "") -> np.ndarray:
        """Bool mask over ``names`` (each index name being ``prefix + name``): True for those not excluded."""
        p = prefix.encode("utf-8", "surrogateescape")
        raw = [p + n.encode("utf-8", "surrogateescape") for n in names]
        found = self._lookup(_digests(raw))
        if _has_form(b"".join(raw)):  # some names have a printable form of their own
            rows, forms = [], []
            for i, b in enumerate(raw):
                c = _printable(b) if _has_form(b) else b
                if c != b:
                    rows.append(i)
                    forms.append(c)
            if rows:
                alt = self._lookup(_digests(forms))
                rows = np.array(rows)
                take = (found[rows] < 0) & (alt >= 0)
                found[rows[take]] = alt[take]
        hits = found[found >= 0]
        self.hit[hits] = True
        self.excluded += len(hits)
        return found < 0

    def filter(self, names: Iterable[str], prefix: str = "") -> Iterator[str]:
        """``names`` without the excluded, streamed in chunks."""
        it = iter(names)
        while True:
            chunk = [n for _, n in zip(range(CHUNK), it)]
            if not chunk:
                return
            yield from (n for n, k in zip(chunk, self.keep(chunk, prefix).tolist()) if k)

    def finish(self, source: str) -> dict:
        """Log what was left out of ``source`` and return the record for index.json. DataSourceError where the
        file names images and none of them is in the source: a report of another copy or mount of the data, or
        of files since removed, would otherwise leave out nothing without a word."""
        missing = int(len(self) - self.hit.sum())
        if len(self) and missing == len(self):
            raise DataSourceError(f"data.exclude {self.path!r} names {len(self)} images, none of which is in "
                                  f"data.source {source!r} (e.g. {', '.join(self._first_missing(SHOWN))}): names "
                                  f"must be as the index gives them, absolute paths and /abs/shard.tar:MEMBER; was "
                                  f"it written for another copy or path of the data? remove data.exclude if "
                                  f"nothing needs leaving out")
        log.info("data.exclude: left out %d images of data.source named in %s (%d names)", self.excluded,
                 self.path, len(self))
        if missing:  # a report of a larger or older copy of the data: said, not an error
            log.warning("data.exclude: %d of the %d names in %s are not images of data.source (first: %s)",
                        missing, len(self), self.path, ", ".join(self._first_missing(SHOWN)))
        return dict(self.stat, names=len(self), excluded=self.excluded, not_in_source=missing)

    def _first_missing(self, n: int) -> list[str]:
        """The first ``n`` names of the file that matched no image, printable (a second read of the file,
        stopping there)."""
        out: list[str] = []
        with open(self.path, "rb") as f:
            for names in _entries(f, self.path):
                found = self._lookup(_digests(names))
                for name, k in zip(names, found.tolist()):
                    if k < 0 or not self.hit[k]:
                        out.append(repr(printable(os.fsdecode(name))))
                        if len(out) == n:
                            return out
        return out


def _entries(f, path: str, sha=None) -> Iterator[list[bytes]]:
    """The names of an open exclude file (module doc), a list per block read; ``sha`` hashes its bytes."""
    carry, line_no, first = b"", 0, True
    same: list[int] = []  # lines naming the kept image itself (below)
    while True:
        block = f.read(READ_BYTES)
        if sha is not None:
            sha.update(block)
        if first and block.startswith(b"\xef\xbb\xbf"):
            block = block[3:]
        first = False
        lines = (carry + block).split(b"\n")
        carry = lines.pop() if block else b""
        if not block and not lines[-1]:
            lines.pop()
        names = []
        for line in lines:
            line_no += 1
            if line.endswith(b"\r"):
                line = line[:-1]
            head = line.lstrip()
            if not head:
                continue
            if head[:1] == b"#":
                if not line.startswith(b"#unreadable\t"):
                    continue
                name = line.split(b"\t", 2)[1]
            else:
                cells = line.split(b"\t")
                name = cells[0]
                if len(cells) == 2 and cells[1] == name:
                    # A dedup report's 'DUP<TAB>KEPT' where the duplicate has the kept image's own name (a list
                    # naming one file twice, a tar shard holding a member twice): names are matched, not
                    # positions, so leaving it out would leave out the kept image too, every copy of it.
                    same.append(line_no)
                    continue
            if name[:1] != b"/" and not os.path.isabs(name):  # (the test of isabs on POSIX, without its cost)
                raise DataSourceError(f"data.exclude {path!r} line {line_no}: {printable(os.fsdecode(name))!r} is "
                                      f"not an absolute path; the index names every image by its absolute path "
                                      f"(a tar member as /abs/shard.tar:MEMBER), as seer data dedup and seer "
                                      f"data check write them")
            names.append(name)
        if names:
            yield names
        if not block:
            if same and sha is not None:  # (said on the first read of the file, not again)
                log.warning("data.exclude: %d line(s) of %s (first: line %d) pair a duplicate with a kept image of "
                            "the same name (data.source names that image more than once): not left out, as that "
                            "would leave out the kept image too; the source keeps its repeated entries",
                            len(same), path, same[0])
            return


def check_unchanged(meta: dict, exclude: str, cache, *, check_file: bool = True) -> None:
    """DataSourceError naming data.exclude where the index in ``cache`` (described by ``meta``) was made with
    another exclude file than ``exclude`` ('' = none), or the file changed since. A file at another path, or
    touched, with the same bytes passes (the same images are left out). ``check_file`` False (the processes
    that only read the index rank 0 has checked): whether one was given at all, nothing read."""
    was: Optional[dict] = meta.get("exclude")  # (an index written before data.exclude existed: none)
    fix = (f"a resumed run would train on another index than its checkpoints did (the data position is an index "
           f"into it); set data.exclude back, use another output folder, or delete {cache} to index data.source "
           f"again")
    if not exclude or was is None:
        if bool(exclude) != (was is not None):
            made = f"with data.exclude={was['path']!r} ({was['excluded']} images left out)" if was else \
                "without data.exclude"
            raise DataSourceError(f"{cache} holds an index of data.source made {made}, but this config has "
                                  f"data.exclude={exclude!r}: {fix}")
        return
    if not check_file:
        return
    path = os.path.abspath(os.path.expanduser(exclude))
    try:
        st = os.stat(path)
        if path == was["path"] and (st.st_size, st.st_mtime_ns) == (was["size"], was["mtime_ns"]):
            return
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(READ_BYTES), b""):
                sha.update(block)
    except OSError as e:
        raise DataSourceError(f"data.exclude: cannot read {path!r} ({type(e).__name__}: {e.strerror})") from None
    if sha.hexdigest() != was["sha256"]:
        what = "changed since the index was made" if path == was["path"] else \
            f"differs from {was['path']!r}, which the index was made with"
        raise DataSourceError(f"data.exclude {path!r} {what} ({st.st_size} bytes, sha256 {sha.hexdigest()[:12]}...; "
                              f"then {was['size']} bytes, sha256 {was['sha256'][:12]}...): {fix}")
    log.info("data.exclude: %s holds the same bytes as %s, which the index in %s was made with", path, was["path"],
             cache)
