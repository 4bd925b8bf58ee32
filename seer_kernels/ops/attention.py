"""The public attention op: ``seer_kernels.attention`` and its ``torch.ops.seer`` custom ops.

Backends (one dispatcher, :mod:`seer_kernels._backend`):

    cuda tensors:  triton -> sdpa -> reference        cpu tensors:  sdpa -> reference

* ``triton``: our FlashAttention-2 style kernels (:mod:`seer_kernels.triton.attention`), bfloat16/float16 on
  GPUs (float32/float16 on the CPU under TRITON_INTERPRET=1, for tests). Chosen automatically only where
  the selector table (:mod:`seer_kernels.ops.attention_table`, written by bench/attention_table.py from a
  GPU benchmark) shows it ahead of the best torch SDPA backend for that GPU, head dim and sequence length,
  and in deterministic mode; otherwise a *preference*, not a refusal, skips it, so forcing still works.
  "Ahead" is in GPU time (CUDA-graph replays) where the benchmark measured it: in a training step the host
  queues the launches while the GPU runs the matmuls before them, so the op costs the step its GPU time.
  Called alone from Python at ViT shapes the op is bound by host time instead (its launches take longer
  than its kernels); a host-bound loop can force SDPA with ``use_backend("sdpa", op="attention")``.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with torch's own autograd. Where the table
  has a row, the SDPA backend the benchmark measured fastest (flash, cuDNN, memory-efficient or math) goes
  first in torch's priority order; elsewhere torch picks. It never enters the custom ops below.
* ``reference``: the pure-torch specification (float32 math, float64 for float64 inputs), CPU and CUDA, any
  dtype (materialises N x N).

The custom ops ``seer::attention_fwd`` (returns out and the log-sum-exp rows) and ``seer::attention_bwd``
(gradients from those rows, P recomputed) are wired with ``register_autograd``: the forward saves q, k, v,
out and lse, never the N x N matrix. They run the triton or reference backend. Plain eager calls of
``attention`` run the same backend functions through an ``autograd.Function`` instead (torch.library's
per-call wrapper cost more host time than the kernels at ViT shapes); anything that traces or intercepts
the call (compile, export, jit.trace, FakeTensor, dispatch modes, tensor subclasses) gets the ops. Under
functorch transforms (``torch.func.grad``, ``vjp``, ``jacrev``, ``vmap`` and their compositions) the ops run
inside an ``autograd.Function`` with a separate ``setup_context``: torch.func cannot differentiate a
``register_autograd`` op itself (pytorch/pytorch#170834). ``vmap`` folds its dim into the batch dim (the
ops' vmap rules). Neither path has a double backward or a forward-mode (jvp) rule: both raise (a dual tensor of
``torch.autograd.forward_ad`` included, whose tangent the kernels would otherwise drop without a word).

Determinism: ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``, or the environment
variable SEER_KERNELS_DETERMINISTIC=1) makes every run give the same bits. The Triton backward then computes
dq in its own pass (7 matmuls per tile pair instead of 5, no atomics, no float32 dq buffer), or from a
stored dS where the selector table's dkdv tile has ``store_ds`` (5 matmuls, no atomics, a dS buffer),
instead of accumulating dq with float32 atomics; on GPUs SDPA is skipped (its CUDA backward may use
atomics) in favour of Triton (half precision) or the reference (float32/float64). The cost is the `-det`
rows of bench/bench_attention.py; docs/attention.md discusses it.

Under ``torch.compile`` the backend is chosen while tracing; compiled code is guarded on ``use_backend``
(entering or leaving a block re-traces), while the environment variables are read once per trace (changing
them afterwards needs ``torch._dynamo.reset()``).
"""
from __future__ import annotations

