"""data.exclude: the images a file names are left out of the data index, for folders, list files and tar shards,
given as plain names or as the reports of seer data dedup and seer data check; the index records the file and
a run that reuses the index with another one, or the file changed, is refused."""
import logging
import os

import pytest

from seer.cli import main
from seer.data import DataSourceError, build_index, open_index
from tests.images import image_bytes, write_shard

IMG = [image_bytes(i, (40, 48)) for i in range(6)]


def _files(root, layout: dict) -> None:
    for rel, data in layout.items():
        p = root / os.fsdecode(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _names(source, cache, **kw) -> list[str]:
    """The images of the index that build_index gives ``source`` in ``cache``."""
    src = open_index(build_index(str(source), "auto", cache, **kw), cache)
    return [src.name(i) for i in range(len(src))]


def test_plain_names_leave_images_out_of_a_folder_in_order(tmp_path, caplog):
    root = tmp_path / "imgs"
    _files(root, {"a.png": IMG[0], "b.png": IMG[1], "sub/c.png": IMG[2], "sub/d.png": IMG[3], "e.png": IMG[4]})
    r = str(root)
    every = _names(root, tmp_path / "all")
    assert every == [f"{r}/a.png", f"{r}/b.png", f"{r}/e.png", f"{r}/sub/c.png", f"{r}/sub/d.png"]
    ex = tmp_path / "ex.txt"
    # a comment, a blank line, a CRLF ending, a name listed twice, and two names the source does not have
    ex.write_bytes(f"# drop these\n{r}/b.png\r\n\n{r}/sub/d.png\n/elsewhere/x.png\n{r}/b.png\n{r}/gone.png\n"
                   .encode())
    caplog.set_level(logging.INFO, "seer.data")
    assert _names(root, tmp_path / "idx", exclude=str(ex)) == [f"{r}/a.png", f"{r}/e.png", f"{r}/sub/c.png"]
    meta = build_index(r, "auto", tmp_path / "idx", exclude=str(ex))  # reused as it is
    st = ex.stat()
    assert {k: meta["exclude"][k] for k in ("path", "size", "mtime_ns", "names", "excluded", "not_in_source")} == \
        {"path": str(ex), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "names": 4, "excluded": 2,
         "not_in_source": 2}
    assert len(meta["exclude"]["sha256"]) == 64 and meta["count"] == 3
    assert "left out 2 images of data.source" in caplog.text
    assert f"2 of the 4 names in {ex} are not images of data.source (first: '/elsewhere/x.png', '{r}/gone.png')" \
        in caplog.text


def test_a_data_check_report_leaves_the_unreadable_files_out_of_a_list(tmp_path):
    _files(tmp_path / "d", {"p.png": IMG[0], "bad.png": b"not an image", "q.jpg": IMG[1]})
    d = str(tmp_path / "d")
    (tmp_path / "l.txt").write_text("d/p.png\nd/bad.png\nd/missing.png\nd/q.jpg\n")
    rep = tmp_path / "bad.tsv"
    assert main(["data", "check", str(tmp_path / "l.txt"), "--workers", "0", "--report", str(rep)]) == 0
    assert sorted(line.split("\t")[0] for line in rep.read_text().splitlines()) == [f"{d}/bad.png",
                                                                                    f"{d}/missing.png"]
    assert _names(tmp_path / "l.txt", tmp_path / "idx", exclude=str(rep)) == [f"{d}/p.png", f"{d}/q.jpg"]
    # the check itself takes --exclude: nothing unreadable is left
    assert main(["data", "check", str(tmp_path / "l.txt"), "--workers", "0", "--exclude", str(rep),
                 "--fail-on-bad"]) == 0


def test_a_data_check_report_never_replaces_a_file_the_check_reads(tmp_path, capsys):
    """--report is written in place: naming the list SOURCE, a tar shard, an image of a folder SOURCE or the
    --exclude file (another path to it too), it replaced that file with the report (a list of images lost).
    Refused before the check, as seer data dedup refuses its outputs; the file is left as it was."""
    _files(tmp_path / "d", {"p.png": IMG[0], "bad.png": b"not an image"})
    lst = tmp_path / "l.txt"
    lst.write_text("d/p.png\nd/bad.png\n")
    ex = tmp_path / "ex.txt"
    ex.write_text("d/p.png\n")
    (tmp_path / "s").mkdir()
    write_shard(tmp_path / "s" / "a.tar", [("x.png", IMG[1])])
    for args, what in (([str(lst), "--report", str(lst)], "SOURCE"),
                       ([str(lst), "--report", f"{tmp_path}/d/../l.txt"], "SOURCE"),
                       ([str(tmp_path / "d"), "--exclude", str(ex), "--report", str(ex)], "the --exclude file"),
                       ([f"{tmp_path}/s/*.tar", "--report", str(tmp_path / "s" / "a.tar")], "a shard of SOURCE"),
                       ([str(tmp_path / "d"), "--report", str(tmp_path / "d" / "p.png")], "an image of SOURCE")):
        before = {p: p.read_bytes() for p in (lst, ex, tmp_path / "s" / "a.tar", tmp_path / "d" / "p.png")}
        assert main(["data", "check", *args, "--workers", "0"]) == 2
        assert f"is {what}, which this command reads: write to another file" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in before} == before
    # a report of another name is written as before
    assert main(["data", "check", str(lst), "--workers", "0", "--report", str(tmp_path / "bad.tsv")]) == 0
    assert (tmp_path / "bad.tsv").read_text().startswith(f"{tmp_path}/d/bad.png\t")


