"""seer.durable: atomic writes, and folder syncs that pass over a filesystem that cannot sync a folder."""
import errno
import os
import stat

import pytest
import torch

import seer.durable as D
from seer.train import CheckpointManager, list_checkpoints
from seer.train.checkpoint import load_tensors


def test_a_failed_write_leaves_the_old_file(tmp_path):
    f = tmp_path / "x.json"
    D.write_atomic(f, lambda p: p.write_text("old"))
    assert f.read_text() == "old" and not (tmp_path / "x.json.part").exists()

    def half(p):
        p.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        D.write_atomic(f, half, suffix=".tmp")
    assert f.read_text() == "old"


def _folder_fsync_fails(monkeypatch, code):
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(D.os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_checkpoints_save_where_the_filesystem_cannot_sync_a_folder(tmp_path, monkeypatch, caplog, code):
    """Some network and FUSE filesystems refuse to fsync a folder: a checkpoint there must still be saved
    (the rename is made; its durability is what that filesystem gives)."""
    _folder_fsync_fails(monkeypatch, code)
    monkeypatch.setattr(D, "_told", set())
    with caplog.at_level("WARNING", "seer.durable"):
        D.sync_folder(tmp_path)
        D.sync_folder(tmp_path)
    assert caplog.text.count(f"cannot fsync the folder {tmp_path}") == 1  # (said once)
    mgr = CheckpointManager(tmp_path, keep=2)
    mgr.save(1, {"w": torch.ones(3)}, {"rank": 0}, {"step": 1}, "x: 1\n")
    dest = {"w": torch.zeros(3)}
    load_tensors(list_checkpoints(tmp_path)[-1], dest)
    assert torch.equal(dest["w"], torch.ones(3))


def test_a_failing_disk_is_not_passed_over(tmp_path, monkeypatch):
    _folder_fsync_fails(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as e:
        D.sync_folder(tmp_path)
    assert e.value.errno == errno.EIO
    with pytest.raises(FileNotFoundError):
        D.sync_folder(tmp_path / "gone")