import math
import numbers
import os
import re
from types import SimpleNamespace
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from .._backend import Backend, Dispatcher, plain_eager, triton_unavailable_reason
from ..reference import attention as ref
from . import attention_table

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The Triton kernel is chosen automatically only when the benchmark shows it at least this much faster than
# the best SDPA backend: a margin against run-to-run noise flipping the choice.
TRITON_MARGIN = 1.05
MAX_GRID = 65535  # CUDA's limit on grid dims y and z (heads and batch)


class _AttentionDispatcher(Dispatcher):
    """The shared dispatcher, minus its log line while torch.compile traces (logging breaks the graph)."""

    def _log(self, backend, device, dtype, how):
        if torch.compiler.is_compiling():
            return backend
        return super()._log(backend, device, dtype, how)


# 'meta' tensors (shape tracing, FLOP counting, meta-device model init) get SDPA's meta kernel.
DISPATCH = _AttentionDispatcher("attention", priority={"cuda": ("triton", "sdpa", "reference"),
                                                       "cpu": ("sdpa", "reference"), "meta": ("sdpa",)})


# ---------------------------------------------------------------------------------------------------------
# Selector evidence (the benchmark-derived table).

_SLUGS: dict = {}


@torch.compiler.assume_constant_result
def _gpu_slug(index: int) -> str:
    """The GPU's name as bench/harness.py spells it in file names, e.g. 'nvidia-h100-80gb-hbm3'."""
    if index not in _SLUGS:
        _SLUGS[index] = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")
    return _SLUGS[index]


