"""seer data dedup: identical files (folder, list, tar) and near duplicates from feature rows; the KEEP list
loads back as a training source holding exactly the kept images."""
import os
import tarfile

import numpy as np
import pytest

from seer.cli import main
from seer.data import DataSourceError, build_index, open_index
from seer.data import union_find
from seer.data.dedup import dedup_source, group_digests
from seer.data.dedup_files import atomic_text
from seer.data.near_dedup import dedup_features
from tests.images import image_bytes, write_shard

IMG = [image_bytes(i, (16, 16)) for i in range(4)]


def _files(root, layout: dict) -> None:
    for rel, data in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _lines(path) -> list[str]:
    return path.read_bytes().decode("utf-8", "surrogateescape").splitlines()


def _loaded(keep, tmp_path) -> list[str]:
    """The images that training given data.source=KEEP reads."""
    cache = tmp_path / "reload"
    src = open_index(build_index(str(keep), "auto", cache), cache)
    return [src.name(i) for i in range(len(src))]


def test_identical_files_in_a_folder_keep_the_first_in_source_order(tmp_path):
    root = tmp_path / "imgs"
    # scan order: a, b, c_copy, sub/x, sub/y, sub/deep/a (a folder's files, then its sub-folders in turn)
    _files(root, {"a.png": IMG[0], "b.png": IMG[1], "c_copy.png": IMG[0], "sub/deep/a.png": IMG[0],
                  "sub/x.png": IMG[1], "sub/y.jpg": IMG[2], "notes.txt": IMG[0]})  # (not an image name)
    keep, rep = tmp_path / "keep.txt", tmp_path / "dups.tsv"
    res = dedup_source(str(root), out=str(keep), report=str(rep), workers=0)
    assert (res.total, res.kept, res.groups.duplicates, res.groups.groups, res.unreadable) == (6, 3, 3, 2, 0)
    r = str(root)
    assert _lines(keep) == [f"{r}/a.png", f"{r}/b.png", f"{r}/sub/y.jpg"]
    assert _lines(rep) == [f"{r}/c_copy.png\t{r}/a.png", f"{r}/sub/deep/a.png\t{r}/a.png",
                           f"{r}/sub/x.png\t{r}/b.png"]
    assert sorted(os.listdir(tmp_path)) == ["dups.tsv", "imgs", "keep.txt"]  # no temporary files left
    assert _loaded(keep, tmp_path) == _lines(keep)


def test_a_source_none_of_whose_images_can_be_read_writes_nothing(tmp_path):
    """An empty KEEP.txt would only fail later, at training, as a source without images."""
    (tmp_path / "all.txt").write_text("gone1.png\ngone2.png\n")
    keep = tmp_path / "keep.txt"
    with pytest.raises(DataSourceError, match=r"none of its 2 images could be read \(the first: .*gone1.png: "
                                              r"FileNotFoundError.*nothing was written"):
        dedup_source(str(tmp_path / "all.txt"), out=str(keep), report=str(tmp_path / "d.tsv"), workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.txt"]


def test_a_list_of_relative_paths_with_a_missing_file(tmp_path):
    _files(tmp_path / "data", {"p.png": IMG[0], "q.png": IMG[1], "r.png": IMG[0]})
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "all.txt").write_text("# a comment\n../data/p.png\n../data/gone.png\n../data/q.png\n\n"
                                   "../data/r.png\n../data/q.png\n")  # q listed twice: a duplicate of itself
    keep, rep = tmp_path / "out" / "keep.txt", tmp_path / "dups.tsv"
    keep.parent.mkdir()
    res = dedup_source(str(lists / "all.txt"), out=str(keep), report=str(rep), workers=1)  # a worker process
    assert (res.total, res.kept, res.groups.duplicates, res.unreadable) == (5, 2, 2, 1)
    d = f"{lists}/../data"
    assert _lines(keep) == [f"{d}/p.png", f"{d}/q.png"]
    lines = _lines(rep)
    assert lines[:2] == [f"{d}/r.png\t{d}/p.png", f"{d}/q.png\t{d}/q.png"]
    assert len(lines) == 3 and lines[2].startswith(f"#unreadable\t{d}/gone.png\tFileNotFoundError: ")
    assert [n for n, _ in res.shown] == [f"{d}/gone.png"]
    # from another folder, the kept list still names the same files: its entries are absolute
    loaded = _loaded(keep, tmp_path)
    assert loaded == _lines(keep) and [open(p, "rb").read() for p in loaded] == [IMG[0], IMG[1]]


