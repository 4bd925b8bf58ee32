"""Exact resume under tensor and data parallelism: 4 steps straight == 2 steps, then a new run resumed from the
step-2 checkpoint (bit for bit on CPU, in 2 gloo processes), with everything that carries state across the
resume point switched on: the forked tensor-parallel RNG stream (dropout on the split MLP columns, drop-path
on sequence shards), the SwAV queue, prototype freezing, LARS momentum and the schedule."""
import pytest
import torch

from seer import load_pretrained
from seer.config import apply_overrides, preset
from seer.train import Trainer
from tests.dist_utils import run_distributed

from .common import losses

pytestmark = [pytest.mark.slow, pytest.mark.dist]

SETTINGS = ["train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=3", "logging.every=1",
            "logging.progress=off", "train.threads=1", "loss.queue_length=8", "loss.queue_start_epoch=0",
            "loss.freeze_prototypes_iters=3", "model.drop_path_rate=0.2", "model.dropout=0.1",
            "data.batch_size=4"]


def _straight_then_resumed(rank, world, root, layout):
    straight, resumed = f"{root}/straight", f"{root}/resumed"
    Trainer(apply_overrides(preset("tiny"), SETTINGS + layout), straight).fit()
    start = f"{straight}/checkpoints/step_00000002"
    trainer = Trainer(apply_overrides(preset("tiny"), SETTINGS + layout + [f"checkpoint.resume={start}"]), resumed)
    assert trainer.step == 2
    trainer.fit()
    return True


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.tp=1"]],
                         ids=["tp2-sp", "dp2"])
def test_parallel_resume_gives_the_same_losses_bit_for_bit(tmp_path, layout):
    run_distributed(_straight_then_resumed, 2, str(tmp_path), layout)
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    assert got == {s: expected[s] for s in (3, 4)}  # exact float equality
    a, b = load_pretrained(tmp_path / "straight").state_dict(), load_pretrained(tmp_path / "resumed").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "parallel.tp=2" in layout:  # per-rank slices cannot be resumed by another split: refused, named
        start = tmp_path / "straight" / "checkpoints" / "step_00000002"
        with pytest.raises(ValueError, match="written with parallel.tp=2; resuming needs the same parallel.tp"):
            Trainer(apply_overrides(preset("tiny"), SETTINGS + [f"checkpoint.resume={start}"]), tmp_path / "tp1")
