"""A wider tile sweep for the attention kernels than the benchmark's candidate sets, on a GPU, within a time
budget: the evidence for choosing the candidate tiles (seer_kernels/triton/attention.py) from one GPU run.

    python -m bench.attention_sweep OUT.json [--budget-s 80] [--workers 12]    # on a GPU
    python -m bench.attention_sweep --compile-check [--arch 90]                 # anywhere: which grid tiles
                                                                                 # compile without spills

Per ViT shape of bench/bench_attention.py (the N = 257, D = 128 target first), it
1. compiles every grid tile of every kernel in parallel worker processes (Triton's disk cache then serves
   the timing process, so compile time is spread over the CPU cores), skipping tiles that do not fit;
2. times each kernel's tiles on their own (fwd; dkdv with and without atomic dq; dq), interleaved, as CUDA-graph
   replays (GPU time: eager calls at these shapes are bound by host time, the same for every tile);
3. times the whole forward, forward+backward (atomic) and forward+backward (deterministic) at the fastest
   tiles against the best correct torch SDPA backend, in the same run, and writes rows in the benchmark's
   format (op, case, mode, ratio, shape, dtype, best_sdpa, tiles). These call the kernels directly, without
   the op's dispatch: evidence for the candidate tiles, not for the selector table, which is written from
   the benchmark (bench/bench_attention.py) through the op.
The JSON is rewritten after each shape, so a run stopped at its budget keeps what it finished.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time

# Variants that spill more than 32 bytes per thread for sm_90 in bf16 (read off ``--compile-check --head-dims
# 128 64``, which lists every spill, Triton 3.8): (tile class, block_m, block_n, warps, stages). Not worth a
# GPU's compile and timing time.
SPILLING = {
    "fwd": {
        (64, 128, 128, 4, 2), (64, 128, 128, 4, 3), (128, 128, 64, 4, 2), (128, 128, 64, 4, 3), (128, 128, 128, 4, 2),
        (128, 128, 128, 4, 3),
    },
    "dkdv+atomic": {
        (64, 32, 128, 4, 2), (64, 32, 128, 4, 3), (64, 64, 128, 4, 2), (64, 64, 128, 4, 3), (128, 16, 128, 4, 2),
        (128, 16, 128, 4, 3), (128, 32, 128, 4, 2), (128, 32, 128, 4, 3), (128, 64, 64, 4, 2), (128, 64, 64, 4, 3),
        (128, 64, 128, 4, 2), (128, 64, 128, 4, 3), (128, 64, 128, 8, 2), (128, 64, 128, 8, 3),
    },
    "dkdv": {
        (64, 32, 128, 4, 3), (64, 64, 128, 4, 2), (64, 64, 128, 4, 3), (128, 16, 128, 4, 2), (128, 16, 128, 4, 3),
        (128, 32, 128, 4, 2), (128, 32, 128, 4, 3), (128, 64, 64, 4, 2), (128, 64, 64, 4, 3), (128, 64, 128, 4, 2),
        (128, 64, 128, 4, 3),
    },
    "dq": {
        (128, 128, 16, 4, 2), (128, 128, 16, 4, 3), (128, 128, 32, 4, 2), (128, 128, 32, 4, 3), (128, 128, 64, 4, 2),
        (128, 128, 64, 4, 3),
    },
}


def grid(kernel: str, cls: int) -> list:
    """Candidate (block_m, block_n, warps, stages) per kernel and tile class, before the fit filter; all with
    split tail tiles (the benchmark's candidate sets time the default tile without them)."""
    from seer_kernels.triton.attention import Tile
    ms = {"fwd": (32, 64, 128), "dkdv": (16, 32, 64), "dq": (32, 64, 128)}[kernel]
    ns = {"fwd": (32, 64, 128), "dkdv": (32, 64, 128), "dq": (16, 32, 64)}[kernel]
    if cls == 256:
        ms, ns = tuple(m for m in ms if m <= 64), tuple(n for n in ns if n <= 64)
    return [Tile(m, n, w, s) for m, n, w, s in itertools.product(ms, ns, (4, 8), (2, 3))]


def _kernels():
    """(label, kernel name, atomic flag): dkdv runs with atomic dq (the default scheme) or without it."""
    yield "fwd", "fwd", None
    yield "dkdv+atomic", "dkdv", True
    yield "dkdv", "dkdv", False
    yield "dq", "dq", None


# ---------------------------------------------------------------------------------------------------------
# Compile check (no GPU)

def compile_check(arch: int, head_dims, dtype: str) -> int:
    from bench.attention_compile import compile_one
    from bench.triton_compile import interpreted, report
    from seer_kernels.triton import attention as tri
    if interpreted():
        return 2
    fns = {"fwd": tri._fwd_kernel, "dkdv": tri._bwd_dkdv_kernel, "dq": tri._bwd_dq_kernel}
    rows = []
    for d in head_dims:
        base = dict(HEAD_DIM=d, D_PAD=tri.d_pad(d))
        for label, kernel, atomic in _kernels():
            cx = base if atomic is None else dict(base, ATOMIC_DQ=atomic, DQ_TMA=False, DQ_DESC=None, STORE_DS=False,
                                                  DS_TMA=False, DS_DESC=None)
            for tile in grid(kernel, tri.tile_class(d)):
                rows.append((f"{label:12s} {d:4d} {str(tile.as_list()):20s}",
                             functools.partial(compile_one, fns[kernel], dtype, cx, tile, arch)))
    return report(rows, arch, f"{'kernel':12s} {'D':>4s} {'tile':20s}")


# ---------------------------------------------------------------------------------------------------------
# GPU sweep

def _launch(kernel: str, atomic, tile, q, k, v, dout, out, lse, scale):
    """Run one kernel with exactly this tile (no fallback to other candidates)."""
    from seer_kernels.triton import attention as tri
    table = {"fwd": tri.FWD_TILES, "dkdv": tri.DKDV_TILES, "dq": tri.DQ_TILES}[kernel]
    cls = tri.tile_class(q.shape[-1])
    saved = table[cls]
    table[cls] = (tile,)
    try:
        if kernel == "fwd":
            return tri.attention_fwd(q, k, v, scale, tile)
        if kernel == "dkdv":
            return tri.attention_bwd(dout, q, k, v, out, lse, scale, not atomic, tile, None)
        return tri.attention_bwd(dout, q, k, v, out, lse, scale, True, None, tile)
    finally:
        table[cls] = saved


def _warm(job):
    """Worker: compile (by running once) each (kernel, atomic, tile) at this shape; return the ones that fit."""
    import torch
    from bench import harness
    (b, h, n, d), dev, dtype, items = job
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(4))
    from seer_kernels.triton import attention as tri
    out, lse = tri.attention_fwd(q, k, v, 1 / math.sqrt(d))
    ok = []
    for kernel, atomic, tile in items:
        try:
            _launch(kernel, atomic, tile, q, k, v, dout, out, lse, 1 / math.sqrt(d))
            harness._sync(dev)
            ok.append((kernel, atomic, tile))
        except Exception as exc:  # too big for this GPU, or a compiler failure: reported, not timed
            print(f"  skip {kernel} atomic={atomic} {tile.as_list()}: {str(exc).splitlines()[-1][:120]}",
                  flush=True)
    return ok