def _blocks(n: int) -> int:
    return -(-n // 64)


def evidence(where: torch.device, head_dim: int, n_q: int, n_kv: int) -> Optional[dict]:
    """The benchmark row for this GPU, head dim and sequence lengths (same number of 64-token tiles), or None.

    Rows are matched by head dim and by ceil(N / 64) for queries and keys (the tile count decides the cost
    structure: 257 matches 257..320, 197 matches 193..256); the nearest measured N wins within a bucket.
    """
    if where.type != "cuda":
        return None
    slug = _gpu_slug(where.index if where.index is not None else 0)
    rows = attention_table.TABLE.get(slug)
    # Memoised for eager calls (several lookups per forward+backward on a host-bound path); not while
    # torch.compile traces, where writing a module dict would be a side effect for Dynamo to guard on.
    tracing = torch.compiler.is_compiling()
    key = (slug, head_dim, n_q, n_kv)
    hit = None if tracing else _EVIDENCE.get(key)
    if hit is not None and hit[0] is rows and hit[1] == len(rows or ()):  # rows swapped or grown since: miss
        return hit[2]
    row = _lookup(rows, head_dim, n_q, n_kv)
    if not tracing:
        if len(_EVIDENCE) >= 4096:  # many distinct sequence lengths: start over rather than grow
            _EVIDENCE.clear()
        _EVIDENCE[key] = (rows, len(rows or ()), row)
    return row


_EVIDENCE: dict = {}


def _lookup(rows: Optional[list], head_dim: int, n_q: int, n_kv: int) -> Optional[dict]:
    if not rows:
        return None
    best, best_dist = None, None
    for row in rows:
        if row["head_dim"] == head_dim and _blocks(row["n_q"]) == _blocks(n_q) \
                and _blocks(row["n_kv"]) == _blocks(n_kv):
            dist = abs(row["n_q"] - n_q) + abs(row["n_kv"] - n_kv)
            if best is None or dist < best_dist:
                best, best_dist = row, dist
    return best


# ---------------------------------------------------------------------------------------------------------
# Backends.

def _tri():
    from ..triton import attention as tri  # lazy: keeps `import triton` off the import path
    return tri


def _tile(row: Optional[dict], kernel: str):
    if row is None or kernel not in row.get("tiles", {}):
        return None
    t = tuple(row["tiles"][kernel])
    tile = _TILES.get(t)
    if tile is None:  # memoised: building and checking a Tile costs more than the lookup (host-bound path)
        # [m, n, warps, stages] lists were recorded before tail tiles existed: run them as they were measured.
        tile = _TILES[t] = _tri().Tile(*t) if len(t) > 4 else _tri().Tile(*t, split_tail=False)
    return tile


_TILES: dict = {}


def _triton_fwd(q, k, v, scale):
    row = evidence(q.device, q.shape[3], q.shape[2], k.shape[2])
    return _tri().attention_fwd(q, k, v, scale, tile=_tile(row, "fwd"))


def _triton_bwd(dout, q, k, v, out, lse, scale, deterministic, grads=None):
    row = evidence(q.device, q.shape[3], q.shape[2], k.shape[2])
    # Where the benchmark measured the dq pass faster than dq atomics, it is the default too.
    det = deterministic or (row is not None and row.get("bwd_scheme") == "deterministic")
    return _tri().attention_bwd(dout, q, k, v, out, lse, scale, det, dkdv_tile=_tile(row, "dkdv"),
                                dq_tile=_tile(row, "dq"), grads=grads)


def _reference_bwd(dout, q, k, v, out, lse, scale, deterministic, grads=None):
    got = ref.attention_bwd(dout, q, k, v, out, lse, scale)
    if grads is None:
        return got
    for g, x in zip(grads, got):
        g.copy_(x)
    return grads


def _triton_check(*, where, dt, head_dim, n_q, n_kv, batch, heads, **_) -> list[str]:
    out = []
    if where.type == "cuda" and dt == torch.float32:
        out.append("float32 on a GPU runs through SDPA or the reference (the Triton kernel is for bfloat16 "
                   "and float16)")
    if where.type == "cpu" and dt == torch.bfloat16:
        out.append("the Triton interpreter computes bfloat16 wrongly; on CPU it takes float32 or float16")
    if not (head_dim % 8 == 0 and 8 <= head_dim <= 256):
        out.append(f"head dim {head_dim} is not supported (a multiple of 8 from 8 to 256)")
    if batch > MAX_GRID or heads > MAX_GRID:
        out.append(f"batch {batch} or heads {heads} exceed the launch grid limit {MAX_GRID}")
    if max(n_q, n_kv) * head_dim >= 2**31:
        out.append(f"N {max(n_q, n_kv)} x head dim {head_dim} passes the kernels' int32 row offsets (2^31)")
    return out


def _triton_prefer(*, where, head_dim, n_q, n_kv, grad, deterministic, packed=False, **_) -> Optional[str]:
    if where.type != "cuda":
        return "the Triton interpreter is for tests, not speed (force it with use_backend('triton'))"
    if deterministic:
        return None  # bit-reproducible backward, unlike the CUDA SDPA backends
    row = evidence(where, head_dim, n_q, n_kv)
    if row is None:
        return (f"no benchmark evidence on {_gpu_slug(where.index or 0)} for head dim {head_dim}, "
                f"N {n_q}x{n_kv} (seer_kernels/ops/attention_table.py); SDPA is the safe default")
    # attention_packed: measured as the ViT runs it, where measured (SDPA on the slices pays for stacking
    # their gradients)
    use_packed = packed and grad and row.get("fwd_bwd_packed") is not None
    ratio = row["fwd_bwd_packed"] if use_packed else row["fwd_bwd"] if grad else row["fwd"]
    if ratio is None:
        return (f"the benchmark has no Triton {'forward+backward' if grad else 'forward'} timing on "
                f"{_gpu_slug(where.index or 0)} for head dim {head_dim}, N {n_q}x{n_kv} (only the SDPA "
                f"backends were compared); SDPA ({row['best_sdpa']}) it is")
    if ratio < TRITON_MARGIN:
        basis = "GPU time" if row.get("basis") == "gpu_time" else "eager calls"
        what = ("forward+backward" if grad else "forward") + (" on a fused qkv projection" if use_packed else "")
        return (f"the benchmark has SDPA ({row['best_sdpa']}) ahead here: Triton x{ratio:.2f} {what} in {basis} "
                f"(needs x{TRITON_MARGIN})")
    return None


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def _sdpa_can_prioritise() -> bool:
    import inspect

    from torch.nn.attention import sdpa_kernel
    return "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


_SDPA_PRIORITY = _sdpa_can_prioritise()


def sdpa_order(row: Optional[dict]) -> Optional[list]:
    """SDPA backends in priority order with the benchmark's fastest first, or None (torch's own order).

    Every backend stays enabled after the preferred one, so an input it cannot take falls through to the
    next instead of failing.
    """
    if row is None or not _SDPA_PRIORITY:  # (no table row: the common case, before building the mapping)
        return None
    names = _sdpa_backends()
    best = row.get("best_sdpa")
    if best not in names:
        return None
    return [names[best]] + [b for n, b in names.items() if n != best]


def _sdpa(q, k, v, scale):
    order = sdpa_order(evidence(q.device, q.shape[3], q.shape[2], k.shape[2]))
    if order is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _sdpa_check(*, in_op, **_) -> list[str]:
    if in_op:
        return ["SDPA runs with torch's own autograd from seer_kernels.attention(), not inside the "
                "seer::attention_fwd/bwd ops"]
    return []


def _sdpa_prefer(*, where, deterministic, **_) -> Optional[str]:
    if deterministic and where.type == "cuda":
        return "deterministic mode: the CUDA SDPA backward may accumulate with atomics"
    return None


DISPATCH.register(Backend(
    "triton", SimpleNamespace(fwd=_triton_fwd, bwd=_triton_bwd), ("cuda", "cpu"), TRITON_DTYPES,
    available=triton_unavailable_reason, check=_triton_check, prefer=_triton_prefer))
DISPATCH.register(Backend(
    "sdpa", SimpleNamespace(attention=_sdpa), ("cuda", "cpu", "meta"), DTYPES, check=_sdpa_check,
    prefer=_sdpa_prefer))
DISPATCH.register(Backend(
    "reference", SimpleNamespace(fwd=ref.attention_fwd, bwd=_reference_bwd),
    ("cuda", "cpu"), DTYPES))


def _info(q: Tensor, k: Tensor, *, grad: bool, deterministic: bool, in_op: bool, packed: bool = False) -> dict:
    # 'where' and 'dt' repeat select()'s device and dtype for the per-backend checks. The sizes are passed as
    # they are, never through int(): under torch.export or torch.compile(dynamic=True) a dynamic dim is a
    # SymInt, and int() on it pins the traced graph to this call's value (an export with a dynamic batch
    # failed, "specialized it to be a constant (2)", even on the SDPA path, which never looks at the batch).
    # A check that does compare a symbolic size adds a guard on that size alone, where it matters.
    # ``packed``: the call is attention_packed's, whose benchmark ratio (where measured) is its own.
    return dict(where=q.device, dt=q.dtype, head_dim=q.shape[3], n_q=q.shape[2], n_kv=k.shape[2],
                batch=q.shape[0], heads=q.shape[1], grad=grad, deterministic=deterministic, in_op=in_op,
                packed=packed)


def _op_backend(name: str, q: Tensor, k: Tensor, deterministic: bool) -> Backend:
    """The backend named by the caller (seer_kernels.attention passes its choice), else the dispatcher's."""
    info = _info(q, k, grad=True, deterministic=deterministic, in_op=True)
    if not name:
        return DISPATCH.select(q.device, q.dtype, **info)
    return DISPATCH.require(name, q.device, q.dtype, info, "passed to the op")


# ---------------------------------------------------------------------------------------------------------
# Custom ops. Fake kernels give shapes and layouts so that torch.compile(fullgraph=True) traces through them.

# Both the ops and their fake kernels check their arguments as seer_kernels.attention does: a direct call of
# an op (or a trace of one) with k and v of another batch or length ran the Triton kernels out of bounds
# (garbage, on a GPU an illegal address) and the reference broadcast a batch of 1 without a word.

@torch.library.custom_op("seer::attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: float, deterministic: bool = False,
            backend: str = "") -> tuple[Tensor, Tensor]:
    """out (B, H, Nq, D) on (B, Nq, H, D) memory, lse (B, H, Nq) float32 (float64 for float64 inputs)."""
    _validate_op(q, k, v, scale)
    return _op_backend(backend, q, k, deterministic).impl.fwd(q, k, v, scale)


@_fwd_op.register_fake
def _(q, k, v, scale, deterministic=False, backend=""):
    _validate_op(q, k, v, scale)
    return ref.new_out(q, v), ref.new_lse(q)


@torch.library.custom_op("seer::attention_bwd", mutates_args=())
def _bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
            deterministic: bool = False, backend: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous) from the saved log-sum-exp rows."""
    _validate_op(q, k, v, scale)
    validate_saved("attention", q, dout, out, lse, (*q.shape[:3], v.shape[3]), q.shape[:3])
    return _op_backend(backend, q, k, deterministic).impl.bwd(dout, q, k, v, out, lse, scale, deterministic)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, scale, deterministic=False, backend=""):
    _validate_op(q, k, v, scale)
    validate_saved("attention", q, dout, out, lse, (*q.shape[:3], v.shape[3]), q.shape[:3])
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _validate_op(q, k, v, scale) -> None:
    _validate(q, k, v)
    _scale(scale, q.shape[3])


def validate_saved(op: str, like: Tensor, dout, out, lse, out_shape: tuple, lse_shape: tuple) -> None:
    """The backward op's other arguments: ``dout`` and ``out`` of ``out_shape`` in the dtype of ``like`` (q or
    qkv), ``lse`` of ``lse_shape`` in the compute dtype (the kernels read it as such), all on its device."""
    for name, t, shape, dtype in (("dout", dout, out_shape, like.dtype), ("out", out, out_shape, like.dtype),
                                  ("lse", lse, lse_shape, ref.compute_dtype(like.dtype))):
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype \
                or t.device != like.device:
            got = f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: argument '{name}' must be {dtype} of shape {tuple(shape)} on {like.device}, "
                             f"got {got}")


def _save(ctx, q, k, v, out, lse, scale, deterministic, backend):
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.deterministic, ctx.backend = scale, bool(deterministic), backend


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs[:4]
    out, lse = output
    _save(ctx, q, k, v, out, lse, scale, inputs[4] if len(inputs) > 4 else False,
          inputs[5] if len(inputs) > 5 else "")
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.seer.attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.deterministic,
                                              ctx.backend)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def no_double_backward(op: str) -> str:
    return (f"Trying to backward through seer::{op}_bwd but no autograd formula was registered: "
            f"seer_kernels.{op} has no double backward on the triton and reference backends; for second "
            f"derivatives call torch's SDPA with its math backend (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), "
            f"the one SDPA backend that has them on every device")


def refuse_double_backward(bwd_op, op: str) -> None:
    """Register, as ``bwd_op``'s own "backward", a refusal with the hint of :func:`no_double_backward`:
    without it torch's message told the user to "use register_autograd to add one", as if the missing
    second derivative were theirs to write."""
    def refuse(ctx, *grads):
        raise RuntimeError(no_double_backward(op))

    bwd_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


refuse_double_backward(_bwd_op, "attention")


def _fold(info, in_dims, tensors):
    """The tensors with vmap's dim folded into the batch dim: (V, B, ...) -> (V * B, ...), an unbatched one
    broadcast to V copies (every (b, h) slice of attention is independent, so a vmap is a bigger batch)."""
    out = []
    for t, dim in zip(tensors, in_dims):
        t = t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
        out.append(t.flatten(0, 1))
    return out


@_fwd_op.register_vmap
def _(info, in_dims, q, k, v, scale, deterministic=False, backend=""):
    n = info.batch_size
    out, lse = torch.ops.seer.attention_fwd(*_fold(info, in_dims[:3], (q, k, v)), scale, deterministic, backend)
    return (out.unflatten(0, (n, -1)), lse.unflatten(0, (n, -1))), (0, 0)


@_bwd_op.register_vmap
def _(info, in_dims, dout, q, k, v, out, lse, scale, deterministic=False, backend=""):
    n = info.batch_size
    grads = torch.ops.seer.attention_bwd(*_fold(info, in_dims[:6], (dout, q, k, v, out, lse)), scale,
                                         deterministic, backend)
    return tuple(g.unflatten(0, (n, -1)) for g in grads), (0, 0, 0)


# ---------------------------------------------------------------------------------------------------------
# The functorch path (torch.func.grad, vjp, jacrev, vmap and their compositions).
#
# torch.library builds register_autograd's autograd.Function without a setup_context, and Function.apply
# refuses such a Function whenever a functorch transform is active ("it must override the setup_context
# staticmethod": pytorch/pytorch#170834, open in torch 2.14), so torch.func.grad cannot differentiate
# seer::attention_fwd itself. seer_kernels.attention runs the ops through these two Functions instead: they
# split forward from setup_context and let torch generate their vmap rules from the ops' (above), which is
# what functorch needs at every level.

class _FuncAttention(torch.autograd.Function):
    """seer::attention_fwd with the ops' backward, in the form functorch transforms accept."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale, deterministic, backend):
        return torch.ops.seer.attention_fwd(q, k, v, scale, deterministic, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _FuncAttentionBwd.apply(dout, q, k, v, out, lse, ctx.scale, ctx.deterministic, ctx.backend)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):  # torch.func.jvp, jacfwd, hessian
        raise RuntimeError(no_forward_ad("attention", ctx.backend))


