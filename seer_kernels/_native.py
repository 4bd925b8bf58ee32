"""Loading of the compiled extension ``seer_kernels._C`` and questions about what it provides.

The extension registers private ops as ``torch.ops.seer_C.<name>`` (CPU and, when built with nvcc, CUDA
kernels). It may be missing (``SEER_KERNELS_SKIP_NATIVE=1`` at build time, or a torch it was not built
against); then every op still runs through Triton or the references, and :func:`status` says why.
"""
from __future__ import annotations

import importlib
import logging
import math
import os

import torch

log = logging.getLogger("seer_kernels")

_LOADED = False
_REASON = "not loaded yet"


def _load() -> None:
    global _LOADED, _REASON
    if os.environ.get("SEER_KERNELS_DISABLE_NATIVE", "").strip() in ("1", "true", "yes"):
        _REASON = "disabled by SEER_KERNELS_DISABLE_NATIVE=1"
        return
    try:
        importlib.import_module("seer_kernels._C")
    except ImportError as exc:
        _REASON = f"seer_kernels._C is not importable ({exc}); build it with `pip install --no-build-isolation -e .`"
        log.debug(_REASON)
        return
    except OSError as exc:  # an .so built against another torch
        _REASON = f"seer_kernels._C failed to load ({exc}); rebuild it against this torch"
        log.warning(_REASON)
        return
    _LOADED = True
    _REASON = ""
    _register_fakes()


# ---------------------------------------------------------------------------------------------------------
# Fake (meta) kernels of the native ops, so that FakeTensor, meta tensors, torch.compile and opcheck can
# trace a direct call of torch.ops.seer_C.<op> (the public torch.ops.seer ops have their own). Each returns
# what both the CPU and the CUDA kernel return: a new contiguous tensor on the input's device, float32 for
# the Sinkhorn ops, ``out_dtype`` for multi-crop. They repeat the kernels' argument checks that need no
# data (csrc/include/seer/*.h, same messages), so that a trace refuses what the kernel would refuse; the
# checks on values (the crops in ``params``) happen when the kernel runs.

_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS_MIN = torch.finfo(torch.float32).tiny
_INT32_MAX = 2**31 - 1
# Largest row or column count of Sinkhorn scores on the kernel backends (C++, CUDA, Triton): they index rows and
# columns with 32-bit ints, and their index arithmetic runs past the last one by up to a few hundred (a block of
# threads, a loop stride); 2^16 of headroom below 2^31 (kSinkhornDimMax in csrc/include/seer/sinkhorn.h).
SINKHORN_DIM_MAX = 2**31 - 2**16
_MULTICROP_COLS = 18  # kCols in csrc/include/seer/multicrop.h
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT32_MAX, _FLOAT32_TINY = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny


def _arg(cond, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"argument '{name}': {message}")


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.uint8: "Byte"}.get(dt, str(dt).replace("torch.", ""))


def _check_scores(scores) -> None:
    _arg(scores.dim() == 2, "scores", f"expected a 2-D tensor, got {scores.dim()}-D")
    _arg(scores.numel() > 0, "scores", f"expected a non-empty matrix, got {list(scores.shape)}")
    why = sinkhorn_dims_problem(scores.shape)
    _arg(why is None, "scores", why)
    _arg(scores.dtype in _SCORE_DTYPES, "scores",
         f"expected float32, bfloat16 or float16, got {_dtype_name(scores.dtype)}")


def sinkhorn_dims_problem(shape) -> str | None:
    """Why the kernel backends cannot take (B, K) scores of this shape (None: they can)."""
    if shape[0] <= SINKHORN_DIM_MAX and shape[1] <= SINKHORN_DIM_MAX:
        return None
    return (f"each dimension must be at most {SINKHORN_DIM_MAX} (2^31 - 2^16: the kernels index rows and columns "
            f"with 32-bit ints), got {list(shape)}")


def _check_eps(eps) -> None:
    _arg(math.isfinite(eps) and eps >= _EPS_MIN, "epsilon",
         f"expected a finite value >= {_EPS_MIN:g} (the smallest normal float32), got {eps:g}")


def _check_vec(t, name: str, n, scores) -> None:
    if t is None:
        return
    _arg(t.dim() == 1, name, f"expected a 1-D tensor, got {t.dim()}-D")
    _arg(t.device == scores.device, name, f"expected a tensor on {scores.device} (the device of 'scores'), got "
                                          f"{t.device}")
    _arg(t.shape[0] == n, name, f"expected {n} values, got {t.shape[0]}")
    _arg(t.dtype == torch.float32, name, f"expected float32, got {_dtype_name(t.dtype)}")


def _check_step(scores, m, f, g, eps, dim) -> None:
    _check_scores(scores)
    _check_eps(eps)
    _arg(dim in (0, 1), "dim", f"expected 0 or 1, got {dim}")
    _check_vec(m, "m", scores.shape[1], scores)
    _check_vec(f, "f", scores.shape[1], scores)
    _check_vec(g, "g", scores.shape[0], scores)


