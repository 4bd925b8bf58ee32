"""Data sources: recursive folders, list files, webdataset tar shards, and memory-safe path lists."""
import io
import os
import pickle
import tarfile

import pytest

from seer.data import DataSourceError, FileSource, TarSource, build_index, detect_format, open_index, scan_folder
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


def test_list_file_with_relative_paths_and_comments(tmp_path):
    paths = write_good_images(tmp_path / "imgs", 5, nested=False)
    lst = tmp_path / "files.txt"
    lst.write_text("# my images\n\n" + "".join(f"imgs/{p.name}\n" for p in paths[:3]) + f"{paths[4]}\n")
    assert detect_format(str(lst)) == "list"
    src = open_index(build_index(str(lst), "auto", tmp_path / "idx"), tmp_path / "idx")
    assert len(src) == 4
    assert [src.read(i) for i in range(4)] == [p.read_bytes() for p in paths[:3] + [paths[4]]]


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
