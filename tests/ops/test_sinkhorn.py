"""seer_kernels.sinkhorn: every backend that can run here against an independent float64 SwAV loop."""
from __future__ import annotations

import logging
import math
import re

import pytest
import torch
import torch.distributed as dist

import seer_kernels
from seer_kernels import BackendError, use_backend
from seer_kernels.ops.sinkhorn import DISPATCH
from seer_kernels.reference import sinkhorn as ref
from seer_kernels.testing import max_abs_err, triton_device
from tests.dist_utils import run_distributed
from tests.oracles import swav_sinkhorn_f64 as swav_f64




def cosine_scores(b: int, k: int, device="cpu", dtype=torch.float32, dim: int = 32) -> torch.Tensor:
    """Scores as SwAV makes them: L2-normalised embeddings against L2-normalised prototypes."""
    z = torch.nn.functional.normalize(torch.randn(b, dim, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, dim, dtype=torch.float64), dim=1)
    return (z @ c.t()).to(device=device, dtype=dtype)


def _runnable(name: str, device: str) -> bool:
    return not DISPATCH.backends[name].reasons(torch.device(device), torch.float32, {})


def backend_params():
    """(backend, device) pairs that can run here; Triton on the CPU only under the interpreter."""
    out = []
    for name in ("cpp", "reference"):
        out.append(pytest.param(name, "cpu", id=f"{name}-cpu",
                                marks=[pytest.mark.ext] if name == "cpp" else []))
    if triton_device() is not None:
        out.append(pytest.param("triton", triton_device(), id=f"triton-{triton_device()}", marks=pytest.mark.triton))
    out.append(pytest.param("cuda", "cuda", id="cuda-cuda", marks=[pytest.mark.cuda, pytest.mark.ext]))
    out.append(pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.cuda))
    return out


def _interpreted(device: str) -> bool:
    return device == "cpu"



# Shapes from the issue; the Triton interpreter runs the small ones only.
SHAPES = [
    ((64, 300), 0.05, 3),
    ((128, 3000), 0.05, 3),
    ((32, 16384), 0.03, 10),  # SEER-10B
    ((1024, 500), 0.05, 3),
    ((64 + 3840, 3000), 0.05, 3),  # batch plus a 3840-row queue
    ((37, 131), 0.05, 3),  # odd sizes
    ((1, 5), 0.05, 3),
    ((7, 1), 0.05, 2),
    ((13, 29), 0.03, 10),
]
SMALL = {(64, 300), (37, 131), (1, 5), (7, 1), (13, 29)}


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape,eps,iters", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
def test_float32_matches_float64(backend, device, shape, eps, iters, poison_empty):
    if backend == "triton" and _interpreted(device) and shape not in SMALL:
        pytest.skip("the Triton interpreter is too slow for this size; the GPU check runs it")
    scores = cosine_scores(*shape, device=device)
    want = swav_f64(scores.cpu(), eps, iters)
    with use_backend(backend, op="sinkhorn"):
        got = seer_kernels.sinkhorn(scores, eps, iters)
    assert got.dtype == torch.float32 and got.shape == scores.shape
    assert max_abs_err(got.cpu(), want) <= 1e-5


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_float64_of_same_values(backend, device, dtype, poison_empty):
    shape = (37, 131) if backend == "triton" and _interpreted(device) else (96, 1000)
    scores = cosine_scores(*shape, device=device, dtype=dtype)
    want = swav_f64(scores.cpu(), 0.05, 3)  # float64 run of the same (rounded) values
    with use_backend(backend, op="sinkhorn"):
        got = seer_kernels.sinkhorn(scores, 0.05, 3)
    assert got.dtype == torch.float32
    assert max_abs_err(got.cpu(), want) <= 1e-5


@pytest.mark.parametrize("backend,device", backend_params())
def test_small_epsilon_never_overflows(backend, device):
    # exp(1 / 0.01) = exp(100) overflows float32 in SwAV's loop; it must stay finite here.
    shape = (24, 40) if backend == "triton" and _interpreted(device) else (256, 3000)
    scores = torch.rand(*shape, dtype=torch.float64).mul(2).sub(1).float().to(device)  # uniform in [-1, 1]
    assert not torch.isfinite(torch.exp(scores / 0.01)).all()
    want = swav_f64(scores.cpu(), 0.01, 5)
    with use_backend(backend, op="sinkhorn"):
        got = seer_kernels.sinkhorn(scores, 0.01, 5)
    assert torch.isfinite(got).all()
    assert max_abs_err(got.cpu(), want) <= 1e-5


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape,iters", [((100000, 3), 3), ((50000, 4), 10), ((5000, 2), 100)],
                         ids=["100000x3-it3", "50000x4-it10", "5000x2-it100"])
def test_tall_narrow_scores(backend, device, shape, iters):
    # Many samples, few prototypes: every prototype total sums a whole column. Summed in float32 one row
    # after the other, such totals drift by ~B ulp, which moves every code (the fused C++ kernel missed the
    # float64 codes by 3e-5 at 100000 x 3, ten times torch's own float32 error). The bound is the rule for
    # every backend: twice the error of the float32 torch reference, plus 1e-5.
    if backend == "triton" and _interpreted(device):
        pytest.skip("the Triton interpreter is too slow for this size; the GPU check runs it")
    scores = (torch.rand(*shape, dtype=torch.float64) * 2 - 1).float()
    want = swav_f64(scores, 0.05, iters)
    bound = 2 * max_abs_err(ref.sinkhorn(scores, 0.05, iters), want) + 1e-5
    with use_backend(backend, op="sinkhorn"):
        got = seer_kernels.sinkhorn(scores.to(device), 0.05, iters)
    assert max_abs_err(got.cpu(), want) <= bound


def test_outlier_sample_far_below_every_prototype():
    # One sample scores 1.8 below each prototype's best: exp(-180) underflows float32 in any single
    # shift, yet its codes are a proper distribution; the first sample step's max shift keeps it.
    # Its potentials cancel at magnitude ~180, so float32 rounding (ulp(180) = 1.5e-5) bounds the
    # accuracy of that row: the tolerance is 3e-5 here instead of 1e-5.
    scores = torch.rand(16, 12) * 0.2 + 0.8
    scores[3] = torch.rand(12) * 0.2 - 1.0
    want = swav_f64(scores, 0.01, 3)
    for backend in [b for b in ("cpp", "reference") if _runnable(b, "cpu")]:
        with use_backend(backend, op="sinkhorn"):
            got = seer_kernels.sinkhorn(scores, 0.01, 3)
        assert max_abs_err(got, want) <= 3e-5, backend
        assert max_abs_err(torch.cat([got[:3], got[4:]]), torch.cat([want[:3], want[4:]])) <= 1e-5
        assert abs(float(got[3].sum()) - 1) < 1e-5