def test_names_that_are_not_utf8_and_names_a_list_cannot_hold(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(IMG[0])
    odd = os.fsencode(str(root)) + b"/\xff.png"
    with open(odd, "wb") as f:
        f.write(IMG[1])
    with open(os.fsencode(str(root)) + b"/c\rd.png", "wb") as f:  # a carriage return ends a list file's line
        f.write(IMG[2])
    keep, rep = tmp_path / "keep.txt", tmp_path / "dups.tsv"
    res = dedup_source(str(root), out=str(keep), report=str(rep), workers=0)
    assert res.kept == 3 and res.groups.unlisted == 1 and "carriage return" in caplog.text
    assert keep.read_bytes() == os.fsencode(str(root)) + b"/a.png\n" + odd + b"\n"
    assert _loaded(keep, tmp_path) == _lines(keep)
    assert open(_loaded(keep, tmp_path)[1], "rb").read() == IMG[1]


def test_tar_shards_get_a_report_and_no_keep_list(tmp_path):
    s0 = write_shard(tmp_path / "s0.tar", [("k0.png", IMG[0]), ("k0.json", b"{}"), ("k1.png", IMG[1])])
    s1 = write_shard(tmp_path / "s1.tar", [("k2.png", IMG[1]), ("k3.png", IMG[2]), ("k4.png", IMG[0])])
    with pytest.raises(ValueError, match="a list file .* cannot name; give --report DUPS.tsv alone"):
        dedup_source(str(tmp_path / "*.tar"), out=str(tmp_path / "keep.txt"), workers=0)
    rep = tmp_path / "dups.tsv"
    res = dedup_source(str(tmp_path / "*.tar"), report=str(rep), workers=0)
    assert (res.total, res.kept, res.groups.duplicates, res.groups.groups) == (5, 3, 2, 2)
    assert _lines(rep) == [f"{s1}:k4.png\t{s0}:k0.png", f"{s1}:k2.png\t{s0}:k1.png"]
    assert not (tmp_path / "keep.txt").exists()


def test_group_digests_keeps_the_lowest_readable_index():
    d = np.zeros((7, 16), np.uint8)
    d[:, 0] = [5, 3, 5, 3, 9, 5, 3]
    ok = np.array([True, False, True, True, True, True, True])  # row 1 unreadable: row 3 keeps the 3s
    g = group_digests(d, ok, chunk=2)  # compared two rows at a time
    assert g.keep.tolist() == [True, False, False, True, True, False, False]
    groups = [g.members[g.bounds[k]:g.bounds[k + 1]].tolist() for k in range(g.groups)]
    assert groups == [[0, 2, 5], [3, 6]]


def test_union_find_matches_a_plain_one_on_random_pairs():
    rng = np.random.default_rng(0)
    for n, pairs in ((50, 30), (200, 150), (500, 2000)):
        u, v = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
        parent = union_find.new_forest(n)
        for k in range(0, pairs, 17):  # in batches, as tiles deliver them
            union_find.union(parent, u[k:k + 17], v[k:k + 17])
        plain = list(range(n))

        def top(x):
            while plain[x] != x:
                x = plain[x]
            return x
        for a, b in zip(u.tolist(), v.tolist()):
            ra, rb = top(a), top(b)
            plain[max(ra, rb)] = min(ra, rb)
        assert union_find.roots(parent).tolist() == [top(x) for x in range(n)]


def _features(tmp_path, rows, names=None):
    npy = tmp_path / "feats.npy"
    np.save(npy, np.asarray(rows, np.float32))
    names = names or [f"/imgs/{i}.jpg" for i in range(len(rows))]
    (tmp_path / "feats.txt").write_text("".join(n + "\n" for n in names))
    return str(npy)


def test_near_duplicates_chain_into_one_cluster_across_blocks(tmp_path, monkeypatch):
    import seer.data.near_dedup as near
    monkeypatch.setattr(near, "TILE_ELEMENTS", 6)  # tiles of 2 x 3: the pairs cross row and column tiles
    monkeypatch.setattr(near, "MIN_TILE_COLS", 1)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 32))
    rows = rng.standard_normal((9, 32))
    e = np.zeros(32)
    e[0] = 1.0
    rows[1], rows[4], rows[8] = base[0], base[0] + 0.3 * e, base[0] + 0.6 * e  # 1~4, 4~8, not 1~8
    rows[2], rows[7] = base[1], base[1] * 3 + 1e-3  # scale does not matter
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    thr = (cos(rows[1], rows[8]) + min(cos(rows[1], rows[4]), cos(rows[4], rows[8]))) / 2
    assert cos(rows[1], rows[8]) < thr <= min(cos(rows[1], rows[4]), cos(rows[4], rows[8]))
    keep, rep = tmp_path / "keep.txt", tmp_path / "dups.tsv"
    res = dedup_features(_features(tmp_path, rows), thr, out=str(keep), report=str(rep), block_rows=2)
    assert (res.total, res.kept, res.groups.duplicates, res.groups.groups, res.zero_rows) == (9, 6, 3, 2, 0)
    assert _lines(keep) == [f"/imgs/{i}.jpg" for i in (0, 1, 2, 3, 5, 6)]
    assert _lines(rep) == ["/imgs/4.jpg\t/imgs/1.jpg", "/imgs/8.jpg\t/imgs/1.jpg", "/imgs/7.jpg\t/imgs/2.jpg"]


