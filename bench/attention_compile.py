"""Compile every attention kernel variant for a GPU target without a GPU, and report its resources.

    python -m bench.attention_compile                 # sm_90 (H100), all candidate tiles, bf16 + fp16
    python -m bench.attention_compile --arch 80 --head-dims 64 128 --dtypes bf16

For each (kernel, head dim, dtype, tile) it runs Triton's full pipeline to a cubin (ptxas included) and
prints shared memory, registers per thread, spills and SASS instructions per main-loop iteration. A variant
that fails to compile, needs more shared memory than the GPU has, spills more than SPILL_BUDGET bytes per
thread, has an instruction of FORBIDDEN_PTX or whose wgmma ptxas serialises (WGMMA-SERIAL) counts as a
failure (exit status 1): a bug to fix before a GPU runs it. Which variants ptxas serialises depends on the
Triton and on the tail tiles: run it with the GPU machines' Triton (3.6) too, at --seq-len 257 and 145.
Needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled). The strides are those of contiguous
(B, H, N, D) inputs: marked divisible by 16 where D is a multiple of 16, as a real launch specialises them,
unmarked otherwise. A variant whose main loop loads or stores global memory 1 or 2 bytes at a time fails
too (NARROW), as every loop did at 88-wide heads before the kernels told the compiler their rows' alignment.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.triton_compile import interpreted, report
from seer_kernels.triton import attention as tri

# The fastest dkdv tile measured at 128-wide heads on an H200, (32, 64, 4 warps), spills with dq atomics,
# compiled by Triton 3.6 (the GPU machines'): 32 bytes per thread at D = 128 and at D = 80 (padded to 128)
# where the last key tile is 16 rows (N = 257), 36 and 24 where it is 32 (N % 64 in 17..32, e.g. N = 145),
# 28 unsplit; by Triton 3.8 (this repository's CI) 32 and 24 at N = 257, 20 and 12 unsplit. No candidate
# spills more than 48 (3.6) or 32 (3.8) bytes at N = 257 or 145. Real register pressure spills hundreds.
# Every candidate is timed per shape, so a tile that spills where it hurts is not chosen. (Before the exp2
# softmax, 2026-11-26, Triton 3.6 spilled 80 bytes on that tile at D = 80, N = 145 and 72 unsplit at D = 80
# and 88: over this budget, found by compiling with the 3.6 wheel offline.)
SPILL_BUDGET = 64

# The softmax is exp2 of one fma per score (seer_kernels/triton/attention.py): tl.exp lowers to this
# non-flush-to-zero ex2, which ptxas expands with range-scaling multiplies (with it, the forward's and dq's
# main loops had a third more SASS instructions per iteration on sm_90). A variant whose PTX has it fails.
FORBIDDEN_PTX = ("ex2.approx.f32",)

# Descriptors of outputs (dq's TMA reduction, the dS store): typed by their own flags, not by TMA_LOAD
OUTPUT_DESCS = ("DQ_DESC", "DS_DESC")


def _signature(fn, dtype: str, constexprs: dict, strides16: bool) -> tuple[dict, dict]:
    params = list(inspect.signature(fn.fn).parameters)
    sig, attrs = {}, {}
    for i, name in enumerate(params):
        if name == "DQ_DESC" and constexprs.get("DQ_TMA"):  # what a launch with a TensorDescriptor compiles
            sig[name] = f"tensordesc<fp32[1,{constexprs['BLOCK_M']},{constexprs['D_PAD']}]>"
        elif name == "DS_DESC" and constexprs.get("DS_TMA"):
            sig[name] = f"tensordesc<{dtype}[1,{constexprs['BLOCK_N']},{constexprs['BLOCK_M']}]>"
        elif name.endswith("_DESC") and name not in OUTPUT_DESCS and constexprs.get("TMA_LOAD"):
            rows = constexprs["BLOCK_M" if name in ("Q_DESC", "DO_DESC") else "BLOCK_N"]
            sig[name] = f"tensordesc<{dtype}[1,1,{rows},{constexprs['D_PAD']}]>"
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in ("H", "N_Q", "N_KV"):
            sig[name] = "*fp32" if name in ("LSE", "DELTA", "DQ_ACC") and not (
                name == "DQ_ACC" and not constexprs.get("ATOMIC_DQ", True)) else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            # strides specialised as multiples of 16 elements; the dS buffer's always are (ds_cols)
            if name.startswith("s") and (strides16 or name.startswith("sds")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(fn, dtype: str, constexprs: dict, tile: tri.Tile, arch: int, seq_len: int = 257,
                maxnreg: int | None = None):
    """``seq_len`` sets the tail tiles (``tri.tail_block``); 257 leaves one row, so both paths compile.
    ``maxnreg``: cap the registers per thread (Triton's launch option; an experiment, no launcher sets it)."""
    params = inspect.signature(fn.fn).parameters  # the delta kernel takes BLOCK_M only
    cx = dict(constexprs, **{k: v for k, v in tile.constexprs(seq_len, seq_len).items() if k in params})
    if "FOLD_TAIL" in params:  # the forward: its last program folds the tail in at this length, or not
        cx["FOLD_TAIL"] = tri.fold_active(tile, seq_len)
    if "TMA_LOAD" in params:  # descriptors where the tile loads through them, None (a constexpr) otherwise
        cx["TMA_LOAD"] = tile.tma_load
        if not tile.tma_load:
            cx.update({name: None for name in params if name.endswith("_DESC") and name not in OUTPUT_DESCS})
    # Contiguous inputs' row stride is D: Triton specialises the strides as multiples of 16 where D is one;
    # elsewhere only the kernels' own hint (_row_ptrs) keeps the loads 16 bytes wide.
    sig, attrs = _signature(fn, dtype, cx, strides16=cx["HEAD_DIM"] % 16 == 0)
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def variants(head_dims, dtypes, defaults_only=False):
    """(name, kernel, head dim, dtype, constexprs, tile) for every candidate tile, or only the default ones
    (the first of each table, and its first tile with each feature: ``dq_tma``, ``tma_load``, ``fold_tail``)."""
    def tiles(table, cls):
        if not defaults_only:
            return table[cls]
        return (list(table[cls][:1]) + [t for t in table[cls] if t.dq_tma][:1]
                + [t for t in table[cls] if t.tma_load and not t.dq_tma][:1]
                + [t for t in table[cls] if t.fold_tail][:1])

    for d in head_dims:
        cls = tri.tile_class(d)
        base = dict(HEAD_DIM=d, D_PAD=tri.d_pad(d))
        for dt in dtypes:
            yield "delta", tri._bwd_delta_kernel, d, dt, dict(base, ZERO_DQ=True), tri.Tile(tri.DELTA_BLOCK, 16, 4, 1)
            for tile in tiles(tri.FWD_TILES, cls):
                yield "fwd", tri._fwd_kernel, d, dt, base, tile
            no_ds = dict(STORE_DS=False, DS_TMA=False, DS_DESC=None)
            for tile in tiles(tri.DKDV_TILES, cls):
                if tile.dq_tma:  # only the atomic scheme reads the flag; the deterministic kernel is the same
                    yield "dkdv+tma", tri._bwd_dkdv_kernel, d, dt, dict(base, ATOMIC_DQ=True, DQ_TMA=True,
                                                                        **no_ds), tile
                    continue
                plain = dict(base, DQ_TMA=False, DQ_DESC=None, **no_ds)
                yield "dkdv+atomic", tri._bwd_dkdv_kernel, d, dt, dict(plain, ATOMIC_DQ=True), tile
                yield "dkdv", tri._bwd_dkdv_kernel, d, dt, dict(plain, ATOMIC_DQ=False), tile
            for tile in tiles(tri.DQ_TILES, cls):
                yield "dq", tri._bwd_dq_kernel, d, dt, base, tile
            # the stored-dS scheme: its dkdv tiles with the store (by TMA with dq_tma), and the dq-from-dS
            # kernel's tiles
            pairs = tri.DS_TILES[cls][:1] if defaults_only else tri.DS_TILES[cls]
            for tile, _ in pairs:
                ds = dict(base, ATOMIC_DQ=False, DQ_TMA=False, DQ_DESC=None, STORE_DS=True, DS_TMA=tile.dq_tma)
                if not tile.dq_tma:
                    ds["DS_DESC"] = None
                yield "dkdv+ds", tri._bwd_dkdv_kernel, d, dt, ds, tile
            for tile in dict.fromkeys(dq for _, dq in pairs):
                yield "dq-ds", tri._bwd_dq_ds_kernel, d, dt, base, tile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[16, 32, 64, 80, 88, 128, 256])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--defaults-only", action="store_true", help="only the default tile of each kernel")
    ap.add_argument("--seq-len", type=int, default=257,
                    help="sets the tail tiles (257: one leftover row, 16-row tails; 145: 32-row tails)")
    ap.add_argument("--kernels", nargs="+", default=None,
                    help="only these kernels (fwd, dkdv, dkdv+atomic, dkdv+tma, dkdv+ds, dq, dq-ds, delta)")
    ap.add_argument("--maxnreg", type=int, default=None,
                    help="cap registers per thread (Triton's maxnreg; an experiment: bench/results/"
                         "sm90-attention-compile-maxnreg.txt)")
    args = ap.parse_args(argv)
    names = {"fwd", "dkdv", "dkdv+atomic", "dkdv+tma", "dkdv+ds", "dq", "dq-ds", "delta"}
    if args.kernels is not None and not set(args.kernels) <= names:
        ap.error(f"argument --kernels: unknown {sorted(set(args.kernels) - names)}; expected some of {sorted(names)}")
    if args.maxnreg is not None and not 24 <= args.maxnreg <= 255:
        ap.error(f"argument --maxnreg: expected registers per thread in [24, 255], got {args.maxnreg}")
    if interpreted():
        return 2
    rows = ((f"{name:12s} {d:4d} {dt:5s} {str(tile.as_list()):24s}",
             functools.partial(compile_one, fn, dt, cx, tile, args.arch, args.seq_len, args.maxnreg))
            for name, fn, d, dt, cx, tile in variants(args.head_dims, args.dtypes, args.defaults_only)
            if args.kernels is None or name in args.kernels)
    return report(rows, args.arch, f"{'kernel':12s} {'D':>4s} {'dtype':5s} {'tile (m,n,warps,stages)':24s}",
                  spill_budget=SPILL_BUDGET, forbidden_ptx=FORBIDDEN_PTX, narrow_access=True)


if __name__ == "__main__":
    sys.exit(main())
