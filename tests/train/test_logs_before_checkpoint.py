"""The run's logs of the steps a checkpoint covers are on the disk before the checkpoint is committed: a run
resumed from it logs only the steps after it (and lists only the unreadable files met after it), so a crash
of the machine that kept the fsynced checkpoint but not the logs' unsynced tails left a gap for good."""
import os

from seer.config import apply_overrides, preset
from seer.train import Trainer
from tests.images import write_bad_images, write_good_images


def test_logs_are_synced_before_the_checkpoint_is_committed(tmp_path, monkeypatch):
    data = tmp_path / "images"
    write_good_images(data, 12)
    write_bad_images(data / "junk")  # 16 files, 8 per step: both steps read every file, 4 of them unreadable
    tensorboard = True
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        tensorboard = False
    cfg = apply_overrides(preset("tiny"), [f"data.source={data}", "train.max_steps=2", "checkpoint.every=2",
                                           "train.threads=1", "eval.every=2", "eval.max_images=40",
                                           "eval.linear=false", f"logging.tensorboard={str(tensorboard).lower()}"])
    out = tmp_path / "run"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("rename", os.path.basename(src)))
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    if tensorboard:
        real_flush = SummaryWriter.flush
        monkeypatch.setattr(SummaryWriter, "flush", lambda self: (events.append(("tensorboard", None)),
                                                                  real_flush(self))[1])
    Trainer(cfg, out).fit()
    commit = events.index(("rename", ".tmp-step_00000002"))
    before = events[:commit]
    for name in ("metrics.jsonl", "eval_history.jsonl", "skipped_files.txt", "."):
        st = os.stat(out / name)
        assert ("fsync", (st.st_dev, st.st_ino)) in before, name
    if tensorboard:
        assert ("tensorboard", None) in before
    assert len((out / "skipped_files.txt").read_text().splitlines()) == 4



def test_a_log_that_cannot_be_synced_does_not_stop_the_save(tmp_path, monkeypatch, caplog):
    import errno
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1"])
    out = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd):
        if (out / "metrics.jsonl").is_file() and os.path.samestat(os.fstat(fd), os.stat(out / "metrics.jsonl")):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with caplog.at_level("WARNING"):
        assert Trainer(cfg, out).fit()["step"] == 1
    assert (out / "checkpoints" / "step_00000001").is_dir()
    assert "cannot sync the run's logs" in caplog.text and "Input/output error" in caplog.text
