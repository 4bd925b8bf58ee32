"""Data sources: recursive folders, list files, webdataset tar shards, and memory-safe path lists."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from seer.data import (DataSourceError, FileSource, TarSource, build_index, detect_format, open_index, open_source,
                       scan_folder)
from seer.data.mapped import StringList, write_lines
from tests.images import image_bytes, write_good_images


def test_folder_scan_is_recursive_sorted_and_ignores_non_images(tmp_path):
    paths = write_good_images(tmp_path, 9)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "part0" / "labels.json").write_text("{}")
    found = list(scan_folder(tmp_path))
    assert sorted(found) == sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert found == list(scan_folder(tmp_path))  # deterministic
    src = open_index(build_index(str(tmp_path), "auto", tmp_path / "idx"), tmp_path / "idx")
    assert isinstance(src, FileSource) and len(src) == 9
    assert src.read(0) == (tmp_path / found[0]).read_bytes()


def test_index_is_kept_for_the_run_and_guards_against_another_source(tmp_path):
    write_good_images(tmp_path / "a", 4)
    meta = build_index(str(tmp_path / "a"), "auto", tmp_path / "idx")
    write_good_images(tmp_path / "a" / "later", 2)  # added after indexing: not in this run's order
    assert build_index(str(tmp_path / "a"), "auto", tmp_path / "idx") == meta
    assert len(open_index(meta, tmp_path / "idx")) == 4
    write_good_images(tmp_path / "b", 2)
    with pytest.raises(DataSourceError, match="holds the index of data.source"):
        build_index(str(tmp_path / "b"), "auto", tmp_path / "idx")


def test_an_index_of_the_same_source_in_another_format_names_the_formats(tmp_path):
    """The message named the source twice ('holds the index of data.source X, not X'), not what differed."""
    write_good_images(tmp_path / "a", 2)
    build_index(str(tmp_path / "a"), "folder", tmp_path / "idx")
    with pytest.raises(DataSourceError, match="read as data.format=folder, not list: set data.format=folder"):
        build_index(str(tmp_path / "a"), "list", tmp_path / "idx")


@pytest.mark.parametrize("fmt", ["folder", "tar"])
def test_a_damaged_index_is_named_with_the_remedy(tmp_path, fmt):
    """Errors that named no file ('mmap length is greater than file size', a JSON error), or none at all:
    a truncated images.txt was read as other paths."""
    if fmt == "folder":
        write_good_images(tmp_path / "src", 4)
        source, files = str(tmp_path / "src"), ("images.txt", "images.offsets.npy")
    else:
        _write_shard(tmp_path / "s.tar", 0, 3)
        source, files = str(tmp_path / "s.tar"), ("members.txt", "members.offsets.npy", "offset.npy")
    idx = tmp_path / "idx"
    meta = build_index(source, fmt, idx)
    assert set(meta["files"]) >= set(files)
    for name in files:
        good = (idx / name).read_bytes()
        (idx / name).write_bytes(good[:len(good) - 3])
        for call in (lambda: build_index(source, fmt, idx), lambda: open_index(meta, idx)):
            with pytest.raises(DataSourceError, match=f"the data index in {idx} is damaged \\({name} has "
                                                      f"{len(good) - 3} bytes, {len(good)} when it was written\\): "
                                                      f"delete {idx}"):
                call()
        (idx / name).unlink()
        with pytest.raises(DataSourceError, match=f"damaged \\({name}: FileNotFoundError"):
            open_index(meta, idx)
        (idx / name).write_bytes(good)
    assert len(open_index(build_index(source, fmt, idx), idx)) == len(open_index(meta, idx))
    (idx / "index.json").write_text("")
    with pytest.raises(DataSourceError, match="damaged \\(index.json: JSONDecodeError"):
        build_index(source, fmt, idx)


def test_list_file_with_relative_paths_and_comments(tmp_path):
    paths = write_good_images(tmp_path / "imgs", 5, nested=False)
    lst = tmp_path / "files.txt"
    lst.write_text("# my images\n\n" + "".join(f"imgs/{p.name}\n" for p in paths[:3]) + f"{paths[4]}\n")
    assert detect_format(str(lst)) == "list"
    src = open_index(build_index(str(lst), "auto", tmp_path / "idx"), tmp_path / "idx")
    assert len(src) == 4
    assert [src.read(i) for i in range(4)] == [p.read_bytes() for p in paths[:3] + [paths[4]]]


def test_list_file_entries_keep_their_spaces(tmp_path, caplog):
    # A name with spaces at an end is a legal file name (find and ls print it so): the entry is the path as
    # written. Lines of spaces, and comments indented or not, are skipped; CRLF line endings are not names.
    imgs = tmp_path / "imgs"
    write_good_images(imgs, 1, nested=False)
    data = next(imgs.iterdir()).read_bytes()
    for name in (" lead.png", "trail.png ", "plain.png"):
        (imgs / name).write_bytes(data + name.encode())
    lst = tmp_path / "files.txt"
    lst.write_bytes(b"imgs/ lead.png\r\n   \r\n  # indented comment\nimgs/trail.png \nimgs/plain.png")
    with caplog.at_level("WARNING", logger="seer.data"):
        src = open_index(build_index(str(lst), "auto", tmp_path / "idx"), tmp_path / "idx")
    assert [src.read(i) for i in range(len(src))] == [data + n.encode() for n in (" lead.png", "trail.png ",
                                                                                   "plain.png")]
    assert "start or end: 1 (first: line 4)" in caplog.text


def _write_shard(path, start, n):
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            for ext, data in ((".jpg", image_bytes(i, (24, 24), "JPEG")), (".json", b'{"i": %d}' % i)):
                info = tarfile.TarInfo(f"sample{i:05d}{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_tar_shards_webdataset_layout(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-000.tar", 0, 3)
    _write_shard(shards / "train-001.tar", 3, 4)
    for source in (str(shards), str(shards / "train-*.tar")):
        cache = tmp_path / f"idx{abs(hash(source))}"
        src = open_index(build_index(source, "auto", cache), cache)
        assert isinstance(src, TarSource) and len(src) == 7  # image members only
        assert src.read(5) == image_bytes(5, (24, 24), "JPEG")
        assert src.name(5).endswith("train-001.tar:sample00005.jpg")
        clone = pickle.loads(pickle.dumps(src))  # as a DataLoader worker gets it
        assert clone.read(2) == image_bytes(2, (24, 24), "JPEG")


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        detect_format(str(tmp_path / "missing"))
    with pytest.raises(DataSourceError, match="data.source is empty"):
        detect_format("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="holds no images"):
        build_index(str(tmp_path / "empty"), "auto", tmp_path / "idx")


def test_path_list_pickles_as_file_names_not_contents(tmp_path):
    """Workers receive the file names only: the pickled size does not grow with the number of paths."""
    sizes = []
    for n in (10, 100_000):
        lst = write_lines((f"/data/images/{i:08d}.jpg" for i in range(n)), tmp_path / f"p{n}.txt",
                          tmp_path / f"p{n}.npy")
        assert len(lst) == n and lst[n - 1] == f"/data/images/{n - 1:08d}.jpg"
        sizes.append(len(pickle.dumps(lst)))
        clone = pickle.loads(pickle.dumps(lst))
        assert clone[n // 2] == lst[n // 2]
    assert sizes[1] < sizes[0] + 64 and sizes[1] < 1000
    # The index is an ordinary list file; indexing it again gives the same offsets.
    again = StringList.from_text_file(tmp_path / "p10.txt", tmp_path / "again.npy")
    assert list(again) == list(StringList(tmp_path / "p10.txt", tmp_path / "p10.npy"))
    assert os.path.getsize(tmp_path / "p100000.npy") < 100_000 * 8 + 1024  # 8 bytes per entry, no objects


def test_a_folder_with_images_and_a_tar_is_refused_not_guessed(tmp_path):
    write_good_images(tmp_path / "mixed", 3, nested=False)
    _write_shard(tmp_path / "mixed" / "backup.tar", 0, 1)
    with pytest.raises(DataSourceError, match=r"both image files \(e.g. 'img_0000.png'\) and .tar shards: set "
                                              "data.format"):
        detect_format(str(tmp_path / "mixed"))
    assert len(open_index(build_index(str(tmp_path / "mixed"), "folder", tmp_path / "i1"), tmp_path / "i1")) == 3
    (tmp_path / "upper").mkdir()
    _write_shard(tmp_path / "upper" / "SHARD.TAR", 0, 2)
    assert detect_format(str(tmp_path / "upper" / "SHARD.TAR")) == "tar" == detect_format(str(tmp_path / "upper"))
    # Images only in a sub-folder (the folder format reads them) were dropped for the tar without a word.
    write_good_images(tmp_path / "upper" / "photos2020" / "may", 2, nested=False)
    with pytest.raises(DataSourceError, match=r"both image files \(e.g. 'photos2020/may/img_0000.png'\) and .tar"):
        detect_format(str(tmp_path / "upper"))
    # a link loop at the top is left out (scan_folder says so), not an error about the whole folder
    (tmp_path / "loop").mkdir()
    write_good_images(tmp_path / "loop", 2, nested=False)
    (tmp_path / "loop" / "self.png").symlink_to(tmp_path / "loop" / "self.png")
    assert detect_format(str(tmp_path / "loop")) == "folder"


def test_compressed_tars_and_binary_lists_are_refused(tmp_path):
    (tmp_path / "shard.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))
    with pytest.raises(DataSourceError, match="compressed tar"):
        detect_format(str(tmp_path / "shard.tar.gz"))
    (tmp_path / "photo.bin").write_bytes(image_bytes(0))
    with pytest.raises(ValueError, match="not a text file of image paths"):
        build_index(str(tmp_path / "photo.bin"), "auto", tmp_path / "idx")
    assert not list((tmp_path / "idx").glob("*.tmp-*"))  # no partial index left behind


def test_paths_with_wildcard_characters_are_paths(tmp_path):
    folder = tmp_path / "photos [2020]"
    write_good_images(folder, 3, nested=False)
    assert detect_format(str(folder)) == "folder"
    assert len(open_index(build_index(str(folder), "auto", tmp_path / "idx"), tmp_path / "idx")) == 3


def test_symlinked_folders_are_followed_once_and_odd_names_left_out(tmp_path, caplog):
    write_good_images(tmp_path / "real", 4, nested=False)
    root = tmp_path / "src"
    write_good_images(root, 2, nested=False)
    (root / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (root / "again").symlink_to(tmp_path / "real", target_is_directory=True)  # the same folder twice
    (tmp_path / "real" / "loop").symlink_to(root, target_is_directory=True)  # and a loop back
    (root / "odd\nname.png").write_bytes(image_bytes(7))
    (root / "self.png").symlink_to(root / "self.png")  # a link to itself: ELOOP when followed
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # a link to nothing (a download that went away)
    found = list(scan_folder(root))
    assert len(found) == 6 and sum(f.startswith("again/") for f in found) == 4  # 'again' sorts first
    assert "a newline in its name" in caplog.text
    assert "leaving out 'gone.jpg' (a symbolic link to a missing file)" in caplog.text  # said, not silent


def test_an_unreadable_folder_is_an_error_not_a_silent_gap(tmp_path, monkeypatch):
    write_good_images(tmp_path / "src", 4)
    locked = tmp_path / "src" / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path):  # what a folder without read permission gives a non-root user
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataSourceError, match="cannot list folder .*locked.* Permission denied"):
        list(scan_folder(tmp_path / "src"))


def test_one_image_per_webdataset_sample(tmp_path, caplog):
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i in range(3):
            for suffix in (".jpg", ".mask.png", ".json"):
                data = image_bytes(i, (16, 16), "PNG") if suffix != ".json" else b"{}"
                info = tarfile.TarInfo(f"d/{i:06d}{suffix}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    src = open_index(build_index(str(tmp_path / "s.tar"), "auto", tmp_path / "idx"), tmp_path / "idx")
    assert len(src) == 3 and src.name(1).endswith("d/000001.jpg")
    assert "3 image members of" in caplog.text and "'d/000000.mask.png'" in caplog.text  # said, not silent


def test_tar_reads_keep_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    """More shards than a worker may hold open (ulimit -n): every image still reads, with at most
    MAX_OPEN_SHARDS handles open (a handle kept per shard ran out of descriptors and skipped good images)."""
    monkeypatch.setattr(TarSource, "MAX_OPEN_SHARDS", 3, raising=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(8):
        _write_shard(shards / f"train-{s:03d}.tar", 2 * s, 2)
    src = open_source(str(shards), cache=tmp_path / "idx")
    opened = []
    for i in [0, 15, 2, 3, 9, 14, 4, 6, 8, 10, 12, 1, 5, 7, 11, 13, 0, 15]:  # shards in a shuffled order, revisited
        assert src.read(i) == image_bytes(i, (24, 24), "JPEG")
        assert len(src._files) <= 3
        opened.extend(src._files.values())
    closed = [f for f in opened if f not in src._files.values()]
    assert closed and all(f.closed for f in closed)


def test_a_shard_truncated_after_indexing_names_the_cause(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-000.tar", 0, 3)
    src = open_source(str(shards), cache=tmp_path / "idx")
    with open(shards / "train-000.tar", "r+b") as f:
        f.truncate(int(src.offset[2]) + 10)
    assert src.read(1) == image_bytes(1, (24, 24), "JPEG")
    with pytest.raises(OSError, match="shard ends 10 bytes into this member.*truncated or rewritten"):
        src.read(2)


def test_a_shard_rewritten_while_open_is_read_afresh_not_from_a_buffer(tmp_path):
    """A buffered handle served a read inside its last 8 KiB from the buffer: after the shard was rewritten in
    place (same size), the next member came back with its old bytes; and truncated, it read in full."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-000.tar", 0, 3)
    src = open_source(str(shards), cache=tmp_path / "idx")
    assert int(src.offset[1]) + int(src.size[1]) - int(src.offset[0]) < 8192  # members 0 and 1 in one buffer
    assert src.read(0) == image_bytes(0, (24, 24), "JPEG")
    path, off, size = shards / "train-000.tar", int(src.offset[1]), int(src.size[1])
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)
    assert src.read(1) == b"\0" * size
    with open(path, "r+b") as f:
        f.truncate(off + 10)
    with pytest.raises(OSError, match="shard ends 10 bytes into this member"):
        src.read(1)


