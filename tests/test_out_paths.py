"""seer.out_paths.check_file_paths: the one rule for where seer's commands may write, each refusal naming the
flag. (Permissions are stubbed: the tests may run as root, whom os.access lets write anywhere.)"""
import os

import pytest

import seer.out_paths as O


def _deny(monkeypatch, *denied):
    real = os.access
    monkeypatch.setattr(O.os, "access", lambda p, mode: str(p) not in map(str, denied) and real(p, mode))


def test_folders_and_missing_folders_are_named(tmp_path):
    (tmp_path / "x.json").mkdir()
    with pytest.raises(ValueError, match=rf"--out '{tmp_path}' is a folder; expected a file path"):
        O.check_file_paths("--out", str(tmp_path))
    with pytest.raises(ValueError, match=rf"--out '{tmp_path}/x.npy': '{tmp_path}/x.json' is a folder"):
        O.check_file_paths("--out", f"{tmp_path}/x.npy", (tmp_path / "x.npy", tmp_path / "x.json"))
    with pytest.raises(ValueError, match=rf"--report '{tmp_path}/no/r.tsv': the folder '{tmp_path}/no' does not "
                                         rf"exist"):
        O.check_file_paths("--report", f"{tmp_path}/no/r.tsv")
    O.check_file_paths("--out", f"{tmp_path}/new/deeper/vit.onnx", make_folders=True)  # (made by the command)


def test_where_files_cannot_be_made_is_named(tmp_path, monkeypatch):
    _deny(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=rf"--out '{tmp_path}/k.txt': cannot create files in '{tmp_path}'"):
        O.check_file_paths("--out", f"{tmp_path}/k.txt")
    with pytest.raises(ValueError, match=rf"cannot create files under '{tmp_path}'"):
        O.check_file_paths("--out", f"{tmp_path}/a/b/vit.safetensors", make_folders=True)
    # written in place: an existing writable file in that folder is fine, a new one is not
    (tmp_path / "r.tsv").write_text("")
    O.check_file_paths("--report", f"{tmp_path}/r.tsv", in_place=True)
    with pytest.raises(ValueError, match=rf"--report '{tmp_path}/new.tsv' is not writable"):
        O.check_file_paths("--report", f"{tmp_path}/new.tsv", in_place=True)
    _deny(monkeypatch, tmp_path / "r.tsv")
    with pytest.raises(ValueError, match=rf"--report '{tmp_path}/r.tsv' is not writable"):
        O.check_file_paths("--report", f"{tmp_path}/r.tsv", in_place=True)


def test_special_files_are_refused_where_the_output_is_renamed_into_place(tmp_path):
    """A rename over /dev/null (or /dev/stdout, a fifo, a link to one) would replace it by a regular file."""
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "null.txt").symlink_to("/dev/null")
    with pytest.raises(ValueError, match=rf"--out '{tmp_path}/fifo.txt' is a fifo; .* needs a regular file path"):
        O.check_file_paths("--out", f"{tmp_path}/fifo.txt")
    with pytest.raises(ValueError, match=rf"--out '{tmp_path}/x.npy': '{tmp_path}/null.txt' is a character device"):
        O.check_file_paths("--out", f"{tmp_path}/x.npy", (tmp_path / "x.npy", tmp_path / "null.txt"))
    with pytest.raises(ValueError, match="is a character device"):
        O.check_file_paths("--out", "/dev/null", make_folders=True)
    # written in place (a report to /dev/stdout): a special file is what the user asked for
    O.check_file_paths("--report", f"{tmp_path}/fifo.txt", in_place=True)
    O.check_file_paths("--report", f"{tmp_path}/null.txt", in_place=True)
