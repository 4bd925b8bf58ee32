"""The autograd collectives (forward and backward of each), the parallel cross-entropy, and the RNG tracker."""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from seer.parallel import mappings as M
from seer.parallel.cross_entropy import soft_cross_entropy
from seer.parallel.random import ForkedRNG, RNGStatesTracker, TP_STREAM, checkpoint_context_fn, seed_parallel_rng
from seer.model.layers import DropPath
from tests.dist_utils import run_distributed


def _value(rank, shape=(4, 3), scale=1.0):
    return (torch.arange(12.0).reshape(shape) + 1) * (rank + 1) * scale


def _check(fn, x, grad):
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def _mappings_body(rank, world):
    g = dist.group.WORLD
    xs = [_value(r) for r in range(world)]
    gs = [_value(r, scale=10.0) for r in range(world)]
    res = {}
    y, gx = _check(lambda t: M.copy_to_tensor_parallel_region(t, g), xs[rank], gs[rank])
    res["copy"] = torch.equal(y, xs[rank]) and torch.equal(gx, sum(gs))
    y, gx = _check(lambda t: M.reduce_from_tensor_parallel_region(t, g), xs[rank], gs[rank])
    res["reduce"] = torch.equal(y, sum(xs)) and torch.equal(gx, gs[rank])
    full_g = torch.cat(gs, dim=-1)
    y, gx = _check(lambda t: M.gather_from_tensor_parallel_region(t, g), xs[rank], full_g)
    res["gather_last"] = torch.equal(y, torch.cat(xs, -1)) and torch.equal(gx, gs[rank])
    half = [t[:2] for t in gs]  # each rank's gradient of its 2 sequences
    y, gx = _check(lambda t: M.scatter_to_sequence_region(t, g), xs[0], half[rank])
    res["scatter_seq"] = torch.equal(y, xs[0][2 * rank:2 * rank + 2]) and torch.equal(gx, torch.cat(half))
    big = [torch.cat([t, t + 100]) for t in gs]  # (8, 3) gradients, different per rank
    y, gx = _check(lambda t: M.gather_from_sequence_region(t, g), xs[rank], big[rank])
    res["gather_seq_tp"] = torch.equal(y, torch.cat(xs)) and torch.equal(gx, sum(big)[4 * rank:4 * rank + 4])
    y, gx = _check(lambda t: M.gather_from_sequence_region(t, g, to_tensor_parallel=False), xs[rank], big[0])
    res["gather_seq_rep"] = torch.equal(gx, big[0][4 * rank:4 * rank + 4])
    y, gx = _check(lambda t: M.reduce_scatter_to_sequence_region(t, g), xs[rank], half[rank])
    res["reduce_scatter_seq"] = torch.equal(y, sum(xs)[2 * rank:2 * rank + 2]) and torch.equal(gx, torch.cat(half))

    # Cross-entropy with the classes split over the ranks equals the full one; gradients are the slices.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 12, generator=gen) * 3
    targets = torch.softmax(torch.randn(5, 12, generator=gen), 1)
    weights = torch.randn(5, generator=gen)
    full = logits.clone().requires_grad_()
    want = soft_cross_entropy(full, targets)
    (want * weights).sum().backward()
    part = logits[:, 6 * rank:6 * rank + 6].clone().requires_grad_()
    got = soft_cross_entropy(part, targets[:, 6 * rank:6 * rank + 6], g)
    (got * weights).sum().backward()
    res["ce_loss"] = float((got - want).abs().max())
    res["ce_grad"] = float((part.grad - full.grad[:, 6 * rank:6 * rank + 6]).abs().max())
    return res


@pytest.mark.dist
def test_collectives_forward_and_backward():
    for rank, res in enumerate(run_distributed(_mappings_body, 2)):
        for key in ("copy", "reduce", "gather_last", "scatter_seq", "gather_seq_tp", "gather_seq_rep",
                    "reduce_scatter_seq"):
            assert res[key], f"rank {rank}: {key}"
        assert res["ce_loss"] < 1e-5 and res["ce_grad"] < 1e-6, res


def test_size_one_group_is_a_no_op():
    x = torch.randn(3, 2)
    for fn in (M.copy_to_tensor_parallel_region, M.reduce_from_tensor_parallel_region,
               M.scatter_to_sequence_region, M.gather_from_sequence_region, M.reduce_scatter_to_sequence_region):
        assert fn(x, None) is x


def test_rng_tracker_streams():
    tracker = RNGStatesTracker()
    torch.manual_seed(1)
    tracker.add("a", 42)
    default_before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), default_before)  # the default stream did not move
    with tracker.fork("a"):
        second = torch.rand(3)
    torch.manual_seed(42)
    assert torch.equal(first, torch.rand(3)) and not torch.equal(first, second)
    saved = tracker.state_dict()
    with tracker.fork("a"):
        third = torch.rand(3)
    tracker.load_state_dict(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), third)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("b"):
            pass
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 1)


def test_rng_tracker_keeps_a_generator_the_saved_state_lacks():
    """A checkpoint written without a GPU has no CUDA states: resumed on one, the stream keeps the CUDA state
    seed_parallel_rng gave it (it was dropped, so the fork left the CUDA generator the same on every TP rank)."""
    tracker = RNGStatesTracker()
    cuda_like = torch.arange(4, dtype=torch.uint8)  # (stands for a CUDA generator's state on this CPU machine)
    tracker._states = {"a": {"cpu": torch.get_rng_state(), "cuda": cuda_like}}
    saved_cpu = torch.zeros_like(torch.get_rng_state())
    tracker.load_state_dict({"a": {"cpu": saved_cpu}, "b": {"cpu": saved_cpu}})
    state = tracker.state_dict()
    assert torch.equal(state["a"]["cpu"], saved_cpu) and torch.equal(state["a"]["cuda"], cuda_like)
    assert set(state["b"]) == {"cpu"}


def test_seed_parallel_rng_same_default_different_tp_streams():
    states = []
    for tp_rank in (0, 1):
        tracker = RNGStatesTracker()
        seed_parallel_rng(7, types.SimpleNamespace(dp_rank=0, tp_rank=tp_rank), tracker)
        default = torch.rand(4)
        with tracker.fork(TP_STREAM):
            states.append((default, torch.rand(4)))
    assert torch.equal(states[0][0], states[1][0]) and not torch.equal(states[0][1], states[1][1])
    tracker = RNGStatesTracker()
    seed_parallel_rng(7, types.SimpleNamespace(dp_rank=1, tp_rank=0), tracker)
    assert not torch.equal(torch.rand(4), states[0][0])  # data-parallel ranks differ


def test_checkpoint_recomputes_the_same_forked_masks():
    tracker = RNGStatesTracker()
    tracker.add(TP_STREAM, 3)
    drop = ForkedRNG(DropPath(0.5), tracker)
    lin = torch.nn.Linear(8, 8)

    def body(x):
        return drop(lin(x)).square()

    x = torch.randn(64, 8)
    saved = tracker.state_dict()
    plain = torch.autograd.grad(body(x).sum(), lin.weight)[0]
    tracker.load_state_dict(saved)
    y = torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False, context_fn=checkpoint_context_fn(tracker))
    ckpt = torch.autograd.grad(y.sum(), lin.weight)[0]
    torch.testing.assert_close(ckpt, plain)
    tracker.load_state_dict(saved)  # without restoring the stream, the recomputation draws new masks
    y = torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False)
    assert not torch.allclose(torch.autograd.grad(y.sum(), lin.weight)[0], plain)
