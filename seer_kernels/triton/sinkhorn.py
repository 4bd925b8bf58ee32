"""Triton kernels for Sinkhorn-Knopp (math: seer_kernels/reference/sinkhorn.py).

Two paths:

* ``sinkhorn_fused``: when the whole B x K matrix fits one program's registers (B*K <= FUSED_MAX_ELEMENTS
  after padding to powers of two), one launch runs every iteration on-chip: the scores are read once and
  the codes written once.
* otherwise the same iteration runs as step kernels (``sinkhorn_max``, ``sinkhorn_sumexp``,
  ``sinkhorn_finalize``), which the distributed driver also uses with collectives between launches.

Scores of any float dtype are loaded and converted to float32 straight away (this is also what keeps the
kernels right under TRITON_INTERPRET=1, whose bfloat16 arithmetic is wrong).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.sinkhorn import SinkhornSteps, sinkhorn_loop
from .device import on_device
from .host_math import cdiv, next_pow2

FUSED_MAX_ELEMENTS = 8192  # every tile up to this size compiles for sm_90 without real spills (bench.sinkhorn_compile)


@triton.jit
def _logits_tile(s_ptr, m_ptr, f_ptr, g_ptr, offs_b, offs_k, mask_b, mask_k, stride_b, stride_k, epsilon,
                 HAS_M: tl.constexpr, HAS_FG: tl.constexpr):
    """X = (S - m) / eps + f + g on a tile, float32; masked entries are -inf."""
    mask = mask_b[:, None] & mask_k[None, :]
    # 64-bit offsets: B * K can exceed 2^31 elements.
    ptrs = s_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :].to(tl.int64) * stride_k
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_M:
        m = tl.load(m_ptr + offs_k, mask=mask_k, other=0.0)
        x = tl.math.div_rn(x - m[None, :], epsilon)  # IEEE division, as the reference
    if HAS_FG:
        f = tl.load(f_ptr + offs_k, mask=mask_k, other=0.0)
        g = tl.load(g_ptr + offs_b, mask=mask_b, other=0.0)
        x = x + f[None, :] + g[:, None]
    return tl.where(mask, x, float("-inf")), mask


@triton.jit
def _reduce_kernel(s_ptr, m_ptr, f_ptr, g_ptr, shift_ptr, out_ptr, B, K, stride_b, stride_k, epsilon,
                   lines_per_split, DIM: tl.constexpr, MODE: tl.constexpr, HAS_M: tl.constexpr,
                   HAS_FG: tl.constexpr, SHIFT_PER_LINE: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Partial reduction of X along DIM over one split of the reduced dimension.

    MODE 0: max (raw scores when not HAS_M: NaN for a line with a non-finite entry); MODE 1: sum exp(X - shift).
    Writes out[split, line].
    """
    pid_line = tl.program_id(0)
    split = tl.program_id(1)
    n_lines = K if DIM == 0 else B
    if DIM == 0:
        offs_k = pid_line * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        line_offs = offs_k
        line_mask = mask_k
        if MODE == 0:
            acc = tl.full([BLOCK_K], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_K], tl.float32)
        bad = tl.zeros([BLOCK_K], tl.int32)
        if SHIFT_PER_LINE:
            shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
        else:
            shift = tl.zeros([BLOCK_K], tl.float32) + tl.load(shift_ptr)
        start = split * lines_per_split
        end = tl.minimum(start + lines_per_split, B)
        for b0 in range(start, end, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask_b = offs_b < end
            x, mask = _logits_tile(s_ptr, m_ptr, f_ptr, g_ptr, offs_b, offs_k, mask_b, mask_k, stride_b,
                                   stride_k, epsilon, HAS_M, HAS_FG)
            if MODE == 0:
                # NaN-propagating max; raw scores also flag +-inf (the caller poisons the result).
                if HAS_M:
                    bad += tl.sum(((x != x) & mask).to(tl.int32), axis=0)
                else:
                    bad += tl.sum((((x != x) | (tl.abs(x) == float("inf"))) & mask).to(tl.int32), axis=0)
                acc = tl.maximum(acc, tl.max(x, axis=0))
            else:
                acc += tl.sum(tl.where(mask, tl.exp(x - shift[None, :]), 0.0),
                              axis=0)
    else:
        offs_b = pid_line * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        line_offs = offs_b
        line_mask = mask_b
        if MODE == 0:
            acc = tl.full([BLOCK_B], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_B], tl.float32)
        bad = tl.zeros([BLOCK_B], tl.int32)
        if SHIFT_PER_LINE:
            shift = tl.load(shift_ptr + offs_b, mask=mask_b, other=0.0)
        else:
            shift = tl.zeros([BLOCK_B], tl.float32) + tl.load(shift_ptr)
        start = split * lines_per_split
        end = tl.minimum(start + lines_per_split, K)
        for k0 in range(start, end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < end
            x, mask = _logits_tile(s_ptr, m_ptr, f_ptr, g_ptr, offs_b, offs_k, mask_b, mask_k, stride_b,
                                   stride_k, epsilon, HAS_M, HAS_FG)
            if MODE == 0:
                if HAS_M:
                    bad += tl.sum(((x != x) & mask).to(tl.int32), axis=1)
                else:
                    bad += tl.sum((((x != x) | (tl.abs(x) == float("inf"))) & mask).to(tl.int32), axis=1)
                acc = tl.maximum(acc, tl.max(x, axis=1))
            else:
                acc += tl.sum(tl.where(mask, tl.exp(x - shift[:, None]), 0.0),
                              axis=1)
    if MODE == 0:
        acc = tl.where(bad > 0, float("nan"), acc)
    tl.store(out_ptr + split * n_lines + line_offs, acc, mask=line_mask)


@triton.jit
def _finalize_kernel(s_ptr, m_ptr, f_ptr, g_ptr, out_ptr, B, K, stride_b, stride_k, epsilon, log_scale,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # One grid axis over every (row block, column block) tile, column blocks fastest (finalize_grid).
    n_kb = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0)
    offs_k = (pid % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = (pid // n_kb) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    mask_k = offs_k < K
    x, mask = _logits_tile(s_ptr, m_ptr, f_ptr, g_ptr, offs_b, offs_k, mask_b, mask_k, stride_b, stride_k,
                           epsilon, True, True)
    tl.store(out_ptr + offs_b[:, None].to(tl.int64) * K + offs_k[None, :], tl.exp(x + log_scale), mask=mask)


@triton.jit
def _fused_kernel(s_ptr, out_ptr, B, K, stride_b, stride_k, epsilon, iterations, log_b, log_k,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole iteration on one register tile (see the reference module for the shifts)."""
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_k = offs_k < K
    mask = mask_b[:, None] & mask_k[None, :]
    s = tl.load(s_ptr + offs_b[:, None].to(tl.int64) * stride_b + offs_k[None, :].to(tl.int64) * stride_k,
                mask=mask, other=0.0)
    s = s.to(tl.float32)
    nonfinite = ((s != s) | (tl.abs(s) == float("inf"))) & mask
    poison = tl.where(tl.sum(tl.sum(nonfinite.to(tl.int32), axis=1), axis=0) > 0, float("nan"), 0.0)
    m = tl.max(tl.where(mask, s, float("-inf")), axis=0)
    m = tl.where(mask_k, m, 0.0)
    d = s - m[None, :]
    # First prototype step on X = (S - m) / eps (g = 0, shift 0); then the row frame of the reference
    # module: x = Y / eps with Y = D - max_k D, and g is h there.
    x = tl.where(mask, tl.math.div_rn(d, epsilon), float("-inf"))
    f = tl.where(mask_k, -(log_k + tl.log(tl.sum(tl.exp(x), axis=0) + poison)), 0.0)
    d = tl.where(mask, d, float("-inf"))
    x = tl.where(mask, tl.math.div_rn(d - tl.max(d, axis=1)[:, None], epsilon), float("-inf"))
    g = tl.zeros([BLOCK_B], tl.float32)
    for it in range(iterations):
        if it > 0:
            e = tl.exp(x + f[None, :] + g[:, None] + log_b)
            f = tl.where(mask_k, f - (log_k - log_b + tl.log(tl.sum(e, axis=0))), 0.0)
        xf = x + f[None, :] + g[:, None]
        col_shift = tl.where(it == 0, tl.max(xf, axis=1), -log_k)
        col_shift = tl.where(mask_b, col_shift, 0.0)
        c = tl.sum(tl.exp(xf - col_shift[:, None]), axis=1)
        g = tl.where(mask_b, g - (log_b + col_shift + tl.log(c)), 0.0)
    out = tl.exp(x + f[None, :] + g[:, None] + log_b)
    tl.store(out_ptr + offs_b[:, None].to(tl.int64) * K + offs_k[None, :], out, mask=mask)


def _launch_reduce(scores: Tensor, m, f, g, epsilon: float, dim: int, mode: int, shift=None) -> Tensor:
    B, K = scores.shape
    dev = scores.device
    n_lines, n_reduce = (K, B) if dim == 0 else (B, K)
    block_b, block_k = (32, 64) if dim == 0 else (4, 256)
    line_block = block_k if dim == 0 else block_b
    grid_lines = cdiv(n_lines, line_block)
    red_block = block_b if dim == 0 else block_k
    # Split the reduced dimension when there are too few lines to fill the GPU.
    splits = 1
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits = max(1, min(cdiv(2 * sms, grid_lines), cdiv(n_reduce, 4 * red_block)))
    per_split = cdiv(cdiv(n_reduce, splits), red_block) * red_block
    splits = cdiv(n_reduce, per_split)
    out = torch.empty((splits, n_lines), device=dev, dtype=torch.float32)
    dummy = out
    if shift is None:
        shift = torch.zeros((), device=dev, dtype=torch.float32)
    shift = shift.float().contiguous()
    with on_device(scores):
        _reduce_kernel[(grid_lines, splits)](
            scores, m if m is not None else dummy, f if f is not None else dummy, g if g is not None else dummy,
            shift, out, B, K, scores.stride(0), scores.stride(1), float(epsilon), per_split,
            DIM=dim, MODE=mode, HAS_M=m is not None, HAS_FG=m is not None and f is not None and g is not None,
            SHIFT_PER_LINE=shift.dim() == 1,
            BLOCK_B=block_b, BLOCK_K=block_k)
    if splits == 1:
        return out[0]
    return out.amax(0) if mode == 0 else out.sum(0)


def sinkhorn_max(scores, m, f, g, epsilon, dim):
    if m is not None and (f is None or g is None):  # the kernel takes f and g together
        f = torch.zeros(scores.shape[1], device=scores.device) if f is None else f
        g = torch.zeros(scores.shape[0], device=scores.device) if g is None else g
    return _launch_reduce(scores, _f32(m), _f32(f), _f32(g), epsilon, dim, 0)


def sinkhorn_sumexp(scores, m, f, g, epsilon, dim, shift):
    return _launch_reduce(scores, _f32(m), _f32(f), _f32(g), epsilon, dim, 1, shift)


FINALIZE_BLOCK_B, FINALIZE_BLOCK_K = 32, 64


def finalize_grid(B: int, K: int) -> tuple[int]:
    """The finalize kernel's grid: one axis of cdiv(B, 32) x cdiv(K, 64) tiles. (Row blocks on grid axis 1, as
    before, failed to launch from B > 65535 x 32 = 2,097,120 samples: CUDA caps grid axes 1 and 2 at 65535.
    Axis 0 takes up to 2^31 - 1 tiles, 2^42 elements: far more than a GPU holds.)"""
    return (cdiv(B, FINALIZE_BLOCK_B) * cdiv(K, FINALIZE_BLOCK_K),)


def sinkhorn_finalize(scores, m, f, g, epsilon, log_scale):
    B, K = scores.shape
    out = torch.empty((B, K), device=scores.device, dtype=torch.float32)
    with on_device(scores):
        _finalize_kernel[finalize_grid(B, K)](scores, _f32(m), _f32(f), _f32(g), out, B, K, scores.stride(0),
                                              scores.stride(1), float(epsilon), float(log_scale),
                                              BLOCK_B=FINALIZE_BLOCK_B, BLOCK_K=FINALIZE_BLOCK_K)
    return out


def _f32(t):
    return None if t is None else t.float().contiguous()


STEPS = SinkhornSteps(sinkhorn_max, sinkhorn_sumexp, sinkhorn_finalize)


def fused_fits(B: int, K: int) -> bool:
    return next_pow2(B) * next_pow2(K) <= FUSED_MAX_ELEMENTS


def sinkhorn_fused(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    """One launch when the matrix fits a register tile, else the step kernels."""
    B, K = scores.shape
    if not fused_fits(B, K):
        return sinkhorn_loop(scores, epsilon, iterations, STEPS)
    out = torch.empty((B, K), device=scores.device, dtype=torch.float32)
    block_b, block_k = next_pow2(B), next_pow2(K)
    with on_device(scores):
        _fused_kernel[(1,)](scores, out, B, K, scores.stride(0), scores.stride(1), float(epsilon),
                            int(iterations), math.log(B), math.log(K), BLOCK_B=block_b, BLOCK_K=block_k,
                            num_warps=fused_num_warps(block_b, block_k))
    return out


def fused_num_warps(block_b: int, block_k: int) -> int:
    """Warps of the fused kernel: 4 below 1024 elements, 8 below 4096, 16 from there (at most 16 elements of
    a tile per thread). At 8 warps, some 4096- and 8192-element tiles spill on sm_90 (ptxas); python -m
    bench.sinkhorn_compile checks every tile the launcher can ask for. One program runs the whole problem,
    so more warps cost nothing else."""
    n = block_b * block_k
    return 16 if n >= 4096 else 8 if n >= 1024 else 4
