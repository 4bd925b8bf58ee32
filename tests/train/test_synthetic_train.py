"""Training on data.source=synthetic: through the CLI, and killed and rerun bit for bit as test_resume's runs."""
import json
import signal

import pytest

from seer.cli import main
from seer.train import list_checkpoints
from tests.together import together

from .common import KILL_AT_STEP, RESUME_SETTINGS, losses, records, same_weights, seer, seer_killed

pytestmark = pytest.mark.slow


def test_two_steps_through_the_cli(tmp_path):
    """The tiny preset's device path (multi-crop in the training process) on 256 x 256 synthetic images."""
    out = tmp_path / "run"
    proc = seer("train", "--preset", "tiny", "--out", str(out), "--set", "data.source=synthetic", "--set",
                "train.max_steps=2")
    assert "done: step 2" in proc.stdout
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["skipped_files"] == 0 for r in recs)
    assert json.loads((out / "data" / "index.json").read_text())["format"] == "synthetic"
    assert not list((out / "data").glob("*.npy"))  # nothing was indexed


# RESUME_SETTINGS (multi-crop in 2 DataLoader workers, the queue, an epoch boundary at step 3) on 24 images
SETTINGS = RESUME_SETTINGS + ["data.source=synthetic", "data.synthetic_count=24", "data.synthetic_size=40x48"]


def _args(out):
    return ["train", "--preset", "tiny", "--out", str(out), *[a for s in SETTINGS for a in ("--set", s)]]


def test_kill_and_rerun_gives_the_same_losses_bit_for_bit(tmp_path, capsys):
    """The rerun's fresh worker processes make the same images for the same indices (from train.seed)."""
    straight, out = tmp_path / "straight", tmp_path / "killed"
    _, proc = together(lambda: seer(*_args(straight)), lambda: seer_killed(KILL_AT_STEP.format(step=3), *_args(out)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    rerun = seer(*_args(out))
    assert "resuming from" in rerun.stdout and "step 3 of 6" in rerun.stdout
    expected, got = losses(straight), losses(out)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # exact float equality, every step
    assert same_weights(straight, out)
    # Other images (another size) for the same run: refused, not silently trained on (in this process: the
    # refusal comes before any training)
    args = [a if a != "data.synthetic_size=40x48" else "data.synthetic_size=40" for a in _args(out)]
    capsys.readouterr()
    assert main([*args, "--set", "train.max_steps=8"]) != 0
    err = capsys.readouterr().err
    assert "data.synthetic_size: index '40x48', config '40x40'" in err, err
