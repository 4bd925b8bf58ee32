"""The public Sinkhorn-Knopp op: ``seer_kernels.sinkhorn`` and its ``torch.ops.seer`` custom ops.

``seer::sinkhorn`` runs the whole iteration for one process (one fused launch where the backend can).
With process groups, :func:`sinkhorn` runs the iteration as step ops (``seer::sinkhorn_max``,
``seer::sinkhorn_sumexp``, ``seer::sinkhorn_finalize``) with functional all-reduces between them, so the
collectives stay outside the kernels and the whole thing traces under ``torch.compile``.
"""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _native
from .._backend import Backend, Dispatcher, plain_eager, triton_unavailable_reason
from ..reference import sinkhorn as ref
from . import constant_outputs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPSILON_MIN = torch.finfo(torch.float32).tiny
_EPSILON_MIN_TEXT = f"{EPSILON_MIN:g}"  # formatted once: Dynamo fails on the format spec with dynamic=True
ITERATIONS_MAX = 2**31 - 1

DISPATCH = Dispatcher("sinkhorn")


def _native_impl() -> SimpleNamespace:
    ops = torch.ops.seer_C
    return SimpleNamespace(
        fused=lambda s, eps, it: ops.sinkhorn_fused(s, eps, it),
        steps=ref.SinkhornSteps(
            lambda s, m, f, g, eps, dim: ops.sinkhorn_max(s, m, f, g, eps, dim),
            lambda s, m, f, g, eps, dim, shift: ops.sinkhorn_sumexp(s, m, f, g, eps, dim, shift),
            lambda s, m, f, g, eps, log_scale: ops.sinkhorn_finalize(s, m, f, g, eps, log_scale)))


def _triton_impl() -> SimpleNamespace:
    from ..triton import sinkhorn as tri
    return SimpleNamespace(fused=tri.sinkhorn_fused, steps=tri.STEPS)


class _Lazy:
    """Build an implementation namespace on first use (keeps `import triton` off the import path)."""

    def __init__(self, factory):
        self._factory = factory
        self._value = None

    def __getattr__(self, name):
        if self._value is None:
            self._value = self._factory()
        return getattr(self._value, name)


def _kernel_shape_check(*, shape=None, **_) -> list[str]:
    """The kernel backends index rows and columns with 32-bit ints (_native.SINKHORN_DIM_MAX): larger scores go
    to the reference when the backend is chosen automatically (the Triton kernels had no check at all, and
    read and wrote out of bounds from 2^31 rows on)."""
    why = _native.sinkhorn_dims_problem(shape) if shape is not None else None
    return [f"argument 'scores': {why}"] if why else []


DISPATCH.register(Backend(
    "cuda", _Lazy(_native_impl), ("cuda",), DTYPES,
    available=lambda d: _native.unavailable_reason("sinkhorn_fused", "CUDA"), check=_kernel_shape_check))
DISPATCH.register(Backend(
    "triton", _Lazy(_triton_impl), ("cuda", "cpu"), DTYPES, available=triton_unavailable_reason,
    check=_kernel_shape_check))
DISPATCH.register(Backend(
    "cpp", _Lazy(_native_impl), ("cpu",), DTYPES,
    available=lambda d: _native.unavailable_reason("sinkhorn_fused", "CPU"), check=_kernel_shape_check))
DISPATCH.register(Backend(
    "reference", SimpleNamespace(fused=ref.sinkhorn, steps=ref.REFERENCE_STEPS), ("cuda", "cpu"), DTYPES))


def _impl(scores: Tensor):
    return DISPATCH.select(scores.device, scores.dtype, shape=tuple(scores.shape)).impl


# ---------------------------------------------------------------------------------------------------------
# Custom ops. Each has a fake kernel (shapes only) so that torch.compile(fullgraph=True) traces through it.

