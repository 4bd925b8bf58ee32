"""Warm-up + cosine schedules and the scheduler's checkpointed state."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seer.optim import LARS, Scheduler, WarmupCosine


def test_warmup_then_cosine_values():
    s = WarmupCosine(4.8, total_steps=110, warmup_steps=10, start=0.3, final=0.0048)
    assert s(0) == pytest.approx(0.3)
    assert s(5) == pytest.approx(0.3 + 4.5 * 0.5)
    assert s(10) == pytest.approx(4.8)
    assert s(60) == pytest.approx(0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == s(10_000) == pytest.approx(0.0048)
    values = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # cosine part is non-increasing
    assert WarmupCosine(1.0, total_steps=5)(0) == 1.0  # no warm-up starts at the peak


def test_vissl_global_cosine_for_seer():
    """VISSL's composite schedule (SEER-10B, seer_spec.md 1.11 and 2.4): the cosine is evaluated on the whole
    run's progress t / T, so it drops a little below the peak where the warm-up ends."""
    T, W = 126_008, 5_500
    s = WarmupCosine(9.3, total_steps=T, warmup_steps=W, start=0.15, final=0.0093, cosine="global")
    vissl = lambda t: 0.0093 + 0.5 * (9.3 - 0.0093) * (1 + math.cos(math.pi * t / T))  # noqa: E731
    assert s(0) == pytest.approx(0.15) and s(W // 2) == pytest.approx(0.15 + (9.3 - 0.15) / 2)
    for t in (W, 63_004, T - 1):
        assert s(t) == pytest.approx(vissl(t), rel=1e-12)
    assert s(W) == pytest.approx(9.256, abs=1e-3) and s(63_004) == pytest.approx(4.655, abs=1e-3)
    assert s(T) == pytest.approx(0.0093)
    from seer.config import preset
    o = preset("seer-vit-10b").optim
    assert (o.cosine, o.warmup_steps, preset("seer-vit-10b").train.max_steps) == ("global", W, T)
    with pytest.raises(ValueError, match="cosine must be one of"):
        WarmupCosine(1.0, total_steps=5, cosine="vissl")


def test_learning_rates_follow_the_global_batch_where_a_reference_is_set(caplog):
    """SEER's 9.3 is for 7936 images per step: the preset had 16 images per data-parallel rank at tp=8, 992 on
    its 496 GPUs, at the full rate. The rank batch is now SEER's 16 per GPU x 8, and the rates scale linearly
    to the run's batch (VISSL's rule) where optim.lr_reference_batch is set; the swav preset likewise."""
    from seer.config import preset
    from seer.optim.config import scaled_to_batch
    from seer.parallel import ParallelDims
    cfg = preset("seer-vit-10b")
    dp = 496 // cfg.parallel.tp
    assert cfg.data.batch_size * dp == cfg.optim.lr_reference_batch == 7936
    assert scaled_to_batch(cfg.optim, 7936) == cfg.optim
    small = scaled_to_batch(cfg.optim, 992)
    assert (small.lr, small.start_warmup_lr, small.final_lr) == pytest.approx((9.3 / 8, 0.15 / 8, 0.0093 / 8))
    swav = preset("swav-vit-small")
    assert scaled_to_batch(swav.optim, 8 * swav.data.batch_size).lr == pytest.approx(0.6)
    assert scaled_to_batch(preset("demo").optim, 12345) == preset("demo").optim  # no reference: as given
    # the trainer's path: the schedule's peak on one process of tiny's 8 images, with a reference of 64
    from seer.config import apply_overrides
    from seer.train.build import build_model, build_optimizer_and_schedule
    tiny = apply_overrides(preset("tiny"), ["optim.lr_reference_batch=64", "train.optimizer=lars"])
    model = build_model(tiny, ParallelDims(tiny.parallel, device_type="cpu", world_size=1), torch.device("cpu"))
    with caplog.at_level("INFO"):
        _, sched = build_optimizer_and_schedule(tiny, model, global_batch=tiny.data.batch_size)
    f = tiny.data.batch_size / 64
    assert sched.lr_schedule(tiny.optim.warmup_steps) == pytest.approx(tiny.optim.lr * f)
    assert "learning rates scaled to the global batch of 8 images" in caplog.text


def test_bad_lengths():
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        WarmupCosine(1.0, total_steps=5, warmup_steps=6)


def test_scheduler_sets_groups_and_resumes():
    model = nn.Linear(3, 3)
    opt = LARS([{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 0.5}], lr=99.0)
    lr = WarmupCosine(1.0, total_steps=20, warmup_steps=4, start=0.0, final=0.1)
    wd = WarmupCosine(1e-4, total_steps=20, start=1e-4, final=1e-3)
    sched = Scheduler(opt, lr, wd)
    assert opt.param_groups[0]["lr"] == 0.0
    for _ in range(6):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr(6)) and opt.param_groups[1]["lr"] == pytest.approx(lr(6) / 2)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(wd(6))
    other = Scheduler(LARS(model.parameters(), lr=5.0), lr)
    other.load_state_dict(sched.state_dict())
    assert other.last_step == 6 and other.optimizer.param_groups[0]["lr"] == pytest.approx(lr(6))
    assert sched.lr == pytest.approx(lr(6)) and torch.is_tensor(model.weight)
