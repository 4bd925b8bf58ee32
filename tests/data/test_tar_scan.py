"""The header scanner (seer.data.tarscan) indexes tar shards exactly as the tarfile-based reader did: the
same members, offsets, sizes, names and order, the same warnings, the same errors; a shard it does not
handle falls back to tarfile. Compared on a fixed set of tricky archives and on fresh random ones each run."""
import logging
import os
import random
import tarfile

import pytest

from seer.data import tarscan
from seer.data.sources import DataSourceError, index_tar_shards

BLOCK = tarfile.BLOCKSIZE
INDEX_FILES = ("members.txt", "members.offsets.npy", "shard_id.npy", "offset.npy", "size.npy")


def _member(name, data=b"", fmt=tarfile.GNU_FORMAT, **attrs) -> bytes:
    """One member's header block(s) and padded data, as tarfile writes it."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(fmt) + data + b"\0" * (-len(data) % BLOCK)


def _header(name="a.jpg", size=0, kind=b"0", fields=None) -> bytearray:
    """A ustar header, ``fields`` (offset -> bytes) written over it, the checksum recomputed."""
    h = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT))
    h[124:136] = b"%011o\0" % size
    h[156:157] = kind
    for offset, value in (fields or {}).items():
        h[offset:offset + len(value)] = value
    return _rechecksum(h)


def _rechecksum(h: bytearray, signed=False) -> bytearray:
    h[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in h)
    h[148:156] = b"%06o\0 " % total
    return h


def _pax(records: dict, kind=b"x") -> bytes:
    """A pax header ('x', 'X' or 'g') and its records "<length> <key>=<value>\\n"."""
    body = b""
    for key, value in records.items():
        rest = f" {key}={value}\n".encode()
        n = len(rest) + len(str(len(rest)))
        n = len(rest) + len(str(n))  # the length counts its own digits
        body += str(n).encode() + rest
    return bytes(_header("././@PaxHeader", len(body), kind)) + body + b"\0" * (-len(body) % BLOCK)


def _data(n, seed=0) -> bytes:
    return random.Random(seed).randbytes(n)


def _end(garbage=b"") -> bytes:
    return b"\0" * (2 * BLOCK) + garbage


def _run(cache, shards, fast: bool, caplog, monkeypatch):
    """(index files, error, warnings) of index_tar_shards with the scanner or with tarfile only."""
    monkeypatch.setattr(tarscan, "usable", (lambda: True) if fast else (lambda: False))
    cache.mkdir()
    caplog.clear()
    error = None
    with caplog.at_level(logging.WARNING, logger="seer.data"):
        try:
            index_tar_shards(shards, cache)
        except DataSourceError as e:
            error = str(e)
    files = None if error else {name: (cache / name).read_bytes() for name in INDEX_FILES}
    return files, error, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _reference_members(path):
    with tarfile.open(path, "r:") as tf:
        return [(m.name, m.type, m.linkname if m.islnk() or m.issym() else "", m.offset_data, m.size) for m in tf]


def _scanned_members(path):
    return [(m.name, m.type, m.linkname, m.offset_data, m.size) for m in tarscan.scan(path)]


def _compare(tmp_path, caplog, monkeypatch, shards, label=""):
    """The index from the scanner equals the one from tarfile alone; returns whether the scanner read every
    shard itself (no fallback)."""
    for shard in shards:  # member by member where the scanner reads the shard
        try:
            scanned = _scanned_members(shard)
        except tarscan.Unhandled:
            continue
        assert scanned == _reference_members(shard), f"{label} {shard}"
    key = len(list(tmp_path.glob("idx-*")))
    ours = _run(tmp_path / f"idx-{key}-fast", shards, True, caplog, monkeypatch)
    ref = _run(tmp_path / f"idx-{key}-ref", shards, False, caplog, monkeypatch)
    assert ours == ref, label
    return ours


def _handled(path) -> bool:
    try:
        tarscan.scan(str(path))
        return True
    except tarscan.Unhandled:
        return False


def _write(path, *parts) -> str:
    path.write_bytes(b"".join(parts))
    return str(path)


# Archives the scanner reads itself (no fallback).
def _tricky_handled(d):
    long_dir = "d" * 60 + "/" + "e" * 60
    yield "gnu", _write(d / "gnu.tar",
                        _member("folder/", type=tarfile.DIRTYPE), _member("folder/000123/abc.jpg", _data(700)),
                        _member("folder/000123/abc.json", b"{}"), _member("folder/000123/abc.cls", b"3"),
                        _member(f"{long_dir}/{'n' * 120}.jpg", _data(1500, 1)),  # GNU 'L'
                        _member(f"{long_dir}/{'n' * 120}.json", b"{}"),
                        _member("short.jpg", type=tarfile.SYMTYPE, linkname=f"{long_dir}/{'n' * 120}.jpg"),  # 'K'
                        _member("hard.png", type=tarfile.LNKTYPE, linkname="folder/000123/abc.jpg"),
                        _member("empty.jpg"), _member("empty.json"),
                        _member("dev.jpg", type=tarfile.CHRTYPE), _member("fifo.png", type=tarfile.FIFOTYPE),
                        _member("x" * 99 + ".jpg", _data(10, 2)),  # 103 bytes: just past the name field
                        _member("big-uid.jpg", _data(512, 3), uid=1 << 40, gid=3_000_000_000),  # base-256
                        _end())
    yield "pax", _write(d / "pax.tar",
                        _member("folder", fmt=tarfile.PAX_FORMAT, type=tarfile.DIRTYPE),
                        _member(f"{long_dir}/{'p' * 150}.jpg", _data(900, 4), tarfile.PAX_FORMAT),  # path=
                        _member("s.jpg", fmt=tarfile.PAX_FORMAT, type=tarfile.SYMTYPE, linkname="l" * 130),
                        _member("ü/naïve.jpg", _data(64, 5), tarfile.PAX_FORMAT),  # a non-ASCII name: path=
                        _member("c.jpg", _data(100, 6), tarfile.PAX_FORMAT, pax_headers={"comment": "hi=there"}),
                        _member("t.jpg", _data(100, 7), tarfile.PAX_FORMAT, mtime=1.5),  # mtime=1.5
                        _end(b"garbage after the end of the archive" * 40))
    yield "ustar", _write(d / "ustar.tar",
                          _member(f"{long_dir}/{'u' * 90}.jpg", _data(300, 8), tarfile.USTAR_FORMAT),  # prefix
                          _member(f"{long_dir}/sub/", fmt=tarfile.USTAR_FORMAT, type=tarfile.DIRTYPE),
                          _member("v7dir/", fmt=tarfile.USTAR_FORMAT, type=tarfile.AREGTYPE),  # a V7 folder
                          _member("cont.jpg", _data(50, 9), tarfile.USTAR_FORMAT, type=tarfile.CONTTYPE),
                          _member("odd.jpg", _data(70, 10), tarfile.USTAR_FORMAT, type=b"V"),  # unknown: data
                          _member("dir-with-size.jpg", fmt=tarfile.USTAR_FORMAT, type=tarfile.DIRTYPE, size=700),
                          # a folder named '/' under a prefix: tarfile strips the slash again after joining
                          bytes(_header("x", 0, tarfile.DIRTYPE, fields={0: b"/" + bytes(99), 345: b"pre/fix"})),
                          _end())
    # the pax size replaces the header's (0 here: the data is skipped by the pax size), 'X' as 'x', a global
    # header ('g', as git archive writes), several headers before one member (the first in the file wins)
    yield "pax-size", _write(d / "pax-size.tar",
                             _pax({"comment": "git commit"}, b"g"),
                             _pax({"size": "1000"}), bytes(_header("sized.jpg", 0)), _data(1000, 11), bytes(24),
                             _pax({"path": "solaris.jpg"}, b"X"), bytes(_header("ignored.jpg", 20)), _data(20),
                             bytes(492),
                             _pax({"path": "outer.jpg"}), _member("L" * 120 + ".jpg", _data(30, 12)),
                             _pax({"path": "trailing/", "linkpath": "sized.jpg"}),
                             bytes(_header("x", 0, tarfile.SYMTYPE)),
                             _end())
    # number fields as old tars wrote them: spaces around the digits, no NUL, all NULs
    old = _header("old.jpg", 5, fields={100: b"   644 \0", 108: b"  1750 \0", 136: b"14000000000 ", 329: bytes(8)})
    signed = _header("\u00e9t\u00e9.jpg", 5)
    yield "old-fields", _write(d / "old.tar", bytes(old), _data(5), bytes(507),
                               bytes(_rechecksum(signed, signed=True)), _data(5), bytes(507), _end())
    # no end-of-archive blocks: tarfile ends at the end of the file
    yield "no-end", _write(d / "no-end.tar", _member("a.jpg", _data(600, 13)), _member("b.jpg", _data(1024, 14)))
    yield "empty-archive", _write(d / "empty-archive.tar", _end())


# Archives the scanner leaves to tarfile: the index must still be the same (these are the reference's
# results: errors, early ends).
def _tricky_fallback(d):
    good = _member("a.jpg", _data(600, 15)) + _member("b.jpg", _data(700, 16))
    yield "truncated-last-member", _write(d / "trunc.tar", good, _member("c.jpg", _data(900, 17))[:BLOCK + 300])
    yield "truncated-padding", _write(d / "trunc-pad.tar", good[:-10])
    yield "truncated-header", _write(d / "trunc-header.tar", good, b"\1" * 100)
    bad = bytearray(_member("c.jpg", _data(10)))
    bad[0] ^= 1  # the checksum no longer matches: tarfile ends the shard there, without a word
    yield "bad-checksum-middle", _write(d / "bad-mid.tar", good, bytes(bad), _member("d.jpg", _data(5)), _end())
    yield "bad-checksum-first", _write(d / "bad-first.tar", bytes(bad), good, _end())
    yield "empty-file", _write(d / "empty.tar")
    yield "short-file", _write(d / "short.tar", b"not a tar")
    yield "longname-at-end", _write(d / "l-end.tar", good, _member("n" * 200 + ".jpg")[:2 * BLOCK], _end())
    yield "pax-at-end", _write(d / "x-end.tar", good, _pax({"path": "a.jpg"}), _end())
    weird = _header("weird.jpg", 5, fields={100: b"+0644\0\0\0"})  # int() reads '+0644', tarfile too
    yield "plus-sign", _write(d / "plus.tar", good, bytes(weird), _data(5), bytes(507), _end())
    yield "pax-size-not-digits", _write(d / "pax-bad-size.tar", _pax({"size": " 12"}),
                                        bytes(_header("s.jpg", 12)), _data(12), bytes(500), _end())
    yield "global-path", _write(d / "g-path.tar", _pax({"path": "all.jpg"}, b"g"), good, _end())
    yield "pax-garbage", _write(d / "pax-garbage.tar", bytes(_header("h", 10, b"x")), b"10 a=b\nxyz",
                                bytes(502), good, _end())


def test_tricky_archives_index_as_with_tarfile(tmp_path, caplog, monkeypatch):
    for name, shard in _tricky_handled(tmp_path):
        assert _handled(shard), name  # the scanner reads it: the comparison below tests the scanner
        files, error, _ = _compare(tmp_path, caplog, monkeypatch, [shard], name)
        assert error is None, name
    for name, shard in _tricky_fallback(tmp_path):
        assert not _handled(shard), name
        _compare(tmp_path, caplog, monkeypatch, [shard], name)
    # all of them as the shards of one source
    (tmp_path / "all").mkdir()
    _compare(tmp_path, caplog, monkeypatch, [s for _, s in _tricky_handled(tmp_path / "all")], "all")


def test_the_fixed_set_covers_what_it_claims(tmp_path):
    """The tricky archives hold what they are meant to (a test of the test)."""
    shards = dict(_tricky_handled(tmp_path))
    with open(shards["gnu"], "rb") as f:
        raw = f.read()
    kinds = {raw[i + 156:i + 157] for i in range(0, len(raw), BLOCK)}
    assert {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK} <= kinds
    assert b"\x80" in raw  # a base-256 number
    names = [m[0] for m in _reference_members(shards["pax-size"])]
    assert names == ["sized.jpg", "solaris.jpg", "outer.jpg", "trailing"]
    assert [m[4] for m in _reference_members(shards["pax-size"])][0] == 1000
    assert _reference_members(shards["ustar"])[2][1] == tarfile.DIRTYPE  # the V7 folder
    assert _reference_members(shards["ustar"])[-1][0] == "pre/fix"


def test_a_corrupt_shard_behaves_as_before(tmp_path, caplog, monkeypatch):
    """A shard cut inside a member is still an error naming it; a bad header after the first still ends that
    shard's members there (as tarfile does), with the other shards indexed."""
    shards = dict(_tricky_fallback(tmp_path))
    _, error, _ = _compare(tmp_path, caplog, monkeypatch, [shards["truncated-last-member"]])
    assert error and "cannot read tar shard" in error and "unexpected end of data" in error
    files, error, _ = _compare(tmp_path, caplog, monkeypatch, [shards["bad-checksum-middle"]])
    assert files["members.txt"] == b"a.jpg\nb.jpg\n"
    (tmp_path / "folder.tar").mkdir()
    for shard in (tmp_path / "missing.tar", tmp_path / "folder.tar"):  # the same OSError, from tarfile
        monkeypatch.setattr(tarscan, "usable", lambda: True)
        with pytest.raises(DataSourceError) as ours:
            index_tar_shards([str(shard)], tmp_path)
        monkeypatch.setattr(tarscan, "usable", lambda: False)
        with pytest.raises(DataSourceError) as ref:
            index_tar_shards([str(shard)], tmp_path)
        assert str(ours.value) == str(ref.value) and "Errno" in str(ours.value)