@pytest.mark.parametrize("backend,device", backend_params())
def test_exact_properties(backend, device):
    shape = (24, 40) if backend == "triton" and _interpreted(device) else (200, 300)
    b, k = shape
    scores = cosine_scores(b, k, device=device)
    with use_backend(backend, op="sinkhorn"):
        q = seer_kernels.sinkhorn(scores, 0.05, 3).cpu().double()
        q_many = seer_kernels.sinkhorn(scores, 0.05, 300).cpu().double()
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=torch.float64), atol=1e-5, rtol=0)
    # With many iterations the prototypes' totals approach B/K (equipartition).
    totals = q_many.sum(0)
    assert float((totals - b / k).abs().max()) < 1e-3 * b / k
    assert float((q.sum(0) - b / k).abs().max()) > float((totals - b / k).abs().max())


@pytest.mark.parametrize("backend,device", backend_params())
def test_step_ops_match_reference(backend, device):
    b, k = (9, 21) if backend == "triton" and _interpreted(device) else (70, 333)
    s = cosine_scores(b, k, device=device)
    m = ref.sinkhorn_max(s, None, None, None, 1.0, 0)
    f, g = torch.randn(k, device=device), torch.randn(b, device=device)
    impl = DISPATCH.backends[backend].impl
    for dim in (0, 1):
        torch.testing.assert_close(impl.steps.max(s, m, f, g, 0.05, dim), ref.sinkhorn_max(s, m, f, g, 0.05, dim))
        torch.testing.assert_close(impl.steps.max(s, None, None, None, 1.0, dim),
                                   ref.sinkhorn_max(s, None, None, None, 1.0, dim))
        for shift in (torch.tensor(-3.0, device=device), torch.randn(s.shape[1 - dim], device=device) + 5):
            torch.testing.assert_close(impl.steps.sumexp(s, m, f, g, 0.05, dim, shift),
                                       ref.sinkhorn_sumexp(s, m, f, g, 0.05, dim, shift), rtol=2e-5, atol=0)
    torch.testing.assert_close(impl.steps.finalize(s, m, f - 2, g - 2, 0.05, 1.5),
                               ref.sinkhorn_finalize(s, m, f - 2, g - 2, 0.05, 1.5), rtol=2e-5, atol=1e-30)
    # Raw max flags every non-finite value with NaN for its line, also in the last row and column (beyond the
    # C++ kernels' first 32-line chunk, whose flags alone a mutation test found checked).
    s2 = s.clone()
    s2[1, 2] = float("inf")
    s2[b - 1, k - 1] = float("-inf")
    for dim, lines in ((0, (2, k - 1)), (1, (1, b - 1))):
        got = impl.steps.max(s2, None, None, None, 1.0, dim)
        bad = torch.zeros(got.shape, dtype=torch.bool, device=got.device)
        bad[list(lines)] = True
        assert torch.isnan(got[bad]).all() and torch.isfinite(got[~bad]).all(), dim


@pytest.mark.parametrize("backend,device", backend_params())
def test_non_finite_scores(backend, device):
    # Also in the last row of a matrix taller than the C++ kernels' 32-row chunks: their per-chunk flags must
    # all be combined (a -inf there, dropped by the column max, gave finite codes).
    s = cosine_scores(70, 16, device=device)
    for row, col in ((2, 3), (69, 11)):
        for bad in (float("nan"), float("inf"), float("-inf")):
            s2 = s.clone()
            s2[row, col] = bad
            with pytest.raises(ValueError, match="'scores' contains NaN or inf"):
                seer_kernels.sinkhorn(s2)
            with use_backend(backend, op="sinkhorn"):
                out = seer_kernels.sinkhorn(s2, check_finite=False)
            assert torch.isnan(out).all(), f"{bad} at {(row, col)}: expected every code NaN"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finiteness_check_sees_every_non_finite_value(dtype):
    """The check reads min and max once: NaN anywhere (also beside an inf), +inf and -inf in any dtype and
    layout are refused; large finite values are not."""
    base = cosine_scores(9, 70).to(dtype)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("nan")],
                [float("-inf"), float("inf")]):
        s = base.clone()
        for i, v in enumerate(bad):
            s[(4 + 3 * i) % 9, (11 + 17 * i) % 70] = v
        for view in (s, s.t().contiguous().t(), s[::2]):
            if not torch.isfinite(view).all():
                with pytest.raises(ValueError, match="'scores' contains NaN or inf"):
                    seer_kernels.sinkhorn(view)
    big = base.clone()
    big[0, 0] = torch.finfo(dtype).max
    assert torch.isfinite(seer_kernels.sinkhorn(big)).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape", [(40, 60), (140, 90)], ids=["fused", "steps"])
def test_non_contiguous_input(backend, device, shape):
    # (140, 90) and its views exceed one fused Triton tile: the step kernels read the strided scores (a step
    # kernel that assumed unit column strides passed every other test).
    big = cosine_scores(*shape, device=device)
    s = big[::2, 5:-5]
    want = swav_f64(s.cpu(), 0.05, 3)
    with use_backend(backend, op="sinkhorn"):
        got = seer_kernels.sinkhorn(s, 0.05, 3)
    assert max_abs_err(got.cpu(), want) <= 1e-5
    with use_backend(backend, op="sinkhorn"):
        got_t = seer_kernels.sinkhorn(big.t(), 0.05, 3)
    assert max_abs_err(got_t.cpu(), swav_f64(big.t().cpu(), 0.05, 3)) <= 1e-5


@pytest.mark.ext
def test_cpp_is_deterministic_across_thread_counts():
    s = cosine_scores(300, 1000)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = seer_kernels.sinkhorn(s, 0.05, 3)
        torch.set_num_threads(max(2, prev))
        b = seer_kernels.sinkhorn(s, 0.05, 3)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)


def test_float64_input_is_computed_in_float32():
    s = cosine_scores(10, 20, dtype=torch.float64)
    out = seer_kernels.sinkhorn(s)
    assert out.dtype == torch.float32
    assert max_abs_err(out, swav_f64(s, 0.05, 3)) <= 1e-5


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("scores,exc,match", [
    (torch.randn(5), ValueError, "'scores' must be 2-D"),
    (torch.randn(2, 3, 4), ValueError, "'scores' must be 2-D"),
    (torch.randn(0, 4), ValueError, "'scores' must be non-empty"),
    (torch.randn(4, 0), ValueError, "'scores' must be non-empty"),
    (torch.ones(4, 3, dtype=torch.int64), TypeError, "'scores' must be float32, bfloat16 or float16"),
    (torch.ones(4, 3, dtype=torch.bool), TypeError, "'scores' must be float32"),
    ([[1.0, 2.0]], TypeError, "'scores' must be a torch.Tensor"),
])
def test_bad_scores(scores, exc, match):
    with pytest.raises(exc, match=match):
        seer_kernels.sinkhorn(scores)


