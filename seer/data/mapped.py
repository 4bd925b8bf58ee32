"""Arrays and string lists that live in files and are mapped, never copied, into every process.

DataLoader workers that hold a Python list of a million paths each touch every string's reference count
and so copy the pages (pytorch issue 13246: memory grows by the list size per worker, for every worker).
Here a list of N strings is one bytes file plus an int64 offsets file, memory-mapped read-only; pickling
sends only the file names, and each process maps the same page cache.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, TextIO

import numpy as np

log = logging.getLogger("seer.data")


class MappedArray:
    """A read-only ``np.load(path, mmap_mode='r')`` array, opened lazily in each process."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._array: Optional[np.ndarray] = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, i):
        return self.array[i]

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path, self._array = state["path"], None


def save_array(path: str | os.PathLike, array: np.ndarray) -> MappedArray:
    """Write ``array`` atomically (temporary name, then rename) and map it."""
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)
    return MappedArray(path)


class StringList:
    """N strings stored as newline-terminated UTF-8 lines of a text file, plus their start offsets.

    ``strings[i]`` decodes line i; ``len(strings)`` is N. The text file is an ordinary list file (one entry
    per line), so an index written by :func:`write_lines` can be read, diffed or edited by hand.
    """

    def __init__(self, text_path: str | os.PathLike, offsets_path: str | os.PathLike):
        self.text_path = str(text_path)
        self.offsets = MappedArray(offsets_path)
        self._text: Optional[np.ndarray] = None

    @property
    def text(self) -> np.ndarray:
        if self._text is None:
            size = os.path.getsize(self.text_path)
            self._text = (np.memmap(self.text_path, dtype=np.uint8, mode="r") if size
                          else np.zeros(0, np.uint8))
        return self._text

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} entries")
        i %= n
        start, end = int(self.offsets[i]), int(self.offsets[i + 1]) - 1  # drop the newline
        return bytes(self.text[start:end]).decode("utf-8", errors="surrogateescape")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        return {"text_path": self.text_path, "offsets": self.offsets}

    def __setstate__(self, state):
        self.text_path, self.offsets, self._text = state["text_path"], state["offsets"], None

    @classmethod
    def from_text_file(cls, text_path: str | os.PathLike, offsets_path: str | os.PathLike) -> "StringList":
        """Index an existing list file with one entry per line (a user's file goes through
        :func:`normalise_list_file` and :func:`write_lines` instead, which drop blank lines and '#' comments)."""
        size = os.path.getsize(text_path)
        text = np.memmap(text_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        # Vectorised newline search: no Python object per line even for 10^9 lines.
        ends = np.flatnonzero(text == 10) + 1
        if size and (not len(ends) or ends[-1] != size):
            raise ValueError(f"{text_path}: the last line must end with a newline")
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        save_array(offsets_path, offsets)
        return cls(text_path, offsets_path)


def write_lines(lines: Iterable[str], text_path: str | os.PathLike, offsets_path: str | os.PathLike) -> StringList:
    """Stream ``lines`` into a list file and its offsets (both written atomically); return the mapped list."""
    tmp = f"{text_path}.tmp-{os.getpid()}"
    offsets = [0]
    chunk: list[int] = []
    pos = 0
    parts = []
    try:
        with open(tmp, "wb") as f:
            for line in lines:
                if "\n" in line:
                    raise ValueError(f"entry {line!r} contains a newline")
                data = line.encode("utf-8", errors="surrogateescape") + b"\n"
                f.write(data)
                pos += len(data)
                chunk.append(pos)
                if len(chunk) >= 1 << 16:  # flush offsets as compact arrays, not a growing Python list
                    parts.append(np.asarray(chunk, dtype=np.int64))
                    chunk = []
    except BaseException:  # the source failed part-way: leave no partial index behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    parts.append(np.asarray(chunk, dtype=np.int64))
    os.replace(tmp, text_path)
    save_array(offsets_path, np.concatenate([np.asarray(offsets, np.int64)] + parts))
    return StringList(text_path, offsets_path)


def normalise_list_file(src: str | os.PathLike, base: Optional[Path] = None) -> Iterator[str]:
    """The entries of a user's list file without blank lines or '#' comments, relative paths resolved against
    ``base``, for :func:`write_lines`. Streams line by line; the file is opened now (an unreadable one fails
    before anything is written)."""
    fin = open(src, "r", encoding="utf-8-sig", errors="surrogateescape")  # -sig: a BOM is not part of a path
    return _clean_lines(fin, base, str(src))


def _clean_lines(fin: TextIO, base: Optional[Path], src: str = "the list file") -> Iterator[str]:
    """Each entry as written, minus its line ending (\\n, \\r\\n): spaces at either end belong to the path,
    as a name that ``find`` or ``ls`` printed may hold them. Lines of spaces only and lines whose first
    non-blank character is '#' are skipped. Entries with spaces at an end are counted into one warning, the
    likely cause should such files then be missing."""
    spaced, first = 0, 0
    join = _joiner(base) if base is not None else None
    with fin:
        for number, line in enumerate(fin, 1):
            if "\x00" in line:  # a binary file (an image, a compressed archive) taken for a list of paths
                raise ValueError(f"data.source {src!r} is not a text file of image paths (line {number} holds a "
                                 f"NUL byte)")
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line
            bare = line.strip()
            if not bare or bare.startswith("#"):
                continue
            if bare != line:
                spaced, first = spaced + 1, first or number
            if base is not None and not os.path.isabs(line):
                line = join(line)
            yield line
    if spaced:
        log.warning("data.source: lines of %s with spaces at the start or end: %d (first: line %d); the spaces "
                    "are kept as part of the file name", src, spaced, first)


def _joiner(base: Path):
    """``line -> str(base / line)`` for relative ``line``, without pathlib for the usual entry.

    pathlib builds and parses two path objects per call (~2.7 us, most of the indexing time of a list file
    of relative paths: an hour per 10^9 lines). Its result is ``base + '/' + line`` exactly when ``line`` has
    no part that pathlib drops or merges: no empty part ('//', a trailing '/') and no '.' part; any other
    entry goes through pathlib, so the index holds the same strings as before."""
    if os.name != "posix":  # other separators and drive rules: pathlib throughout
        return lambda line: str(base / line)
    prefix = str(base)
    prefix = "" if prefix == "." else prefix if prefix.endswith("/") else prefix + "/"

    def join(line: str) -> str:
        if "//" in line or "/./" in line or line.startswith("./") or line.endswith(("/", "/.")) or line == ".":
            return str(base / line)
        return prefix + line
    return join
