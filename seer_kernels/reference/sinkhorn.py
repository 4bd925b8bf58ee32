r"""Sinkhorn-Knopp for SwAV codes: the pure-torch specification every backend must match.

SwAV (main_swav.py ``distributed_sinkhorn``) computes, for a score matrix S (B samples x K prototypes)::

    P = exp(S / eps)                       (no max subtraction: overflows for eps < ~0.011)
    P = P / sum(P)
    repeat n times:
        P[:, k] *= 1 / (K * sum_j P[j, k])   every prototype gets mass 1/K   (all-reduce over the batch)
        P[j, :] *= 1 / (B * sum_k P[j, k])   every sample gets mass 1/B      (local, or all-reduce over K)
    codes = B * P                          every row sums to 1

We run the same iteration in the log domain with potentials f (K,) and g (B,)::

    X[j, k] = (S[j, k] - m[k]) / eps + f[k] + g[j]        codes = exp(X + log B)

where ``m[k] = max_j S[j, k]`` over the *global* batch. Subtracting a per-prototype constant changes nothing
(the first prototype step divides it out exactly) but makes ``(S - m) / eps <= 0``, so nothing overflows for
any eps. The initial division by sum(P) is a global constant and also cancels. One iteration is::

    f[k] -= log K + LSE_j X[j, k]      (prototype step)
    g[j] -= log B + LSE_k X[j, k]      (sample step)

Each log-sum-exp is taken as ``shift + log(sum exp(X - shift))`` with a shift that keeps the sum in a safe
range without a separate max pass, except in the first iteration:

* first prototype step: X <= 0 with max 0 in every column, so shift = 0 and the sum lies in [1, B];
* first sample step: a sample whose scores are all far below every prototype's best would underflow, so the
  shift is the true row max (one max pass; all-reduced with MAX over ``prototype_group``);
* later prototype steps: after a sample step every row has LSE = -log B, hence X <= -log B: shift = -log B
  and the sum is B * (mass of prototype k), which the previous steps bound to [1/K, B];
* later sample steps: symmetrically shift = -log K and the sum lies in [1/B, K].

Row frame. After the first prototype step every later step runs on ``Y = D - max_k D[j, k]`` (D = S - m) in
place of S - m, that is with ``X = Y / eps + f + h``, where h = g + max_k D[j, k] / eps. In exact arithmetic
this is the same X; in floating point it is what keeps the codes right when a sample's best score lies far
below every prototype's best (D[j, k] / eps = A_j << 0): the first sample step would put -A_j into g[j], and
from there on X = D / eps + f + g adds O(1) terms (log B, log K, the log of each sum) to two numbers of size
|A_j| and rounds them at |A_j| x 2^-24. With cosine scores that already cost 7.5e-5 of absolute error in the
codes at eps = 1e-4 (2.2e-6 at 1e-3, 7x the tests' bound at 1e-4), and from |A_j| ~ 2^24 on (eps = 1e-7, or
scores of 1e37 at eps = 0.05) rows summed to up to B instead of 1. Y is formed in score units, where the
row's best entry is exactly 0 and its near neighbours are exact differences (Sterbenz), and h stays within
a few log B + log K. The Triton fused kernel and the CUDA kernels behind ``seer_C::sinkhorn_fused`` use the
same frame (the CUDA step kernels take the shifts max_k D as a vector instead of a B x K buffer Y), and the
C++ CPU kernel (which normalises in the scale domain) for the rows it rescues. On an H200, before the CUDA
kernels took it, 4 of the 6 huge-logit cases of tests/ops/test_sinkhorn.py failed there. The step ops need
nothing: this driver hands them Y with m = 0.

Non-finite input: NaN or +-inf anywhere in the scores (on any rank) makes every code NaN, never a silently
finite answer; :func:`seer_kernels.sinkhorn` raises on such input first unless ``check_finite=False``.

The step functions below are the reference backend of the step ops that the distributed driver calls with
collectives between them; :func:`sinkhorn_loop` is that driver, shared by every backend.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


def sinkhorn_max(scores: Tensor, m: Optional[Tensor], f: Optional[Tensor], g: Optional[Tensor],
                 epsilon: float, dim: int) -> Tensor:
    """Max of X along ``dim`` (0: per prototype over samples, 1: per sample over prototypes), float32.

    With ``m is None`` it returns the per-line max of the raw scores instead, NaN for a line that holds any
    non-finite value (so that the caller can poison the whole result).
    """
    s = _compute(scores)
    if m is None:
        bad = ~torch.isfinite(s).all(dim=dim)
        return torch.where(bad, torch.full_like(bad, float("nan"), dtype=s.dtype), s.amax(dim=dim))
    return _logits(s, m, f, g, epsilon).amax(dim=dim)


def sinkhorn_sumexp(scores: Tensor, m: Tensor, f: Tensor, g: Tensor, epsilon: float, dim: int,
                    shift: Tensor) -> Tensor:
    """``sum(exp(X - shift), dim)``; ``shift`` is a scalar tensor or one value per line."""
    x = _logits(_compute(scores), m, f, g, epsilon)
    sh = shift.to(x.dtype).unsqueeze(dim) if shift.dim() == 1 else shift.to(x.dtype)
    return torch.exp(x - sh).sum(dim=dim)


def sinkhorn_finalize(scores: Tensor, m: Tensor, f: Tensor, g: Tensor, epsilon: float,
                      log_scale: float) -> Tensor:
    """The codes ``exp(X + log_scale)``, contiguous (the ops' fake kernels promise that layout; element-wise
    math on a transposed ``scores`` would hand its strides on)."""
    return torch.exp(_logits(_compute(scores), m, f, g, epsilon) + log_scale).contiguous()


def _compute(scores: Tensor) -> Tensor:
    """Scores in the compute dtype: float32, or float64 for float64 input (the test oracle)."""
    return scores if scores.dtype == torch.float64 else scores.float()


def _logits(s: Tensor, m: Tensor, f: Optional[Tensor], g: Optional[Tensor], epsilon: float) -> Tensor:
    # Division (not multiplication by 1/eps) so that float32 matches the float64 reference to rounding.
    x = (s - m.to(s.dtype)) / epsilon
    if f is not None:
        x = x + f.to(s.dtype)
    if g is not None:
        x = x + g.to(s.dtype).unsqueeze(1)
    return x


class SinkhornSteps(NamedTuple):
    """The step kernels of one backend (same signatures as the reference functions above)."""

    max: Callable[..., Tensor]
    sumexp: Callable[..., Tensor]
    finalize: Callable[..., Tensor]


class SinkhornComm(NamedTuple):
    """Reductions across ranks. ``data`` spans the batch, ``proto`` the prototypes (K split)."""

    data_size: int = 1
    proto_size: int = 1
    data_max: Callable[[Tensor], Tensor] = lambda t: t
    data_sum: Callable[[Tensor], Tensor] = lambda t: t
    proto_max: Callable[[Tensor], Tensor] = lambda t: t
    proto_sum: Callable[[Tensor], Tensor] = lambda t: t


REFERENCE_STEPS = SinkhornSteps(sinkhorn_max, sinkhorn_sumexp, sinkhorn_finalize)


def sinkhorn_loop(scores: Tensor, epsilon: float, iterations: int,
                  steps: SinkhornSteps = REFERENCE_STEPS, comm: SinkhornComm = SinkhornComm()) -> Tensor:
    """Run the iteration with ``steps`` kernels and ``comm`` reductions between them (see module doc).

    No host synchronisation: every quantity stays on the device and nothing branches on data.
    """
    b_local, k_local = scores.shape
    log_b = math.log(b_local * comm.data_size)
    log_k = math.log(k_local * comm.proto_size)
    m_local = steps.max(scores, None, None, None, 1.0, 0)
    m = comm.data_max(m_local)
    # 0 normally, NaN if this rank saw a non-finite score; added to the first sums, it reaches every rank.
    poison = (m_local - m_local).sum()
    dev = scores.device
    cdt = m.dtype
    f = torch.zeros(k_local, device=dev, dtype=cdt)
    g = torch.zeros(b_local, device=dev, dtype=cdt)
    zero = torch.zeros((), device=dev, dtype=cdt)
    # First prototype step on X = (S - m) / eps (shift 0, see above).
    s = comm.data_sum(steps.sumexp(scores, m, f, g, epsilon, 0, zero) + poison)
    f = f - (log_k + torch.log(s))
    # The row frame (module doc): from here on the steps run on Y = D - max_k D with m = 0, and g is h.
    sc = _compute(scores)
    d = sc - m.to(sc.dtype)
    y = d - comm.proto_max(d.amax(dim=1)).unsqueeze(1)
    del sc, d  # B x K each: only y lives on
    m = torch.zeros_like(m)
    for it in range(iterations):
        if it > 0:
            s = comm.data_sum(steps.sumexp(y, m, f, g, epsilon, 0, zero - log_b))
            f = f - (log_k - log_b + torch.log(s))
        if it == 0:
            col_shift = comm.proto_max(steps.max(y, m, f, g, epsilon, 1))
        else:
            col_shift = zero - log_k
        u = comm.proto_sum(steps.sumexp(y, m, f, g, epsilon, 1, col_shift))
        g = g - (log_b + col_shift + torch.log(u))
    return steps.finalize(y, m, f, g, epsilon, log_b)


def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Reference codes for one process: float32 math (float64 math and output for float64 scores).
    Returns contiguous codes (like :func:`sinkhorn_finalize`) whatever the strides of ``scores``."""
    return sinkhorn_loop(scores, epsilon, iterations)
