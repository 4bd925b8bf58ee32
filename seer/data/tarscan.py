"""The members of an uncompressed tar shard from its 512-byte headers, without :mod:`tarfile`.

Indexing tar shards with ``tarfile`` costs ~22 us per member (a TarInfo object, eight octal fields and a
Python checksum loop per header): 10^9 images are hours on rank 0 while every other rank waits. This
scanner reads only the headers (each member's data is skipped by position), keeps per header the few slices
:func:`seer.data.sources.index_tar_shards` needs (name, type, link name, data offset, size) and validates
the checksums and number fields of a batch of headers at once with numpy.

It gives exactly what ``tarfile.open(shard, 'r:')`` iterated gives for those attributes, or nothing: a
shard with anything this module does not reproduce raises :class:`Unhandled`, and the caller reads that
whole shard with ``tarfile`` instead (the reference, whose errors and early ends are then the same as
before). Unhandled: a header that fails its checksum or holds a number field other than octal digits
between spaces or base-256 (tarfile ends the shard there silently, or refuses it when it is the first),
data or a header cut short by the end of the file, GNU sparse members (type 'S' or pax ``GNU.sparse.*``),
pax records that are not well formed, a global pax header that sets ``path``/``linkpath``/``size``, and a
file system encoding other than UTF-8.

Format facts used (POSIX ustar, pax, GNU tar; as ``tarfile`` reads them):

* header: name 0:100, mode 100:108, uid 108:116, gid 116:124, size 124:136, mtime 136:148, checksum 148:156,
  type 156, linkname 157:257, devmajor 329:337, devminor 337:345, prefix 345:500; text fields end at the
  first NUL; the checksum is the sum of the 512 bytes with its own field read as spaces, as unsigned or
  signed bytes; a number field is octal text or, when its first byte is 0x80 (0xff: negative), big-endian
  base-256 in the other bytes;
* an all-zero block ends the archive (what follows is never read); so does the end of the file at a header;
* the name is ``prefix + '/' + name`` when the prefix is not empty; type NUL with a name ending in '/' is a
  folder, and a folder's name loses its trailing slashes;
* a member's data, ``size`` bytes padded to 512, follows its header only for regular types ('0', NUL, '7')
  and types tarfile does not know; links, folders, devices and fifos have none, whatever their size field;
* 'L' / 'K' (GNU): the data is the next header's name / link name; 'x' / 'X' (pax): records
  ``"<len> <key>=<value>\\n"`` for the next header, ``path`` (trailing slashes dropped), ``linkpath`` and
  ``size`` replacing its fields; 'g': records for every later member. Several of these may precede one
  member; the first in the file is applied last, so it wins.
"""
from __future__ import annotations

import codecs
import os
import tarfile

import numpy as np

BLOCK = 512
_ZERO = bytes(BLOCK)
# Read size of one chunk of headers: members of a few kB share a read; a large member's data is skipped by
# reading at the next header's position, so at most this much of it is read.
CHUNK = 1 << 16
# Headers validated together (numpy); also bounds the memory held for the check.
_BATCH = 2048
# Largest 'L' / 'K' / pax data read (tarfile reads any size; larger ones here are left to it).
_MAX_EXT = 1 << 20

_REGULAR = frozenset(tarfile.REGULAR_TYPES)
_SUPPORTED = frozenset(tarfile.SUPPORTED_TYPES)
_DIR, _AREG, _LNK, _SYM = tarfile.DIRTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
_EXTENSIONS = frozenset((tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE))
# Number fields (offset, width) that tarfile parses in every header, checksum last.
_NUMBER_FIELDS = ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8), (148, 8))
_FIELD_COLUMNS = np.concatenate([np.arange(start, start + width) for start, width in _NUMBER_FIELDS])


class Unhandled(Exception):
    """The shard holds something this scanner does not reproduce: read it with ``tarfile``."""


class Member:
    """The attributes (and predicates) of ``tarfile.TarInfo`` that indexing reads."""

    __slots__ = ("name", "type", "linkname", "offset_data", "size")

    def __init__(self, name: str, type: bytes, linkname: str, offset_data: int, size: int):
        self.name, self.type, self.linkname, self.offset_data, self.size = name, type, linkname, offset_data, size

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def islnk(self) -> bool:
        return self.type == _LNK

    def issym(self) -> bool:
        return self.type == _SYM

    def isdir(self) -> bool:
        return self.type == _DIR

    def issparse(self) -> bool:
        return False  # sparse members are Unhandled


def usable() -> bool:
    """Whether names decode here as tarfile decodes them (its default encoding is the file system's)."""
    return codecs.lookup(tarfile.ENCODING).name == "utf-8"


