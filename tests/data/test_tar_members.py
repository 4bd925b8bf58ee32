"""Tar shards with links, sparse members and other non-regular members: a member is indexed only where its
bytes can be read in place, and then they are the bytes extracting the shard gives; never other bytes."""
import logging
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from seer.data import build_index, open_index
from tests.images import image_bytes

IMG = [image_bytes(i, (24, 24), "JPEG") for i in range(4)]


def _member(name, data=b"", fmt=tarfile.GNU_FORMAT, **attrs) -> bytes:
    """One member's header block(s) and padded data, as tarfile writes it."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(fmt) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _link(name, target) -> bytes:
    return _member(name, type=tarfile.LNKTYPE, linkname=target)


def _symlink(name, target) -> bytes:
    return _member(name, type=tarfile.SYMTYPE, linkname=target)


def _write_tar(path, *members: bytes) -> str:
    path.write_bytes(b"".join(members) + b"\0" * (2 * tarfile.BLOCKSIZE))
    return str(path)


def _index(tmp_path, shard):
    cache = tmp_path / "idx"
    return open_index(build_index(shard, "tar", cache), cache)


def _names(src):
    return [src.name(i).rpartition(".tar:")[2] for i in range(len(src))]


def _extracted(shard, name) -> bytes:
    """What extracting the shard gives under ``name`` (tarfile follows links as tar does)."""
    with tarfile.open(shard) as tf:
        return tf.extractfile(name).read()


def test_hard_and_symbolic_links_read_their_targets_bytes(tmp_path, caplog):
    shard = _write_tar(
        tmp_path / "s.tar",
        _member("a.jpg", IMG[0]), _member("a.json", b"{}"),
        _link("b.jpg", "a.jpg"),                 # what tar writes for a second name of one file
        _link("c.jpg", "./a.jpg"),               # the same path, spelt differently
        _symlink("d/e.jpg", "../a.jpg"),         # relative to the link's own folder
        _symlink("d/f.png", "g/late.png"),       # a member further on: resolved once the shard is read
        _member("blob", IMG[2]), _symlink("i.jpg", "blob"),  # a target not named like an image
        _link("k.jpg", "a.jpg"), _member("k.mask.png", IMG[3]),  # the link is the sample's image, not the mask
        _member("d/g/late.png", IMG[1]),
    )
    src = _index(tmp_path, shard)
    assert _names(src) == ["a.jpg", "b.jpg", "c.jpg", "d/e.jpg", "d/f.png", "i.jpg", "k.jpg", "d/g/late.png"]
    expected = [IMG[0]] * 4 + [IMG[1], IMG[2], IMG[0], IMG[1]]
    assert [src.read(i) for i in range(len(src))] == expected
    assert all(src.read(i) == _extracted(shard, name) for i, name in enumerate(_names(src)))
    assert "cannot be read in place" not in caplog.text
    assert "'k.mask.png' after its sample's first image" in caplog.text


def test_links_that_cannot_be_resolved_are_left_out_with_a_warning(tmp_path, caplog):
    shard = _write_tar(
        tmp_path / "s.tar",
        _member("good.jpg", IMG[0]),
        # a hard link to a symbolic link: GNU tar links the symlink (read from h.jpg's folder), tarfile its target
        _symlink("d/e.jpg", "../good.jpg"), _link("h.jpg", "d/e.jpg"),
        _link("m1.jpg", "missing.jpg"),
        _link("m2.jpg", "later.jpg"),            # a hard link only names a member before it
        _symlink("m3.jpg", "/data/photo.jpg"),   # the host's file, not the shard's
        _symlink("d/m4.jpg", "../../up.jpg"),    # above the shard's root
        _symlink("m5.jpg", "m6.jpg"), _symlink("m6.jpg", "m5.jpg"),
        _member("folder", type=tarfile.DIRTYPE), _symlink("m7.jpg", "folder"),
        _symlink("k.jpg", "gone.jpg"), _member("k.mask.png", IMG[2]),  # the mask does not stand in for k.jpg
        _member("later.jpg", IMG[1]),
    )
    with caplog.at_level(logging.WARNING, logger="seer.data"):
        src = _index(tmp_path, shard)
    assert _names(src) == ["good.jpg", "d/e.jpg", "later.jpg"]
    assert [src.read(i) for i in range(len(src))] == [IMG[0], IMG[0], IMG[1]]
    assert f"9 image members of {shard} cannot be read in place" in caplog.text
    for name, why in [("h.jpg", "a hard link to the symbolic link 'd/e.jpg' (extractors differ on what it reads)"),
                      ("m1.jpg", "a hard link to 'missing.jpg', which is not a member earlier in the shard"),
                      ("m2.jpg", "a hard link to 'later.jpg', which is not a member earlier in the shard"),
                      ("m3.jpg", "a symbolic link to '/data/photo.jpg', outside the shard"),
                      ("d/m4.jpg", "a symbolic link to '../../up.jpg', outside the shard"),
                      ("m5.jpg", "a loop of symbolic links"), ("m6.jpg", "a loop of symbolic links"),
                      ("m7.jpg", "a symbolic link to 'folder': a folder"),
                      ("k.jpg", "a symbolic link to 'gone.jpg', which is not in the shard")]:
        assert f"{name!r}: {why}" in caplog.text


def _ppm_with_a_hole():
    """A PPM image whose middle rows are black: bytes 2048..10240 are zero, a hole of a sparse file."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:6], pixels[-6:] = 200, 90
    real = b"P6\n64 64\n255\n" + pixels.tobytes()
    chunks = [(0, 2048), (10240, len(real) - 10240)]
    assert not real[2048:10240].strip(b"\0")
    return real, chunks


