"""Shared by bench/attention_compile.py and bench/sinkhorn_compile.py: compile Triton kernels for a GPU
target without a GPU (Triton's full pipeline, ptxas included) and report shared memory, registers and spills.

A variant that fails to compile, needs more shared memory than the GPU has, spills more than its budget,
or whose wgmma ptxas serialises (sm_90: a wait after every matmul) counts as a failure: a bug to fix before
a GPU runs it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional

import triton

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _bundled(tool: str) -> str:
    """Path of a CUDA tool that Triton ships (ptxas, nvdisasm)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _run_bundled(tool: str, data, suffix: str, *args: str):
    """Run Triton's bundled ``tool`` on ``data`` (str or bytes) written to a temporary ``suffix`` file, whose
    path replaces the argument '{file}'; the completed process (text output), or None without the tool."""
    path = _bundled(tool)
    if not os.path.exists(path):
        return None
    with tempfile.NamedTemporaryFile("wb" if isinstance(data, bytes) else "w", suffix=suffix, delete=False) as f:
        f.write(data)
    try:
        return subprocess.run([path, *(f.name if a == "{file}" else a for a in args)], capture_output=True,
                              text=True)
    finally:
        os.unlink(f.name)


def ptxas_usage(ptx: str, arch: int) -> tuple[object, object, str]:
    """(registers per thread, spill bytes, wgmma serialisation) from Triton's bundled ptxas -v; ('-', '-', '')
    if unavailable. The third is ptxas's code (e.g. 'C7515') where it serialised the kernel's wgmma: a wait
    after every wgmma, so no matmul overlaps anything, which it reports as a 'Potential Performance Loss'
    (an accumulator written by other instructions while a wgmma is in flight, too few registers for the
    pipeline, ...), else ''."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    res = _run_bundled("ptxas", ptx, ".ptx", f"-arch={sm}", "-v", "{file}", "-o", os.devnull)
    if res is None:
        return "-", "-", ""
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    serial = re.search(r"\((C\d+)\)[^\n]*wgmma[^\n]*serialized", res.stderr)
    return (int(regs.group(1)) if regs else "-"), (int(spills.group(1)) if spills else "-"), \
        (serial.group(1) if serial else "")


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def main_loop(cubin: bytes) -> Optional[list[str]]:
    """The SASS opcodes of one iteration of the kernel's main loop: the largest loop (a label and a
    predicated branch back to it) among those that issue wgmma (HGMMA) if any does, else mma (HMMA), else
    any ([] without a loop). (The copy of a loop compiled for a smaller tail tile uses mma and can be the
    larger one.) None without Triton's nvdisasm."""
    res = _run_bundled("nvdisasm", cubin, ".cubin", "-c", "{file}")
    if res is None:
        return None
    lines = res.stdout.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = i
        # a predicated branch back: the unconditional ones return from out-of-line wait loops
        back = re.search(r"@!?U?P\w+\s+BRA\s+`\(\.(L_x_\d+)\)", line)
        if back and labels.get(back.group(1), i) < i:
            ops = [m.group(1) for m in map(_SASS_OP.match, lines[labels[back.group(1)]:i + 1]) if m]
            loops.append((any(op.startswith("HGMMA") for op in ops), any(op.startswith("HMMA") for op in ops),
                          ops))
    # wgmma loops first, then mma ones, then the rest; the largest within the first group there is
    return max(loops, key=lambda t: (t[0], t[0] or t[1], len(t[2])), default=(False, False, []))[2]


def largest_loop(cubin: bytes) -> object:
    """SASS instructions per iteration of the kernel's main loop (``main_loop``): the count that
    instruction-level changes move. 0 without a loop, '-' without Triton's nvdisasm."""
    ops = main_loop(cubin)
    return "-" if ops is None else len(ops)


# Global loads and stores of 1 or 2 bytes per thread (LDG.E.U16, STG.E.U8, ...): what half-precision rows
# compile to when the compiler cannot prove that they start 16 bytes aligned.
_NARROW = re.compile(r"^(?:LDG|STG)\.E(?:\.\w+)*\.(?:U8|S8|U16|S16)$")


def narrow_accesses(ops: list[str]) -> int:
    """How many of these SASS opcodes load or store global memory 1 or 2 bytes at a time."""
    return sum(bool(_NARROW.match(op)) for op in ops)


def interpreted() -> bool:
    """True (with a message) under TRITON_INTERPRET=1, where kernels cannot be compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return True
    return False


def report(rows: Iterable[tuple[str, Callable]], arch: int, header: str, spill_budget: int = 0,
           forbidden_ptx: tuple[str, ...] = (), narrow_access: bool = False) -> int:
    """Compile each (label, compile thunk) row, print one line per row and a total; 1 if any failed, else 0.

    ``loop``: SASS instructions per iteration of the largest loop (``largest_loop``). ``forbidden_ptx``:
    PTX instructions (matched with a trailing space or tab) that fail a variant, for code that must not come
    back (a slower lowering). A variant whose wgmma ptxas serialised fails too (``WGMMA-SERIAL:<code>``), and
    with ``narrow_access`` one whose main loop has 1- or 2-byte global loads or stores (``NARROW:<count>``)."""
    limit = SMEM_LIMIT.get(arch, 99 * 1024)
    bad = count = 0
    print(f"{header} {'smem KB':>8s} {'regs':>5s} {'spills':>6s} {'loop':>5s} {'s':>5s}")
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
        regs, spills, serial = ptxas_usage(c.asm["ptx"], arch)
        ops = main_loop(c.asm["cubin"]) if "cubin" in c.asm else None
        loop = "-" if ops is None else len(ops)
        flag = ""
        if smem > limit:
            flag += " SMEM>LIMIT"
        if isinstance(spills, int) and spills > spill_budget:
            flag += " SPILLS"
        found = [op for op in forbidden_ptx if re.search(re.escape(op) + r"[ \t]", c.asm["ptx"])]
        if found:
            flag += " PTX:" + ",".join(found)
        if serial:
            flag += " WGMMA-SERIAL:" + serial
        narrow = narrow_accesses(ops) if narrow_access and ops else 0
        if narrow:
            flag += f" NARROW:{narrow}"
        bad += bool(flag)  # one failure per variant, whatever it breaks
        print(f"{label} {smem / 1024:8.1f} {regs!s:>5s} {spills!s:>6s} {loop!s:>5s} {time.time() - t0:5.1f}{flag}")
    print(f"{count} variants, {bad} failures")
    return 1 if bad else 0