class _FuncAttentionBwd(torch.autograd.Function):
    """seer::attention_bwd. torch.func.grad always differentiates with create_graph, so the gradients carry
    this node: differentiating them again (hessian, jacrev of grad) raises, as through the op."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dout, q, k, v, out, lse, scale, deterministic, backend):
        return torch.ops.seer.attention_bwd(dout, q, k, v, out, lse, scale, deterministic, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(no_double_backward("attention"))


# ---------------------------------------------------------------------------------------------------------
# The eager path: the same backend functions as the ops above, without torch.library's per-call wrapper.

class _EagerAttention(torch.autograd.Function):
    """seer::attention_fwd + its registered backward, as a plain autograd.Function.

    On the GPU machine (H200, torch 2.11) a forward+backward through the ops cost 1.2 ms of host time
    against 0.3 ms for the same kernels called directly (the forward alone 0.23 ms against 0.10 ms), several
    times what the kernels take at ViT shapes; cProfile put the difference in torch.library's per-call
    wrapper (bench/results/nvidia-h200-profile.txt). Plain eager calls take this path; anything that traces
    or intercepts the call goes through the ops, which it understands (see ``_backend.plain_eager``).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, deterministic, backend: Backend):
        # ``backend`` is what seer_kernels.attention just selected for these inputs: run it as is (the ops
        # take a name and check it again, a few µs of Python per call on this host-bound path).
        out, lse = backend.impl.fwd(q, k, v, scale)
        _save(ctx, q, k, v, out, lse, scale, deterministic, backend.name)
        ctx.impl = backend.impl
        return out

    @staticmethod
    def backward(ctx, dout):
        # Compiled autograd traces this: give it the op. With create_graph=True, the op too: its gradients
        # carry a node that refuses a second backward, as the op path does. (once_differentiable refuses only
        # when dout itself requires grad; a gradient penalty's first gradients would come back as constants
        # and its second-order term would silently vanish.)
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return _backward(ctx, dout, None)
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.impl.bwd(dout, q, k, v, out, lse, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------------------
# The public function.

def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
              deterministic: Optional[bool] = None) -> Tensor:
    r"""softmax(q k^T * scale) v for (B, H, N, D) tensors: non-causal self- or cross-attention.

    Args:
        q: (B, H, Nq, D) queries. Any strides (e.g. a slice of a fused qkv projection).
        k, v: (B, H, Nkv, D) keys and values; Nkv may differ from Nq.
        scale: multiplies the scores; defaults to 1/sqrt(D).
        deterministic: same bits on every run, also for the gradients (see the module docstring for what it
            changes and costs). None follows ``torch.are_deterministic_algorithms_enabled()`` or
            SEER_KERNELS_DETERMINISTIC=1.

    Dtypes: bfloat16 and float16 (the Triton kernel on GPUs where it wins, SDPA elsewhere), float32 and
    float64 (SDPA or the reference). Under autocast, float32 inputs are cast to the autocast dtype, as SDPA
    does. Differentiable in q, k and v; the forward keeps only the log-sum-exp rows for the backward.
    Returns (B, H, Nq, D) in the input dtype.
    """
    q, k, v = _autocast(q, k, v)
    _validate(q, k, v)
    scale = _scale(scale, q.shape[3])
    det = _deterministic(deterministic)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    backend = DISPATCH.select(q.device, q.dtype, **_info(q, k, grad=grad, deterministic=det, in_op=False))
    if backend.name == "sdpa":
        return backend.impl.attention(q, k, v, scale)
    if fwAD._current_level >= 0 and has_tangent(q, k, v):
        raise RuntimeError(no_forward_ad("attention", backend.name))
    if plain_eager(q, k, v):
        if not grad:  # nothing to record: skip the autograd.Function (several µs of host time per call)
            return backend.impl.fwd(q, k, v, scale)[0]
        return _EagerAttention.apply(q, k, v, scale, det, backend)
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        out, _ = _FuncAttention.apply(q, k, v, scale, det, backend.name)
        return out
    out, _ = torch.ops.seer.attention_fwd(q, k, v, scale, det, backend.name)
    return out