def _shape_rows(case, shape, pool, workers, deadline, dev, dtype, per_grid):
    import torch
    from bench import harness
    from bench.bench_attention import _available_sdpa, _best, _float32_math, _fwd_bwd, _inputs
    from seer_kernels.testing import max_abs_err
    from seer_kernels.triton import attention as tri
    b, h, n, d = shape
    cls = tri.tile_class(d)
    items = [(kernel, atomic, t) for label, kernel, atomic in _kernels() for t in grid(kernel, cls)[:per_grid]
             if (cls, *t.as_list()[:4]) not in SPILLING[label]]
    chunks = [items[i::workers] for i in range(workers)]
    t0 = time.time()
    fits = [x for got in pool.map(_warm, [((b, h, n, d), dev, dtype, c) for c in chunks if c]) for x in got]
    print(f"[sweep] {case}: {len(fits)}/{len(items)} variants fit, compiled in {time.time() - t0:.0f} s", flush=True)
    scale = 1 / math.sqrt(d)
    q, k, v, dout = _inputs(b, h, n, d, dev, dtype, grad=True)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    want = _float32_math(qd, kd, vd)
    out, lse = tri.attention_fwd(qd, kd, vd, scale)
    per_kernel, best = {}, {}
    for label, kernel, atomic in _kernels():
        if time.time() > deadline:
            break
        fns = {}
        for kk, aa, tile in fits:
            if kk != kernel or aa != atomic:
                continue
            if kernel == "fwd":
                err = max_abs_err(_launch(kernel, atomic, tile, qd, kd, vd, dout, out, lse, scale)[0], want)
                if err > 3e-2:
                    print(f"  WRONG fwd {tile.as_list()}: {err:.3g}", flush=True)
                    continue
            fns[tuple(tile.as_list())] = (lambda tile=tile, kernel=kernel, atomic=atomic:
                                          _launch(kernel, atomic, tile, qd, kd, vd, dout, out, lse, scale))
        if not fns:
            continue
        t = harness.compare_gpu_time(fns, dev, min_time=0.02, max_rounds=12, min_rounds=3)
        per_kernel[label] = sorted(([list(key), t[key].median_s * 1e6] for key in t), key=lambda r: r[1])
        best[label] = tri.Tile(*per_kernel[label][0][0])
        print(f"[sweep] {case} {label}: best {per_kernel[label][:3]} (us)", flush=True)
    rows = []
    if {"fwd", "dkdv+atomic", "dkdv", "dq"} <= set(best):
        sdpa, rejected = _available_sdpa(q, k, v, dout, want)

        def fb(det):
            def f():
                o, l_ = tri.attention_fwd(qd, kd, vd, scale, best["fwd"])
                return tri.attention_bwd(dout, qd, kd, vd, o, l_, scale, det,
                                         best["dkdv" if det else "dkdv+atomic"], best["dq"] if det else None)
            return f

        modes = {"fwd": lambda: tri.attention_fwd(qd, kd, vd, scale, best["fwd"]),
                 "fwdbwd": fb(False), "fwdbwd-det": fb(True)}
        for mode, ours in modes.items():
            if mode == "fwd":
                base = {nm: (lambda f=f: f(qd, kd, vd)) for nm, f in sdpa.items()}
            else:
                base = {nm: (lambda f=f: _fwd_bwd(f, q, k, v, dout)) for nm, f in sdpa.items()}
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                top = _best(dev, base)
                t = harness.compare({"triton": ours, top: base[top]}, dev, min_time=0.05, max_rounds=40,
                                    min_rounds=5)
            ratio = t[top].median_s / t["triton"].median_s
            tiles = {"fwd": best["fwd"].as_list(), "dkdv": best["dkdv" if mode == "fwdbwd-det" else "dkdv+atomic"]
                     .as_list(), "dq": best["dq"].as_list()}
            rows.append({"op": "attention", "case": f"{case}-{mode}", "ours": "triton", "baseline": top,
                         "mode": mode, "ratio": ratio, "shape": [b, h, n, n, d], "dtype": str(dtype)[6:],
                         "best_sdpa": top[5:], "tiles": tiles, "us": t["triton"].median_s * 1e6,
                         "us_best_sdpa": t[top].median_s * 1e6, "sdpa_rejected": rejected,
                         "source": "bench/attention_sweep.py (kernels called directly, no op dispatch)"})
            print(f"[sweep] {case}-{mode}: {ratio:.3f}x {top} ({t['triton'].median_s * 1e6:.1f} us vs "
                  f"{t[top].median_s * 1e6:.1f} us)", flush=True)
    return rows, per_kernel


