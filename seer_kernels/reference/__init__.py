"""Pure-torch references: the specification of every op, the CPU fallback and the test oracle."""
from __future__ import annotations

import functools

import torch


def autocast_off(fn):
    """Run ``fn`` with autocast off on CPU and CUDA.

    A custom op's implementation still sees its caller's autocast state, so under ``torch.autocast`` the
    matmuls of a reference would silently run in bfloat16 instead of the compute dtype it documents
    (attention's reference was 3x less accurate than plain bf16 math that way). Inputs are cast by the
    public ops, as torch's own ops would; inside, the stated precision holds.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper
