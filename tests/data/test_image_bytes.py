"""data.max_image_bytes: an image file or tar member larger than the limit is refused before it is read (a
20 GB file named .jpg, a tar member of a huge size, read whole by every worker that met it, could exhaust
memory and kill the run), and counts as an unreadable file with the reason, as a corrupt one does."""
import os
import re
import tarfile

import pytest

from seer.config import CropsConfig, DataConfig
from seer.data import DataError, DecodedDataset, TrainData, open_source
from seer.data import sources
from seer.data.check import check_dataset
from seer.data.dedup import dedup_source
from tests.images import image_bytes, write_good_images

CROPS = CropsConfig(global_size=32, local_count=2, local_size=16)
LIMIT = DataConfig.max_image_bytes
BIG = LIMIT + 4096  # a sparse file or member: no disk, and, refused unread, no memory either


def _sparse_file(path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def _sparse_shard(path, members) -> str:
    """A tar shard of ``members``, (name, bytes or an int: a member of that many zero bytes, left a hole in
    the file), as tar writes it."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf(tarfile.GNU_FORMAT))
            if isinstance(data, int):
                f.seek(-(-data // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, os.SEEK_CUR)
            else:
                f.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return str(path)


def test_the_default_is_512_mib():
    assert DataConfig().max_image_bytes == 512 * 2**20


def test_a_file_over_the_limit_in_a_folder_is_refused_unread_and_skipped_as_unreadable(tmp_path):
    root = tmp_path / "data"
    write_good_images(root, 3, nested=False)
    big = _sparse_file(root / "video.jpg", BIG)
    src = open_source(str(root), max_bytes=LIMIT)
    i = [src.name(k) for k in range(len(src))].index(big)
    reason = f"{BIG} bytes exceed data.max_image_bytes={LIMIT} (not read)"
    with pytest.raises(ValueError, match=rf"^{re.escape(reason)}$"):
        src.read(i)
    image, skipped = DecodedDataset(src, max_pixels=10**8)[(0, i)]  # replaced by the next image, named
    assert image.shape[0] == 3 and [(s.name, s.reason) for s in skipped] == [(big, f"ValueError: {reason}")]
    report = check_dataset(str(root), workers=0, max_bytes=LIMIT)
    assert report.ok == 3 and report.bad == [(big, f"ValueError: {reason}")]
    # Only such files: the source itself is wrong, as with any unreadable files.
    only = tmp_path / "only"
    only.mkdir()
    _sparse_file(only / "a.png", BIG)
    with pytest.raises(DataError, match=rf"all 1 images of data\.source are unreadable.*ValueError: "
                                        rf"{re.escape(reason)}"):
        DecodedDataset(open_source(str(only), max_bytes=LIMIT), max_pixels=10**8)[(0, 0)]


def test_the_limit_is_inclusive_and_0_is_none(tmp_path):
    data = image_bytes(0)
    (tmp_path / "a.png").write_bytes(data)
    assert open_source(str(tmp_path), max_bytes=len(data)).read(0) == data
    with pytest.raises(ValueError, match=rf"^{len(data)} bytes exceed data\.max_image_bytes={len(data) - 1} "):
        open_source(str(tmp_path), max_bytes=len(data) - 1).read(0)
    assert open_source(str(tmp_path), max_bytes=0).read(0) == data
    with pytest.raises(ValueError, match=r"max_bytes must be an integer >= 0 \(bytes; 0 = no limit\), got -1"):
        open_source(str(tmp_path), max_bytes=-1)


@pytest.mark.skipif(not os.path.isfile("/proc/self/cmdline"), reason="needs Linux's /proc")
def test_a_file_whose_size_is_not_known_beforehand_is_read_up_to_the_limit_only(monkeypatch):
    """fstat gives 0 bytes for the files of /proc (and of some FUSE mounts), as for a file that grows after
    the check: at most limit + 1 bytes are read, in chunks (one read of a large limit allocates it whole)."""
    path = "/proc/self/cmdline"
    assert os.stat(path).st_size == 0
    with open(path, "rb") as f:
        whole = f.read()
    monkeypatch.setattr(sources, "READ_CHUNK", 7)
    assert sources.read_regular_file(path, len(whole)) == whole
    with pytest.raises(ValueError, match=rf"^more than {len(whole) - 1} bytes \(the file grew while it was read, "
                                         rf"or its size was not known beforehand\) exceed data\.max_image_bytes"):
        sources.read_regular_file(path, len(whole) - 1)
    assert sources.read_regular_file(path, 10**15) == whole  # (no allocation of the limit)


def test_a_tar_member_over_the_limit_is_refused_from_its_header_without_reading_the_shard(tmp_path):
    good = image_bytes(1, fmt="JPEG")
    shard = _sparse_shard(tmp_path / "a.tar", [("0.jpg", good), ("1.jpg", BIG), ("2.png", image_bytes(2))])
    assert os.path.getsize(shard) > BIG
    src = open_source(shard, max_bytes=LIMIT)
    assert [src.name(i).rpartition(":")[2] for i in range(len(src))] == ["0.jpg", "1.jpg", "2.png"]
    assert src.read(0) == good
    # Cut where the member's bytes start: had the member been read, the missing bytes would be the error.
    os.truncate(shard, int(src.offset[1]))
    reason = f"{BIG} bytes exceed data.max_image_bytes={LIMIT} (not read)"
    with pytest.raises(ValueError, match=rf"^{re.escape(reason)}$"):
        src.read(1)
    src.max_bytes = 0  # no limit: read, as before the limit
    with pytest.raises(OSError, match="the shard ends .* into this member"):
        src.read(1)


def test_a_tar_member_over_a_small_limit_is_reported_by_data_check_and_dedup(tmp_path):
    members = [("a.png", image_bytes(0)), ("b.png", image_bytes(0)), ("c.png", image_bytes(3, (64, 64)))]
    shard = _sparse_shard(tmp_path / "s.tar", members)
    big = len(members[2][1])
    limit = big - 1
    assert len(members[0][1]) <= limit  # (c.png is the larger image)
    report = check_dataset(shard, workers=0, max_bytes=limit)
    reason = f"ValueError: {big} bytes exceed data.max_image_bytes={limit} (not read)"
    assert report.ok == 2 and report.bad == [(f"{shard}:c.png", reason)]
    res = dedup_source(shard, report=str(tmp_path / "dups.tsv"), workers=0, max_bytes=limit)
    assert (res.unreadable, res.groups.duplicates) == (1, 1)
    assert f"#unreadable\t{shard}:c.png\t{reason}\n" in (tmp_path / "dups.tsv").read_text()


def test_training_skips_files_over_data_max_image_bytes(tmp_path):
    write_good_images(tmp_path / "data", 4, nested=False)
    big = _sparse_file(tmp_path / "data" / "video.png", BIG)
    data = TrainData(DataConfig(source=str(tmp_path / "data"), batch_size=5, num_workers=0, crops=CROPS),
                     seed=0, cache=tmp_path / "index")
    try:
        crops, skipped = data.next()
    finally:
        data.close()
    assert crops[0].shape[0] == 5
    assert [(s.name, s.reason) for s in skipped] == \
        [(big, f"ValueError: {BIG} bytes exceed data.max_image_bytes={LIMIT} (not read)")]