def sweep(out_path: str, budget_s: float, workers: int, smoke: bool = False) -> int:
    """``smoke``: the same code on the CPU under TRITON_INTERPRET=1 (float32, one tiny shape, two tiles per
    kernel), to test this script without a GPU."""
    import torch
    import torch.multiprocessing as mp
    from bench import harness
    from bench.bench_attention import GPU_SHAPES
    if smoke:
        dev, dtype, shapes, per_grid = "cpu", torch.float32, [("smoke-B1H2N37D64", 1, 2, 37, 64)], 2
    elif torch.cuda.is_available():
        dev, dtype, shapes, per_grid = "cuda", torch.bfloat16, GPU_SHAPES, None
    else:
        print("no GPU (--smoke runs the CPU interpreter version)", file=sys.stderr)
        return 2
    deadline = time.time() + budget_s
    result = {"environment": harness.environment(dev), "rows": [], "per_kernel": {}}
    with mp.get_context("spawn").Pool(workers) as pool:
        for case, b, h, n, d in shapes:
            if time.time() > deadline:
                print(f"[sweep] budget spent before {case}", flush=True)
                break
            rows, per_kernel = _shape_rows(case, (b, h, n, d), pool, workers, deadline, dev, dtype, per_grid)
            result["rows"] += rows
            result["per_kernel"][case] = per_kernel
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="attention_sweep.json")
    ap.add_argument("--budget-s", type=float, default=80.0)
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter run of this script (TRITON_INTERPRET=1)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args(argv)
    if args.compile_check:
        return compile_check(args.arch, args.head_dims, args.dtype)
    return sweep(args.out, args.budget_s, args.workers, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
