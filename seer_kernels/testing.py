"""Helpers for testing kernels against references (used by tests/ and bench/).

The correctness rule (FlashAttention's): a kernel's error against a float64 reference must be at most
``2 x`` the error that plain PyTorch makes in the same dtype, plus a small absolute tolerance. The
tolerance therefore follows what the dtype can achieve instead of hand-tuned constants.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

POISON = float("nan")


def poisoned_like(t: Tensor, value: float = POISON) -> Tensor:
    """An output buffer filled with NaN (or ``value``), so elements a kernel never writes show up."""
    return torch.full_like(t, value)


def max_abs_err(a: Tensor, b: Tensor) -> float:
    """Max |a - b| in float64; NaN or inf where only one side is non-finite counts as infinite."""
    a64, b64 = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    same_inf = torch.isinf(a64) & torch.isinf(b64) & (a64 == b64)
    diff = (a64 - b64).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_to_ref(out: Tensor, ref64: Tensor, torch_same_dtype: Tensor, *, atol: float,
                        factor: float = 2.0, name: str = "output") -> None:
    """``|out - ref64| <= factor * |torch_same_dtype - ref64| + atol`` (max norm), with a readable message."""
    err = max_abs_err(out, ref64)
    base = max_abs_err(torch_same_dtype, ref64)
    bound = factor * base + atol
    if not err <= bound:
        diff = (out.double() - ref64.double()).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        worst = torch.topk(diff.flatten(), min(5, diff.numel())).indices
        idx = [tuple(int(i) for i in torch.unravel_index(w, diff.shape)) for w in worst]
        raise AssertionError(
            f"{name}: max error {err:.3e} > {factor} x PyTorch's error {base:.3e} + atol {atol:.1e}; "
            f"worst at {idx}: got {[float(out[i]) for i in idx]}, want {[float(ref64[i]) for i in idx]}")


def triton_device() -> Optional[str]:
    """Where Triton kernels can be tested here: 'cuda', 'cpu' (interpreter) or None."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            return None
        return "cpu"
    return None


def emulate_descriptor_reduce() -> bool:
    """Teach Triton's CPU interpreter the tensor-descriptor reduction ``desc.atomic_add`` where it lacks it
    (Triton 3.8's interpreter has no ``create_descriptor_reduce``), so that tests run the attention kernel's
    TMA dq path (``Tile.dq_tma``) on the CPU. The emulation does what the TMA unit does: an elementwise
    atomic add of the box into the tensor, dropping the elements that fall outside it. Returns whether the
    interpreter can now reduce (False where Triton or its interpreter is missing)."""
    try:
        import numpy as np
        from triton._C.libtriton import interpreter as native
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return True

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != interpreter._ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind}: only add is emulated")
        ptrs, mask = desc.materialize_pointers(indices)
        op = native.RMW_OP.FADD if np.issubdtype(value.data.dtype, np.floating) else native.RMW_OP.ADD
        native.atomic_rmw(op, ptrs.data, value.data, mask, native.MEM_SEMANTIC.RELAXED)
        return None

    builder.create_descriptor_reduce = create_descriptor_reduce
    return True


def fix_interpreter_index() -> bool:
    """Let Triton's CPU interpreter use a runtime scalar as a Python index (``range(start, n_full, BLOCK)``
    in a kernel) under NumPy >= 2.4. The interpreter holds a scalar as a one-element array and its
    ``tensor.__index__`` is ``int(array)``, which NumPy 2.4 refuses for arrays that are not 0-d ("only
    0-dimensional arrays can be converted to Python scalars"): Triton 3.6 (the one torch 2.11 pins) has it,
    Triton 3.8 squeezes the array first. This wraps the interpreter's per-launch patch of ``tl.tensor`` to
    install Triton 3.8's squeezing ``__index__`` after it (the same function there). Returns whether
    the interpreter is present (False where Triton or its interpreter is missing)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_seer_index_fixed", False):
        return patch is not None

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._seer_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
