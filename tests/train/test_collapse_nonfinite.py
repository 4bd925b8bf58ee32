"""Collapse signals and warnings; non-finite losses are skipped, counted, and stop the run after a limit."""
import math

import pytest
import torch
import torch.nn.functional as F

import seer.train.trainer as trainer_mod
from seer.config import apply_overrides, preset
from seer.train import CollapseMonitor, NonFiniteLossError, Trainer, collapse_signals
from seer.train.collapse import REMEDIES

from .common import records, seer_killed


def test_signals_separate_collapsed_from_healthy_assignments():
    k, b, d = 64, 256, 16
    z = F.normalize(torch.randn(b, d), dim=1)
    protos = F.normalize(torch.randn(k, d), dim=1)
    healthy = collapse_signals(z @ protos.T * 8, z, num_prototypes=k, temperature=0.1, epsilon=0.05, iterations=3)
    const = F.normalize(torch.randn(1, d), dim=1).expand(b, d)
    collapsed = collapse_signals(const @ protos.T, const, num_prototypes=k, temperature=0.1, epsilon=0.05,
                                 iterations=3)
    assert healthy["assign_entropy"] < 0.9 < collapsed["assign_entropy"] <= 1.0 + 1e-6
    assert healthy["prototypes_used"] > 20 and collapsed["embedding_std"] < 1e-3 < 0.5 < healthy["embedding_std"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "degrees of freedom <= 0" for a batch of one
        one = collapse_signals(z[:1] @ protos.T, z[:1], num_prototypes=k, temperature=0.1, epsilon=0.05,
                               iterations=3)
    assert math.isnan(one["embedding_std"])
    mon = CollapseMonitor(num_prototypes=k, warmup_steps=0, window=2)
    assert [mon.update(s, 3.0, {"assign_entropy": 0.5, "embedding_std": math.nan}) for s in range(3)] == [None] * 3


def _signals_of_a_split_batch(rank, world, per_rank):
    import torch.distributed as dist
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(world * per_rank, 16, generator=g), dim=1)
    protos = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    mine = z[rank * per_rank:(rank + 1) * per_rank]
    split = collapse_signals(mine @ protos.T * 8, mine, num_prototypes=64, temperature=0.1, epsilon=0.05,
                             iterations=3, group=dist.group.WORLD)
    whole = collapse_signals(z @ protos.T * 8, z, num_prototypes=64, temperature=0.1, epsilon=0.05, iterations=3)
    return split["embedding_std"], whole["embedding_std"], float(z.std(0).mean() * 4)


@pytest.mark.parametrize("per_rank", [1, 3])
def test_embedding_spread_is_the_global_batchs_whatever_the_layout(per_rank):
    """The spread was each rank's own, averaged: another number for the same global batch under data
    parallelism, and NaN with one image per rank (the collapse warning could then never fire)."""
    from tests.dist_utils import run_distributed
    for split, whole, direct in run_distributed(_signals_of_a_split_batch, 2, per_rank):
        assert split == pytest.approx(whole, rel=1e-6) and whole == pytest.approx(direct, rel=1e-6)


def test_monitor_warns_after_warmup_with_the_remedies():
    mon = CollapseMonitor(num_prototypes=300, warmup_steps=20, window=3, every=100)
    flat = {"assign_entropy": 0.99, "embedding_std": 0.5}
    assert all(mon.update(s, math.log(300), flat) is None for s in range(0, 20, 5))  # warm-up
    text = [mon.update(s, math.log(300), flat) for s in range(20, 50, 5)]
    assert text[:2] == [None, None]  # the window fills with steps after the warm-up only
    assert text[2] is not None and "ln K" in text[2] and "near uniform" in text[2] and REMEDIES in text[2]
    for remedy in ("loss.epsilon", "loss.queue_length", "loss.freeze_prototypes_iters", "optim.lr"):
        assert remedy in text[2]
    assert text[3:] == [None, None, None]  # rate-limited
    ok = CollapseMonitor(num_prototypes=300, warmup_steps=0, window=2)
    assert [ok.update(s, 3.0, {"assign_entropy": 0.6, "embedding_std": 0.9}) for s in range(4)] == [None] * 4


def test_a_resumed_monitor_warns_where_an_uninterrupted_one_does(tmp_path):
    """Its window and last warning restarted on resume: warnings came at other steps than without the stop
    (a warning due right after the resume waited a window; one rate-limited came at once)."""
    import json
    flat, ok = {"assign_entropy": 0.99, "embedding_std": 0.5}, {"assign_entropy": 0.5, "embedding_std": 0.5}
    feed = [(s, math.log(300), flat if 25 <= s < 60 or s >= 85 else ok) for s in range(0, 200, 5)]
    whole = CollapseMonitor(num_prototypes=300, warmup_steps=10, window=3, every=40)
    want = [whole.update(*f) for f in feed]
    assert sum(w is not None for w in want) >= 2  # (the case exercises the window and the spacing)
    for cut in range(1, len(feed)):
        first = CollapseMonitor(num_prototypes=300, warmup_steps=10, window=3, every=40)
        got = [first.update(*f) for f in feed[:cut]]
        resumed = CollapseMonitor(num_prototypes=300, warmup_steps=10, window=3, every=40)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # (as meta.json holds it)
        got += [resumed.update(*f) for f in feed[cut:]]
        assert got == want, cut


