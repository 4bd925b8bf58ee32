"""Checkpoint files: atomic commit, keep-last-N, and loading that never unpickles arbitrary objects."""
import os
import pickle

import pytest
import torch

from seer import load_pretrained
from seer.config import apply_overrides, preset
from seer.train import CheckpointManager, Trainer, UnsafeCheckpointError, list_checkpoints
from seer.train.checkpoint import load_rank_state, load_tensors, read_meta


def _save(mgr, step, value):
    return mgr.save(step, {"w": torch.full((3,), float(value))}, {"rank": 0}, {"step": step}, "x: 1\n")


def test_keep_last_n_and_incomplete_folders_are_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(mgr, step, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # A folder left by a killed writer (no meta.json, never renamed) is invisible, then cleaned up.
    (tmp_path / ".tmp-step_00000004").mkdir()
    (tmp_path / ".tmp-step_00000004" / "__0_0.distcp").write_bytes(b"partial")
    assert mgr.latest().name == "step_00000003"
    CheckpointManager(tmp_path, keep=2)
    assert not (tmp_path / ".tmp-step_00000004").exists()
    dest = {"w": torch.zeros(3)}
    load_tensors(mgr.latest(), dest)
    assert torch.equal(dest["w"], torch.full((3,), 3.0))
    assert read_meta(mgr.latest())["step"] == 3 and load_rank_state(mgr.latest(), 0) == {"rank": 0}
    _save(mgr, 3, 7)  # the same step again replaces it atomically
    load_tensors(mgr.latest(), dest)
    assert torch.equal(dest["w"], torch.full((3,), 7.0))


def test_resave_killed_between_its_renames_keeps_the_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=1)
    _save(mgr, 3, 3)

    def killed(src, dst):  # the process dies after moving the complete copy aside
        if str(src).endswith("step_00000003") and ".old-" in str(dst):
            real_replace(src, dst)
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr("seer.train.checkpoint.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 3, 9)
    monkeypatch.setattr("seer.train.checkpoint.os.replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-step_00000003", ".tmp-step_00000003"]
    mgr = CheckpointManager(tmp_path, keep=1)  # the next run: the copy moved aside is the checkpoint again
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]
    dest = {"w": torch.zeros(3)}
    load_tensors(mgr.latest(), dest)
    assert torch.equal(dest["w"], torch.full((3,), 3.0))


class _Evil:
    """Unpickling this runs a command (what a tampered pickle can do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=2", "checkpoint.every=2", "train.threads=1"])
    Trainer(cfg, out).fit()
    return out, cfg


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_tampered_index_is_refused_without_running_it(run, tmp_path):
    out, cfg = run
    bad_run = _copy(out, tmp_path / "bad")
    ckpt = list_checkpoints(bad_run / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_pretrained(bad_run)
    with pytest.raises(UnsafeCheckpointError):
        Trainer(cfg, bad_run)  # resuming refuses it too
    assert not marker.exists()


def test_tampered_rank_file_is_refused(run, tmp_path):
    out, cfg = run
    bad_run = _copy(out, tmp_path / "bad_rank")
    ckpt = list_checkpoints(bad_run / "checkpoints")[-1]
    marker = tmp_path / "pwned2"
    torch.save({"rng": _Evil(marker)}, ckpt / "rank_00000.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        Trainer(cfg, bad_run)
    assert not marker.exists()


def test_resume_needs_the_same_architecture(run, tmp_path):
    out, cfg = run
    other = apply_overrides(cfg, ["model.depth=3"])
    with pytest.raises(ValueError, match="model.depth: checkpoint 2, config 3"):
        Trainer(other, _copy(out, tmp_path / "arch"))
    with pytest.raises(FileExistsError, match="checkpoint.resume='never'"):
        Trainer(apply_overrides(cfg, ["checkpoint.resume=never"]), _copy(out, tmp_path / "never"))
