"""Shared by bench/attention_compile.py and bench/sinkhorn_compile.py: compile Triton kernels for a GPU
target without a GPU (Triton's full pipeline, ptxas included) and report shared memory, registers and spills.

A variant that fails to compile, needs more shared memory than the GPU has, or spills more than its budget
counts as a failure: a bug to fix before a GPU runs it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable

import triton

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def ptxas_usage(ptx: str, arch: int) -> tuple[object, object]:
    """(registers per thread, spill bytes) from Triton's bundled ptxas -v; ('-', '-') if unavailable."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "-", "-"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return (int(regs.group(1)) if regs else "-"), (int(spills.group(1)) if spills else "-")


def interpreted() -> bool:
    """True (with a message) under TRITON_INTERPRET=1, where kernels cannot be compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return True
    return False


def report(rows: Iterable[tuple[str, Callable]], arch: int, header: str, spill_budget: int = 0) -> int:
    """Compile each (label, compile thunk) row, print one line per row and a total; 1 if any failed, else 0."""
    limit = SMEM_LIMIT.get(arch, 99 * 1024)
    bad = count = 0
    print(f"{header} {'smem KB':>8s} {'regs':>5s} {'spills':>6s} {'s':>5s}")
    for label, build in rows:
        t0 = time.time()
        count += 1
        try:
            c = build()
        except Exception as exc:  # report every failure, then exit non-zero
            bad += 1
            print(f"{label} FAILED: {str(exc).splitlines()[0][:200]}")
            continue
        smem = c.metadata.shared
        regs, spills = ptxas_usage(c.asm["ptx"], arch)
        flag = ""
        if smem > limit:
            flag, bad = " SMEM>LIMIT", bad + 1
        if isinstance(spills, int) and spills > spill_budget:
            flag, bad = flag + " SPILLS", bad + 1
        print(f"{label} {smem / 1024:8.1f} {regs!s:>5s} {spills!s:>6s} {time.time() - t0:5.1f}{flag}")
    print(f"{count} variants, {bad} failures")
    return 1 if bad else 0