def test_a_dedup_report_with_odd_names_and_an_unreadable_file(tmp_path):
    """The report writes names printable (a tab as \\t, bytes that are not UTF-8 as \\xNN) and the unreadable
    files as '#unreadable<TAB>NAME<TAB>REASON': both are matched."""
    root = tmp_path / "imgs"
    _files(root, {"a.png": IMG[0], "t\tab.png": IMG[0], b"x\xff.png": IMG[0], "b.png": IMG[1]})
    r = os.fsencode(str(root))
    lst = tmp_path / "l.txt"
    lst.write_bytes(b"".join(r + b"/" + n + b"\n" for n in (b"a.png", b"t\tab.png", b"x\xff.png", b"gone.png",
                                                            b"b.png")))
    rep = tmp_path / "dups.tsv"
    assert main(["data", "dedup", str(lst), "--report", str(rep), "--workers", "0"]) == 0
    lines = rep.read_text(encoding="utf-8").splitlines()
    r = str(root)
    assert lines[:2] == [f"{r}/t\\tab.png\t{r}/a.png", f"{r}/x\\xff.png\t{r}/a.png"]
    assert len(lines) == 3 and lines[2].startswith(f"#unreadable\t{r}/gone.png\tFileNotFoundError")
    assert _names(lst, tmp_path / "idx", exclude=str(rep)) == [f"{r}/a.png", f"{r}/b.png"]


def test_names_with_tabs_and_line_breaks_stay_one_line_in_every_report(tmp_path):
    """A name holding a tab or a carriage return (legal in a folder or a tar shard) is written printable (its
    '\\t', '\\r') by seer data check --report (and OUT/skipped_files.txt, the same writer) and by seer data
    dedup --report: each report stays one line per file, and leaves those files out as data.exclude. Written
    as they were, the tab cut the name short, and the carriage return ended the line (universal newlines)
    into a name that matched nothing and a relative one, which refused the whole file. (A name with a line
    feed is left out of the index itself.)"""
    odd = ["t\tab.png", "c\rr.png"]
    root = tmp_path / "imgs"
    _files(root, {"a.png": IMG[0], "b.png": IMG[1], "n\nl.png": b"not an image",
                  **{n: b"not an image" for n in odd}})
    r = str(root)
    rep = tmp_path / "bad.tsv"
    assert main(["data", "check", r, "--workers", "0", "--report", str(rep)]) == 0
    lines = rep.read_bytes().split(b"\n")
    assert lines[-1] == b"" and sorted(line.split(b"\t")[0].decode() for line in lines[:-1]) == \
        sorted(f"{r}/" + n.replace("\t", "\\t").replace("\r", "\\r") for n in odd)
    assert _names(root, tmp_path / "idx", exclude=str(rep)) == [f"{r}/a.png", f"{r}/b.png"]
    # dedup: duplicates with such names (sorted after the images they copy, which are kept)
    root2 = tmp_path / "imgs2"
    _files(root2, {"a.png": IMG[0], "b.png": IMG[1], odd[0]: IMG[0], odd[1]: IMG[1]})
    r2, dups = str(root2), tmp_path / "dups.tsv"
    assert main(["data", "dedup", r2, "--report", str(dups), "--workers", "0"]) == 0
    assert dups.read_bytes().decode() == f"{r2}/t\\tab.png\t{r2}/a.png\n{r2}/c\\rr.png\t{r2}/b.png\n"
    assert _names(root2, tmp_path / "idx2", exclude=str(dups)) == [f"{r2}/a.png", f"{r2}/b.png"]


