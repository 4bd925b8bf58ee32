"""Where a GPU op's time goes: host time per call against device (kernel) time per call, and the top kernels.

    python -m bench.gpu_profile [--only attention sinkhorn] [--iters 20]

For each case it prints
  host_us   wall time of the Python call alone (launch, dispatch, allocation), calls queued without a sync;
  gpu_us    sum of the CUDA kernels' durations per call (torch.profiler), the work the GPU does;
  wall_us   synchronised time per call (CUDA events over the calls): max(host, gpu) when nothing else runs;
and the kernels that take the device time. host_us > gpu_us means a loop of these calls is launch-bound: it
is the Python path, not the kernel, that a benchmark of the op alone measures.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from bench import harness


def measure(name: str, fn, iters: int, top: int = 6) -> dict:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    wall = harness._time_once(fn, "cuda", iters)  # CUDA events around the calls
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / iters / 1e6
    print(f"{name:52s} host {host * 1e6:8.1f} us  gpu {gpu * 1e6:8.1f} us  wall {wall * 1e6:8.1f} us", flush=True)
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"      {e.self_device_time_total / iters:8.1f} us x{e.count // iters:<3d} {e.key[:110]}")
    return {"case": name, "host_us": host * 1e6, "gpu_us": gpu * 1e6, "wall_us": wall * 1e6}


def attention_cases(iters: int) -> list:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import seer_kernels
    from seer_kernels.ops import attention as ops
    from seer_kernels.triton import attention as tri
    out = []
    for case, b, h, n, d in (("vit10b-tp4-B32H8N257D128", 32, 8, 257, 128), ("local-B192H16N37D64", 192, 16, 37, 64)):
        q, k, v, dout = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                         for i in range(4))
        qd, kd, vd = (t.detach() for t in (q, k, v))
        scale = 1 / math.sqrt(d)

        def op(det):
            def f():
                with seer_kernels.use_backend("triton", op="attention"):
                    o = seer_kernels.attention(q, k, v, deterministic=det)
                return torch.autograd.grad(o, (q, k, v), dout)
            return f

        def op_fwd():
            with torch.no_grad(), seer_kernels.use_backend("triton", op="attention"):
                return seer_kernels.attention(qd, kd, vd)

        def custom_op(det):  # through torch.ops.seer.*, the path traced code takes
            def f():
                o, _ = torch.ops.seer.attention_fwd(q, k, v, scale, det, "triton")
                return torch.autograd.grad(o, (q, k, v), dout)
            return f

        def sdpa(backend, grad):
            def f():
                with sdpa_kernel([backend]):
                    if not grad:
                        with torch.no_grad():
                            return F.scaled_dot_product_attention(qd, kd, vd)
                    o = F.scaled_dot_product_attention(q, k, v)
                    return torch.autograd.grad(o, (q, k, v), dout)
            return f

        try:  # the backward cases need its out and lse; a failing forward must not cost the SDPA rows
            o, lse = tri.attention_fwd(qd, kd, vd, scale)
        except Exception as exc:
            print(f"attention {case} triton forward: {str(exc).splitlines()[0][:100]}")
            o = lse = None
        tma = tri.Tile(64, 32, 4, 3, tma_load=True)  # Tile.tma_load: loop loads through TMA descriptors
        cases = {"triton kernels fwd (direct)": lambda: tri.attention_fwd(qd, kd, vd, scale),
                 "triton kernels fwd tma-load (direct)": lambda: tri.attention_fwd(qd, kd, vd, scale, tma),
                 "triton kernels bwd atomic (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, False),
                 # Tile.dq_tma: dq shares by TMA reductions, against the same tile with pointer atomics
                 # (the (16, 64) tile: ptxas serialises the (32, 64) one's wgmma with TMA reductions)
                 "triton kernels bwd atomic 16x64 tma-dq (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, False,
                                               tri.Tile(16, 64, 4, 2, dq_tma=True)),
                 "triton kernels bwd atomic 16x64 (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, False, tri.Tile(16, 64, 4, 2)),
                 "triton kernels bwd det (direct)": lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, True),
                 # Tile.store_ds: dq from a stored dS instead of the dq pass, dS stored by TMA and by pointers
                 "triton kernels bwd det stored-dS tma (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, True,
                                               tri.Tile(32, 64, 4, 2, store_ds=True, dq_tma=True),
                                               tri.Tile(64, 64, 4, 3)),
                 "triton kernels bwd det stored-dS (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, True,
                                               tri.Tile(32, 64, 4, 2, store_ds=True), tri.Tile(64, 64, 4, 3)),
                 "triton kernels bwd det tma-load (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, True,
                                               tri.Tile(32, 64, 4, 2, tma_load=True), tma),
                 "triton kernels bwd atomic 16x64 tma-dq tma-load (direct)":
                     lambda: tri.attention_bwd(dout, qd, kd, vd, o, lse, scale, False,
                                               tri.Tile(16, 64, 4, 2, dq_tma=True, tma_load=True)),
                 "attention() fwd (triton)": op_fwd, "attention() fwd+bwd atomic (triton)": op(False),
                 "attention() fwd+bwd det (triton)": op(True),
                 "torch.ops.seer fwd+bwd atomic (triton)": custom_op(False)}
        for nm, be in ops._sdpa_backends().items():
            if nm == "math":  # O(N^2) memory; not a contender
                continue
            cases[f"sdpa-{nm} fwd"] = sdpa(be, False)
            cases[f"sdpa-{nm} fwd+bwd"] = sdpa(be, True)
        for nm, fn in cases.items():
            try:
                out.append(measure(f"attention {case} {nm}", fn, iters))
            except Exception as exc:  # report and go on: one failing case must not hide the others
                print(f"attention {case} {nm}: {str(exc).splitlines()[0][:100]}")
        try:
            python_profile(f"attention {case} attention() fwd+bwd atomic (triton)", op(False), iters)
        except Exception as exc:
            print(f"attention {case} cProfile: {str(exc).splitlines()[0][:100]}")
    return out


def python_profile(name: str, fn, iters: int, top: int = 22) -> None:
    """Where the host time of ``fn`` goes, by Python function (cProfile, own time)."""
    import cProfile
    import io
    import pstats
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    print(f"--- cProfile: {name}, {iters} calls, by own time")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-4000:])


def sinkhorn_cases(iters: int) -> list:
    import seer_kernels
    out = []
    for b, k in ((32, 16384), (4096, 16384)):
        scores = torch.randn(b, k, device="cuda")
        cases = {}
        for backend in ("cuda", "triton", "reference"):
            def f(backend=backend, check=True):
                with seer_kernels.use_backend(backend, op="sinkhorn"):
                    return seer_kernels.sinkhorn(scores, 0.05, 3, check_finite=check)
            cases[backend] = f
        # What the benchmark rows time (no finite check: its device-to-host copy syncs every call), and the
        # native op alone: the difference is the Python path's host time.
        cases["cuda, check_finite=False"] = lambda: cases["cuda"](check=False)
        cases["cuda, torch.ops.seer_C directly"] = lambda: torch.ops.seer_C.sinkhorn_fused(scores, 0.05, 3)
        for name, f in cases.items():
            try:
                out.append(measure(f"sinkhorn {b}x{k} it3 {name}", f, iters))
            except Exception as exc:  # report and go on
                print(f"sinkhorn {b}x{k} {name}: {str(exc).splitlines()[0][:100]}")
        if b == 32:
            try:
                python_profile(f"sinkhorn {b}x{k} it3 cuda, check_finite=False", cases["cuda, check_finite=False"],
                               iters)
            except Exception as exc:  # e.g. no CUDA backend (a failed build): the attention cases still run
                print(f"sinkhorn {b}x{k} cProfile: {str(exc).splitlines()[0][:100]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=["sinkhorn", "attention"])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    for what in args.only:
        {"attention": attention_cases, "sinkhorn": sinkhorn_cases}[what](args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
