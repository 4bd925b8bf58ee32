"""SyncBatchNorm1d: over 2 gloo ranks holding unequal slices of one batch it computes what one nn.BatchNorm1d
computes on the whole batch (outputs, gradients, running statistics); alone it is nn.BatchNorm1d; converting
keeps parameters, buffers and state_dict keys."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seer.parallel import SyncBatchNorm1d, convert_sync_batch_norm
from seer.parallel.sync_batch_norm import sync_batch_norm
from seer.swav import SwAVHead, SwAVHeadConfig
from tests.dist_utils import run_distributed

TOL = dict(rtol=1e-12, atol=1e-12)


def _batch(step: int, rows: int, shape_tail: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (rows, C[, L]) away from zero mean and unit variance, and the upstream gradient of a loss on it."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(rows, *shape_tail, generator=g, dtype=torch.float64) * 3 + 5
    return x, torch.randn(rows, *shape_tail, generator=g, dtype=torch.float64)


def _pair(momentum, affine=True, track=True, group=None):
    """A reference nn.BatchNorm1d and a SyncBatchNorm1d with the same random affine parameters (float64)."""
    ref = nn.BatchNorm1d(4, momentum=momentum, affine=affine, track_running_stats=track, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(7))
            ref.bias.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(8))
    return ref, SyncBatchNorm1d.from_batch_norm(_clone(ref), group)


def _clone(bn: nn.BatchNorm1d) -> nn.BatchNorm1d:
    out = nn.BatchNorm1d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         dtype=torch.float64)
    out.load_state_dict(bn.state_dict())
    return out


def _worst(diff: torch.Tensor) -> float:
    return float(diff.detach().abs().max()) if diff.numel() else 0.0  # a rank without rows differs nowhere


def _compare_steps(ref, par, rows: list[int], rank: int, shape_tail: tuple, steps: int = 3) -> dict:
    """Train-mode steps: ``ref`` on the whole batch, ``par`` on this rank's rows; then one eval step. The worst
    differences (outputs, input gradients, summed weight/bias gradients, running statistics)."""
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    diff = {"y": 0.0, "dx": 0.0, "dw": 0.0, "stats": 0.0, "eval": 0.0, "tracked": []}
    for step in range(steps):
        x, gy = _batch(step, sum(rows), shape_tail)
        xr, xp = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
        yr, yp = ref(xr), par(xp)
        (yr * gy).sum().backward()
        (yp * gy[lo:hi]).sum().backward()  # this rank's share of the same loss: the ranks' losses sum to it
        diff["y"] = max(diff["y"], _worst(yr[lo:hi] - yp))
        diff["dx"] = max(diff["dx"], _worst(xr.grad[lo:hi] - xp.grad))
        if ref.affine:  # the data-parallel reduction adds the ranks' gradients (FSDP then divides by dp)
            for p_ref, p_par in ((ref.weight, par.weight), (ref.bias, par.bias)):
                summed = p_par.grad.clone()
                dist.all_reduce(summed, group=par.process_group)
                diff["dw"] = max(diff["dw"], float((p_ref.grad - summed).abs().max()))
                p_ref.grad = p_par.grad = None
        if ref.track_running_stats:
            diff["stats"] = max(diff["stats"], float((ref.running_mean - par.running_mean).abs().max()),
                                float((ref.running_var - par.running_var).abs().max()))
            diff["tracked"].append((int(ref.num_batches_tracked), int(par.num_batches_tracked)))
    ref.eval()
    par.eval()
    x, _ = _batch(99, sum(rows), shape_tail)
    with torch.no_grad():
        diff["eval"] = _worst(ref(x)[lo:hi] - par(x[lo:hi]))
    return diff


CASES = {  # name: (rows per rank, (C[, L]), momentum, affine, track_running_stats)
    "unequal_2d": ([7, 4], (4,), 0.1, True, True),
    "unequal_3d": ([3, 2], (4, 5), 0.1, True, True),
    "cumulative_momentum": ([6, 5], (4,), None, True, True),
    "no_affine": ([5, 6], (4, 2), 0.3, False, True),
    "empty_rank": ([9, 0], (4,), 0.1, True, True),
}


def _body(rank, world):
    out = {}
    for name, (rows, tail, momentum, affine, track) in CASES.items():
        ref, par = _pair(momentum, affine, track, group=dist.group.WORLD)
        out[name] = _compare_steps(ref, par, rows, rank, tail)
    # A group of one rank (each rank its own): nn.BatchNorm1d on that rank's rows, no collective.
    groups = [dist.new_group([r]) for r in range(world)]
    ref, par = _pair(0.1, group=groups[rank])
    out["own_group"] = _compare_steps(ref, par, [5], 0, (4,))
    # Too few values over the whole group: every rank refuses, none waits.
    ref, par = _pair(0.1, group=dist.group.WORLD)
    try:
        par(torch.ones(1 - rank, 4, dtype=torch.float64))
        out["refused"] = "accepted"
    except ValueError as exc:
        out["refused"] = str(exc)
    return out


@pytest.mark.dist
def test_two_ranks_with_unequal_slices_match_one_batch_norm_on_the_whole_batch():
    for rank, res in enumerate(run_distributed(_body, 2)):
        for name, d in res.items():
            if name == "refused":
                assert "expected more than 1 value per channel over the process group" in d, d
                continue
            for key in ("y", "dx", "dw", "stats", "eval"):
                assert d[key] < 1e-12, (rank, name, key, d)
            assert all(r == p for r, p in d["tracked"]) and d["tracked"][-1][0] == 3, (rank, name, d)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_batch_norm_equivalence_without_a_group(shape, affine):
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5 if affine else None
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None
    params = (w, b) if affine else ()
    fn = (lambda x, w, b: sync_batch_norm(x, w, b, None, None, 0.1, 1e-5, None)) if affine else \
        (lambda x: sync_batch_norm(x, None, None, None, None, 0.1, 1e-5, None))
    assert torch.autograd.gradcheck(fn, (x, *params))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 1
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = sync_batch_norm(x, w, b, rm, rv, 0.25, 1e-5, None)
    torch.testing.assert_close(y, F.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.25, 1e-5), **TOL)
    torch.testing.assert_close((rm, rv), (rm_ref, rv_ref), **TOL)
    y.relu_().sum().backward()  # the head's ReLU(inplace=True) follows: the output must not be a view


def test_mixed_precision_dtypes():
    """bf16 input (autocast, or FSDP's bf16 parameters): statistics in float32, output and input gradient in
    bf16, parameter gradients in the parameters' dtype."""
    x = (torch.randn(16, 3) * 2 + 1).to(torch.bfloat16).requires_grad_()
    for dtype in (torch.float32, torch.bfloat16):
        w, b = torch.ones(3, dtype=dtype, requires_grad=True), torch.zeros(3, dtype=dtype, requires_grad=True)
        y = sync_batch_norm(x, w, b, None, None, 0.1, 1e-5, None)
        y.float().square().sum().backward()
        assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == b.grad.dtype == dtype
        expected = F.batch_norm(x.detach().float(), None, None, training=True)
        torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
        x.grad = None


def test_without_a_group_it_is_batch_norm_1d():
    """process_group=None: forward, gradients, running statistics (cumulative momentum) and eval identical."""
    for momentum in (0.1, None):
        ref, par = _pair(momentum)
        for step in range(3):
            x, gy = _batch(step, 6, (4,))
            xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yp = ref(xr), par(xp)
            (yr * gy).sum().backward()
            (yp * gy).sum().backward()
            assert torch.equal(yr, yp) and torch.equal(xr.grad, xp.grad)
            assert torch.equal(ref.weight.grad, par.weight.grad) and torch.equal(ref.bias.grad, par.bias.grad)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), par.state_dict().values()))
        ref.eval(), par.eval()
        assert torch.equal(ref(x), par(x))


