"""The CUDA device a Triton launch runs on.

A Triton kernel launches on the *current* CUDA device, on that device's current stream
(``triton.runtime.jit``: ``driver.active.get_current_device()``), whatever device its tensor arguments
live on. Tensors on cuda:1 while cuda:0 is current would be read by a kernel running on cuda:0 (an
illegal address, or a peer read on the wrong stream, unordered with cuda:1's work). Every launcher makes
the inputs' device current around its launches, as the native kernels' ``c10::cuda::CUDAGuard`` does.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def on_device(t: Tensor):
    """Context: ``t``'s CUDA device current. Nothing to switch (and no torch.cuda.device to enter and leave,
    host time on every eager call) when it already is, or when ``t`` is not on a GPU (the interpreter)."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