def has_tangent(*tensors: Tensor) -> bool:
    """Whether a tensor is a forward-mode AD dual (torch.autograd.forward_ad.make_dual) with a tangent. The
    kernels (and the custom ops, which torch runs without a forward-AD rule) would return the primal alone:
    a tangent silently dropped, i.e. taken as zero."""
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def no_forward_ad(op: str, backend: str) -> str:
    return (f"seer_kernels.{op}: forward-mode AD (forward_ad dual tensors, torch.func.jvp, jacfwd, hessian) has "
            f"no rule on the {backend} backend (its tangent would be dropped); use reverse mode "
            f"(backward, torch.func.grad, vjp, jacrev), or torch's SDPA with its math backend "
            f"(torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), which has one")


def explain(q: Tensor, k: Tensor, v: Tensor, *, deterministic: Optional[bool] = None,
            grad: bool = True) -> dict[str, list[str]]:
    """For every backend, why seer_kernels.attention would not pick it for these inputs ([] = it would run).

    Unlike :meth:`Dispatcher.explain` this includes the soft preferences (the benchmark table), so it answers
    "why does my GPU run SDPA here?".
    """
    _validate(q, k, v)
    info = _info(q, k, grad=grad, deterministic=_deterministic(deterministic), in_op=False)
    out = DISPATCH.explain(q.device, q.dtype, **info)
    for name, backend in DISPATCH.backends.items():
        soft = None if out[name] else backend.preference(info)
        if soft:
            out[name] = [f"(preference) {soft}"]
    return out