@pytest.mark.cuda
def test_near_duplicates_on_the_gpu_are_the_cpus(tmp_path):
    """--device cuda (float32, TF32 off): the same clusters as on the CPU, with pairs well away from the
    threshold (noisy copies at cosine ~0.999, others near 0) and a block that does not divide the rows."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 96)).astype(np.float32)
    copies = base[rng.integers(0, 300, 200)] + 0.01 * rng.standard_normal((200, 96)).astype(np.float32)
    rows = np.concatenate([base, copies, np.zeros((3, 96), np.float32)])[rng.permutation(503)]
    npy = _features(tmp_path, rows)
    cpu = dedup_features(npy, 0.99, report=str(tmp_path / "cpu.tsv"), block_rows=97)
    gpu = dedup_features(npy, 0.99, report=str(tmp_path / "gpu.tsv"), device="cuda", block_rows=97)
    assert gpu.groups.duplicates == cpu.groups.duplicates > 0 and gpu.zero_rows == cpu.zero_rows == 3
    assert _lines(tmp_path / "gpu.tsv") == _lines(tmp_path / "cpu.tsv")


def test_the_threshold_is_inclusive_and_zero_rows_pair_with_nothing(tmp_path):
    # unit vectors whose dot products are exact in float32: cos(0, 1) = cos(0, 2) = 0.5, cos(1, 2) = 0
    rows = [[2, 2, 2, 2], [1, 1, 1, -1], [1, 1, -1, 1], [0, 0, 0, 0], [np.nan, 1, 1, 1], [-1, -1, -1, -1]]
    npy = _features(tmp_path, rows)
    assert dedup_features(npy, 0.5, report=str(tmp_path / "a.tsv")).groups.duplicates == 2
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    res = dedup_features(npy, above, report=str(tmp_path / "b.tsv"))
    assert res.groups.duplicates == 0 and res.zero_rows == 2
    res = dedup_features(npy, -1.0, out=str(tmp_path / "keep.txt"))  # every pair with a direction
    assert res.groups.keep.tolist() == [True, False, False, True, True, False]


def test_features_with_relative_paths_load_back_from_the_current_folder(tmp_path, monkeypatch):
    _files(tmp_path / "imgs", {"a.png": IMG[0], "b.png": IMG[1]})
    monkeypatch.chdir(tmp_path)
    npy = _features(tmp_path, [[1, 0], [1, 1e-4]], ["imgs/a.png", "imgs/b.png"])
    res = dedup_features(npy, 0.99, out=str(tmp_path / "keep.txt"))
    assert res.relative_to == str(tmp_path)
    assert _loaded(tmp_path / "keep.txt", tmp_path) == [f"{tmp_path}/imgs/a.png"]


def test_an_output_is_never_replaced_without_overwrite(tmp_path):
    _files(tmp_path / "imgs", {"a.png": IMG[0], "b.png": IMG[0]})
    keep = tmp_path / "keep.txt"
    keep.write_text("mine\n")
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        dedup_source(str(tmp_path / "imgs"), out=str(keep), workers=0)
    assert keep.read_text() == "mine\n"
    dedup_source(str(tmp_path / "imgs"), out=str(keep), workers=0, overwrite=True)
    assert _lines(keep) == [f"{tmp_path}/imgs/a.png"]
    # one that appears while the command runs: kept, and the result left under its temporary name
    late = tmp_path / "late.txt"
    with pytest.raises(ValueError, match="appeared while seer data dedup ran.*the result is in"):
        with atomic_text(str(late), "--out", False) as f:
            f.write("result\n")
            late.write_text("theirs\n")
    assert late.read_text() == "theirs\n"
    assert (tmp_path / f"late.txt.tmp-{os.getpid()}").read_text() == "result\n"


def test_overwrite_replaces_an_earlier_output_never_an_input_nor_the_other_output(tmp_path):
    """--overwrite replaces what an earlier run wrote: not the list, shard, --exclude file or FEATS.npy/.txt the
    command reads, nor --out through another path of --report (a linked folder: abspath differs)."""
    _files(tmp_path / "imgs", {"a.png": IMG[0], "b.png": IMG[0], "c.png": IMG[1]})
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with pytest.raises(ValueError, match="--out and --report name the same file"):
        dedup_source(str(tmp_path / "imgs"), out=str(tmp_path / "out" / "x.txt"),
                     report=str(tmp_path / "link" / "x.txt"), workers=0, overwrite=True)
    assert not (tmp_path / "out" / "x.txt").exists()
    lst = tmp_path / "l.txt"
    lst.write_text("imgs/a.png\nimgs/b.png\nimgs/c.png\n")
    with pytest.raises(ValueError, match=f"--out '{lst}' is SOURCE, which this command reads"):
        dedup_source(str(lst), out=str(lst), workers=0, overwrite=True)
    assert lst.read_text() == "imgs/a.png\nimgs/b.png\nimgs/c.png\n"
    ex = tmp_path / "ex.txt"
    ex.write_text(f"{tmp_path}/imgs/c.png\n")
    with pytest.raises(ValueError, match="--report .* is the --exclude file"):
        dedup_source(str(lst), report=str(ex), exclude=str(ex), workers=0, overwrite=True)
    shard = write_shard(tmp_path / "s.tar", [("k0.png", IMG[0]), ("k1.png", IMG[0])])
    with pytest.raises(ValueError, match="--report .* is a shard of SOURCE"):
        dedup_source(str(tmp_path / "*.tar"), report=shard, workers=0, overwrite=True)
    assert tarfile.open(shard).getnames() == ["k0.png", "k1.png"]
    np.save(tmp_path / "f.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "f.txt").write_text("/a.png\n/b.png\n/c.png\n")
    for target, what in ((tmp_path / "f.npy", "--features"), (tmp_path / "f.txt", "its FEATS.txt")):
        with pytest.raises(ValueError, match=f"--out '{target}' is {what}, which this command reads"):
            dedup_features(str(tmp_path / "f.npy"), 0.9, out=str(target), overwrite=True)
    assert np.load(tmp_path / "f.npy").shape == (3, 3) and (tmp_path / "f.txt").read_text().count("\n") == 3
    res = dedup_source(str(lst), out=str(tmp_path / "out" / "x.txt"), report=str(ex), workers=0, overwrite=True)
    assert res.kept == 2  # (an earlier output, not read by this command: replaced)


@pytest.mark.parametrize("argv, fragment", [
    (["--features", "{f}", "--threshold", "1.5", "--out", "{t}/k.txt"], "--threshold must be a cosine similarity "
                                                                        "between -1 and 1, got 1.5"),
    (["--features", "{f}", "--threshold", "nan", "--out", "{t}/k.txt"], "between -1 and 1, got nan"),
    (["--features", "{f}", "--out", "{t}/k.txt"], "--features needs --threshold"),
    (["--features", "{t}/nope.npy", "--threshold", "0.9", "--out", "{t}/k.txt"], "is not a file"),
    (["--features", "{f}", "--threshold", "0.9", "--out", "{t}/exists.txt"], "'{t}/exists.txt' exists: pass "
                                                                             "--overwrite"),
    (["--features", "{f}", "--threshold", "0.9", "--block-rows", "0", "--out", "{t}/k.txt"],
     "--block-rows must be an integer >= 1"),
    (["--features", "{f}", "--threshold", "0.9"], "nothing to write"),
    (["--features", "{f}", "--threshold", "0.9", "--out", "{t}/k", "--report", "{t}/../{b}/./k"],
     "name the same file"),
    (["{t}", "--features", "{f}", "--threshold", "0.9", "--out", "{t}/k.txt"], "one of the two"),
    (["--out", "{t}/k.txt"], "one of the two"),
    (["{t}", "--threshold", "0.9", "--out", "{t}/k.txt"], "--threshold is for --features"),
    (["--features", "{f}", "--threshold", "0.9", "--workers", "2", "--out", "{t}/k.txt"], "--workers is for SOURCE"),
    (["--features", "{f}", "--threshold", "0.9", "--max-image-bytes", "9", "--out", "{t}/k.txt"],
     "--max-image-bytes is for SOURCE"),
    (["{t}", "--max-image-bytes", "-1", "--out", "{t}/k.txt"],
     "--max-image-bytes must be an integer >= 0 (bytes; 0 = no limit), got -1"),
    (["{t}/none", "--out", "{t}/k.txt"], "SOURCE '{t}/none' does not exist"),
    (["synthetic", "--out", "{t}/k.txt"], "SOURCE 'synthetic' is a built-in set"),
])
def test_bad_arguments_are_one_line_and_status_2(argv, fragment, tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.ones((2, 3), np.float32))
    (tmp_path / "f.txt").write_text("/a.jpg\n/b.jpg\n")
    (tmp_path / "exists.txt").write_text("")
    sub = {"{t}": str(tmp_path), "{f}": str(tmp_path / "f.npy"), "{b}": tmp_path.name}
    for k, v in sub.items():
        argv = [a.replace(k, v) for a in argv]
        fragment = fragment.replace(k, v)
    assert main(["data", "dedup", *argv]) == 2
    err = capsys.readouterr().err
    assert "seer data dedup: error: " in err and fragment in err and "Traceback" not in err


@pytest.mark.parametrize("txt, rows, fragment", [
    (None, np.ones((2, 3), np.float32), "feats.txt', the image path of each row that seer features writes beside "
                                        "it, does not exist"),
    ("/a.jpg\n", np.ones((2, 3), np.float32), "has 2 rows but"),
    ("", np.ones((0, 3), np.float32), "has no rows"),
    ("/a.jpg\n", np.ones(3, np.float32), "expected float rows (N, D)"),
])
def test_feature_files_that_are_not_a_pair_are_refused(tmp_path, txt, rows, fragment):
    np.save(tmp_path / "feats.npy", rows)
    if txt is not None:
        (tmp_path / "feats.txt").write_text(txt)
    with pytest.raises(ValueError) as e:
        dedup_features(str(tmp_path / "feats.npy"), 0.9, out=str(tmp_path / "k.txt"))
    assert fragment in str(e.value)
    assert not (tmp_path / "k.txt").exists()


def test_the_command_prints_a_summary_and_the_unreadable_files(tmp_path, capsys):
    _files(tmp_path / "imgs", {"a.png": IMG[0], "b.png": IMG[0], "c.png": IMG[3]})
    (tmp_path / "list.txt").write_text("imgs/a.png\nimgs/b.png\nimgs/missing.png\nimgs/c.png\n")
    keep = tmp_path / "keep.txt"
    assert main(["data", "dedup", str(tmp_path / "list.txt"), "--out", str(keep), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "4 images, 2 unique, 1 duplicates in 1 groups, 1 unreadable (" in out
    assert f"UNREADABLE {tmp_path}/imgs/missing.png\tFileNotFoundError" in out
    assert f"--set data.source={keep}" in out
    # Files over --max-image-bytes (data.max_image_bytes) are unreadable, as training skips them (0: no limit).
    limit = len(IMG[3]) - 1
    assert len(IMG[0]) <= limit
    assert main(["data", "dedup", str(tmp_path / "list.txt"), "--out", str(keep), "--workers", "0", "--overwrite",
                 "--max-image-bytes", str(limit)]) == 0
    out = capsys.readouterr().out
    assert "4 images, 1 unique, 1 duplicates in 1 groups, 2 unreadable (" in out
    assert f"UNREADABLE {tmp_path}/imgs/c.png\tValueError: {len(IMG[3])} bytes exceed data.max_image_bytes={limit} " \
        f"(not read)" in out
    np.save(tmp_path / "f.npy", np.array([[1, 0], [0, 0], [1, 0]], np.float32))
    (tmp_path / "f.txt").write_text("/x/a.jpg\n/x/b.jpg\n/x/c.jpg\n")
    assert main(["data", "dedup", "--features", str(tmp_path / "f.npy"), "--threshold", "0.95", "--out",
                 str(tmp_path / "k2.txt")]) == 0
    out = capsys.readouterr().out
    assert "3 images, 2 kept, 1 near duplicates in 1 clusters (cosine >= 0.95), 1 zero rows" in out