def test_collapse_warning_shows_once_on_the_terminal_and_stays_in_train_log(tmp_path):
    """The CLI printed each collapse warning twice (its log line, then the trainer's own terminal line)."""
    constant = """
import seer.train.trainer as _t
_orig = _t.collapse_signals
def _signals(*a, **k):
    return {**_orig(*a, **k), "embedding_std": 0.0}  # a constant representation: the warning is due
_t.collapse_signals = _signals
"""
    out = tmp_path / "run"
    proc = seer_killed(constant, "train", "--preset", "tiny", "--set", "train.max_steps=6", "--set",
                       "train.collapse_warmup_steps=0", "--set", "train.threads=1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("possible collapse") == 1
    assert (out / "train.log").read_text().count("possible collapse") == 1


def test_monitor_does_not_call_a_falling_loss_collapse():
    # A shortened demo: losses above ln K in the warm-up, below it after; the window once averaged both.
    ln_k, learning = math.log(300), {"assign_entropy": 0.8, "embedding_std": 0.6}
    mon = CollapseMonitor(num_prototypes=300, warmup_steps=50, window=5)
    losses = [ln_k * 1.1] * 5 + [ln_k * 0.94] * 10
    assert [mon.update(10 * i, loss, learning) for i, loss in enumerate(losses)] == [None] * len(losses)
    # far above ln K is a confident wrong prediction, not a uniform one
    high = CollapseMonitor(num_prototypes=300, warmup_steps=0, window=2)
    assert [high.update(s, ln_k * 1.5, learning) for s in range(4)] == [None] * 4


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    real = trainer_mod.swav_loss
    bad_steps = {2, 3}

    def flaky(scores, **kw):
        loss = real(scores, **kw)
        return loss * float("nan") if _step[0] in bad_steps else loss

    _step = [0]
    orig_step = Trainer.train_step

    def counting(self, *a, **k):
        _step[0] = self.step + 1
        return orig_step(self, *a, **k)

    monkeypatch.setattr(trainer_mod, "swav_loss", flaky)
    monkeypatch.setattr(Trainer, "train_step", counting)
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=5", "train.max_nonfinite_steps=3", "train.threads=1",
                                           "checkpoint.every=0"])
    t = Trainer(cfg, tmp_path / "a")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    recs = records(tmp_path / "a")
    assert [r["nonfinite_skipped"] for r in recs] == [0, 1, 2, 2, 2]
    assert recs[1]["loss"] == "nan" and isinstance(recs[0]["loss"], float)
    assert t.step == 5 and any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert t.freezer.step == t.sched.last_step == 5  # skipped steps count as iterations for both

    bad_steps.update(range(1, 100))
    t = Trainer(apply_overrides(cfg, ["checkpoint.resume=never"]), tmp_path / "b")
    w0 = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="3 steps in a row with a non-finite loss"):
        t.fit()
    assert all(torch.equal(w0[k], v) for k, v in t.model.named_parameters())  # no update from a NaN step


def test_a_skipped_step_leaves_the_heads_batchnorm_statistics_as_they_were(tmp_path):
    """A NaN reaching the head's BatchNorm makes its running statistics NaN in the forward itself: the skip puts
    them back (they stayed NaN in every later checkpoint), and a finite loss still updates them."""
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=3", "train.max_nonfinite_steps=5", "train.threads=1",
                                           "checkpoint.every=0"])
    t = Trainer(cfg, tmp_path / "r")
    norms = [m for m in t.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms, "the tiny preset's head has a BatchNorm"
    hooks = [m.register_forward_pre_hook(lambda m, args: (args[0] * float("nan"),) if t.step == 1 else None)
             for m in norms]
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    for h in hooks:
        h.remove()
    recs = records(tmp_path / "r")
    assert [r["nonfinite_skipped"] for r in recs] == [0, 1, 1]
    after = t.model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.isfinite(after[k].float()).all() for k in stats)
    # two finite steps of three moved them (the skipped one did not count)
    assert all(int(after[k]) == int(before[k]) + 2 for k in stats if k.endswith("num_batches_tracked"))


def test_weights_made_nan_by_a_finite_loss_step_are_not_checkpointed(tmp_path):
    """A step whose loss is finite but one of whose gradients is NaN (no gradient scaler in bf16/fp32) makes the
    optimizer write NaN into the weights. Every later step is then skipped, but the periodic saves went on,
    each checkpoint holding the NaN weights: with checkpoint.keep=2 the finite ones were pruned, and the error
    said the last checkpoint held finite weights. Now the save refuses, and the finite checkpoints stay."""
    from seer.train.checkpoint import list_checkpoints, read_meta
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=8", "train.max_nonfinite_steps=5", "train.threads=1",
                                           "checkpoint.every=1", "checkpoint.keep=2", "eval.at_end=false"])
    t = Trainer(cfg, tmp_path / "r")
    real_step = t.opt.step

    def nan_grad_at_step_2(*a, **k):
        if t.step == 2:
            next(p for p in t.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return real_step(*a, **k)
    t.opt.step = nan_grad_at_step_2
    with pytest.raises(NonFiniteLossError, match="weights are NaN or inf at step 3.*step_00000002"):
        t.fit()
    kept = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [read_meta(p)["step"] for p in kept] == [1, 2]
    again = Trainer(cfg, tmp_path / "r")
    assert again.step == 2 and all(torch.isfinite(p).all() for p in again.model.parameters())