@torch.library.custom_op("seer::sinkhorn", mutates_args=())
def _sinkhorn_op(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    # The checks of sinkhorn(), so that every backend refuses the same input with the same message (the
    # reference and Triton backends would otherwise return NaN or wrong codes for a bad epsilon or count).
    scores = _validate(scores, epsilon, iterations, None, None)
    return _impl(scores).fused(scores, epsilon, iterations)


@_sinkhorn_op.register_fake
def _(scores, epsilon, iterations):
    return scores.new_empty(scores.shape, dtype=torch.float32)


@_sinkhorn_op.register_vmap
def _(info, in_dims, scores, epsilon, iterations):
    # Every vmapped (B, K) slice is a Sinkhorn problem of its own (the normalisations run over its rows and
    # columns): one call per slice, as torch's batching fallback would make, without its warning.
    if in_dims[0] is None:
        return torch.ops.seer.sinkhorn(scores, epsilon, iterations), None
    return torch.stack([torch.ops.seer.sinkhorn(s, epsilon, iterations) for s in scores.unbind(in_dims[0])]), 0


@torch.library.custom_op("seer::sinkhorn_max", mutates_args=())
def _max_op(scores: Tensor, m: Optional[Tensor], f: Optional[Tensor], g: Optional[Tensor], epsilon: float,
            dim: int) -> Tensor:
    # The native kernels' checks (same messages), for every backend: the reference and Triton steps would
    # broadcast a vector of the wrong length, or reduce over dim -1, and return a wrong result silently.
    _native._check_step(scores, m, f, g, epsilon, dim)
    return _impl(scores).steps.max(scores, m, f, g, epsilon, dim)


@_max_op.register_fake
def _(scores, m, f, g, epsilon, dim):
    return scores.new_empty((scores.shape[1 - dim],), dtype=torch.float32)


@torch.library.custom_op("seer::sinkhorn_sumexp", mutates_args=())
def _sumexp_op(scores: Tensor, m: Tensor, f: Tensor, g: Tensor, epsilon: float, dim: int,
               shift: Tensor) -> Tensor:
    _native._check_step(scores, m, f, g, epsilon, dim)
    _native._check_shift(shift, scores, scores.shape[1 - dim])
    return _impl(scores).steps.sumexp(scores, m, f, g, epsilon, dim, shift)


@_sumexp_op.register_fake
def _(scores, m, f, g, epsilon, dim, shift):
    return scores.new_empty((scores.shape[1 - dim],), dtype=torch.float32)


@torch.library.custom_op("seer::sinkhorn_finalize", mutates_args=())
def _finalize_op(scores: Tensor, m: Tensor, f: Tensor, g: Tensor, epsilon: float, log_scale: float) -> Tensor:
    _native._check_step(scores, m, f, g, epsilon, 0)
    return _impl(scores).steps.finalize(scores, m, f, g, epsilon, log_scale)


@_finalize_op.register_fake
def _(scores, m, f, g, epsilon, log_scale):
    return scores.new_empty(scores.shape, dtype=torch.float32)


# The codes are constants of the loss, as sinkhorn() makes them by detaching the scores: a direct call of an
# op on scores that require grad gives constants too.
for _op in (_sinkhorn_op, _max_op, _sumexp_op, _finalize_op):
    constant_outputs(_op)

OP_STEPS = ref.SinkhornSteps(torch.ops.seer.sinkhorn_max, torch.ops.seer.sinkhorn_sumexp,
                             torch.ops.seer.sinkhorn_finalize)


# ---------------------------------------------------------------------------------------------------------
# The public function.

def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, *,
             group: Optional[dist.ProcessGroup] = None, prototype_group: Optional[dist.ProcessGroup] = None,
             check_finite: bool = True) -> Tensor:
    r"""SwAV codes by Sinkhorn-Knopp: float32 (B, K), every row sums to 1.

    Args:
        scores: (B, K) prototype scores of the local batch (float32, bfloat16, float16; float64 is accepted
            and computed in float32). Not differentiated: the codes are constants of the loss.
        epsilon: entropy regularisation, >= the smallest normal float32 (1.2e-38). Q = exp(scores / epsilon)
            up to the scalings below; any such value is safe (the exponent is shifted per prototype, which
            changes nothing mathematically).
        iterations: number of (prototype, sample) normalisation rounds, in [1, 2^31 - 1].
        group: process group over which the batch is split; the global batch B_global = B x its size.
        prototype_group: process group over which K is split (a tensor-parallel prototype layer).
        check_finite: raise ``ValueError`` if ``scores`` holds NaN or inf, or is spread so widely for this
            epsilon that a sample's logits (S - max_j S) / epsilon all overflow float32 (more than 3.4e38 x
            epsilon below every prototype's best score: |S| ~ 1e38 at epsilon = 0.05; never cosine scores).
            This costs one device-to-host copy on a GPU (and one more pass over such extreme scores); it is
            skipped while compiling, capturing a CUDA graph, under torch.func transforms (``vmap``) and for
            meta or FakeTensor scores, which hold no values (the codes are then shapes only).
            Without the check, NaN or inf anywhere (on any rank) makes every code NaN, which a training
            loop sees in its loss; such a sample's codes come from the row frame on every backend (the
            CUDA kernels' since 329f20b; that case is not run on a GPU, the op refusing it first), unless
            the scores spread over more than float32 holds, |S| > 1.7e38, where S - m overflows: then
            every code is NaN on every backend.
            Float64 scores are computed in float32: beyond its range (|S| > 3.4e38) they are refused as
            such. Under ``group`` or ``prototype_group`` the ranks decide together (one small all-reduce
            per group; for such extreme scores a few more, with the global column max): all of them raise,
            those without the bad input saying it is on another rank.

    Semantics (SwAV): Q = exp(S / eps), normalised to sum 1; then ``iterations`` times every prototype's
    total over the global batch is set to 1/K and every sample's total to 1/B_global; finally Q * B_global.
    Computed in float32 in the log domain (see :mod:`seer_kernels.reference.sinkhorn`), so it never
    overflows: epsilon = 0.01 on cosine scores gives finite codes.
    """
    given = scores
    scores = _validate(scores, epsilon, iterations, group, prototype_group)
    # e.g. a Fraction or a numpy integer; a SymFloat (compiled, varying between calls) stays symbolic
    epsilon = epsilon if isinstance(epsilon, torch.SymFloat) else float(epsilon)
    iterations = int(iterations)
    if check_finite and not _tracing(scores):
        finite, may_overflow = _all_finite(scores, epsilon)
        finite_here = finite
        if group is not None or prototype_group is not None:  # every rank decides alike: all raise, or none
            finite, may_overflow = _agree(finite, may_overflow, scores.device, group, prototype_group)
        if not finite:
            if not finite_here and given.dtype == torch.float64 and bool(torch.isfinite(given).all()):
                raise ValueError("sinkhorn: argument 'scores' (float64) holds values beyond the float32 range "
                                 "(|x| > 3.4e38), in which the codes are computed. Rescale the scores.")
            elsewhere = " (on another rank)" if finite_here else ""
            raise ValueError(f"sinkhorn: argument 'scores' contains NaN or inf{elsewhere}; the codes would be all "
                             "NaN. Check the embeddings (L2-normalised?) and the prototype weights.")
        if may_overflow:
            _check_logits_finite(scores, epsilon, group, prototype_group)
    data_size = dist.get_world_size(group) if group is not None else 1
    proto_size = dist.get_world_size(prototype_group) if prototype_group is not None else 1
    if data_size == 1 and proto_size == 1:
        # The selected backend directly, without torch.library's per-call wrapper; meta tensors get the op's
        # fake kernel (no backend runs on them).
        if plain_eager(scores) and scores.device.type != "meta":
            return _impl(scores).fused(scores, epsilon, iterations)
        return torch.ops.seer.sinkhorn(scores, epsilon, iterations)
    comm = ref.SinkhornComm(
        data_size, proto_size,
        data_max=_reducer("max", group if data_size > 1 else None),
        data_sum=_reducer("sum", group if data_size > 1 else None),
        proto_max=_reducer("max", prototype_group if proto_size > 1 else None),
        proto_sum=_reducer("sum", prototype_group if proto_size > 1 else None))
    return ref.sinkhorn_loop(scores, epsilon, iterations, OP_STEPS, comm)