@pytest.mark.parametrize("kw,match", [
    (dict(epsilon=0.0), "'epsilon' must be a finite number >= 1.17549e-38 \\(the smallest normal float32\\)"),
    (dict(epsilon=-0.1), "'epsilon'"),
    (dict(epsilon=1e-39), "'epsilon' must be a finite number >= 1.17549e-38"),  # subnormal in float32
    (dict(epsilon=1e-50), "'epsilon' must be a finite number >= 1.17549e-38"),  # 0 in float32
    (dict(epsilon=float("nan")), "'epsilon'"),
    (dict(epsilon=float("inf")), "'epsilon'"),
    (dict(epsilon=True), "'epsilon'"),
    (dict(iterations=0), "'iterations' must be an integer in \\[1, 2147483647\\]"),
    (dict(iterations=2**31), "'iterations' must be an integer in \\[1, 2147483647\\]"),
    (dict(iterations=2.5), "'iterations'"),
    (dict(iterations=True), "'iterations'"),
])
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        seer_kernels.sinkhorn(torch.randn(4, 3), **kw)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(4, 5), 0.0, 3), ValueError, "'epsilon' must be a finite number >= 1.17549e-38"),
    ((torch.randn(4, 5), -0.05, 3), ValueError, "'epsilon'"),
    ((torch.randn(4, 5), 1e-39, 3), ValueError, "'epsilon'"),
    ((torch.randn(4, 5), 0.05, 0), ValueError, "'iterations' must be an integer in"),
    ((torch.randn(4, 5), 0.05, -5), ValueError, "'iterations'"),
    ((torch.randn(5), 0.05, 3), ValueError, "'scores' must be 2-D"),
    ((torch.randn(0, 5), 0.05, 3), ValueError, "'scores' must be non-empty"),
], ids=["eps0", "eps-neg", "eps-subnormal", "it0", "it-neg", "1-D", "empty"])
def test_custom_op_checks_its_arguments_on_every_backend(backend, device, args, exc, match):
    """torch.ops.seer.sinkhorn runs sinkhorn()'s checks itself: the reference and Triton backends gave NaN codes
    for epsilon 0, ran with a negative one and returned the unnormalised rows for 0 or negative iterations."""
    scores, eps, iters = args
    with use_backend(backend, op="sinkhorn"), pytest.raises(exc, match=match):
        torch.ops.seer.sinkhorn(scores.to(device), eps, iters)


def test_any_real_epsilon_and_integral_count():
    """What the checks accept, the op computes: a Fraction epsilon (numbers.Real) raised a TypeError inside
    the finiteness check; numpy numbers run as the same floats and ints."""
    import fractions

    import numpy as np
    scores = torch.randn(6, 5)
    want = seer_kernels.sinkhorn(scores, 0.05, 3)
    for eps, iters in ((fractions.Fraction(1, 20), 3), (np.float64(0.05), np.int64(3)), (0.05, np.int32(3))):
        assert torch.equal(seer_kernels.sinkhorn(scores, eps, iters), want), (eps, iters)


@pytest.mark.parametrize("check_finite", [True, False])
def test_vmap_runs_one_problem_per_slice(check_finite):
    """Under torch.vmap every (B, K) slice is a Sinkhorn problem of its own: the same codes as a loop. (The
    finiteness check read the batched tensor on the host: "Cannot access data pointer of Tensor that doesn't
    have storage"; under functorch transforms it is skipped, as while compiling.)"""
    scores = torch.randn(3, 6, 5)
    want = torch.stack([seer_kernels.sinkhorn(s) for s in scores])
    f = lambda s: seer_kernels.sinkhorn(s, check_finite=check_finite)  # noqa: E731
    assert torch.equal(torch.vmap(f)(scores), want)
    assert torch.equal(torch.vmap(f, in_dims=1)(scores.transpose(0, 1)), want)
    assert torch.equal(torch.vmap(torch.vmap(f))(scores[None].expand(2, -1, -1, -1))[1], want)
    both = torch.vmap(lambda s, y: f(s) + y, in_dims=(None, 0))(scores[0], torch.zeros(3, 1, 1))  # unbatched
    assert torch.equal(both, want[0].expand(3, -1, -1))


@pytest.mark.parametrize("kw,match", [(dict(group=3), "'group' must be a torch.distributed.ProcessGroup"),
                                      (dict(group=torch.distributed.GroupMember.NON_GROUP_MEMBER),
                                       "'group' is a group this process is not a member of"),
                                      (dict(prototype_group="tp"), "'prototype_group' must be")])
