"""Sinkhorn-Knopp: our backends against the pure-torch reference (and SwAV's original loop), same run.

Rows: ``sinkhorn:<backend>-<B>x<K>-it<n>``. GB/s counts the floor traffic (scores read once, float32
codes written once); on a GPU, ``floor_pct`` is the share of the memory-bandwidth floor reached.
"""
from __future__ import annotations

import pytest
import torch

import seer_kernels
from bench import harness
from seer_kernels.ops.sinkhorn import DISPATCH
from seer_kernels.reference import sinkhorn as ref

SHAPES = [(32, 3000), (32, 16384), (256, 3000), (4096, 16384), (32, 65536)]
ITERATIONS = [3, 10]


def swav_original(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """facebookresearch/swav's distributed_sinkhorn for one process (rewritten; overflows for small eps)."""
    q = torch.exp(scores.float() / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def _backends(device: str) -> list[str]:
    out = []
    for name, backend in DISPATCH.backends.items():
        if name != "reference" and not backend.reasons(torch.device(device), torch.float32, {}):
            if name == "triton" and device == "cpu":
                continue  # the interpreter is not a performance path
            out.append(name)
    return out


def _cases(device: str):
    for b, k in SHAPES:
        for it in ITERATIONS:
            if device == "cpu" and b * k > 1 << 22 and it > 3:
                continue  # the reference needs ~10 s per call there; 3 iterations make the point
            yield b, k, it


@pytest.mark.parametrize("shape_it", [pytest.param(c, id=f"{c[0]}x{c[1]}-it{c[2]}")
                                      for c in _cases("cuda" if torch.cuda.is_available() else "cpu")])
def bench_sinkhorn(bench_record, bench_device, shape_it):
    b, k, it = shape_it
    scores = torch.nn.functional.normalize(torch.randn(b, k, device=bench_device), dim=1)
    big = b * k > 1 << 22
    # (the reference takes ~6 s a call at (4096, 16384) on the CI CPU: a timed warm-up and 2 rounds; ~16x, floor 3x)
    kw = dict(min_rounds=2, max_rounds=2, min_time=0.0, warmup=1) if big and bench_device == "cpu" else {}
    nbytes = scores.numel() * scores.element_size() + scores.numel() * 4
    ceiling = harness.bandwidth_ceiling(bench_device)
    backends = _backends(bench_device)
    if not backends:
        pytest.skip(f"no compiled backend on {bench_device}")
    for backend in backends:
        def ours(backend=backend):
            with seer_kernels.use_backend(backend, op="sinkhorn"):
                return seer_kernels.sinkhorn(scores, 0.05, it, check_finite=False)

        fns = {backend: ours, "reference": lambda: ref.sinkhorn(scores, 0.05, it),
               "swav": lambda: swav_original(scores, 0.05, it)}

        def metrics(t, backend=backend):
            out = {"gbps": harness.gbps(nbytes, t[backend].median_s),
                   "vs_swav": t["swav"].median_s / t[backend].median_s}
            if ceiling:
                out["floor_pct"] = 100 * nbytes / (ceiling * 1e9) / t[backend].median_s
            return out

        # (a backend below its floor fails the test after the other backends' rows are measured)
        bench_record("sinkhorn", f"{backend}-{b}x{k}-it{it}", fns, ours=backend, baseline="reference",
                     metrics=metrics, defer_gate=True, **kw)
    bench_record.fail_deferred()
