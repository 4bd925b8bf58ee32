"""`python -m seer_kernels`: what this machine can run, a short demonstration of each op, and the
benchmark table (our kernels against their baselines, timed in the same run).

    python -m seer_kernels            # demo + CPU (or GPU) benchmarks
    python -m seer_kernels --no-bench
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import seer_kernels
from seer_kernels import _backend


def _ops_table(device: torch.device) -> None:
    """The backend each op picks here, for a typical input (the choice may depend on the shape)."""
    from seer_kernels.ops import attention, multicrop, sinkhorn

    def pick(disp, dtype, **info) -> str:
        try:
            return disp.select(device, dtype, **info).name
        except _backend.BackendError:
            return "none"

    for dtype in (torch.float32, torch.bfloat16):
        shape = (4096, 3000)
        print(f"  sinkhorn   {_dt(device, dtype)} {str(shape):22s} -> "
              f"{pick(sinkhorn.DISPATCH, dtype, shape=shape)}")
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.empty(32, 8, 257, 128, dtype=dtype, device=device)  # ViT-10B under tensor parallelism 4
        info = attention._info(q, q, grad=True, deterministic=False, in_op=False)
        print(f"  attention  {_dt(device, dtype)} {str(tuple(q.shape)):22s} -> {pick(attention.DISPATCH, dtype, **info)}")
    print(f"  multicrop  {_dt(device, torch.uint8)} {'(3, H, W) images':22s} -> {pick(multicrop.DISPATCH, torch.uint8)}")


def _dt(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device.type}/{str(dtype).replace('torch.', ''):9s}"


def demo(device: torch.device) -> None:
    print(f"torch {torch.__version__}; native kernels: {seer_kernels.native_status() or 'loaded'}; "
          f"device: {device}")
    print("backend chosen per op:")
    _ops_table(device)

    # Sinkhorn: SwAV's loop overflows at small epsilon; ours stays finite and exact.
    # Embeddings close to some prototypes, as after training: cosines near 1, exp(1 / 0.01) = inf.
    c = torch.nn.functional.normalize(torch.randn(3000, 128, device=device), dim=1)
    z = torch.nn.functional.normalize(c[torch.randint(0, 3000, (256,), device=device)]
                                      + 0.05 * torch.randn(256, 128, device=device), dim=1)
    scores = z @ c.t()
    for eps in (0.05, 0.01):
        naive = torch.exp(scores / eps)
        codes = seer_kernels.sinkhorn(scores, eps, 3)
        print(f"sinkhorn eps={eps}: exp(scores/eps) finite: {bool(torch.isfinite(naive).all())}; "
              f"codes finite: {bool(torch.isfinite(codes).all())}, rows sum to 1 within "
              f"{float((codes.sum(1) - 1).abs().max()):.1e}")

    # Attention: forward and backward against PyTorch's SDPA at a ViT shape.
    q, k, v = (torch.randn(2, 4, 197, 64, device=device, requires_grad=True) for _ in range(3))
    out = seer_kernels.attention(q, k, v)
    out.sum().backward()
    want = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    print(f"attention (2, 4, 197, 64): max |ours - sdpa| = {float((out.detach() - want).abs().max()):.1e}, "
          f"dq finite: {bool(torch.isfinite(q.grad).all())}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmarks")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    demo(torch.device(args.device))
    if args.no_bench:
        return 0
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench").is_dir():
        print("benchmarks live in the source tree (bench/); not found next to this install")
        return 0
    print("\nbenchmarks (ratio = baseline time / our time, same run):")
    return subprocess.call([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--no-gate",
                            "--benchmark-disable", "--bench-device", args.device], cwd=root)


if __name__ == "__main__":
    sys.exit(main())