def test_bad_groups(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        seer_kernels.sinkhorn(torch.randn(4, 3), **kw)


@pytest.mark.ext
def test_native_ops_check_their_arguments():
    ops = torch.ops.seer_C
    with pytest.raises(ValueError, match="argument 'epsilon'"):
        ops.sinkhorn_fused(torch.randn(3, 4), -1.0, 3)
    with pytest.raises(ValueError, match="argument 'iterations'"):
        ops.sinkhorn_fused(torch.randn(3, 4), 0.05, 0)
    with pytest.raises(ValueError, match="argument 'scores'"):
        ops.sinkhorn_fused(torch.randn(3), 0.05, 3)
    with pytest.raises(ValueError, match="argument 'm'"):
        ops.sinkhorn_max(torch.randn(3, 4), torch.randn(5), None, None, 0.05, 0)
    with pytest.raises(ValueError, match="argument 'dim'"):
        ops.sinkhorn_max(torch.randn(3, 4), None, None, None, 1.0, 2)
    with pytest.raises(ValueError, match="argument 'shift'"):
        z = torch.zeros(4)
        ops.sinkhorn_sumexp(torch.randn(3, 4), z, z, torch.zeros(3), 0.05, 0, torch.zeros(7))


@pytest.mark.parametrize("backend,device", backend_params())
def test_step_ops_check_their_arguments_on_every_backend(backend, device):
    """torch.ops.seer.sinkhorn_{max,sumexp,finalize} refuse bad arguments with the native kernels' message on
    every backend: the reference (and Triton) steps broadcast a vector of the wrong length, reduce over
    dim -1 or divide by epsilon 0 and returned a wrong result without a word."""
    ops = torch.ops.seer
    s = torch.randn(3, 4, device=device)
    z4, z3 = torch.zeros(4, device=device), torch.zeros(3, device=device)
    cases = [
        (lambda: ops.sinkhorn_max(s, torch.zeros(1, device=device), None, None, 0.05, 0),
         "argument 'm': expected 4 values, got 1"),
        (lambda: ops.sinkhorn_max(s, None, None, None, 0.05, -1), "argument 'dim': expected 0 or 1, got -1"),
        (lambda: ops.sinkhorn_max(s, z4, None, None, 0.0, 0), "argument 'epsilon'"),
        (lambda: ops.sinkhorn_sumexp(s, z4, z4, torch.zeros(1, device=device), 0.05, 0, torch.zeros((), device=device)),
         "argument 'g': expected 3 values, got 1"),
        (lambda: ops.sinkhorn_sumexp(s, z4, z4, z3, 0.05, 0, torch.zeros(3, device=device)),
         "argument 'shift': expected a scalar tensor or 4 values"),
        (lambda: ops.sinkhorn_finalize(s, z4, torch.zeros(4, dtype=torch.float64, device=device), z3, 0.05, 0.0),
         "argument 'f': expected float32, got Double"),
    ]
    with use_backend(backend, op="sinkhorn"):
        for call, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                call()


def _native_message_cases():
    ops = torch.ops.seer_C
    return [
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3, 4), 0.05, 3),
         "argument 'scores': expected a 2-D tensor, got 3-D"),
        (lambda: ops.sinkhorn_fused(torch.zeros(0, 3), 0.05, 3),
         "argument 'scores': expected a non-empty matrix, got [0, 3]"),
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3, dtype=torch.float64), 0.05, 3), "got Double"),
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3), -1e-7, 3),
         "expected a finite value >= 1.17549e-38 (the smallest normal float32), got -1e-07"),
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3), -2.5, 3), "expected a finite value >= 1.17549e-38"),
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3), 1e-39, 3), "got 1e-39"),
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3), 0.05, -4),
         "argument 'iterations': expected an integer in [1, 2147483647], got -4"),
        (lambda: ops.sinkhorn_fused(torch.zeros(2, 3), 0.05, 2**31),
         "argument 'iterations': expected an integer in [1, 2147483647], got 2147483648"),
        (lambda: ops.sinkhorn_sumexp(torch.zeros(2, 3), torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.05, 0,
                                     torch.zeros(5, 1)), "expected a scalar tensor or 3 values, got shape [5, 1]"),
        (lambda: ops.sinkhorn_max(torch.zeros(3, 4), torch.zeros(5), None, None, 0.05, 0),
         "argument 'm': expected 4 values, got 5"),
        (lambda: ops.sinkhorn_max(torch.zeros(3, 4), None, None, torch.zeros(3, dtype=torch.float16), 0.05, 0),
         "argument 'g': expected float32, got Half"),
        (lambda: ops.sinkhorn_max(torch.zeros(3, 4), None, None, None, 1.0, 2),
         "argument 'dim': expected 0 or 1, got 2"),
        # (expanded views: nothing that large is allocated before the check refuses it)
        (lambda: ops.sinkhorn_fused(torch.zeros(1, 1).expand(2**31 - 2**16 + 1, 3), 0.05, 3),
         "argument 'scores': each dimension must be at most 2147418112 (2^31 - 2^16: the kernels index rows and "
         "columns with 32-bit ints), got [2147418113, 3]"),
        (lambda: ops.sinkhorn_max(torch.zeros(1, 1).expand(3, 2**31 - 1), None, None, None, 1.0, 0),
         "each dimension must be at most 2147418112 (2^31 - 2^16: the kernels index rows and columns with 32-bit "
         "ints), got [3, 2147483647]"),
    ]


@pytest.mark.ext
def test_native_messages_format_every_kind_of_value():
    """The checks format their messages without C++ streams (csrc/include/seer/message.h): integers, sizes,
    floats (as %g, like an ostream) and dtypes must still read as torch prints them. (Devices go through
    libc10's Device::str(); a wrong-device call of a CPU op never reaches it here, dispatch picks the device.)"""
    for call, want in _native_message_cases():
        with pytest.raises(ValueError) as info:
            call()
        assert want in str(info.value), (want, str(info.value))


def _native_op_cases():
    ops = torch.ops.seer_C
    s = cosine_scores(6, 10)
    m = ref.sinkhorn_max(s, None, None, None, 1.0, 0)
    f, g = torch.randn(10), torch.randn(6)
    half_t = cosine_scores(10, 6, dtype=torch.bfloat16).t()  # half precision, transposed
    return [
        (ops.sinkhorn_fused.default, (s, 0.05, 3)),
        (ops.sinkhorn_fused.default, (half_t, 0.05, 2)),
        (ops.sinkhorn_max.default, (s, None, None, None, 1.0, 0)),
        (ops.sinkhorn_max.default, (half_t, None, None, None, 1.0, 1)),
        (ops.sinkhorn_max.default, (s, m, f, g, 0.05, 1)),
        (ops.sinkhorn_sumexp.default, (s, m, f, g, 0.05, 0, torch.tensor(0.0))),
        (ops.sinkhorn_sumexp.default, (s, m, f, g, 0.05, 1, torch.zeros(6))),
        (ops.sinkhorn_finalize.default, (s, m, f, g, 0.05, 1.0)),
        (ops.sinkhorn_finalize.default, (half_t, m, f, g, 0.05, 1.0)),
    ]


@pytest.mark.ext
@pytest.mark.parametrize("case", range(9))
def test_native_ops_have_fake_kernels(case):
    """The private seer_C ops trace like the public ones: FakeTensor and meta tensors get the kernels'
    shape, dtype, strides and device (float32, contiguous, whatever the input), and opcheck passes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op, args = _native_op_cases()[case]
    torch.library.opcheck(op, args)
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert (fake.shape, fake.dtype, fake.stride(), fake.device) == \
        (real.shape, real.dtype, real.stride(), real.device)
    meta = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    assert (meta.shape, meta.dtype, meta.stride(), meta.device.type) == (real.shape, real.dtype, real.stride(), "meta")


@pytest.mark.ext
def test_native_fake_kernels_refuse_what_the_kernels_refuse():
    """Under FakeTensorMode (a trace) the seer_C ops raise the kernels' own errors for bad shapes, dtypes and
    numbers, so that compile refuses what the kernel would refuse at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for call, want in _native_message_cases():
        with FakeTensorMode(), pytest.raises(ValueError) as info:
            call()
        assert want in str(info.value), (want, str(info.value))


# ---- dispatch -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2**31 - 2**16 + 1, 3), (3, 2**31 - 1)], ids=["rows", "columns"])
def test_scores_past_the_kernels_32_bit_indices_go_to_the_reference(shape):
    """A dimension above 2^31 - 2^16 (_native.SINKHORN_DIM_MAX): every kernel backend that could run here
    refuses it by name, so the automatic choice takes the reference and a forced kernel backend raises. The
    Triton kernels took any size (past 2^31 rows their int32 row offsets wrapped negative: reads and writes
    out of bounds), and the CUDA ones, which checked for < 2^31, wrapped their thread indices from
    2^31 - 256 on. Shapes only: nothing is allocated."""
    fits = tuple(min(n, 2**31 - 2**16) for n in shape)
    want = (f"argument 'scores': each dimension must be at most 2147418112 (2^31 - 2^16: the kernels index rows "
            f"and columns with 32-bit ints), got {list(shape)}")
    for dev in ("cpu", "cuda"):
        device = torch.device(dev)
        runnable = [name for name, why in DISPATCH.explain(device, torch.float32, shape=fits).items() if not why]
        refused = DISPATCH.explain(device, torch.float32, shape=shape)
        for name in runnable:
            assert refused[name] == ([] if name == "reference" else [want]), (dev, name, refused[name])
            if name != "reference":
                with use_backend(name, op="sinkhorn"), pytest.raises(BackendError) as info:
                    DISPATCH.select(device, torch.float32, shape=shape)
                assert f"  {name}: {want}" in str(info.value)
        assert DISPATCH.select(device, torch.float32, shape=shape).name == "reference"
        first = next(name for name in DISPATCH.priority[dev] if name in runnable)
        assert DISPATCH.select(device, torch.float32, shape=fits).name == first