def _text(field: bytes) -> str:
    """A NUL-terminated text field, decoded as tarfile does (UTF-8, undecodable bytes kept as escapes)."""
    end = field.find(0)
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A number field; the batch check rejects every field whose text is not what this reads."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    end = field.find(0)
    digits = (field if end < 0 else field[:end]).strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise Unhandled(f"a number field {field!r}") from None


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def check_headers(blocks: bytes) -> None:
    """Raise :class:`Unhandled` unless every 512-byte header in ``blocks`` passes tarfile's checks: each
    number field octal digits between spaces (before its first NUL) or base-256, and the checksum (octal)
    equal to the unsigned or the signed sum."""
    a = np.frombuffer(blocks, np.uint8).reshape(-1, BLOCK)
    # The number fields' bytes as rows (field byte, header): numpy then works along whole rows of headers.
    t = np.ascontiguousarray(a[:, _FIELD_COLUMNS].T)
    digit = (t - np.uint8(0x30)) < 8
    # The forms tar writes, checked in a few operations: w-1 octal digits and a NUL, empty (a NUL first), and
    # base-256; the checksum: 6 digits, a NUL and any byte. Headers with another form take the long check.
    other = np.zeros(len(a), bool)
    row = 0
    for start, width in _NUMBER_FIELDS:
        f, d = t[row:row + width], digit[row:row + width]
        row += width
        if start == 148:
            other |= ~(d[:6].all(axis=0) & (f[6] == 0))
        else:
            other |= ~((d[:-1].all(axis=0) & (f[-1] == 0)) | (f[0] == 0) | (f[0] == 0x80) | (f[0] == 0xFF))
    cs = t[-8:].astype(np.int64)
    stored = ((cs[:6] - 0x30) << np.array([15, 12, 9, 6, 3, 0])[:, None]).sum(axis=0)
    if other.any():
        stored[other] = _check_fields(t[:, other])
    unsigned = a.sum(axis=1, dtype=np.uint32).astype(np.int64) - cs.sum(axis=0) + 8 * 0x20
    bad = np.flatnonzero(stored != unsigned)
    if len(bad):  # some tars sum signed bytes
        high = (a[bad] >= 0x80).sum(axis=1) - (a[bad, 148:156] >= 0x80).sum(axis=1)
        if (stored[bad] != unsigned[bad] - 256 * high).any():
            raise Unhandled("a header with a bad checksum")


def _check_fields(t: np.ndarray) -> np.ndarray:
    """The long check of :func:`check_headers` on the number fields ``t`` (field byte, header): raise
    :class:`Unhandled` for a field tarfile may read otherwise than octal digits between spaces; return the
    checksums."""
    row = 0
    for start, width in _NUMBER_FIELDS:
        f = t[row:row + width]
        row += width
        before = np.logical_and.accumulate(f != 0, axis=0)  # the text, up to the first NUL
        digit = before & (f >= 0x30) & (f <= 0x37)
        space = before & (f == 0x20)
        # a space between two digits: int() refuses it, and so would tarfile
        inner = space & np.logical_or.accumulate(digit, axis=0) & np.logical_or.accumulate(digit[::-1], axis=0)[::-1]
        ok = (digit | space | ~before).all(axis=0) & ~inner.any(axis=0)
        if start != 148:  # base-256 numbers are always valid; a base-256 checksum is left to tarfile
            ok |= (f[0] == 0x80) | (f[0] == 0xFF)
        if not ok.all():
            raise Unhandled(f"a header with an unexpected number field at bytes {start}:{start + width}")
    # f, digit: the checksum field's
    digits_after = digit[::-1].cumsum(axis=0, dtype=np.int64)[::-1] - digit
    return np.where(digit, (f.astype(np.int64) - 0x30) << (3 * digits_after), 0).sum(axis=0)


def _pax_records(data: bytes, size: int) -> dict:
    """The records of a pax header's data (``size`` bytes, then NUL padding), strictly well formed."""
    records = {}
    pos = 0
    while pos < size:
        space = data.find(b" ", pos, pos + 24)
        length = data[pos:space]
        if space < 0 or not length.isdigit():
            raise Unhandled("a pax record without a length")
        end = pos + int(length)
        eq = data.find(b"=", space + 1, end)
        if end > size or data[end - 1] != 0x0A or eq <= space + 1:
            raise Unhandled("a malformed pax record")
        key = data[space + 1:eq]
        if key.startswith(b"GNU.sparse."):
            raise Unhandled("a GNU sparse member")
        records[key] = data[eq + 1:end - 1]
        pos = end
    if data[size:].strip(b"\0"):
        raise Unhandled("bytes after the pax records")  # tarfile would read them as more records
    return records


def _pax_overrides(records: dict) -> dict:
    """What a pax header replaces in the next member: 'path', 'linkpath', 'size'."""
    out = {}
    if b"path" in records:
        out["path"] = records[b"path"].decode("utf-8", "surrogateescape").rstrip("/")
    if b"linkpath" in records:
        out["linkpath"] = records[b"linkpath"].decode("utf-8", "surrogateescape")
    if b"size" in records:
        size = records[b"size"]
        if not size.isdigit():  # tarfile reads a size int() refuses as 0, and int() takes more than digits
            raise Unhandled(f"a pax size {size!r}")
        out["size"] = int(size)
    return out


