"""Exact resume: 6 steps straight == 3 steps, SIGKILL, the same command again (bit for bit on CPU); a
checkpoint killed while being written is never used."""
import json
import signal

import pytest

from seer.train import list_checkpoints
from tests.images import write_good_images
from tests.together import together

from .common import (INT_GROUP_AT_STEP, KILL_AT_STEP, KILL_IN_COMMIT, RESUME_SETTINGS, TERM_GROUP_AT_STEP, losses,
                     same_weights, seer, seer_killed)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_good_images(root, 24)
    return root


def _args(images, out):
    sets = [a for s in RESUME_SETTINGS + [f"data.source={images}"] for a in ("--set", s)]
    return ["train", "--preset", "tiny", "--out", str(out), *sets]


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    seer(*_args(images, out))
    return out


def test_kill_and_rerun_gives_the_same_losses_bit_for_bit(images, straight, tmp_path):
    out = tmp_path / "killed"
    proc = seer_killed(KILL_AT_STEP.format(step=3), *_args(images, out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    rerun = seer(*_args(images, out))
    assert "resuming from" in rerun.stdout and "step 3 of 6" in rerun.stdout
    expected, got = losses(straight), losses(out)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # exact float equality, every step
    assert same_weights(straight, out)


def test_checkpoint_killed_while_being_written_is_not_used(images, straight, tmp_path):
    out = tmp_path / "killed_in_save"
    proc = seer_killed(KILL_IN_COMMIT.format(name="step_00000006"), *_args(images, out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step_00000006").is_dir()  # fully written, never committed
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000003"]
    rerun = seer(*_args(images, out))
    assert "step 3 of 6" in rerun.stdout  # the previous, complete checkpoint
    assert not (ckpts / ".tmp-step_00000006").exists()
    assert losses(out) == losses(straight)
    assert same_weights(straight, out)


def test_sigterm_to_the_whole_job_saves_and_the_rerun_continues(images, straight, tmp_path):
    """SIGTERM reaches the DataLoader workers too (scancel, preemption): the run still saves at the end of the
    step and exits 0. Here it arrives during step 3, a periodic-save step: one save, not two."""
    out = tmp_path / "terminated"
    proc = seer_killed(TERM_GROUP_AT_STEP.format(step=2), *_args(images, out))
    assert proc.returncode == 0, proc.stderr
    assert "stopped by signal at step 3" in proc.stdout and f"outputs in {out}" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".lock", "step_00000003"]  # the run lock
    rerun = seer(*_args(images, out))
    assert "step 3 of 6" in rerun.stdout
    assert losses(out) == losses(straight)
    assert same_weights(straight, out)


def test_ctrl_c_saves_and_a_second_one_stops_at_once(images, straight, tmp_path):
    """Ctrl-C reaches the main process and its DataLoader workers: like SIGTERM, the run saves at the end of
    the step (here step 2, not a periodic-save step) and exits 0, also when the signal arrives twice at once
    (torchrun forwarding it); it had stopped with a KeyboardInterrupt, losing the steps since the last save.
    A second Ctrl-C later stops at once. A SIGINT that the parent ignores (a job started with '&' from a
    script) stays ignored."""
    out, twice, ignoring = tmp_path / "interrupted", tmp_path / "interrupted_twice", tmp_path / "ignoring"
    ignore = "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    # three runs at once, each in a process group of its own (the signals reach one run only)
    proc, proc_twice, proc_ignoring = together(
        lambda: seer_killed(INT_GROUP_AT_STEP.format(step=1, times=2, gap_s=0.0, echo_s=1.0), *_args(images, out)),
        lambda: seer_killed(INT_GROUP_AT_STEP.format(step=1, times=2, gap_s=0.2, echo_s=0.1), *_args(images, twice)),
        lambda: seer_killed(ignore + INT_GROUP_AT_STEP.format(step=1, times=1, gap_s=0.0, echo_s=1.0),
                            *_args(images, ignoring)))
    assert proc.returncode == 130, proc.stderr  # saved, and a shell sees an interrupted command
    assert "stopped by signal at step 2" in proc.stdout and "Ctrl-C: saving a checkpoint" in proc.stderr
    assert "stopped: step 2 in" in proc.stdout and "done:" not in proc.stdout  # (it said 'done: step 2')
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    rerun = seer(*_args(images, out))
    assert "step 2 of 6" in rerun.stdout
    assert losses(out) == losses(straight)
    assert same_weights(straight, out)
    assert proc_twice.returncode == 130 and "seer train: interrupted" in proc_twice.stderr, proc_twice.stderr
    assert "Traceback" not in proc_twice.stderr
    assert list_checkpoints(twice / "checkpoints") == []
    assert proc_ignoring.returncode == 0 and "stopped by signal" not in proc_ignoring.stdout, proc_ignoring.stderr
    assert [p.name for p in list_checkpoints(ignoring / "checkpoints")] == ["step_00000003", "step_00000006"]


CTRL_C_IN_FINAL_EVAL = """
import seer.train.trainer as _t
def _evaluate(self, *a, **k):  # Ctrl-C while the final evaluation runs (the stop handler is restored by then)
    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError("not interrupted")
_t.Trainer.evaluate = _evaluate
"""


def test_ctrl_c_in_the_final_evaluation_keeps_the_finished_run(images, tmp_path):
    """It printed a KeyboardInterrupt traceback after the last checkpoint, as if the run had failed."""
    out = tmp_path / "eval_interrupted"
    args = [*_args(images, out), "--set", "train.max_steps=3", "--set", "eval.at_end=true"]
    proc = seer_killed(CTRL_C_IN_FINAL_EVAL, *args)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Ctrl-C during the final evaluation" in proc.stderr
    assert "done: step 3" in proc.stdout and "rerun the same command to evaluate the finished run" in proc.stdout
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert not (out / "eval.json").exists()
    # The advice holds: the same command evaluates the finished run as its end would have (it said 'seer eval
    # knn', which writes no eval.json and scores no linear probe).
    rerun = seer(*args)
    assert "kNN top-1" in rerun.stdout and "linear probe top-1" in rerun.stdout
    assert {"knn_top1", "linear_top1"} <= set(json.loads((out / "eval.json").read_text()))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