def test_forced_backend_refusal_lists_every_backend(monkeypatch):
    with use_backend("cuda", op="sinkhorn"), pytest.raises(BackendError) as info:
        seer_kernels.sinkhorn(torch.randn(4, 3))
    msg = str(info.value)
    assert "backend 'cuda' forced by use_backend()" in msg
    for name in ("cuda", "triton", "cpp", "reference"):
        assert f"  {name}: " in msg
    assert "does not run on cpu tensors" in msg
    monkeypatch.setenv("SEER_KERNELS_BACKEND_SINKHORN", "sdpa")
    with pytest.raises(BackendError, match="this op has no such backend"):
        seer_kernels.sinkhorn(torch.randn(4, 3))
    monkeypatch.setenv("SEER_KERNELS_BACKEND_SINKHORN", "bogus")
    with pytest.raises(BackendError, match="'bogus' is not a backend"):
        seer_kernels.sinkhorn(torch.randn(4, 3))


def test_environment_variable_naming_no_op_is_refused(monkeypatch):
    # A misspelt op in the variable's name forced nothing, silently (use_backend refuses such an op).
    import seer_kernels._backend as backend
    monkeypatch.setattr(backend, "_env_names_checked", False)  # checked once per process: as if at launch
    monkeypatch.setenv("SEER_KERNELS_BACKEND_SINKORN", "reference")
    with pytest.raises(BackendError, match="SEER_KERNELS_BACKEND_SINKORN names no op .*SINKHORN, ATTENTION"):
        seer_kernels.sinkhorn(torch.randn(4, 3))
    monkeypatch.delenv("SEER_KERNELS_BACKEND_SINKORN")
    monkeypatch.setenv("SEER_KERNELS_BACKEND_SINKHORN", "reference")
    assert DISPATCH.select(torch.device("cpu"), torch.float32).name == "reference"


def test_environment_forces_and_context_manager_wins(monkeypatch, caplog):
    monkeypatch.setenv("SEER_KERNELS_BACKEND", "reference")
    assert DISPATCH.select(torch.device("cpu"), torch.float32).name == "reference"
    if _runnable("cpp", "cpu"):
        with use_backend("cpp"):
            assert DISPATCH.select(torch.device("cpu"), torch.float32).name == "cpp"
    monkeypatch.delenv("SEER_KERNELS_BACKEND")
    expected = "cpp" if _runnable("cpp", "cpu") else "reference"
    assert DISPATCH.select(torch.device("cpu"), torch.bfloat16).name == expected
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("nope"):
            pass


def test_choice_is_logged_once_per_device_and_dtype(caplog):
    DISPATCH._logged.clear()
    with caplog.at_level(logging.INFO, logger="seer_kernels"):
        for _ in range(3):
            seer_kernels.sinkhorn(torch.randn(4, 3, dtype=torch.float16))
    lines = [r.message for r in caplog.records if "seer_kernels.sinkhorn on cpu/float16" in r.message]
    assert len(lines) == 1


# ---- torch.library ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_opcheck(backend):
    s = cosine_scores(6, 10)
    m = ref.sinkhorn_max(s, None, None, None, 1.0, 0)
    f, g = torch.zeros(10), torch.zeros(6)
    with use_backend(backend, op="sinkhorn"):
        torch.library.opcheck(torch.ops.seer.sinkhorn.default, (s, 0.05, 3))
        torch.library.opcheck(torch.ops.seer.sinkhorn_max.default, (s, None, None, None, 1.0, 0))
        torch.library.opcheck(torch.ops.seer.sinkhorn_max.default, (s, m, f, g, 0.05, 1))
        torch.library.opcheck(torch.ops.seer.sinkhorn_sumexp.default, (s, m, f, g, 0.05, 0, torch.tensor(0.0)))
        torch.library.opcheck(torch.ops.seer.sinkhorn_finalize.default, (s, m, f, g, 0.05, 1.0))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_ops_fake_kernels_match_on_degenerate_shapes_and_layouts(backend):
    """One sample, one prototype, an expanded (stride 0), sliced or transposed scores matrix, float16: every op's
    fake kernel gives exactly the real output's shape, dtype, device and strides; no output aliases the scores
    (a shortcut for B = 1 or K = 1 might hand them back) and the scores stay as they were."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    dev = triton_device() if backend == "triton" else "cpu"
    ops = torch.ops.seer

    def meta(t):
        return tuple(t.shape), t.dtype, t.device, t.stride(), t.storage_offset()

    for b, k in ((1, 1), (1, 5), (5, 1)):
        layouts = [cosine_scores(b, k, dev), cosine_scores(1, k, dev).expand(b, k),
                   cosine_scores(b, k + 3, dev)[:, 2:k + 2], cosine_scores(k, b, dev).t(),
                   cosine_scores(b, k, dev, torch.float16)]
        for s in layouts:
            m = ref.sinkhorn_max(s, None, None, None, 1.0, 0)
            f, g = torch.randn(2 * k, device=dev)[::2], torch.randn(b, device=dev)
            cases = [(ops.sinkhorn, (s, 0.05, 3)), (ops.sinkhorn_max, (s, None, None, None, 1.0, 0)),
                     (ops.sinkhorn_max, (s, m, f, g, 0.05, 1)),
                     (ops.sinkhorn_sumexp, (s, m, f, g, 0.05, 0, torch.zeros(k, device=dev))),
                     (ops.sinkhorn_finalize, (s, m, f, g, 0.05, 1.0))]
            before = s.clone()
            with use_backend(backend, op="sinkhorn"):
                for op, args in cases:
                    real = op(*args)
                    with FakeTensorMode() as mode:
                        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
                    assert meta(real) == meta(fake), (op, b, k, s.stride())
                    assert real.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
            assert torch.equal(s, before)

@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_ops_give_constants_for_scores_that_require_grad(backend):
    """The codes are constants of the loss (sinkhorn() detaches the scores): the ops called directly on scores
    that require grad return constants too. torch gave them a grad_fn whose backward raised 'no autograd formula
    was registered', so opcheck failed on such input and so did a loss that used the codes."""
    dev = triton_device() if backend == "triton" else "cpu"
    s = cosine_scores(6, 10, device=dev).requires_grad_()
    m = ref.sinkhorn_max(s.detach(), None, None, None, 1.0, 0)
    f, g = torch.zeros(10, device=dev), torch.zeros(6, device=dev)
    ops = torch.ops.seer
    cases = [(ops.sinkhorn.default, (s, 0.05, 3)), (ops.sinkhorn_max.default, (s, None, None, None, 1.0, 0)),
             (ops.sinkhorn_sumexp.default, (s, m, f, g, 0.05, 1, torch.tensor(0.0, device=dev))),
             (ops.sinkhorn_finalize.default, (s, m, f, g, 0.05, 1.0))]
    with use_backend(backend, op="sinkhorn"):
        for op, args in cases:
            assert not op(*args).requires_grad, op
            torch.library.opcheck(op, args)
        codes = ops.sinkhorn(s, 0.05, 3)
        (-(codes * torch.log_softmax(s / 0.1, dim=1)).sum()).backward()
        want = torch.autograd.grad(-(codes.detach() * torch.log_softmax(s / 0.1, dim=1)).sum(), s)[0]
    assert torch.equal(s.grad, want)

