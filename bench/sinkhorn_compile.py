"""Compile every Sinkhorn Triton kernel variant for a GPU target without a GPU, and report its resources.

    python -m bench.sinkhorn_compile                  # sm_90 (H100): every variant the launchers can ask for
    python -m bench.sinkhorn_compile --arch 80 --quick

The launchers in seer_kernels/triton/sinkhorn.py pick fixed tiles for the step kernels and a power-of-two
register tile of at most FUSED_MAX_ELEMENTS for the fused kernel; this compiles each of them through
Triton's full pipeline (ptxas included) and fails (exit status 1) on a compile error, shared memory beyond
the GPU's, or register spills beyond a few bytes: the things only a GPU run would otherwise show. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.triton_compile import interpreted, report
from seer_kernels.triton import sinkhorn as tri

# A few bytes of spill per thread are let through: ptxas spills 12 bytes for the (2, 4096) float32 tile at any
# warp count (a structural spill, not register pressure: 64 registers used of 128), in a kernel that runs
# once per step on at most 32 KB of scores. Real register pressure spills hundreds of bytes (4 warps on the
# 8192-element tiles: up to 716).
SPILL_BUDGET = 16

_SCALARS = {"B": "i32", "K": "i32", "stride_b": "i32", "stride_k": "i32", "epsilon": "fp32", "lines_per_split": "i32",
            "iterations": "i32", "log_b": "fp32", "log_k": "fp32", "log_scale": "fp32"}


def compile_one(fn, score_dtype: str, constexprs: dict, num_warps: int, arch: int):
    """``fn`` with scores of ``score_dtype``, float32 everywhere else (as the launchers pass them)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "s_ptr":
            sig[name] = f"*{score_dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = _SCALARS[name]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def variants(quick: bool = False):
    """(name, kernel, score dtype, constexprs, num_warps) for what the launchers can launch."""
    dtypes = ("fp32",) if quick else ("fp32", "bf16", "fp16")
    for dt in dtypes:
        for dim, mode, has_m, has_fg, per_line in itertools.product((0, 1), (0, 1), (False, True), (False, True),
                                                                     (False, True)):
            if (has_fg and not has_m) or (per_line and mode == 0) or (quick and not (has_m and has_fg)):
                continue  # f and g come with m; only the sum-exp takes a shift
            block_b, block_k = (32, 64) if dim == 0 else (4, 256)  # as _launch_reduce
            yield (f"reduce d{dim} m{mode}{' m' * has_m}{'fg' * has_fg}{' line' * per_line}", tri._reduce_kernel, dt,
                   dict(DIM=dim, MODE=mode, HAS_M=has_m, HAS_FG=has_fg, SHIFT_PER_LINE=per_line,
                        BLOCK_B=block_b, BLOCK_K=block_k), 4)
        yield "finalize", tri._finalize_kernel, dt, dict(BLOCK_B=32, BLOCK_K=64), 4
        # The fused kernel at the largest tiles (register pressure grows with the tile), every aspect ratio.
        top = tri.FUSED_MAX_ELEMENTS.bit_length() - 1
        for total in ((top,) if quick else range(top, top - 4, -1)):
            for p in range(total + 1):
                if quick and p not in (0, 5, total // 2 + 1, total):
                    continue
                bb, bk = 2 ** p, 2 ** (total - p)
                yield (f"fused {bb}x{bk}", tri._fused_kernel, dt, dict(BLOCK_B=bb, BLOCK_K=bk),
                       tri.fused_num_warps(bb, bk))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="float32 scores and a sample of the fused tiles")
    ap.add_argument("--part", default="0/1", metavar="K/N",
                    help="every N-th variant from the K-th: N processes at once compile them all (K = 0 .. N-1)")
    args = ap.parse_args(argv)
    try:
        k, n = (int(x) for x in args.part.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        ap.error(f"--part {args.part!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    if interpreted():
        return 2
    rows = ((f"{name:22s} {dt:5s} {warps:5d}", functools.partial(compile_one, fn, dt, cx, warps, args.arch))
            for i, (name, fn, dt, cx, warps) in enumerate(variants(args.quick)) if i % n == k)
    return report(rows, args.arch, f"{'kernel':22s} {'dtype':5s} {'warps':>5s}", spill_budget=SPILL_BUDGET)


if __name__ == "__main__":
    sys.exit(main())
