"""Loading of the compiled extension ``seer_kernels._C`` and questions about what it provides.

The extension registers private ops as ``torch.ops.seer_C.<name>`` (CPU and, when built with nvcc, CUDA
kernels). It may be missing (``SEER_KERNELS_SKIP_NATIVE=1`` at build time, or a torch it was not built
against); then every op still runs through Triton or the references, and :func:`status` says why.
"""
from __future__ import annotations

import importlib
import logging
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