def test_conversion_keeps_parameters_buffers_and_checkpoint_keys():
    torch.manual_seed(0)
    head = SwAVHead(8, SwAVHeadConfig(hidden_dims=[6, 5], output_dim=4, num_prototypes=3, batch_norm=True))
    head(torch.randn(10, 8))  # running statistics away from their initial values
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    params = [id(p) for p in head.parameters()]
    head.eval()
    convert_sync_batch_norm(head, None)
    assert [type(m) for m in head.projection] == [nn.Linear, SyncBatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [id(p) for p in head.parameters()] == params  # shared: an optimizer built before keeps working
    assert not head.projection[1].training  # the mode is kept
    now = head.state_dict()
    assert list(now) == list(saved) and all(torch.equal(now[k], saved[k]) for k in saved)
    plain = SwAVHead(8, SwAVHeadConfig(hidden_dims=[6, 5], output_dim=4, num_prototypes=3, batch_norm=True))
    plain.load_state_dict(now)  # a checkpoint of either loads into the other, strictly
    head.load_state_dict(plain.state_dict())
    # A BatchNorm1d itself is replaced (returned); other norms and already converted ones are left alone.
    with torch.device("meta"):  # the trainer converts before materialising
        bn, bn2d = nn.BatchNorm1d(3), nn.BatchNorm2d(3)
    new = convert_sync_batch_norm(bn, None)
    assert type(new) is SyncBatchNorm1d and new.weight is bn.weight and new.running_var is bn.running_var
    assert new.weight.is_meta and convert_sync_batch_norm(new, None) is new
    assert convert_sync_batch_norm(bn2d, None) is bn2d


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None, got str"):
        convert_sync_batch_norm(nn.BatchNorm1d(3), "world")
    with pytest.raises(TypeError, match="module must be an nn.Module, got int"):
        convert_sync_batch_norm(3, None)
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm1d, got BatchNorm2d"):
        SyncBatchNorm1d.from_batch_norm(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        SyncBatchNorm1d(3)(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="expected more than 1 value per channel over the process group"):
        sync_batch_norm(torch.randn(1, 3), None, None, None, None, 0.1, 1e-5, None)