@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=pytest.mark.ext), "reference"])
def test_opcheck_and_compile_on_a_transposed_input(backend):
    # The fake kernels promise contiguous codes; the reference used to hand on the input's strides, which
    # opcheck reports and which broke compiled code that views the result (aot_eager: "view size is not
    # compatible"; inductor: a stride assertion).
    base = cosine_scores(10, 6)
    s = base.t()
    m = ref.sinkhorn_max(s, None, None, None, 1.0, 0)
    f, g = torch.randn(10), torch.randn(6)
    with use_backend(backend, op="sinkhorn"):
        torch.library.opcheck(torch.ops.seer.sinkhorn.default, (s, 0.05, 3))
        torch.library.opcheck(torch.ops.seer.sinkhorn_finalize.default, (s, m, f, g, 0.05, 1.0))
        torch._dynamo.reset()
        codes = torch.compile(lambda x: seer_kernels.sinkhorn(x.t(), 0.05, 3).view(-1), fullgraph=True,
                              backend="aot_eager")
        got = codes(base).view(6, 10)
    assert max_abs_err(got, swav_f64(s, 0.05, 3)) <= 1e-5


def test_compiles_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def codes(z, c):
        scores = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(c, dim=1).t()
        return seer_kernels.sinkhorn(scores, 0.05, 3)

    z, c = torch.randn(16, 8), torch.randn(30, 8)
    got = codes(z, c)
    want = swav_f64(torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(c, dim=1).t(), 0.05, 3)
    assert max_abs_err(got, want) <= 1e-5


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_with_an_epsilon_that_varies_between_calls(dynamic):
    """torch.compile passes an epsilon that changes between calls (a schedule) as a SymFloat: no graph break
    (math.isfinite on it broke fullgraph=True), right values, and a bad one is still refused by name."""
    torch._dynamo.reset()
    codes = torch.compile(lambda s, eps: seer_kernels.sinkhorn(s, eps, 3), fullgraph=True, dynamic=dynamic)
    s = cosine_scores(16, 30)
    for eps in (0.05, 0.1, 0.03):
        assert max_abs_err(codes(s, eps), swav_f64(s, eps, 3)) <= 1e-5, eps
    with pytest.raises(Exception, match="argument 'epsilon' must be a finite number >= 1.17549e-38"):
        codes(s, 0.0)


def test_plain_eager_calls_skip_the_op_with_the_same_bits(monkeypatch):
    """A plain call runs the selected backend directly (no torch.library wrapper); anything that traces or
    intercepts it (here FakeTensor and a dispatch mode) gets the custom op. Both give the same result."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from seer_kernels.ops import sinkhorn as ops
    s = cosine_scores(24, 40)
    direct = seer_kernels.sinkhorn(s, 0.05, 3)
    with FlopCounterMode(display=False):
        via_op = seer_kernels.sinkhorn(s, 0.05, 3)
    assert torch.equal(direct, via_op)
    with FakeTensorMode() as mode:
        assert seer_kernels.sinkhorn(mode.from_tensor(s), 0.05, 3, check_finite=False).shape == s.shape
    seen = []
    monkeypatch.setattr(ops, "plain_eager", lambda *t: seen.append(1) or False)
    assert torch.equal(seer_kernels.sinkhorn(s, 0.05, 3), direct) and seen == [1]


def test_meta_and_fake_scores_give_shapes():
    """Shape tracing and FLOP counting run the SwAV loss on meta tensors or FakeTensors, as attention takes
    them: the finiteness check (which reads values) is skipped and the op's fake kernel answers. They raised
    'Cannot copy out of meta tensor' / a data-dependent error, and meta without the check a BackendError."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for check in (True, False):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            codes = seer_kernels.sinkhorn(torch.empty(6, 4, device="meta", dtype=dtype), check_finite=check)
            assert (codes.shape, codes.dtype, codes.device.type) == ((6, 4), torch.float32, "meta")
        with FakeTensorMode() as mode:
            codes = seer_kernels.sinkhorn(mode.from_tensor(cosine_scores(6, 4)), 0.05, 3, check_finite=check)
            assert codes.shape == (6, 4) and codes.dtype == torch.float32
    with pytest.raises(ValueError, match="argument 'epsilon'"):  # the arguments are still checked
        seer_kernels.sinkhorn(torch.empty(6, 4, device="meta"), 0.0)