def _random_archive(rng: random.Random, path) -> str:
    """A random archive of the kinds of members and headers webdataset shards and tar tools hold."""
    fmt = rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
    names: list[str] = []
    parts = []
    if fmt == tarfile.PAX_FORMAT and rng.random() < 0.2:
        parts.append(_pax({"comment": "global"}, b"g"))
    for _ in range(rng.randint(0, 40)):
        depth = rng.choice([0, 1, 1, 2, 3])
        folder = "/".join(rng.choice(["000123", "a" * rng.randint(1, 90), "ü", "x.y", "."])
                          for _ in range(depth))
        key = rng.choice([f"{rng.getrandbits(32):08x}", "k" * rng.randint(1, 130), "s\u00e9", "a.b"])
        name = f"{folder}/{key}" if folder else key
        what = rng.random()
        try:
            if what < 0.5:
                for ext in rng.sample([".jpg", ".json", ".cls", ".mask.png", ".PNG", ""], rng.randint(1, 3)):
                    data = _data(rng.choice([0, 1, 511, 512, 513, rng.randint(0, 5000)]), rng.getrandbits(16))
                    parts.append(_member(name + ext, data, fmt))
                    names.append(name + ext)
            elif what < 0.6:
                parts.append(_member(name + rng.choice(["", "/"]), fmt=fmt, type=tarfile.DIRTYPE))
            elif what < 0.75 and names:
                parts.append(_member(name + ".jpg", fmt=fmt, type=tarfile.SYMTYPE,
                                     linkname=rng.choice([rng.choice(names), "../" + rng.choice(names), "/abs"])))
            elif what < 0.85 and names:
                parts.append(_member(name + ".jpg", fmt=fmt, type=tarfile.LNKTYPE,
                                     linkname=rng.choice([rng.choice(names), "./" + rng.choice(names), "no"])))
            elif what < 0.9:
                parts.append(_member(name + ".png", fmt=fmt, type=rng.choice([tarfile.FIFOTYPE, b"V"])))
            elif fmt == tarfile.PAX_FORMAT:
                data = _data(rng.randint(0, 1500), rng.getrandbits(16))
                parts.append(_pax({"size": str(len(data)), "path": name + ".jpg"}) +
                             bytes(_header("x.jpg", rng.choice([0, len(data)]))) + data +
                             bytes(-len(data) % BLOCK))
        except ValueError:  # a name ustar cannot hold
            continue
    archive = b"".join(parts)
    end = rng.random()
    if end < 0.6:
        archive += _end(rng.choice([b"", b"garbage" * rng.randint(1, 200)]))
    elif end < 0.75 and archive:  # cut anywhere
        archive = archive[:rng.randint(0, len(archive))]
    elif end < 0.9 and archive:  # one byte changed anywhere
        buf = bytearray(archive + _end())
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        archive = bytes(buf)
    return _write(path, archive)