def test_a_report_line_whose_duplicate_is_the_kept_image_itself_leaves_that_image_in(tmp_path, caplog):
    """A list naming one file twice (and a shard holding a member twice) gives 'Q<TAB>Q': names are matched, so
    leaving Q out would leave out the kept image too (every entry of it), not only the repeated one."""
    _files(tmp_path / "d", {"q.png": IMG[0], "p.png": IMG[1], "c.png": IMG[1]})
    d = str(tmp_path / "d")
    lst = tmp_path / "l.txt"
    lst.write_text("d/q.png\nd/p.png\nd/q.png\nd/c.png\n")
    rep = tmp_path / "dups.tsv"
    assert main(["data", "dedup", str(lst), "--report", str(rep), "--workers", "0"]) == 0
    assert rep.read_text().splitlines() == [f"{d}/q.png\t{d}/q.png", f"{d}/c.png\t{d}/p.png"]
    assert _names(lst, tmp_path / "idx", exclude=str(rep)) == [f"{d}/q.png", f"{d}/p.png", f"{d}/q.png"]
    assert "1 line(s) of" in caplog.text and "(first: line 1)" in caplog.text
    s = write_shard(tmp_path / "s.tar", [("k0.png", IMG[0]), ("k1.png", IMG[1]), ("k0.png", IMG[0])])
    trep = tmp_path / "tar.tsv"
    assert main(["data", "dedup", s, "--report", str(trep), "--workers", "0"]) == 0
    assert trep.read_text().splitlines() == [f"{s}:k0.png\t{s}:k0.png"]
    assert _names(s, tmp_path / "tidx", exclude=str(trep)) == [f"{s}:k0.png", f"{s}:k1.png", f"{s}:k0.png"]


def test_a_dedup_report_of_tar_shards_then_a_training_index_without_the_copies(tmp_path, capsys):
    s0 = write_shard(tmp_path / "s0.tar", [("k0.png", IMG[0]), ("k0.json", b"{}"), ("k1.png", IMG[1])])
    s1 = write_shard(tmp_path / "s1.tar", [("k2.png", IMG[1]), ("k3.png", IMG[2]), ("k4.png", IMG[0])])
    glob, rep = str(tmp_path / "*.tar"), tmp_path / "dups.tsv"
    assert main(["data", "dedup", glob, "--report", str(rep), "--workers", "0"]) == 0
    assert f"--set data.exclude={rep}" in capsys.readouterr().out
    assert rep.read_text().splitlines() == [f"{s1}:k4.png\t{s0}:k0.png", f"{s1}:k2.png\t{s0}:k1.png"]
    cache = tmp_path / "idx"
    meta = build_index(glob, "auto", cache, exclude=str(rep))
    src = open_index(meta, cache)
    assert [src.name(i) for i in range(len(src))] == [f"{s0}:k0.png", f"{s0}:k1.png", f"{s1}:k3.png"]
    assert [src.read(i) for i in range(len(src))] == [IMG[0], IMG[1], IMG[2]]  # the offsets went with the names
    assert meta["exclude"]["excluded"] == 2 and meta["files"]["size.npy"] == (cache / "size.npy").stat().st_size
    # dedup of the same shards with the report as --exclude: no copies left
    assert main(["data", "dedup", glob, "--report", str(tmp_path / "again.tsv"), "--workers", "0",
                 "--exclude", str(rep)]) == 0
    assert "3 images, 3 unique, 0 duplicates" in capsys.readouterr().out