def _all_finite(t: Tensor, epsilon: float) -> tuple[bool, bool]:
    """(no NaN or inf in ``t``, whether some logit (S - m) / epsilon may overflow float32), from one read of t
    and one device-to-host copy: min and max propagate NaN, +-inf is an extreme, and no logit is below
    -(max - min) / epsilon.

    (``torch.isfinite(t).all()`` makes several passes over t and a bool copy of it: at 4096 x 16384 it took
    185 ms against 5.5 ms on the 2-core CPU, and its four kernels 0.3 ms of a 2.4 ms call on an H200.)
    """
    lo, hi = torch.aminmax(t)
    lo, hi = lo.float(), hi.float()
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    spread = (hi - lo) / epsilon  # in float32, as every backend computes (S - m) / epsilon
    finite, may_overflow = torch.stack([finite, torch.isinf(spread)]).tolist()
    return finite, finite and may_overflow


def _agree(finite: bool, may_overflow: bool, device, group, prototype_group) -> tuple[bool, bool]:
    """The flags of :func:`_all_finite` over every rank of the groups (one small all-reduce per group)."""
    flags = torch.tensor([0.0 if finite else 1.0, 1.0 if may_overflow else 0.0], device=device)
    bad, over = _max_over(flags, group, prototype_group).tolist()
    return bad == 0.0, over == 1.0


