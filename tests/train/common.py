"""Helpers for the training tests: run the CLI in a subprocess (optionally killed at a chosen point)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A tiny run that exercises every piece of state: multi-crop in 2 DataLoader workers over image files, an
# epoch boundary (24 images / 8 per step), the queue (filled from the second epoch), prototype freezing
# across the resume point, drop-path (the torch RNG), LARS momentum and the warm-up + cosine schedule.
RESUME_SETTINGS = ["train.max_steps=6", "checkpoint.every=3", "logging.every=1", "data.augment_on=workers",
                   "data.num_workers=2", "loss.queue_length=16", "loss.queue_start_epoch=1",
                   "loss.freeze_prototypes_iters=4", "model.drop_path_rate=0.1", "train.threads=1"]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def seer(*args: str, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "seer", *args], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"seer {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def seer_killed(patch: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``seer ARGS`` in a process that first executes ``patch`` (Python source that may arrange for the
    process to SIGKILL itself at a chosen point); return the finished process. The process leads a session
    of its own, so that a patch may signal its whole process group (its DataLoader workers) as SLURM does."""
    code = "import os, signal, sys\n" + patch + "\nfrom seer.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=ROOT, start_new_session=True)


KILL_AT_STEP = """
import seer.train.trainer as _t
_orig = _t.Trainer.train_step
def _step(self, *a, **k):
    if self.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _orig(self, *a, **k)
_t.Trainer.train_step = _step
"""

# scancel / preemption: SIGTERM to every process of the job, the DataLoader workers included, from another
# process (torch's workers exit quietly on a SIGTERM from their parent, but not on one from SLURM); twice, as
# under `srun torchrun`, whose agent forwards the job's SIGTERM to each rank's process group.
TERM_GROUP_AT_STEP = """
import subprocess
import seer.train.trainer as _t
_orig = _t.Trainer.train_step
def _step(self, *a, **k):
    if self.step == {step}:
        for _ in range(2):
            subprocess.run(["kill", "-TERM", "--", f"-{{os.getpgid(0)}}"])
    return _orig(self, *a, **k)
_t.Trainer.train_step = _step
"""

# Ctrl-C in a terminal: SIGINT to the foreground process group (the main process and its DataLoader
# workers), as torchrun then forwards it once more; or twice, ECHO_S apart.
INT_GROUP_AT_STEP = """
import subprocess, time
import seer.train.trainer as _t
_t.SIGINT_ECHO_S = {echo_s}
_orig = _t.Trainer.train_step
def _step(self, *a, **k):
    if self.step == {step}:
        for i in range({times}):
            subprocess.run(["kill", "-INT", "--", f"-{{os.getpgid(0)}}"])
            time.sleep({gap_s} if i == 0 else 0)
    return _orig(self, *a, **k)
_t.Trainer.train_step = _step
"""

KILL_IN_COMMIT = """
import seer.train.checkpoint as _c
_orig = _c.CheckpointManager._commit
def _commit(self, tmp, final):
    if final.name == "{name}":
        os.kill(os.getpid(), signal.SIGKILL)  # every file written, the rename not done
    return _orig(self, tmp, final)
_c.CheckpointManager._commit = _commit
"""


def records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The JSON records of OUT/NAME, one per line (the trainer writes no blank lines)."""
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out)}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' (or checkpoints') backbones are equal bit for bit."""
    import torch

    from seer import load_pretrained
    sa, sb = load_pretrained(a).state_dict(), load_pretrained(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
