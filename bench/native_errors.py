"""Does a C++ argument error of the native ops reach Python as an exception on this machine?

    python -m bench.native_errors            # one subprocess per case; prints ok / crashed (signal) per case

Each case calls a native op directly (torch.ops.seer_C.*) with an argument its C++ check refuses. A case
whose process dies (a signal instead of a ValueError) is a crash of the error path itself: on the GPU
machine the CUDA multi-crop op's refusal of a box outside its image segfaulted (first GPU check). The CPU
op's identical check shows whether it is the C++ exception machinery or the CUDA translation unit.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

CASES = {
    "multicrop cpu, box outside the image": "cpu",
    "multicrop cuda, box outside the image": "cuda",
}
SNIPPET = """
import torch, seer_kernels
from seer_kernels import CropParams
image = torch.zeros(3, 23, 30, dtype=torch.uint8, device={dev!r})
packed = CropParams.identity([[0, 0, 24, 10]]).pack()  # 24 rows > 23
try:
    torch.ops.seer_C.multicrop_apply([image], packed, 8, [0.5] * 3, [0.2] * 3, torch.float32)
except ValueError as exc:
    print("ValueError:", str(exc).splitlines()[0][:120])
"""


def main() -> int:
    bad = 0
    for name, dev in CASES.items():
        res = subprocess.run([sys.executable, "-c", SNIPPET.format(dev=dev)], capture_output=True, text=True,
                             timeout=120)
        if res.returncode == 0:
            print(f"ok       {name}: {res.stdout.strip()}")
            continue
        bad += 1
        if res.returncode > 0:
            print(f"FAILED   {name}: exit {res.returncode}\n{res.stderr[-1500:]}")
            continue
        print(f"CRASHED  {name}: signal {-res.returncode}\n{res.stderr[-800:]}")
        if shutil.which("cuda-gdb"):  # where the error path dies: the native frames of the crash
            gdb = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable,
                                  "-c", SNIPPET.format(dev=dev)], capture_output=True, text=True, timeout=300)
            frames = [line for line in gdb.stdout.splitlines() if line.startswith("#")]
            print("\n".join(frames[:40]) or gdb.stdout[-3000:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