def _max_over(t: Tensor, *groups) -> Tensor:
    """``t``'s elementwise max over every rank of each group given (None: none)."""
    for g in groups:
        t = _reducer("max", g)(t)
    return t


def _check_logits_finite(scores: Tensor, epsilon: float, group=None, prototype_group=None) -> None:
    """ValueError if a sample's logits (S - m) / epsilon all overflow float32 to -inf (m: each prototype's
    best score).

    Only scores spread over more than 3.4e38 x epsilon get here (e.g. |S| ~ 1e38 at epsilon = 0.05; never
    cosine scores, epsilon >= 1.2e-38 keeps 2 / epsilon finite). A logit that overflows is harmless where
    its sample has a finite one (exp gives 0 either way), but a sample with none has no finite row maximum
    of its logits: the kernels returned NaN codes for it until every backend took the row frame
    (seer_kernels.reference.sinkhorn), which shifts in score units. The op still refuses such input, on
    every backend alike: scores this far apart are a bug upstream (unnormalised embeddings), not data.
    """
    s = scores.float()
    m = _max_over(s.amax(dim=0), group)  # each prototype's best over the global batch (the kernels' shift)
    gap = s - m  # itself -inf where the scores spread over more than float32 holds (|S| > 1.7e38)
    row_max = _max_over((gap / epsilon).amax(dim=1), prototype_group)  # a sample's best logit over all K
    bad = torch.nonzero(row_max == -math.inf)
    if group is not None or prototype_group is not None:  # every rank raises if any rank has such a sample
        count = _max_over(torch.tensor([float(bad.shape[0])], device=scores.device), group, prototype_group)
        if count.item() and not bad.numel():
            raise ValueError(f"sinkhorn: argument 'scores' is out of range for epsilon={epsilon!r}: on another "
                             "rank a sample's logits (scores - max) / epsilon all overflow float32, so its codes "
                             "would be NaN. Rescale the scores (L2-normalised embeddings and prototypes give "
                             "cosine scores in [-1, 1]) or raise epsilon.")
    if bad.numel():
        j = int(bad[0, 0])
        spread = bool(torch.isinf(gap[j]).all())  # no epsilon helps then
        why = ("more than 3.4e38 below each prototype's best score (the difference itself overflows float32)"
               if spread else "more than 3.4e38 x epsilon below each prototype's best score")
        raise ValueError(
            f"sinkhorn: argument 'scores' is out of range for epsilon={epsilon!r}: sample {j} (and "
            f"{bad.shape[0] - 1} more) scores {why}, so its logits (scores - max) / epsilon all overflow float32 "
            "and its codes would be NaN. Rescale the scores (L2-normalised embeddings and prototypes give cosine "
            f"scores in [-1, 1]){'' if spread else ' or raise epsilon'}.")