def test_a_shard_changed_since_indexing_is_refused_naming_it(tmp_path, caplog):
    """A shard rewritten after indexing at the same size was read silently (members at wrong bytes): the
    index records each shard's size and modification time, and reusing the index checks them."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "train-000.tar", 0, 3)
    _write_shard(shards / "train-001.tar", 3, 2)
    idx = tmp_path / "idx"
    meta = build_index(str(shards), "tar", idx)
    assert len(meta["shard_stats"]) == 2
    with caplog.at_level("WARNING", logger="seer.data"):
        assert build_index(str(shards), "tar", idx) == meta  # unchanged: reused without a word
    assert not caplog.records
    shard = shards / "train-001.tar"
    src = open_index(meta, idx)
    data = bytearray(shard.read_bytes())
    data[int(src.offset[4]) + 100] ^= 0xFF  # another image of the same size, written later
    st = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later write, however coarse the clock
    remedy = f"delete {idx} and the next run indexes data.source again"
    with pytest.raises(DataSourceError, match=f"tar shard '{shard}' changed since it was indexed into {idx} "
                                              f"\\(modified at .* same size\\).*{remedy}"):
        build_index(str(shards), "tar", idx)
    assert build_index(str(shards), "tar", idx, check_shards=False) == meta  # ranks that only read the index
    with open(shard, "r+b") as f:
        f.truncate(len(data) - 512)
    with pytest.raises(DataSourceError, match=f"'{shard}' changed .*\\({len(data) - 512} bytes, {len(data)} when "
                                              f"indexed\\)"):
        build_index(str(shards), "tar", idx)
    shard.unlink()  # gone: nothing wrong can be read from it; its images are skipped as missing files are
    caplog.clear()
    with caplog.at_level("WARNING", logger="seer.data"):
        assert build_index(str(shards), "tar", idx) == meta
    assert [r.getMessage() for r in caplog.records] == [
        f"data.source: 1 tar shard(s) indexed into {idx} cannot be opened now; their images will be skipped as "
        f"unreadable: '{shard}' (FileNotFoundError: No such file or directory)"]


def test_an_index_without_shard_stats_still_opens_with_a_warning(tmp_path, caplog):
    """An index written before shard sizes and times were recorded is used as before, unchecked, said once."""
    _write_shard(tmp_path / "s.tar", 0, 3)
    idx = tmp_path / "idx"
    meta = build_index(str(tmp_path / "s.tar"), "tar", idx)
    del meta["shard_stats"]
    (idx / "index.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="seer.data"):
        again = build_index(str(tmp_path / "s.tar"), "tar", idx)
        assert len(open_index(again, idx)) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"data.source: the index in {idx} records no sizes or modification times of its tar shards (written by an "
        f"older seer), so a shard rewritten since cannot be detected; delete {idx} to index data.source again with "
        f"them"]


def test_a_damaged_header_inside_a_shard_is_said_not_passed_over(tmp_path, caplog):
    """tarfile ends a shard silently at a bad header after the first: the members before it are indexed, and
    a warning names the shard and how much of it is left out (they were dropped without a word)."""
    shard = tmp_path / "s.tar"
    _write_shard(shard, 0, 3)  # 6 members: jpg, json per sample
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        third = tf.getmembers()[2].offset  # the header of sample00001.jpg
    data[third + 148] ^= 0x01  # its checksum field
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="seer.data"):
        meta = build_index(str(shard), "tar", tmp_path / "idx")
    assert meta["count"] == 1
    assert [r.getMessage() for r in caplog.records if "damaged header" in r.getMessage()] == [
        f"data.source: tar shard '{shard}' has a damaged header at byte {third}; its members from there on "
        f"({len(data) - third} bytes of the shard) are not indexed"]
    caplog.clear()
    _write_shard(shard, 0, 3)  # an intact shard: not a word
    with caplog.at_level("WARNING", logger="seer.data"):
        build_index(str(shard), "tar", tmp_path / "idx2")
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]


def test_the_sources_module_imports_without_torch():
    """What a spawned worker that indexes tar shards imports: seer.data and its sources module import neither
    torch nor seer_kernels (~2 s per process); seer.data's names resolve on first use (TrainData: every test)."""
    code = ("import sys, seer.data.sources as s; from seer.data import build_index; assert build_index is "
            "s.build_index; heavy = {'torch', 'seer_kernels'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_a_source_under_home_is_found_from_a_tilde_path(tmp_path, monkeypatch):
    """'~/images' in a YAML file or a quoted --set reaches us unexpanded (no shell did it)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_good_images(tmp_path / "imgs", 3)
    meta = build_index("~/imgs", "auto", tmp_path / "idx")
    assert meta["format"] == "folder" and meta["count"] == 3 and meta["source"] == str(tmp_path / "imgs")
    assert build_index(str(tmp_path / "imgs"), "auto", tmp_path / "idx") == meta  # the same source


def test_a_relative_pattern_of_shards_from_another_folder_is_another_source(tmp_path, monkeypatch):
    """A relative pattern was recorded as written: run from another folder with the same output folder, its
    other shards were passed over for the first folder's, without a word (a relative folder was refused)."""
    for folder, first in (("a", 0), ("b", 100)):
        (tmp_path / folder / "shards").mkdir(parents=True)
        _write_shard(tmp_path / folder / "shards" / "s.tar", first, 2)
    monkeypatch.chdir(tmp_path / "a")
    meta = build_index("shards/*.tar", "auto", tmp_path / "idx")
    assert meta["source"] == str(tmp_path / "a" / "shards" / "*.tar")
    assert build_index("shards/*.tar", "auto", tmp_path / "idx") == meta  # the same folder: the same index
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(DataSourceError, match=r"holds the index of data.source '.*/a/shards/\*\.tar', not "
                                              r"'.*/b/shards/\*\.tar'"):
        build_index("shards/*.tar", "auto", tmp_path / "idx")
    # An index written before patterns were made absolute (its folder unknown) is still used for its pattern
    legacy = json.loads((tmp_path / "idx" / "index.json").read_text())
    legacy["source"] = "shards/*.tar"
    (tmp_path / "idx" / "index.json").write_text(json.dumps(legacy))
    assert build_index("shards/*.tar", "auto", tmp_path / "idx")["shards"] == meta["shards"]


def test_an_indexing_killed_part_way_leaves_no_temporary_files_behind(tmp_path):
    """write_lines' and save_array's temporary files are named by their writer's pid: those of a run killed
    while indexing stayed in OUT/data for good (the rebuild writes under its own pid), an images.txt of a
    billion names being tens of GB."""
    src = tmp_path / "src"
    write_good_images(src, 3)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = [cache / "images.txt.tmp-99999", cache / "images.offsets.npy.tmp-99999.npy"]
    for p in stale:
        p.write_bytes(b"partial")
    assert build_index(str(src), "folder", cache)["count"] == 3
    assert not any(p.exists() for p in stale)
    assert len(open_index(build_index(str(src), "folder", cache), cache)) == 3
