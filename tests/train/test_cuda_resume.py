"""Resume on a GPU with the SwAV queue filled: the checkpoint holds the queue on the CPU (run by
bench/gpu_check.sh with the other GPU tests)."""
from __future__ import annotations

import pytest
import torch

from seer.config import apply_overrides, preset
from seer.train import Trainer

pytestmark = pytest.mark.cuda


def test_resume_with_a_full_queue_on_the_gpu(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["train.device=cuda", "train.max_steps=4", "checkpoint.every=2",
                                           "loss.queue_length=16", "loss.queue_start_epoch=0",
                                           "logging.every=1"])
    Trainer(apply_overrides(cfg, ["train.max_steps=2"]), tmp_path).fit()
    resumed = Trainer(cfg, tmp_path)
    assert resumed.step == 2 and resumed.queue.full and resumed.queue.queue.device.type == "cuda"
    assert resumed.fit()["step"] == 4
    assert torch.isfinite(resumed.queue.queue).all()