def _reducer(op: str, group):
    if group is None:
        return lambda t: t
    from torch.distributed import _functional_collectives as funcol

    def reduce(t: Tensor) -> Tensor:
        return funcol.wait_tensor(funcol.all_reduce(t, op, group))
    return reduce


def _tracing(t: Tensor) -> bool:
    """Compiling, capturing a CUDA graph, under a torch.func transform (vmap, grad), or t a meta tensor or a
    FakeTensor (shape tracing, FLOP counting): no value of t can be read on the host there."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or t.device.type == "meta":
        return True
    if type(t) is not Tensor:
        from torch._subclasses.fake_tensor import FakeTensor
        if isinstance(t, FakeTensor):
            return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _validate(scores, epsilon, iterations, group, prototype_group) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"sinkhorn: argument 'scores' must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: argument 'scores' must be 2-D (B, K), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"sinkhorn: argument 'scores' must be non-empty, got shape {tuple(scores.shape)}")
    if scores.dtype == torch.float64:
        scores = scores.float()
    if scores.dtype not in DTYPES:
        raise TypeError(f"sinkhorn: argument 'scores' must be float32, bfloat16 or float16, got {scores.dtype}")
    # Every backend divides by epsilon in float32: below the smallest normal float32 it rounds to 0 or a
    # subnormal, and the logits (S - m) / epsilon become NaN or -inf for whole rows (all codes NaN).
    # Comparisons, not math.isfinite: torch.compile passes an epsilon that varies between calls (a schedule)
    # as a SymFloat, and a comparison becomes a guard where math.isfinite breaks the graph.
    if isinstance(epsilon, bool) or not isinstance(epsilon, (numbers.Real, torch.SymFloat)) \
            or not EPSILON_MIN <= epsilon < math.inf:
        # float(): torch 2.11's Dynamo cannot put a SymFloat into an f-string (its own error then replaces
        # this one); it sees the SymFloat as a float, and float() of a float changes nothing.
        shown = float(epsilon) if isinstance(epsilon, float) else epsilon
        raise ValueError(f"sinkhorn: argument 'epsilon' must be a finite number >= {_EPSILON_MIN_TEXT} (the smallest "
                         f"normal float32), got {shown!r}")
    # The native kernels count iterations in 32 bits.
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) \
            or not 1 <= iterations <= ITERATIONS_MAX:
        raise ValueError(f"sinkhorn: argument 'iterations' must be an integer in [1, {ITERATIONS_MAX}], "
                         f"got {iterations!r}")
    for name, g in (("group", group), ("prototype_group", prototype_group)):
        if type(g) is int and g == getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None):
            # (what dist.new_group hands the processes it leaves out)
            raise ValueError(f"sinkhorn: argument '{name}' is a group this process is not a member of (dist.new_group "
                             f"gives the others GroupMember.NON_GROUP_MEMBER): call sinkhorn on its members only")
        if g is not None and not isinstance(g, dist.ProcessGroup):
            raise TypeError(f"sinkhorn: argument '{name}' must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(g).__name__}")
    return scores.detach()