def _fake_sinkhorn_fused(scores, epsilon, iterations):
    _check_scores(scores)
    _check_eps(epsilon)
    _arg(1 <= iterations <= _INT32_MAX, "iterations", f"expected an integer in [1, {_INT32_MAX}], got {iterations}")
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _fake_sinkhorn_max(scores, m, f, g, epsilon, dim):
    _check_step(scores, m, f, g, epsilon, dim)
    return scores.new_empty((scores.shape[1 - dim],), dtype=torch.float32)


def _fake_sinkhorn_sumexp(scores, m, f, g, epsilon, dim, shift):
    _check_step(scores, m, f, g, epsilon, dim)
    lines = scores.shape[1 - dim]
    _check_shift(shift, scores, lines)
    return scores.new_empty((lines,), dtype=torch.float32)


def _check_shift(shift, scores, lines) -> None:
    _arg(shift.dim() == 0 or (shift.dim() == 1 and shift.shape[0] == lines), "shift",
         f"expected a scalar tensor or {lines} values, got shape {list(shift.shape)}")
    _arg(shift.device == scores.device, "shift", f"expected a tensor on {scores.device} (the device of 'scores'), "
                                                 f"got {shift.device}")


def _fake_sinkhorn_finalize(scores, m, f, g, epsilon, log_scale):
    _check_step(scores, m, f, g, epsilon, 0)
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _fake_multicrop_apply(images, params, size, mean, std, out_dtype):
    _arg(len(images) > 0, "images", "expected at least one image")
    for i, im in enumerate(images):
        _arg(im.device == images[0].device, "images", f"every image must be on the same device, image {i} is on "
                                                      f"{im.device} and image 0 on {images[0].device}")
        _arg(im.dtype == torch.uint8, "images", f"image {i}: expected uint8, got {_dtype_name(im.dtype)}")
        _arg(im.dim() == 3 and im.shape[0] == 3, "images", f"image {i}: expected shape (3, H, W), got "
                                                          f"{list(im.shape)}")
        _arg(im.shape[1] > 0 and im.shape[2] > 0, "images", f"image {i}: expected a non-empty image, got "
                                                            f"{list(im.shape)}")
        _arg(im.shape[1] < 2**24 and im.shape[2] < 2**24, "images", f"image {i}: sides must be below 2^24 "
                                                                    f"pixels, got {list(im.shape)}")
    _arg(params.device.type in ("cpu", "meta"), "params", f"expected a CPU tensor, got {params.device}")
    _arg(params.dtype == torch.float32, "params", f"expected float32, got {_dtype_name(params.dtype)}")
    _arg(params.dim() == 2 and params.shape[1] == _MULTICROP_COLS, "params",
         f"expected shape (n, {_MULTICROP_COLS}), got {list(params.shape)}")
    _arg(params.shape[0] <= _INT32_MAX, "params", f"expected at most {_INT32_MAX} crops (rows), got {params.shape[0]}")
    _arg(1 <= size <= 16384, "size", f"expected an integer in [1, 16384], got {size}")
    _arg(len(mean) == 3, "mean", f"expected 3 values, got {len(mean)}")
    _arg(len(std) == 3, "std", f"expected 3 values, got {len(std)}")
    for mu, sd in zip(mean, std):
        _arg(abs(mu) <= _FLOAT32_MAX, "mean", f"expected values finite in float32, got {mu:g}")
        _arg(_FLOAT32_TINY <= abs(sd) <= _FLOAT32_MAX, "std", "expected non-zero values finite in float32 "
             f"(1.17549e-38 <= |std| <= 3.40282e+38), got {sd:g}")
    _arg(out_dtype in _OUT_DTYPES, "out_dtype", f"expected float32, bfloat16 or float16, got {_dtype_name(out_dtype)}")
    return images[0].new_empty((params.shape[0], 3, size, size), dtype=out_dtype)


_FAKES = {"sinkhorn_fused": _fake_sinkhorn_fused, "sinkhorn_max": _fake_sinkhorn_max,
          "sinkhorn_sumexp": _fake_sinkhorn_sumexp, "sinkhorn_finalize": _fake_sinkhorn_finalize,
          "multicrop_apply": _fake_multicrop_apply, "multicrop_apply_emulated": _fake_multicrop_apply}


def _register_fakes() -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"seer_C::{name}", fake)


_load()


def loaded() -> bool:
    return _LOADED


def status() -> str:
    """Empty string when the extension is loaded, else why not."""
    return _REASON


_FOUND: set = set()  # (op, dispatch key) pairs seen registered: the extension never unregisters a kernel


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``seer_C::<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if not _LOADED:
        return False
    if (op, dispatch_key) in _FOUND:  # the dispatcher query costs ~2 us, on every op call's backend choice
        return True
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"seer_C::{op}", dispatch_key)
    except RuntimeError:  # schema not registered at all
        return False
    if found:
        _FOUND.add((op, dispatch_key))
    return found


def unavailable_reason(op: str, dispatch_key: str) -> str | None:
    """None if ``seer_C::<op>`` runs on ``dispatch_key``; otherwise a sentence saying why not."""
    if not _LOADED:
        return _REASON
    if has_kernel(op, dispatch_key):
        return None
    if dispatch_key == "CUDA":
        return "seer_kernels._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
    return f"seer_kernels._C has no {dispatch_key} kernel for {op}"
