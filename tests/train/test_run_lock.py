"""One run per output folder: a second process on a live run's OUT is refused before it touches anything;
a killed run leaves no stale lock; Trainers of one process share the lock."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from seer.config import apply_overrides, preset
from seer.train import Trainer, list_checkpoints
from seer.train.lock import RunLockedError

HOLD = textwrap.dedent("""
    import sys, time
    from seer.train.lock import RunLock
    lock = RunLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
""")

TRY = textwrap.dedent("""
    import sys
    from seer.train.lock import RunLock, RunLockedError
    try:
        RunLock(sys.argv[1])
    except RunLockedError as e:
        print("refused:", e)
    else:
        print("free")
""")


def _cfg():
    return apply_overrides(preset("tiny"), ["train.max_steps=2", "checkpoint.every=1", "train.threads=1",
                                           "eval.at_end=false"])


def test_the_lock_imports_without_torch():
    """The lock's helper processes (and a CLI that only checks a run's lock) start in 0.1 s, not torch's 5 s:
    seer.train's package names load on first use."""
    code = "import sys; import seer.train.lock; from seer.train import lock; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_live_run_on_the_folder_refuses_another(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(), out).fit()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by another seer run \(pid {holder.pid} on "):
            Trainer(apply_overrides(_cfg(), ["train.max_steps=4"]), out)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    t = Trainer(apply_overrides(_cfg(), ["train.max_steps=4"]), out)  # the killed holder left no stale lock
    assert t.step == 2
    other = subprocess.run([sys.executable, "-c", TRY, str(out)], capture_output=True, text=True, timeout=120)
    assert other.stdout.startswith("refused:"), other.stdout + other.stderr  # held from construction ...
    again = Trainer(apply_overrides(_cfg(), ["train.max_steps=4"]), out)  # ... shared within this process
    t.fit()
    assert again.step == 2 and list_checkpoints(out / "checkpoints")[-1].name == "step_00000004"
    again.release()
    other = subprocess.run([sys.executable, "-c", TRY, str(out)], capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == "free", other.stdout + other.stderr  # released once fit ended


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    # DataLoader workers are forked children: a flock is shared with them unless they close their copies.
    import os

    from seer.train.lock import RunLock
    lock = RunLock(tmp_path)
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child lives until the parent's checks are over
        os.close(done_w)
        os.read(done_r, 1)
        os._exit(0)
    os.close(done_r)
    try:
        lock.release()
        other = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True,
                               timeout=120)
        assert other.stdout.strip() == "free", other.stdout + other.stderr
        again = RunLock(tmp_path)  # and this process may take it again
        again.release()
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # (checked while the child was alive)
    finally:
        os.close(done_w)
        os.waitpid(pid, 0)


def test_a_shared_checkpoint_dir_outside_out_is_locked_too(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpts)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"{ckpts} is in use by another seer run"):
            Trainer(apply_overrides(_cfg(), [f"checkpoint.dir={ckpts}"]), tmp_path / "other_out")
    finally:
        holder.kill()
        holder.wait()
    t = Trainer(apply_overrides(_cfg(), [f"checkpoint.dir={ckpts}"]), tmp_path / "other_out")
    t.fit()
    assert list_checkpoints(ckpts)[-1].name == "step_00000002"


def test_a_runs_default_checkpoint_folder_is_locked_in_its_own_right(tmp_path):
    """Run A keeps its checkpoints in A/checkpoints (no checkpoint.dir); run B names that folder as its
    checkpoint.dir. Only A/.lock was held, so B started, removed A's checkpoint in progress and resumed from
    A's checkpoints; and the other way round (A names X/checkpoints, B's --out is X)."""
    a = Trainer(_cfg(), tmp_path / "A")
    try:
        with pytest.raises(RunLockedError, match=f"{tmp_path / 'A' / 'checkpoints'} is in use by another seer run"):
            check_in_other_process(tmp_path / "A" / "checkpoints")
    finally:
        a.release()
    (tmp_path / "X" / "checkpoints").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "X" / "checkpoints")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match="checkpoints is in use by another seer run"):
            Trainer(_cfg(), tmp_path / "X")  # its default checkpoint folder is the other run's checkpoint.dir
    finally:
        holder.kill()
        holder.wait()


def check_in_other_process(folder):
    """RunLock(folder) in a fresh process (this process's own Trainers share their locks)."""
    out = subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True, check=True).stdout
    if out.startswith("refused:"):
        raise RunLockedError(out[len("refused: "):].strip())
    assert out.strip() == "free", out


def test_a_filesystem_without_locks_is_warned_not_fatal(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK on some network filesystems: the run goes on unlocked, with a warning naming
    the folder; seer export's and seer features' output locks the same (one lock_part for all)."""
    import errno
    import fcntl
    import logging

    from seer.part_lock import lock_part
    from seer.train.lock import RunLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING)
    (tmp_path / "run_a").mkdir()
    lock = RunLock(tmp_path / "run_a")
    assert f"this filesystem has no file locks; make sure no other run writes to {tmp_path / 'run_a'}" in caplog.text
    lock.release()
    assert lock_part(tmp_path / "x.part", "busy") is None
    assert "make sure no other process writes the same output" in caplog.text


def test_a_filesystem_whose_stat_and_fstat_disagree_still_locks(tmp_path, monkeypatch, caplog):
    """lock_part retries while the file at the path is not the one it locked (a holder renamed or removed it
    meanwhile); where the two never agree (a FUSE filesystem's inode numbers), it stops after a bound, keeps
    the lock and says so, instead of spinning forever."""
    import logging

    import seer.part_lock as PL
    monkeypatch.setattr(PL.os.path, "samestat", lambda a, b: False)
    caplog.set_level(logging.WARNING)
    fd = PL.lock_part(tmp_path / "x.part", "busy")
    try:
        assert fd is not None and "fstat and stat disagree" in caplog.text
    finally:
        PL.unlock_part(fd)


def test_a_later_run_in_the_same_process_logs_into_its_own_train_log_only(tmp_path):
    """OUT/train.log's handler stayed on the 'seer' logger after the run: every later run of the process (a
    notebook, a sweep) logged into each earlier run's train.log too. Trainers on one OUT share the file."""
    Trainer(_cfg(), tmp_path / "a").fit()
    Trainer(_cfg(), tmp_path / "b").fit()
    assert str(tmp_path / "a") in (tmp_path / "a" / "train.log").read_text()
    assert str(tmp_path / "b") not in (tmp_path / "a" / "train.log").read_text()
    first, second = Trainer(_cfg(), tmp_path / "c"), Trainer(_cfg(), tmp_path / "c")
    first.release()
    second.fit()  # (saves the checkpoint of step 2 that the first one would have)
    assert "step_00000002" in (tmp_path / "c" / "train.log").read_text()