def _validate(q, k, v) -> None:
    if _plainly_valid(q, k, v):
        return
    tensors = (("q", q), ("k", k), ("v", v))
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors:
        if t.dim() != 4:
            raise ValueError(f"attention: argument '{name}' must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    for name, t in tensors:
        if t.dtype not in DTYPES:
            raise TypeError(f"attention: argument '{name}' must be float32, bfloat16, float16 or float64, got "
                            f"{t.dtype}")
    for name, t in tensors[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"attention: argument '{name}' has dtype {t.dtype} but 'q' has {q.dtype}; q, k and v "
                            f"must share one dtype")
        if t.device != q.device:
            raise ValueError(f"attention: argument '{name}' is on {t.device} but 'q' is on {q.device}")
    for name, t in tensors:
        if t.numel() == 0:
            raise ValueError(f"attention: argument '{name}' must be non-empty, got shape {tuple(t.shape)}")
    for name, t in tensors[1:]:
        for dim, what in ((0, "batch size"), (1, "heads"), (3, "head dim")):
            if t.shape[dim] != q.shape[dim]:
                raise ValueError(f"attention: argument '{name}' has {what} {t.shape[dim]} (dim {dim}) but 'q' has "
                                 f"{q.shape[dim]}; expected q (B, H, Nq, D) and k, v (B, H, Nkv, D)")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: argument 'v' has {v.shape[2]} keys (dim 2) but 'k' has {k.shape[2]}")


def _plainly_valid(q, k, v) -> bool:
    """The common case of :func:`_validate` in one pass (it runs on every call: about 5 µs of Python for the
    checks one by one on the 2-core CPU); False sends the inputs through the checks that name the problem.
    Accepts nothing that those checks refuse."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    dt = q.dtype
    return (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and dt in DTYPES and k.dtype == dt and v.dtype == dt
            and qs[0] == ks[0] == vs[0] and qs[1] == ks[1] == vs[1] and qs[3] == ks[3] == vs[3]
            and ks[2] == vs[2] and 0 not in qs and ks[2] != 0 and k.device == q.device and v.device == q.device)


def _scale(scale, head_dim: int, op: str = "attention") -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    # Comparisons, not math.isfinite: torch.compile passes a scale that varies between calls as a SymFloat,
    # and a comparison becomes a guard where math.isfinite breaks the graph.
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat)) \
            or not -math.inf < scale < math.inf:
        raise _bad_scale(scale, op)
    if isinstance(scale, torch.SymFloat):
        return scale
    try:
        return float(scale)
    except OverflowError:  # an int beyond float range (10**400): finite, yet no float
        raise _bad_scale(scale, op) from None


def _bad_scale(scale, op: str) -> ValueError:
    # (made only when raised: _scale runs on every call, and the message's repr costs host time)
    return ValueError(f"{op}: argument 'scale' must be a finite number or None, got {scale!r}")


def _deterministic(flag, op: str = "attention") -> bool:
    if flag is None:
        if torch.are_deterministic_algorithms_enabled():
            return True
        setting = os.environ.get("SEER_KERNELS_DETERMINISTIC", "").strip()
        if setting not in ("", "0", "1"):  # 'true' or 'yes' would otherwise leave the mode off without a word
            raise ValueError(f"{op}: SEER_KERNELS_DETERMINISTIC={setting!r} is neither '1' (deterministic) nor "
                             f"'0' or unset (not)")
        return setting == "1"
    if not isinstance(flag, bool):
        raise TypeError(f"{op}: argument 'deterministic' must be True, False or None, got {flag!r}")
    return flag


def _autocast(q, k, v) -> tuple:
    """Under autocast, every floating-point input other than float64 on the autocast device runs in the
    autocast dtype, as torch's SDPA (a lower-precision autocast op) does: float32 q and k with a bfloat16 v
    (e.g. after a float32 rotary embedding) run in bfloat16, and so do float16 inputs under bfloat16
    autocast. Anything else is left for the validation that follows."""
    kind = q.device.type if isinstance(q, Tensor) else None
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return q, k, v
    dt = torch.get_autocast_dtype(kind)
    if q.dtype == dt and getattr(k, "dtype", None) == dt and getattr(v, "dtype", None) == dt:
        return q, k, v  # the common case in bf16 training: nothing to cast, no per-call .to() (host time)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
            and t.device.type == kind
        return t.to(dt) if eligible else t
    return cast(q), cast(k), cast(v)
