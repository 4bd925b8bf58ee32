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
