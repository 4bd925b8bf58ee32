"""Host time of seer_kernels.attention's eager Triton path per call, with the kernel launches stubbed out.

    python -m bench.attention_host                      # ViT-10B/TP4's N and D, B = H = 2 (the host work
    python -m bench.attention_host --n 197 --d 64       # does not depend on B and H)

At ViT shapes an eager call of the op is bound by host time, not by its kernels (docs/attention.md): this
measures the Python around the launches (validation, backend choice, layout checks, buffers, tile choice,
autograd) on the CPU, with every Triton kernel replaced by a no-op that only counts its launches, so it
needs no GPU and is not disturbed by the interpreter. Triton's own launch path (argument binding, the
launcher) is not in it: on a GPU machine the `-fwd`/`-fwdbwd` eager rows of bench/bench_attention.py and
bench/gpu_profile.py see the whole. Run it at two revisions on one machine to compare; the tiles and the
backward scheme are those of the H100 selector table's row for the shape where there is one.

Rows: ``direct fwd`` / ``direct bwd`` (the launchers, seer_kernels.triton.attention), ``op fwd`` (no
gradient: no autograd node) and ``op fwd+bwd`` (torch.autograd.grad through the op), in microseconds per
call, the best of --repeats.
"""
from __future__ import annotations

import argparse
import os
import timeit

os.environ["TRITON_INTERPRET"] = "1"  # lets the CPU tensors take the triton backend; the kernels are stubbed

import torch  # noqa: E402

import seer_kernels  # noqa: E402
from seer_kernels.ops import attention as ops  # noqa: E402
from seer_kernels.triton import attention as tri  # noqa: E402

KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_delta_kernel", "_bwd_dq_ds_kernel")
GPU = "nvidia-h100-80gb-hbm3"


class _Stub:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch only."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=257)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    launches: list = []
    for name in KERNELS:
        setattr(tri, name, _Stub(name, launches))
    ops._SLUGS[0] = GPU  # the CPU tensors read the H100's table row, as a GPU call there would
    row = ops.evidence(torch.device("cuda", 0), args.d, args.n, args.n)  # a lookup only: no GPU needed
    ops.evidence = lambda where, d, n_q, n_kv: row if (d, n_q, n_kv) == (args.d, args.n, args.n) else None

    b, h = 2, 2
    qkv = torch.randn(b, args.n, 3, h, args.d, dtype=torch.float16, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # slices of a fused projection, as in the ViT
    g = torch.randn_like(q)
    out, lse = tri.attention_fwd(q.detach(), k.detach(), v.detach(), 0.1)

    def op_fwd():
        with torch.no_grad():
            seer_kernels.attention(q, k, v)

    def op_fwd_bwd():
        torch.autograd.grad(seer_kernels.attention(q, k, v), (q, k, v), g)

    det = row is not None and row.get("bwd_scheme") == "deterministic"
    rows = {
        "direct fwd": lambda: tri.attention_fwd(q, k, v, 0.1, ops._tile(row, "fwd")),
        "direct bwd": lambda: tri.attention_bwd(g, q, k, v, out, lse, 0.1, det, ops._tile(row, "dkdv"),
                                                ops._tile(row, "dq")),
        "op fwd": op_fwd,
        "op fwd+bwd": op_fwd_bwd,
    }
    print(f"host time per call, launches stubbed: N {args.n}, D {args.d}, torch {torch.__version__}, "
          f"table row {row['case'] if row else None} ({GPU})")
    with seer_kernels.use_backend("triton", op="attention"):
        for name, fn in rows.items():
            launches.clear()
            fn()
            kernels = list(launches)
            best = min(timeit.repeat(fn, number=args.calls, repeat=args.repeats)) / args.calls * 1e6
            print(f"  {name:12s} {best:7.1f} us   {' + '.join(kernels)}")


if __name__ == "__main__":
    main()