@pytest.mark.cuda
def test_cuda_graph_capture():
    s = cosine_scores(32, 3000, device="cuda")
    seer_kernels.sinkhorn(s, check_finite=False)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = seer_kernels.sinkhorn(s)  # the finiteness check is skipped while capturing
    s.copy_(cosine_scores(32, 3000, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert max_abs_err(out.cpu(), swav_f64(s.cpu(), 0.05, 3)) <= 1e-5


@pytest.mark.triton
def test_triton_launches_run_on_the_scores_device(monkeypatch):
    """Triton launches on the current CUDA device, not on the tensors' one: every launcher must make the
    scores' device current (seer_kernels.triton.device.on_device), the fused kernel and each step kernel."""
    from seer_kernels.triton import sinkhorn as tri
    entered = []
    real = tri.on_device

    def spy(t):
        entered.append(t)
        return real(t)
    monkeypatch.setattr(tri, "on_device", spy)
    s = cosine_scores(6, 10, device=triton_device())
    tri.sinkhorn_fused(s, 0.05, 2)
    assert len(entered) == 1 and entered[0] is s
    m = tri.sinkhorn_max(s, None, None, None, 1.0, 0)
    f, g = torch.zeros(10, device=s.device), torch.zeros(6, device=s.device)
    tri.sinkhorn_sumexp(s, m, f, g, 0.05, 1, torch.tensor(0.0, device=s.device))
    tri.sinkhorn_finalize(s, m, f, g, 0.05, 0.0)
    assert len(entered) == 4 and all(t is s for t in entered)


CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)  # CUDA's limits on grid axes 0, 1 and 2


class _RecordedLaunches:
    """Stands in for a @triton.jit kernel: records each launch's grid and runs nothing (outputs stay as
    allocated)."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


@pytest.mark.triton
def test_triton_grids_fit_cuda_limits_for_a_tall_batch(monkeypatch):
    """Every launch of the Triton Sinkhorn keeps its grid within CUDA's limits for 2.2 million samples (the step
    kernels; recorded, not run). The finalize kernel had its row blocks on grid axis 1, which stops at 65535:
    from 65535 x 32 = 2,097,120 samples on, it failed to launch on a GPU (the interpreter has no such limit)."""
    from seer_kernels.triton import sinkhorn as tri
    kernels = {name: _RecordedLaunches() for name in ("_reduce_kernel", "_finalize_kernel")}
    for name, rec in kernels.items():
        monkeypatch.setattr(tri, name, rec)
    B, K = 65535 * 32 + 100_000, 3
    tri.sinkhorn_fused(torch.zeros(B, K, device=triton_device()), 0.05, 2)
    assert kernels["_reduce_kernel"].grids and kernels["_finalize_kernel"].grids
    for name, rec in kernels.items():
        for grid in rec.grids:
            assert all(n <= most for n, most in zip(grid, CUDA_GRID_MAX)), (name, grid)
    assert tri.finalize_grid(B, K) == (-(-B // 32),)  # every tile once: cdiv(B, 32) x cdiv(K, 64) of them


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("shape", [(32, 200), (64, 3000)], ids=["fused", "steps"])
def test_triton_scores_on_the_second_device(shape):
    """Device guard: scores on cuda:1 while cuda:0 is current (the kernels run on cuda:1)."""
    s = cosine_scores(*shape, device="cuda:1")
    with torch.cuda.device(0), use_backend("triton", op="sinkhorn"):
        out = seer_kernels.sinkhorn(s, 0.05, 3)
        torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda:1")
    assert max_abs_err(out.cpu(), swav_f64(s.cpu(), 0.05, 3)) <= 1e-5


# ---- distributed ------------------------------------------------------------------------------------

def _dist_body(rank: int, world: int, layout: str, scores: torch.Tensor, eps: float, iters: int):
    """Split the global matrix per ``layout`` and return this rank's codes block."""
    b, k = scores.shape
    if layout == "batch":
        data, proto, dr, pr, dsize, psize = dist.group.WORLD, None, rank, 0, world, 1
    elif layout == "proto":
        data, proto, dr, pr, dsize, psize = None, dist.group.WORLD, 0, rank, 1, world
    else:  # 2 x 2 mesh: rank = data_rank * 2 + proto_rank
        dsize = psize = 2
        dr, pr = divmod(rank, 2)
        data_groups = [dist.new_group([p, p + 2]) for p in range(2)]
        proto_groups = [dist.new_group([2 * d, 2 * d + 1]) for d in range(2)]
        data, proto = data_groups[pr], proto_groups[dr]
    bl, kl = b // dsize, k // psize
    local = scores[dr * bl:(dr + 1) * bl, pr * kl:(pr + 1) * kl].contiguous()
    return seer_kernels.sinkhorn(local, eps, iters, group=data, prototype_group=proto)


@pytest.mark.dist
@pytest.mark.parametrize("layout,world", [("batch", 2), ("proto", 2), ("mesh", 4)])
def test_distributed_matches_single_process(layout, world):
    scores = cosine_scores(48, 90)
    blocks = run_distributed(_dist_body, world, layout, scores, 0.03, 10)
    if layout == "batch":
        got = torch.cat(blocks, 0)
    elif layout == "proto":
        got = torch.cat(blocks, 1)
    else:
        got = torch.cat([torch.cat(blocks[0:2], 1), torch.cat(blocks[2:4], 1)], 0)
    want = swav_f64(scores, 0.03, 10)
    assert max_abs_err(got, want) <= 1e-5
    assert max_abs_err(got, seer_kernels.sinkhorn(scores, 0.03, 10)) <= 1e-5


def _dist_nan_body(rank: int, world: int, scores: torch.Tensor):
    local = scores[rank * 4:(rank + 1) * 4].clone()
    if rank == 1:
        local[0, 0] = float("nan")
    return seer_kernels.sinkhorn(local, group=dist.group.WORLD, check_finite=False)


@pytest.mark.dist
def test_distributed_nan_on_one_rank_poisons_every_rank():
    blocks = run_distributed(_dist_nan_body, 2, cosine_scores(8, 10))
    assert all(torch.isnan(b).all() for b in blocks)


def _dist_refusal_body(rank: int, world: int, layout: str, bad: str):
    """Rank 1 alone holds the bad input; every rank must raise (one raising left the others in a collective)."""
    local = cosine_scores(4, 6)
    if rank == 1 and bad == "nan":
        local[0, 0] = float("nan")
    if bad == "spread":
        # A sample of rank 1 scores 1e38 below every prototype's best, which the other rank holds when the
        # batch is split; split over prototypes, each rank holds half of that sample's scores.
        local = local * 1e36
        if rank == 1:
            local[2] = -1e38
        elif layout == "batch":
            local[0] = 1e36
    kw = {"group": dist.group.WORLD} if layout == "batch" else {"prototype_group": dist.group.WORLD}
    try:
        codes = seer_kernels.sinkhorn(local, 0.05, 3, **kw)
    except ValueError as exc:
        return str(exc)
    return "finite codes" if bool(torch.isfinite(codes).all()) else "NaN codes"


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["batch", "proto"])
@pytest.mark.parametrize("bad", ["nan", "spread"])
def test_distributed_refusal_is_raised_on_every_rank(layout, bad):
    errors = run_distributed(_dist_refusal_body, 2, layout, bad)
    if bad == "nan":
        assert "contains NaN or inf (on another rank)" in errors[0] and "contains NaN or inf;" in errors[1]
    elif layout == "batch":
        assert "on another rank a sample's logits" in errors[0] and "sample 2 (and 0 more)" in errors[1]
    else:  # the sample's other half of the prototypes (rank 0's) gives it finite logits: no refusal
        assert errors == ["finite codes", "finite codes"]  # (rank 1 used to refuse it from its half alone)


def swav_log(scores: torch.Tensor, epsilon: float, iterations: int, dtype=torch.float64) -> torch.Tensor:
    """SwAV's loop on the log of the matrix itself, normalised in place (float64 result). In float64, S / eps
    fits for any float32 scores and epsilon >= 1.2e-38, and each normalisation subtracts a row's or column's
    log-sum-exp from its own entries: the entries that matter are O(1) from the first step on."""
    x = scores.to(dtype) / epsilon
    b, k = x.shape
    for _ in range(iterations):
        x = x - torch.logsumexp(x, dim=0, keepdim=True) - math.log(k)
        x = x - torch.logsumexp(x, dim=1, keepdim=True) - math.log(b)
    return torch.exp(x + math.log(b)).double()