def scan(path: str) -> list[Member]:
    """Every member of the tar file ``path`` in order, as ``tarfile`` iterates them, or :class:`Unhandled`.
    OSError as opening or reading the file gives it."""
    members: list[Member] = []
    append = members.append
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        file_size = os.fstat(fd).st_size
        if file_size < BLOCK:
            raise Unhandled("shorter than one header")  # tarfile: 'empty file' or 'truncated header'
        buf, base = b"", 0  # buf holds the file's bytes from offset base
        pos = 0
        pending: list[tuple[bytes, object]] = []  # extension headers read for the next member, in file order
        headers: list[bytes] = []
        while True:
            rel = pos - base
            if rel < 0 or rel + BLOCK > len(buf):
                if pos == file_size:  # tarfile ends here without a word (no end-of-archive blocks)
                    if pending:
                        raise Unhandled("an extension header without its member")
                    break
                if file_size - pos < BLOCK:
                    raise Unhandled("a truncated header")
                buf, base, rel = os.pread(fd, CHUNK, pos), pos, 0
                if len(buf) < BLOCK:
                    raise Unhandled("the file shrank while it was read")
            h = buf[rel:rel + BLOCK]
            if h == _ZERO:
                if pending:
                    raise Unhandled("an extension header without its member")
                break
            headers.append(h)
            if len(headers) >= _BATCH:
                check_headers(b"".join(headers))
                headers.clear()
            kind = h[156:157]
            size = -1
            if h[135] == 0:  # "%011o\0", what tar writes: the batch check rejects what int() reads otherwise
                try:
                    size = int(h[124:135], 8)
                except ValueError:
                    pass
            if size < 0:
                size = _number(h[124:136])
                if size < 0:
                    raise Unhandled("a negative size")
            data_at = pos + BLOCK
            if kind in _EXTENSIONS:
                pos = _extension(fd, kind, size, data_at, buf, base, file_size, pending)
                continue
            if kind == tarfile.GNUTYPE_SPARSE:
                raise Unhandled("a GNU sparse member")
            name = h[0:100]
            end = name.find(0)
            name = (name if end < 0 else name[:end]).decode("utf-8", "surrogateescape")
            if kind == _AREG and name.endswith("/"):
                kind = _DIR
            isdir = kind == _DIR
            if isdir:
                name = name.rstrip("/")
            if h[345]:
                name = _text(h[345:500]) + "/" + name
                if isdir:  # tarfile strips again once the prefix is joined
                    name = name.rstrip("/")
            linkname = _text(h[157:257]) if kind == _LNK or kind == _SYM else ""  # only links' are read
            has_data = kind in _REGULAR or kind not in _SUPPORTED
            skip = (size + BLOCK - 1) & -BLOCK if has_data else 0
            if pending:
                for ext, value in reversed(pending):  # innermost first: the first in the file wins
                    if ext == tarfile.GNUTYPE_LONGNAME:
                        name = value.removesuffix("/") if isdir else value
                    elif ext == tarfile.GNUTYPE_LONGLINK:
                        linkname = value
                        if isdir:
                            name = name.removesuffix("/")
                    elif ext == tarfile.XHDTYPE:
                        name = value.get("path", name)
                        linkname = value.get("linkpath", linkname)
                        if "size" in value:
                            size = value["size"]
                            skip = _padded(size) if has_data else 0
                pending.clear()
            if data_at + skip > file_size:
                raise Unhandled("a member's data cut short by the end of the file")
            append(Member(name, kind, linkname, data_at, size))
            pos = data_at + skip
        if headers:
            check_headers(b"".join(headers))
    return members


def _extension(fd: int, kind: bytes, size: int, data_at: int, buf: bytes, base: int, file_size: int,
               pending: list) -> int:
    """Read an 'L', 'K', 'x', 'X' or 'g' header's data (at ``data_at``) into ``pending``; return the
    position of the next header."""
    end = data_at + _padded(size)
    if size > _MAX_EXT or end > file_size:
        raise Unhandled("a long or cut extension header")
    data = buf[data_at - base:end - base] if end - base <= len(buf) else os.pread(fd, end - data_at, data_at)
    if kind == tarfile.GNUTYPE_LONGNAME or kind == tarfile.GNUTYPE_LONGLINK:
        pending.append((kind, _text(data)))
        return end
    records = _pax_records(data, size)
    if kind == tarfile.XGLTYPE:
        if records.keys() & {b"path", b"linkpath", b"size"}:
            raise Unhandled("a global pax header that renames or resizes members")
        pending.append((kind, None))  # a member must follow it, as one follows 'x'
    else:
        pending.append((tarfile.XHDTYPE, _pax_overrides(records)))
    return end
