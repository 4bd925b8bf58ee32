"""``seer_kernels.attention_packed``: attention on a fused qkv projection (the ViT's own layout), with the
gradient written straight into one fused buffer.

    out = attention_packed(qkv, heads)     # qkv (B, N, 3 H D) -> out (B, N, H D)

is ``attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)`` for
``q, k, v = qkv.unflatten(-1, (3, heads, D)).permute(2, 0, 3, 1, 4).unbind(0)``: the projection's columns
are [q of every head | k of every head | v of every head], as in ``seer.model.layers.Attention``. Same values,
and on the triton and reference backends the same bits, forward and backward.

Why it exists: through ``attention`` on those slices, autograd assembles the gradient of ``qkv`` from dq, dk
and dv with a ``stack`` (the backward of ``unbind``) and then a copy (the permuted result reshaped back to
(B, N, 3 H D)): two passes over the whole gradient, 4 x 3 B N H D elements read or written (about 200 MB at
ViT-10B/TP4: B 32, N 257, H D 1024, bfloat16; of the order of 60 us at an H100's bandwidth, against about
190 us for the attention itself; an estimate, to be timed by the benchmark's ``-fwdbwd-det-vit`` rows). Here
the backward kernels write dq, dk and dv into the three slices of one (B, N, 3 H D) buffer through their
strides, which is the gradient of ``qkv`` as it stands. The forward's output is already on (B, N, H, D)
memory, so ``out`` is a view, as the reshape was.

Backends are chosen for the slices as ``attention`` chooses them, except that with a gradient the selector
table's ``fwd_bwd_packed`` ratio decides where the benchmark measured one (its ``-fwdbwd-det-vit`` rows: this
op against SDPA on the slices, copies included). Where the choice is SDPA (on CPUs, and on GPUs where the
table has SDPA ahead), and under torch.func transforms, the slices go through ``attention`` as before: SDPA takes separate tensors, so its gradients go through the same copies. The custom
ops ``seer::attention_packed_fwd`` and ``seer::attention_packed_bwd`` carry the triton and reference backends
through torch.compile and export; plain eager calls run the backend functions directly (as ``attention``
does, for host time).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .._backend import plain_eager
from ..reference import attention as ref
from . import attention as A


def unpack(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, N, D): views of ``qkv`` (B, N, 3 H D)."""
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _pack(out: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H D): a view where ``out`` is on (B, N, H, D) memory, as the backends write it."""
    return out.transpose(1, 2).flatten(2)


def _heads_view(x: Tensor, heads: int) -> Tensor:
    """(B, N, H D) -> (B, H, N, D), a view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _grads(impl, dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int, scale: float,
           deterministic: bool) -> Tensor:
    """The gradient of ``qkv``: the backend writes dq, dk and dv into the slices of one new buffer."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = unpack(qkv, heads)
    impl.bwd(_heads_view(dout, heads), q, k, v, _heads_view(out, heads), lse, scale, deterministic,
             grads=unpack(dqkv, heads))
    return dqkv


# ---------------------------------------------------------------------------------------------------------
# Custom ops (triton and reference backends), with fake kernels for torch.compile(fullgraph=True) and export.

@torch.library.custom_op("seer::attention_packed_fwd", mutates_args=())
def _fwd_op(qkv: Tensor, heads: int, scale: float, deterministic: bool = False,
            backend: str = "") -> tuple[Tensor, Tensor]:
    """out (B, N, H D), lse (B, H, N) float32 (float64 for float64 inputs)."""
    _validate_op(qkv, heads, scale)
    q, k, v = unpack(qkv, heads)
    out, lse = A._op_backend(backend, q, k, deterministic).impl.fwd(q, k, v, scale)
    return _pack(out), lse


@_fwd_op.register_fake
def _(qkv, heads, scale, deterministic=False, backend=""):
    _validate_op(qkv, heads, scale)
    q, _, v = unpack(qkv, heads)
    return _pack(ref.new_out(q, v)), ref.new_lse(q)


@torch.library.custom_op("seer::attention_packed_bwd", mutates_args=())
def _bwd_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int, scale: float,
            deterministic: bool = False, backend: str = "") -> Tensor:
    """The gradient of qkv (B, N, 3 H D), contiguous: dq, dk and dv written into its slices."""
    _validate_bwd(dout, qkv, out, lse, heads, scale)
    q, k, _ = unpack(qkv, heads)
    return _grads(A._op_backend(backend, q, k, deterministic).impl, dout, qkv, out, lse, heads, scale,
                  deterministic)


@_bwd_op.register_fake
def _(dout, qkv, out, lse, heads, scale, deterministic=False, backend=""):
    _validate_bwd(dout, qkv, out, lse, heads, scale)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# The ops and their fake kernels check their arguments as attention_packed does, and the backward's dout, out
# and lse against qkv: the Triton backward read a dout, out or lse shorter than qkv's out of bounds, and a
# float64 lse as float32, and returned a gradient without a word.

def _validate_op(qkv, heads, scale) -> None:
    _validate(qkv, heads)
    A._scale(scale, qkv.shape[2] // (3 * heads), "attention_packed")


def _validate_bwd(dout, qkv, out, lse, heads, scale) -> None:
    _validate_op(qkv, heads, scale)
    b, n, width = qkv.shape
    A.validate_saved("attention_packed", qkv, dout, out, lse, (b, n, width // 3), (b, heads, n))


def _setup_context(ctx, inputs, output):
    qkv, heads, scale = inputs[:3]
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.heads, ctx.scale = heads, scale
    ctx.deterministic = bool(inputs[3]) if len(inputs) > 3 else False
    ctx.backend = inputs[4] if len(inputs) > 4 else ""
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = torch.ops.seer.attention_packed_bwd(dout, qkv, out, lse, ctx.heads, ctx.scale, ctx.deterministic,
                                               ctx.backend)
    return dqkv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


A.refuse_double_backward(_bwd_op, "attention_packed")


class _EagerAttentionPacked(torch.autograd.Function):
    """The two ops above as a plain autograd.Function, without torch.library's per-call wrapper (host time;
    see ``attention._EagerAttention``)."""

    @staticmethod
    def forward(ctx, qkv, heads, scale, deterministic, backend, slices):
        # ``slices``: unpack(qkv, heads), which attention_packed has made already to choose the backend (a
        # tuple: autograd does not track it; about 5 us of host time not spent twice on this eager path)
        out, lse = backend.impl.fwd(*slices, scale)
        out = _pack(out)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads, ctx.scale, ctx.deterministic = heads, scale, bool(deterministic)
        ctx.backend, ctx.impl = backend.name, backend.impl
        return out

    @staticmethod
    def backward(ctx, dout):
        # Compiled autograd, or create_graph=True: the op, whose gradient refuses a second backward (as
        # attention's eager path does).
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return *_backward(ctx, dout, None), None
        qkv, out, lse = ctx.saved_tensors
        dqkv = _grads(ctx.impl, dout, qkv, out, lse, ctx.heads, ctx.scale, ctx.deterministic)
        return dqkv, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# The public function.

def attention_packed(qkv: Tensor, heads: int, *, scale: Optional[float] = None,
                     deterministic: Optional[bool] = None) -> Tensor:
    r"""softmax(q k^T * scale) v per head for q, k, v packed in one fused projection (module docstring).

    Args:
        qkv: (B, N, 3 * heads * D): per token the queries of every head, then the keys, then the values (the
            output of one ``nn.Linear(dim, 3 * dim)``). Any strides.
        heads: the number of heads H; D = qkv.shape[-1] / (3 H).
        scale, deterministic: as :func:`seer_kernels.attention`.

    Returns (B, N, H * D) in qkv's dtype (under autocast, the autocast dtype, as ``attention``):
    ``attention(q, k, v)`` with its heads side by side per token.
    Differentiable in qkv; its gradient comes back as one (B, N, 3 H D) tensor written by the backward kernels
    (no stacking of dq, dk, dv) on the triton and reference backends.
    """
    qkv = A._autocast(qkv, qkv, qkv)[0]
    _validate(qkv, heads)
    q, k, v = unpack(qkv, heads)
    scale = A._scale(scale, q.shape[3], "attention_packed")
    det = A._deterministic(deterministic, "attention_packed")
    grad = torch.is_grad_enabled() and qkv.requires_grad
    backend = A.DISPATCH.select(q.device, q.dtype,
                                **A._info(q, k, grad=grad, deterministic=det, in_op=False, packed=True))
    if backend.name == "sdpa":
        return _pack(backend.impl.attention(q, k, v, scale))
    if A.fwAD._current_level >= 0 and A.has_tangent(qkv):
        raise RuntimeError(A.no_forward_ad("attention_packed", backend.name))
    if plain_eager(qkv):
        if not grad:
            return _pack(backend.impl.fwd(q, k, v, scale)[0])
        return _EagerAttentionPacked.apply(qkv, heads, scale, det, backend, (q, k, v))
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        return _pack(A.attention(q, k, v, scale=scale, deterministic=det))  # its functorch path (no packed rule)
    out, _ = torch.ops.seer.attention_packed_fwd(qkv, heads, scale, det, backend.name)
    return out


def _validate(qkv, heads) -> None:
    if not isinstance(qkv, Tensor):
        raise TypeError(f"attention_packed: argument 'qkv' must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(heads, bool) or not isinstance(heads, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"attention_packed: argument 'heads' must be an int, got {heads!r}")
    if heads < 1:
        raise ValueError(f"attention_packed: argument 'heads' must be at least 1, got {heads}")
    if qkv.dim() != 3:
        raise ValueError(f"attention_packed: argument 'qkv' must be 3-D (B, N, 3 * heads * D), got shape "
                         f"{tuple(qkv.shape)}")
    if qkv.dtype not in A.DTYPES:
        raise TypeError(f"attention_packed: argument 'qkv' must be float32, bfloat16, float16 or float64, got "
                        f"{qkv.dtype}")
    if qkv.shape[2] % (3 * heads) != 0:
        raise ValueError(f"attention_packed: argument 'qkv' has {qkv.shape[2]} features (dim 2), not a multiple "
                         f"of 3 * heads = {3 * heads}; expected (B, N, 3 * heads * D)")
    if qkv.numel() == 0:
        raise ValueError(f"attention_packed: argument 'qkv' must be non-empty, got shape {tuple(qkv.shape)}")