def _huge_logit_cases():
    """(scores, epsilon) whose logits (S - m) / eps reach 1e37 and beyond, in the documented range (finite
    float32 scores, epsilon >= 1.2e-38): each sample's codes follow from its best prototypes only."""
    big = cosine_scores(24, 10) * 1e37
    outlier = torch.full((1, 10), -1e37)
    outlier[0, 3] = 1e37
    return {
        "1e37-eps0.1": (big, 0.1),
        "cosine-eps1e-30": (cosine_scores(24, 10), 1e-30),
        # where the log-domain potentials first missed the bound with ordinary cosine scores (7.5e-5 vs 1e-5)
        "cosine-eps1e-4": (cosine_scores(24, 10), 1e-4),
        "cosine-eps1e-5": (cosine_scores(24, 10), 1e-5),
        # larger than one fused Triton tile: the step kernels and the driver's row frame
        "cosine-eps1e-4-steps": (cosine_scores(130, 70), 1e-4),
        # logits that overflow float32 to -inf are harmless where their sample keeps a finite one
        "1e37-eps0.05-overflow": (torch.cat([big, outlier]), 0.05),
        # more samples than the CUDA cooperative kernel takes (4096): its step kernels, with the frame's
        # shifts as a vector. (At eps = 1e-5 this many samples put float32's own summation error near the
        # bound for every backend; at 1e-30 the loop without the frame has rows summing to B = 4100.)
        "cosine-eps1e-30-tall": (cosine_scores(4100, 12), 1e-30),
        "1e37-eps0.1-tall": (cosine_scores(4100, 12) * 1e37, 0.1),
    }


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", list(_huge_logit_cases()))
def test_huge_logits_match_float64(backend, device, case):
    """Scores near float32's top (or a small epsilon) give huge logits. The log-domain row potentials lost
    the O(1) terms beside them: 7.5e-5 of error with cosine scores at eps = 1e-4 (Triton, reference), rows
    summing to up to B at 1e37; the C++ kernel's rescued rows 3e-5 at eps = 1e-5; on an H200 the CUDA
    kernels, before they took the row frame, failed 4 of the first 6 cases. The rule: twice PyTorch's own
    float32 error plus 1e-5, where PyTorch's error is the larger of SwAV's loop in float32 and our reference's
    (float32, on the CPU). Each is one draw of rounding luck: at eps = 1e-4 half an ulp of a score (3e-8 near
    0.5, in S - m or in SwAV's S / eps) is 3e-4 of a logit, which moves a code split 0.15 / 0.85 by 4e-5; on
    an H200 one seed (2474895554) had SwAV's float32 loop at 9.2e-6 where the reference, the C++ kernel and
    Triton all made 3.27e-5."""
    if backend == "triton" and _interpreted(device) and case.endswith("-tall"):
        pytest.skip("20 s each in the Triton interpreter; '-steps' covers its step kernels, the GPU check this")
    if backend == "reference" and device == "cpu":
        pytest.skip("the bound includes this very computation; test_reference_float64_keeps_huge_logits_normalised "
                    "checks the reference's algorithm")
    scores, eps = _huge_logit_cases()[case]
    want = swav_log(scores, eps, 3)
    torch.testing.assert_close(want.sum(1), torch.ones(want.shape[0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch_error = max(max_abs_err(swav_log(scores, eps, 3, torch.float32), want),
                      max_abs_err(ref.sinkhorn(scores, eps, 3), want))
    bound = 2 * torch_error + 1e-5
    with use_backend(backend, op="sinkhorn"):
        got = seer_kernels.sinkhorn(scores.to(device), eps, 3).cpu()
    assert max_abs_err(got, want) <= bound


@pytest.mark.parametrize("case", list(_huge_logit_cases()))
def test_reference_float64_keeps_huge_logits_normalised(case):
    """The float64 reference (the oracle of the other tests) had the same fault: rows summing to B."""
    scores, eps = _huge_logit_cases()[case]
    assert max_abs_err(ref.sinkhorn(scores.double(), eps, 3), swav_log(scores, eps, 3)) <= 1e-9


@pytest.mark.parametrize("backend,device", backend_params())
def test_logits_overflowing_for_a_whole_sample_are_refused(backend, device):
    """A sample scoring more than 3.4e38 x epsilon below every prototype's best has no finite logit
    (S - m) / eps in float32: every kernel returned NaN codes for that finite input. The op refuses it on
    every backend, naming the argument; a sample with one finite logit is fine (see above)."""
    scores = torch.cat([cosine_scores(8, 6) * 1e36, torch.full((1, 6), -1e38)])
    with use_backend(backend, op="sinkhorn"), pytest.raises(ValueError, match="argument 'scores' is out of range "
                                                                              "for epsilon=0.05: sample 8 "):
        seer_kernels.sinkhorn(scores.to(device), 0.05, 3)
    with use_backend(backend, op="sinkhorn"):
        assert torch.isfinite(seer_kernels.sinkhorn(scores.to(device), 1.0, 3)).all()  # logits fit at eps = 1
    # Scores beyond +-1.7e38: S - m itself overflows (at any epsilon), which the message says rather than
    # blaming epsilon; float64 scores beyond float32 are not "NaN or inf".
    wide = torch.tensor([[3e38, 3e38], [-3e38, -2e38]])
    with use_backend(backend, op="sinkhorn"), pytest.raises(ValueError, match=r"sample 1 .*\(the difference itself "
                                                                              r"overflows float32\)") as info:
        seer_kernels.sinkhorn(wide.to(device), 1e38, 3)
    assert "raise epsilon" not in str(info.value)
    with use_backend(backend, op="sinkhorn"), pytest.raises(ValueError, match=r"\(float64\) holds values beyond "
                                                                              "the float32 range"):
        seer_kernels.sinkhorn(torch.tensor([[1e300, 0.0], [0.0, 1.0]], dtype=torch.float64).to(device), 0.05, 3)


def test_reference_float64_is_the_same_algorithm():
    s = cosine_scores(20, 30, dtype=torch.float64)
    got = ref.sinkhorn(s, 0.05, 4)
    assert got.dtype == torch.float64
    assert max_abs_err(got, swav_f64(s, 0.05, 4)) <= 1e-12
    assert math.isclose(float(got.sum()), 20.0, rel_tol=1e-12)


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_without_spills(sm90_compile):
    """Without a GPU: the step kernels and a sample of the fused tiles compiled for sm_90 (python -m
    bench.sinkhorn_compile checks every tile the launchers can ask for)."""
    from tests.together import together

    # two processes at once, half the variants each
    outs = together(*(lambda part=part: sm90_compile("bench.sinkhorn_compile", "--quick", "--part", part)
                      for part in ("0/2", "1/2")))
    counts = [re.search(r"(\d+) variants, 0 failures", out) for out in outs]
    assert all(counts) and sum(int(c.group(1)) for c in counts) == 11, outs