def test_reusing_the_index_with_another_or_a_changed_file_is_refused(tmp_path):
    root = tmp_path / "imgs"
    _files(root, {"a.png": IMG[0], "b.png": IMG[1], "c.png": IMG[2]})
    r, cache = str(root), tmp_path / "idx"
    ex, other = tmp_path / "ex.txt", tmp_path / "other.txt"
    ex.write_text(f"{r}/a.png\n")
    other.write_text(f"{r}/b.png\n")
    build_index(r, "auto", cache, exclude=str(ex))
    with pytest.raises(DataSourceError, match=rf"data.exclude '{other}' differs from '{ex}', which the index was "
                                              rf"made with .*set data.exclude back, .* or delete {cache}"):
        build_index(r, "auto", cache, exclude=str(other))
    with pytest.raises(DataSourceError, match=rf"made with data.exclude='{ex}' \(1 images left out\), but this "
                                              rf"config has data.exclude=''"):
        build_index(r, "auto", cache)
    other.write_text(f"{r}/a.png\n")  # the same bytes elsewhere: the same index
    assert build_index(r, "auto", cache, exclude=str(other))["count"] == 2
    os.utime(ex, ns=(1, 1))  # touched, not changed
    assert build_index(r, "auto", cache, exclude=str(ex))["count"] == 2
    ex.write_text(f"{r}/a.png\n{r}/c.png\n")
    with pytest.raises(DataSourceError, match=rf"data.exclude '{ex}' changed since the index was made"):
        build_index(r, "auto", cache, exclude=str(ex))
    # the ranks that only read the index rank 0 checked: whether a file was given, not its bytes
    assert build_index(r, "auto", cache, exclude=str(ex), check_shards=False)["count"] == 2
    build_index(r, "auto", tmp_path / "plain")
    with pytest.raises(DataSourceError, match=r"made without data.exclude, but this config has data.exclude="):
        build_index(r, "auto", tmp_path / "plain", exclude=str(ex))


def test_a_file_naming_none_of_the_images_or_relative_names_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    _files(root, {"a.png": IMG[0], "b.png": IMG[1]})
    ex = tmp_path / "ex.txt"
    ex.write_text("/mnt/copy/imgs/a.png\n/mnt/copy/imgs/b.png\n")  # a report of another mount of the data
    with pytest.raises(DataSourceError, match=r"names 2 images, none of which is in data.source .* \(e.g. "
                                              r"'/mnt/copy/imgs/a.png', '/mnt/copy/imgs/b.png'\)"):
        build_index(str(root), "auto", tmp_path / "idx", exclude=str(ex))
    assert not (tmp_path / "idx" / "index.json").exists()  # nothing a rerun would reuse
    ex.write_text(f"# the images\n{root}/a.png\nimgs/b.png\n")
    with pytest.raises(DataSourceError, match=r"line 3: 'imgs/b.png' is not an absolute path"):
        build_index(str(root), "auto", tmp_path / "idx", exclude=str(ex))
    ex.write_text(f"{root}/a.png\n{root}/b.png\n")
    with pytest.raises(DataSourceError, match="leaves out all 2 images of data.source"):
        build_index(str(root), "auto", tmp_path / "idx", exclude=str(ex))
    ex.write_text("# nothing\n")  # an empty report (no duplicates found): nothing left out, no error
    assert build_index(str(root), "auto", tmp_path / "idx", exclude=str(ex))["exclude"]["names"] == 0
    with pytest.raises(DataSourceError, match="built-in set"):
        build_index("digits", "auto", tmp_path / "digits", exclude=str(ex))
