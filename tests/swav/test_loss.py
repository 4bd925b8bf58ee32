"""swav_loss against a plain, independent implementation of the SwAV formula (seer_spec.md 1.6-1.7)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seer.parallel.cross_entropy import soft_cross_entropy
from seer.swav import swav_loss
from tests.oracles import swav_sinkhorn_f64 as plain_sinkhorn


def plain_swav_loss(scores, crops_for_assign, temperature, epsilon, iterations, queue_scores=None):
    """main_swav.py's loop: per assignment crop a, average over v != a of the cross-entropy, then over a."""
    n_crops, batch = len(scores), scores[0].shape[0]
    loss = 0.0
    for i, a in enumerate(crops_for_assign):
        with torch.no_grad():
            s = scores[a].detach()
            if queue_scores is not None:
                s = torch.cat([queue_scores[i], s])
            q = plain_sinkhorn(s, epsilon, iterations)[-batch:]
        sub = 0.0
        for v in range(n_crops):
            if v != a:
                sub = sub - torch.mean(torch.sum(q * F.log_softmax(scores[v].double() / temperature, dim=1), dim=1))
        loss = loss + sub / (n_crops - 1)
    return loss / len(crops_for_assign)


def cosine_scores(n_crops, b, k, d=16, requires_grad=True):
    c = F.normalize(torch.randn(k, d), dim=1)
    out = [F.normalize(torch.randn(b, d), dim=1) @ c.t() for _ in range(n_crops)]
    return [s.requires_grad_(requires_grad) for s in out]


@pytest.mark.parametrize("n_crops, assign", [(2, (0, 1)), (6, (0, 1)), (4, (0,)), (5, (1, 3)), (3, (0, 1, 2))])
@pytest.mark.parametrize("eps, iters", [(0.05, 3), (0.03, 10)])
def test_matches_plain_formula(n_crops, assign, eps, iters):
    scores = cosine_scores(n_crops, 12, 40)
    ours = swav_loss(scores, crops_for_assign=assign, temperature=0.1, epsilon=eps, iterations=iters)
    ours.backward()
    got = [s.grad.clone() for s in scores]
    ref64 = [s.detach().double().requires_grad_() for s in scores]
    want = plain_swav_loss(ref64, assign, 0.1, eps, iters)
    want.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), want.detach(), atol=1e-5, rtol=1e-5)
    for g, r in zip(got, ref64):  # (a crop that only assigns gets no gradient: None in the reference)
        want_grad = r.grad if r.grad is not None else torch.zeros_like(r)
        torch.testing.assert_close(g.double(), want_grad, atol=1e-6, rtol=1e-4)


def test_matches_plain_formula_with_queue():
    scores = cosine_scores(4, 8, 30)
    queue = [s.detach() for s in cosine_scores(2, 24, 30, requires_grad=False)]
    ours = swav_loss(scores, queue_scores=queue, temperature=0.2, epsilon=0.05, iterations=3)
    want = plain_swav_loss([s.double() for s in scores], (0, 1), 0.2, 0.05, 3, [q.double() for q in queue])
    torch.testing.assert_close(ours.double(), want.detach(), atol=1e-5, rtol=1e-5)
    without = swav_loss(scores, temperature=0.2)
    assert abs(without.item() - ours.item()) > 1e-4  # the queue changes the codes


def test_uniform_scores_give_ln_k():
    """Identical scores everywhere: codes are uniform and every prediction is uniform: loss = ln K."""
    scores = [torch.zeros(8, 300, requires_grad=True) for _ in range(4)]
    assert abs(swav_loss(scores).item() - math.log(300)) < 1e-4


def test_bf16_scores_are_scored_in_float32():
    scores = cosine_scores(3, 8, 20)
    a = swav_loss([s.bfloat16() for s in scores])
    b = swav_loss([s.bfloat16().float() for s in scores])
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_soft_cross_entropy_matches_log_softmax():
    logits = torch.randn(6, 11, requires_grad=True)
    targets = torch.rand(6, 11)
    ours = soft_cross_entropy(logits, targets)
    want = -(targets * F.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(ours, want)
    w = torch.randn(6)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    torch.testing.assert_close(g_ours, g_want)


@pytest.mark.parametrize("kw, match", [
    ({"scores": torch.zeros(4, 5)}, "list with one"),
    ({"scores": [torch.zeros(4, 5)]}, "at least 2 crops"),
    ({"scores": [torch.zeros(4, 5), torch.zeros(3, 5)]}, "same"),
    ({"scores": [torch.zeros(4, 5), torch.zeros(4)]}, r"scores\[1\] must be a 2-D"),
    ({"crops_for_assign": (0, 2)}, "crops_for_assign"),
    ({"crops_for_assign": (0, 0)}, "crops_for_assign"),
    ({"crops_for_assign": ()}, "crops_for_assign"),
    ({"temperature": 0.0}, "temperature"),
    ({"queue_scores": [torch.zeros(3, 5)]}, "one .* per assignment crop"),
    ({"queue_scores": [torch.zeros(3, 5), torch.zeros(3, 4)]}, r"queue_scores\[1\] must be"),
    ({"epsilon": -1.0}, "epsilon"),
])
def test_bad_arguments(kw, match):
    args = {"scores": [torch.zeros(4, 5), torch.zeros(4, 5)]}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        swav_loss(args.pop("scores"), **args)