def test_random_archives_index_as_with_tarfile(tmp_path, caplog, monkeypatch):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    shards = [_random_archive(rng, tmp_path / f"r{i:03d}.tar") for i in range(40)]
    handled = 0
    for shard in shards:
        _compare(tmp_path, caplog, monkeypatch, [shard], f"seed {seed}: {shard}")
        handled += _handled(shard)
    print(f"seed {seed}: the scanner read {handled} of 40 archives itself")
    assert handled >= 10, f"seed {seed}: the scanner read only {handled} of 40 archives itself"
    # several shards in one source: shard ids and the order of the merged index
    good = [s for s in shards if _handled(s)]
    _compare(tmp_path, caplog, monkeypatch, good, f"seed {seed}: all")


def test_large_members_are_skipped_not_read(tmp_path, monkeypatch):
    """The scanner reads headers, not members' data: a shard of 1 MiB members costs a read per header."""
    shard = _write(tmp_path / "big.tar", *(_member(f"{i}.jpg", bytes(1 << 20)) for i in range(8)), _end())
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(tarscan.os, "pread", lambda fd, n, pos: reads.append(n) or real_pread(fd, n, pos))
    assert _scanned_members(shard) == _reference_members(shard)
    assert sum(reads) <= 10 * tarscan.CHUNK