def _old_gnu_sparse(name, real, chunks) -> bytes:
    """A GNU tar 'S' member (the sparse map in the header): what `tar --sparse --format=gnu` writes."""
    stored = b"".join(real[o:o + n] for o, n in chunks)
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"%011o\0" % len(stored)
    header[156:157] = tarfile.GNUTYPE_SPARSE
    for i, (offset, numbytes) in enumerate(chunks):
        header[386 + 24 * i:410 + 24 * i] = b"%011o\0%011o\0" % (offset, numbytes)
    header[483:495] = b"%011o\0" % len(real)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + stored + b"\0" * (-len(stored) % tarfile.BLOCKSIZE)


def _pax_sparse(name, real, chunks) -> bytes:
    """A GNU sparse 1.0 pax member (the sparse map before the data): what `tar --sparse --format=posix`
    writes."""
    stored = b"".join(real[o:o + n] for o, n in chunks)
    sparse_map = (f"{len(chunks)}\n" + "".join(f"{o}\n{n}\n" for o, n in chunks)).encode()
    data = sparse_map + b"\0" * (-len(sparse_map) % tarfile.BLOCKSIZE) + stored
    headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
               "GNU.sparse.realsize": str(len(real))}
    return _member(f"GNUSparseFile.0/{name}", data, tarfile.PAX_FORMAT, pax_headers=headers)


def test_sparse_members_are_left_out_not_read_as_wrong_bytes(tmp_path, caplog):
    real, chunks = _ppm_with_a_hole()
    shard = _write_tar(tmp_path / "s.tar", _member("a.jpg", IMG[0]), _old_gnu_sparse("s1.ppm", real, chunks),
                       _pax_sparse("s2.ppm", real, chunks), _link("l.ppm", "s1.ppm"), _member("z.jpg", IMG[1]))
    with tarfile.open(shard) as tf:  # the shard is what GNU tar writes: tarfile reads the sparse files back
        sparse = [m for m in tf if m.issparse()]
        assert [m.name for m in sparse] == ["s1.ppm", "s2.ppm"]
        assert all(tf.extractfile(m).read() == real for m in sparse)
    with caplog.at_level(logging.WARNING, logger="seer.data"):
        src = _index(tmp_path, shard)
    assert _names(src) == ["a.jpg", "z.jpg"]
    assert [src.read(i) for i in range(len(src))] == [IMG[0], IMG[1]]
    sparse_why = "a sparse member: its stored bytes are not the file's bytes in order"
    assert f"'s1.ppm': {sparse_why}" in caplog.text and f"'s2.ppm': {sparse_why}" in caplog.text
    assert f"'l.ppm': a hard link to 's1.ppm': {sparse_why}" in caplog.text


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_archives_are_left_out(tmp_path, caplog, fmt):
    tar = shutil.which("tar")
    if tar is None or "GNU tar" not in subprocess.run([tar, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("needs GNU tar")
    real, chunks = _ppm_with_a_hole()
    with open(tmp_path / "sparse.ppm", "wb") as f:  # holes where the image is zero, for tar --sparse to find
        for offset, numbytes in chunks:
            f.seek(offset)
            f.write(real[offset:offset + numbytes])
    if os.stat(tmp_path / "sparse.ppm").st_blocks * 512 >= len(real):
        pytest.skip("the file system here stores no holes")
    (tmp_path / "a.jpg").write_bytes(IMG[0])
    subprocess.run([tar, "--sparse", f"--format={fmt}", "-cf", "s.tar", "a.jpg", "sparse.ppm"], cwd=tmp_path,
                   check=True)
    with caplog.at_level(logging.WARNING, logger="seer.data"):
        src = _index(tmp_path, str(tmp_path / "s.tar"))
    assert _names(src) == ["a.jpg"] and src.read(0) == IMG[0]
    assert "'sparse.ppm': a sparse member" in caplog.text


def test_devices_and_fifos_named_like_images_are_left_out_with_a_warning(tmp_path, caplog):
    shard = _write_tar(
        tmp_path / "s.tar",
        _member("x.jpg", type=tarfile.FIFOTYPE), _member("y.png", type=tarfile.CHRTYPE),
        _member("z.bmp", type=tarfile.BLKTYPE), _member("photos.jpg", type=tarfile.DIRTYPE),
        _member("w.jpg", IMG[0]),
        _member("k.jpg", type=tarfile.FIFOTYPE), _member("k.mask.png", IMG[1]),  # the mask does not stand in
    )
    with caplog.at_level(logging.WARNING, logger="seer.data"):
        src = _index(tmp_path, shard)
    assert _names(src) == ["w.jpg"] and src.read(0) == IMG[0]
    assert ("'x.jpg': not a file (a fifo); 'y.png': not a file (a character device); "
            "'z.bmp': not a file (a block device)") in caplog.text
    assert "photos.jpg" not in caplog.text  # a folder is not an image, whatever its name
