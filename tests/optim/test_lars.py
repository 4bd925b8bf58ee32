"""LARS against a straightforward per-tensor implementation of apex's LARC + SGD (seer_spec.md 1.10)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from seer.optim import LARS, OptimConfig, build_optimizer, lars_param_groups


def reference_step(params, grads, bufs, *, lr, momentum, wd, trust, eps, clip, adapt_mask):
    """One LARC + SGD step, tensor by tensor, with Python control flow (apex/parallel/LARC.py semantics)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        g = g.clone()
        if adapt_mask[i]:
            wn, gn = float(p.norm()), float(g.norm())
            if wn != 0 and gn != 0:
                eta = trust * wn / (gn + wd * wn + eps)
                if clip:
                    eta = min(eta / lr, 1.0)
                g = (g + wd * p) * eta
            # else: no adaptation and no weight decay
        else:
            g = g + wd * p  # excluded: plain SGD (the exclusion groups have wd = 0)
        if bufs[i] is None:
            bufs[i] = g.clone()
        else:
            bufs[i] = momentum * bufs[i] + g
        p.sub_(lr * bufs[i])


def make_params():
    torch.manual_seed(0)
    return [torch.randn(8, 5), torch.zeros(8), torch.randn(5) * 3, torch.randn(3, 4, 2), torch.randn(7) * 1e-3]


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_matches_per_tensor_reference(clip, wd):
    ref = make_params()
    ours = [nn.Parameter(p.clone()) for p in ref]
    opt = LARS(ours, lr=0.7, momentum=0.9, weight_decay=wd, trust_coefficient=0.02, eps=1e-8, clip=clip)
    bufs = [None] * len(ref)
    for step in range(4):
        grads = [torch.randn_like(p) for p in ref]
        grads[4] = None if step == 1 else grads[4]  # a tensor skipped on one step keeps its state
        if step == 0:
            grads[1] = torch.zeros(8)  # zero gradient: no adaptation, no weight decay
        for p, g in zip(ours, grads):
            p.grad = g.clone() if g is not None else None
        opt.step()
        reference_step(ref, grads, bufs, lr=0.7, momentum=0.9, wd=wd, trust=0.02, eps=1e-8, clip=clip,
                       adapt_mask=[True] * 5)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-5)
    for p, b in zip(ours, bufs):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, atol=1e-6, rtol=1e-5)


def test_zero_tensor_gets_plain_sgd_step_without_weight_decay():
    bias = nn.Parameter(torch.zeros(4))
    opt = LARS([bias], lr=2.0, weight_decay=0.5)
    bias.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.full((4,), -2.0))  # raw lr, no eta, no decay


def test_bias_and_norm_exclusion_groups():
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))
    groups = lars_param_groups(model, exclude_bias_and_norm=True)
    excluded = [g for g in groups if g.get("lars") is False]
    assert len(excluded) == 1 and len(excluded[0]["params"]) == 3 and excluded[0]["weight_decay"] == 0.0
    ref = [p.detach().clone() for p in model.parameters()]
    opt = LARS(groups, lr=0.3, weight_decay=0.1)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    order = {id(p): i for i, p in enumerate(model.parameters())}
    mask = [p.dim() > 1 for p in model.parameters()]
    wds = [0.1 if m else 0.0 for m in mask]
    bufs = [None] * 4
    for i in range(4):  # reference per tensor with its group's weight decay
        reference_step([ref[i]], [grads[i]], [bufs[i]], lr=0.3, momentum=0.9, wd=wds[i], trust=0.001, eps=1e-8,
                       clip=False, adapt_mask=[mask[i]])
    for p in model.parameters():
        torch.testing.assert_close(p.detach(), ref[order[id(p)]])
    assert all(len(g["params"]) for g in groups)


def test_state_dict_round_trip_continues_identically():
    params = [nn.Parameter(t) for t in make_params()]
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    a, b = LARS(params, lr=0.5), LARS(twin, lr=0.5)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        if step == 0:
            b.step()
            b = LARS(twin, lr=0.5)
            b.load_state_dict(copy.deepcopy(LARS.state_dict(a)))
        else:
            b.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="'lr' must be >= 0"):
        LARS([nn.Parameter(torch.zeros(1))], lr=-1.0)


def test_build_optimizer_wires_schedules():
    model = nn.Linear(4, 4)
    cfg = OptimConfig(lr=1.0, start_warmup_lr=0.1, final_lr=0.001, warmup_steps=10, weight_decay=1e-4,
                      final_weight_decay=1e-2)
    opt, sched = build_optimizer(model, cfg, total_steps=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-4)
    for _ in range(10):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    for _ in range(90):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-2)
