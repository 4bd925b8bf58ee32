"""Does a C++ argument error of the native ops reach Python as an exception on this machine?

    python -m bench.native_errors            # one subprocess per case; prints ok / crashed (signal) per case

Each case calls a native op directly (torch.ops.seer_C.*) with an argument its C++ check refuses; the
public ops validate in Python first, so only direct callers of the private ops reach these checks.

Found on the GPU machine (H200 image, torch 2.11, extension built by its /opt/gcc/bin/g++): both the CPU and
the CUDA op die with SIGSEGV while c10::str formats the first integer of the message. The backtrace has
std::ostream::_M_insert<long> inside seer_kernels/_C.abi3.so, where a normal build imports it from
libstdc++.so.6 (``nm -C _C.abi3.so | grep _M_insert`` shows ``U`` here): that toolchain put a private copy
of libstdc++'s number formatting into the extension, which crashes against the process's own libstdc++.
This script prints that symbol check too, and the native frames of a crash (cuda-gdb, where installed).
Since then the checks format their messages without streams (csrc/include/seer/message.h); the symbol check
still warns about a private copy, which other (internal) error paths of torch's inline code could reach.
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


def libstdcxx_copy() -> str:
    """'' if the extension imports libstdc++'s ostream code, else a line naming the symbols it defines."""
    import glob
    import os

    import seer_kernels
    libs = glob.glob(os.path.join(os.path.dirname(seer_kernels.__file__), "_C*.so"))
    if not libs or not shutil.which("nm"):
        return ""
    syms = subprocess.run(["nm", "-C", "--defined-only", libs[0]], capture_output=True, text=True).stdout
    own = [line.split(" ", 2)[-1] for line in syms.splitlines() if "std::ostream::_M_insert" in line
           or "std::basic_ostream<char, std::char_traits<char> >::_M_insert" in line]
    return f"{libs[0]} defines its own libstdc++ stream code: {', '.join(own[:3])}" if own else ""


def main() -> int:
    copy = libstdcxx_copy()
    print(f"WARNING  {copy}" if copy else "ok       the extension imports libstdc++'s stream code")
    bad = 0
    import torch
    for name, dev in CASES.items():
        if dev == "cuda" and not torch.cuda.is_available():
            print(f"skipped  {name}: no GPU")
            continue
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
