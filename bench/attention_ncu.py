"""Nsight Compute's view of the attention kernels at the target shape: where each kernel's time goes, ours
next to cuDNN's and FlashAttention's, read from one GPU run.

The benchmark says how far the Triton kernels are from the best SDPA backend (0.75x-0.80x of cuDNN at
ViT-10B/TP4 on the H200); it cannot say why. The compiled SASS (bench/attention_compile.py) counts
instructions, not stalls. This collects, per kernel launch: duration, grid and waves, registers, shared
memory, theoretical and achieved occupancy, SM and memory throughput, issue-slot use, tensor-pipe use and
the warp stall reasons (cycles per issued instruction), which is what the next kernel change has to be
chosen on (latency-bound at low occupancy, or tensor-pipe bound, or waiting on loads or barriers).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section LaunchStats \\
        --section Occupancy --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \\
        -f -o OUT/attention \\
        python -m bench.attention_ncu run --labels OUT/ncu_cases.json
    ncu --import OUT/attention.ncu-rep --csv --page raw --print-units base > OUT/ncu.csv
    python -m bench.attention_ncu table OUT/ncu.csv --labels OUT/ncu_cases.json

bench/gpu_check.sh runs these (its ncu phase, NCU_TIMEOUT). ``--clock-control none``: Nsight Compute
otherwise locks the GPU's clocks to base for the run; we leave the card's settings alone, so durations are
at whatever clock the GPU runs (compare kernels of the same run, not with other runs).

The cases, in order (``cases``): our forward, cuDNN's forward+backward, our deterministic, atomic and
stored-dS backward (``Tile.store_ds``: its first candidate), FlashAttention's, then the Hopper features next
to their twins (TMA loads in the forward; dq by TMA reductions against pointer atomics on the same dkdv tile).

``run`` warms every case up (Triton compiles, cuDNN plans) outside the profiled range, then runs each once
between cudaProfilerStart and cudaProfilerStop, separated by a one-thread ``spin_kernel``
(``torch.cuda._sleep``) so that ``table`` can tell which launches belong to which case.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import re
import sys
import time
from typing import Callable, Optional

T0 = time.monotonic()
SEPARATOR = "spin_kernel"  # the kernel of torch.cuda._sleep, launched between cases
TARGET = "vit10b-tp4-B32H8N257D128"  # the issue's target shape, first of bench/bench_attention.py's


# ---------------------------------------------------------------------------------------------------------
# The profiled workload (on a GPU, under ncu)


def cases(b: int, h: int, n: int, d: int, device: str = "cuda", dtype=None) -> dict[str, Callable[[], object]]:
    """label -> callable: our kernels (default tiles, called directly) and the SDPA backends that run, in the
    order of profiling: what matters most first, in case the time budget stops it."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from seer_kernels.ops import attention as ops
    from seer_kernels.triton import attention as tri

    q, k, v, dout = (torch.randn(b, h, n, d, device=device, dtype=dtype or torch.bfloat16) for _ in range(4))
    scale = 1 / math.sqrt(d)
    try:  # a failing Triton forward must not cost the SDPA backends' profiles
        o, lse = tri.attention_fwd(q, k, v, scale)
    except Exception as exc:
        print(f"triton forward failed, its cases left out: {str(exc).splitlines()[0][:160]}")
        o = lse = None
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def sdpa(backend):
        def fwd_bwd():
            with sdpa_kernel([backend]):
                res = F.scaled_dot_product_attention(qg, kg, vg)
            return torch.autograd.grad(res, (qg, kg, vg), dout)
        return fwd_bwd

    # cuDNN was the fastest SDPA backend at the target (run 3); memory-efficient and math were 2-3x slower
    backends = ops._sdpa_backends()
    out = {"ours fwd": lambda: tri.attention_fwd(q, k, v, scale)}
    cls = tri.tile_class(d)
    # The forward with its query tail folded into the last program (Tile.fold_tail) and its twin: the
    # duration and the L2 traffic (memory throughput) say whether the K/V passes it saves were the bound.
    fold = next((t for t in tri.FWD_TILES[cls] if t.fold_tail), None)
    if fold is not None:
        for label, tile in (("fold_tail", fold), ("own tail program", dataclasses.replace(fold, fold_tail=False))):
            out[f"ours fwd {tile.as_list()[:4]} {label}"] = lambda tile=tile: tri.attention_fwd(q, k, v, scale, tile)
    if "cudnn" in backends:
        out["sdpa-cudnn fwd+bwd"] = sdpa(backends["cudnn"])
    out["ours bwd deterministic"] = lambda: tri.attention_bwd(dout, q, k, v, o, lse, scale, True)
    out["ours bwd atomic"] = lambda: tri.attention_bwd(dout, q, k, v, o, lse, scale, False)
    if tri.DS_TILES[cls]:  # the stored-dS scheme's first candidate (dS stored by TMA)
        ds_tiles = tri.DS_TILES[cls][0]
        out["ours bwd stored dS"] = lambda: tri.attention_bwd(dout, q, k, v, o, lse, scale, True, *ds_tiles)
    if "flash" in backends:
        out["sdpa-flash fwd+bwd"] = sdpa(backends["flash"])
    # Last (the budget cuts these first): the Hopper features against their twins without them, where the
    # benchmark only says which is faster: the first candidate with TMA loads (forward), and the first with
    # dq by TMA reductions next to the same tile with pointer atomics.
    tma_fwd = next((t for t in tri.FWD_TILES[cls] if t.tma_load), None)
    if tma_fwd is not None:
        out[f"ours fwd {tma_fwd.as_list()} tma_load"] = lambda: tri.attention_fwd(q, k, v, scale, tma_fwd)
    dq_tma = next((t for t in tri.DKDV_TILES[cls] if t.dq_tma and not t.tma_load), None)
    if dq_tma is not None:
        twin = dataclasses.replace(dq_tma, dq_tma=False)
        for label, tile in (("dq_tma", dq_tma), ("pointer atomics", twin)):
            out[f"ours bwd atomic {tile.as_list()[:4]} {label}"] = (
                lambda tile=tile: tri.attention_bwd(dout, q, k, v, o, lse, scale, False, tile))
    return out


def _shapes() -> dict:
    from bench.bench_attention import GPU_SHAPES
    return {case: shape for case, *shape in GPU_SHAPES}


def run(shape: str, labels_path: Optional[str], budget_s: float) -> int:
    """Profile each case once; stop before a case once ``budget_s`` have passed since the start (ncu runs
    its replays inside each launch, so they count), so that ncu still ends and writes its report before the
    GPU check's time limit would kill it with nothing written."""
    import torch
    if not torch.cuda.is_available():
        print("bench.attention_ncu run: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = _shapes()
    if shape not in shapes:
        raise ValueError(f"bench.attention_ncu.run: shape must be one of {sorted(shapes)}, got {shape!r}")
    b, h, n, d = shapes[shape]
    ran = []
    for label, fn in cases(b, h, n, d).items():
        try:
            for _ in range(2):  # compile, plan, allocate outside the profiled range
                fn()
            ran.append((label, fn))
        except Exception as exc:  # a backend that cannot run this shape: report it and profile the rest
            print(f"{label}: skipped ({str(exc).splitlines()[0][:120]})")
    torch.cuda.synchronize()
    done = []
    torch.cuda.profiler.start()
    for label, fn in ran:
        if time.monotonic() - T0 > budget_s:
            print(f"time budget ({budget_s:.0f} s) reached: not profiled: {label}")
            continue
        torch.cuda._sleep(1000)
        fn()
        torch.cuda.synchronize()
        done.append(label)
    torch.cuda.profiler.stop()
    names = [f"{shape}: {label}" for label in done]
    print("profiled, in order:\n  " + "\n  ".join(names))
    if labels_path:
        with open(labels_path, "w") as f:
            json.dump(names, f)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The table (anywhere: reads ncu's CSV)

_TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
               "s": 1e6}


def _number(text: str) -> Optional[float]:
    """A CSV cell as a float: thousands separators dropped; None for 'n/a', '' and the like."""
    try:
        return float(text.replace(",", "").strip())
    except (ValueError, AttributeError):
        return None


def read(text: str) -> list[dict]:
    """Kernel launches from ncu's CSV, in launch order: ``{"kernel": name, "metrics": {name: (value, unit)}}``.

    Takes the raw page (one row per launch, a column per metric, a row of units under the header, or units
    in the header as ``name [unit]``) or the details page (one row per metric: Metric Name, Unit, Value).
    Lines before the header (``==PROF==`` messages) are skipped."""
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = list(csv.reader(io.StringIO(text[start:])))
    header = rows[0]
    name_col = next((i for i, c in enumerate(header) if c in ("Kernel Name", "Function Name", "Demangled Name")), 4)
    if "Metric Name" in header:
        return _read_long(header, rows[1:], name_col)
    units = [""] * len(header)
    body = rows[1:]
    if body and _number(body[0][0]) is None:  # the units row
        units, body = body[0], body[1:]
    launches = []
    for row in body:
        if len(row) < len(header) or _number(row[0]) is None:
            continue
        metrics = {}
        for col, (name, unit) in enumerate(zip(header, units)):
            match = re.fullmatch(r"(.+?) \[(.*)\]", name)
            if match:
                name, unit = match.groups()
            metrics[name] = (_number(row[col]), unit)
        launches.append({"kernel": row[name_col], "metrics": metrics})
    return launches


def _read_long(header: list, rows: list, name_col: int) -> list[dict]:
    col = {name: header.index(name) for name in ("ID", "Metric Name", "Metric Unit", "Metric Value")
           if name in header}
    launches: dict = {}
    for row in rows:
        if len(row) < len(header):
            continue
        launch = launches.setdefault(row[col["ID"]], {"kernel": row[name_col], "metrics": {}})
        unit = row[col["Metric Unit"]] if "Metric Unit" in col else ""
        launch["metrics"][row[col["Metric Name"]]] = (_number(row[col["Metric Value"]]), unit)
    return list(launches.values())


def _get(launch: dict, name: str) -> Optional[float]:
    return launch["metrics"].get(name, (None, ""))[0]


def _duration_us(launch: dict) -> Optional[float]:
    for name in ("gpu__time_duration.sum", "Duration"):
        value, unit = launch["metrics"].get(name, (None, ""))
        if value is not None:
            return value * _TIME_UNITS.get(unit, 1e-3 if name == "gpu__time_duration.sum" else 1.0)
    return None


def _tensor_pct(launch: dict) -> Optional[float]:
    """Busiest tensor pipe, % of peak (Hopper's wgmma is the 'gmma' pipe; names differ between versions)."""
    values = [v for name, (v, _) in launch["metrics"].items() if v is not None and "tensor" in name
              and "pct_of_peak" in name]
    return max(values) if values else None


# Warp stall reasons, by the metric family a version of Nsight Compute reports them in: (pattern, unit).
# 'cyc': cycles per issued instruction (WarpStateStats); '%': share of the PC samples (SourceCounters'
# sampling, and WarpStateStats in some versions).
_STALL_FAMILIES = ((r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio", "cyc"),
                   (r"smsp__pcsamp_warps_issue_stalled_(\w+)", "%"))


def stalls(launch: dict, top: int = 4) -> list[tuple[str, float, str]]:
    """The largest warp stall reasons as (reason, value, unit), from the first family present (see
    _STALL_FAMILIES); 'selected' (the cycle of the issue itself) and 'not_selected' (eligible, another warp
    issued) are not stalls, and the samples' '_not_issued' twins are left out."""
    for pattern, unit in _STALL_FAMILIES:
        found = {}
        for name, (value, _) in launch["metrics"].items():
            match = re.fullmatch(pattern, name)
            if match and value is not None and not match.group(1).endswith("_not_issued"):
                found[match.group(1)] = value
        if found:
            if unit == "%":
                total = sum(found.values()) or 1.0
                found = {reason: 100 * value / total for reason, value in found.items()}
            ranked = sorted(((r, v) for r, v in found.items() if r not in ("selected", "not_selected")),
                            key=lambda kv: -kv[1])
            return [(reason, value, unit) for reason, value in ranked[:top]]
    return []


def short_name(kernel: str) -> str:
    """A kernel's name without return type, namespaces, template arguments and parameters, and cuDNN's
    generated prefix, so that the table's column tells the kernels apart (cuDNN's forward and backward differ
    only after 44 characters)."""
    name = re.sub(r"^void\s+", "", kernel.strip()).split("(")[0].split("<")[0].rsplit("::", 1)[-1]
    return name.replace("cudnn_generated_fort_native_sdpa_", "cudnn_")


def read_labels(path) -> Optional[list]:
    """The case names that ``run --labels`` wrote, or None where the file is missing or unreadable (the table
    then numbers the cases)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt(value: Optional[float], spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def table(launches: list[dict], labels: Optional[list] = None) -> str:
    """One line per kernel launch (the separators start a new case), the largest stalls last."""
    lines = [f"{'kernel':44s} {'us':>7s} {'grid':>6s} {'waves':>5s} {'regs':>4s} {'smemKB':>6s} "
             f"{'occ th/ach %':>12s} {'SM %':>5s} {'mem %':>5s} {'issue %':>7s} {'tensor %':>8s} "
             f"{'cyc/inst':>8s}  largest stalls (cyc: cycles per issued instruction, %: share of samples)"]
    case = -1
    for launch in launches:
        name = launch["kernel"]
        if SEPARATOR in name:
            case += 1
            title = labels[case] if labels and case < len(labels) else f"case {case + 1}"
            lines.append(f"-- {title}")
            continue
        smem = _get(launch, "launch__shared_mem_per_block_dynamic")
        static = _get(launch, "launch__shared_mem_per_block_static")
        smem_kb = None if smem is None and static is None else ((smem or 0) + (static or 0)) / 1024
        issue = _get(launch, "smsp__issue_active.avg.pct_of_peak_sustained_active")
        per_cycle = _get(launch, "smsp__issue_active.avg.per_cycle_active")
        if issue is None and per_cycle is not None:
            issue = 100 * per_cycle
        theo = _get(launch, "sm__maximum_warps_per_active_cycle_pct")
        ach = _get(launch, "sm__warps_active.avg.pct_of_peak_sustained_active")
        lines.append(
            f"{short_name(name)[:44]:44s} {_fmt(_duration_us(launch), '.1f'):>7s} {_fmt(_get(launch, 'launch__grid_size')):>6s} "
            f"{_fmt(_get(launch, 'launch__waves_per_multiprocessor'), '.2f'):>5s} "
            f"{_fmt(_get(launch, 'launch__registers_per_thread')):>4s} {_fmt(smem_kb, '.1f'):>6s} "
            f"{_fmt(theo) + '/' + _fmt(ach):>12s} "
            f"{_fmt(_get(launch, 'sm__throughput.avg.pct_of_peak_sustained_elapsed')):>5s} "
            f"{_fmt(_get(launch, 'gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed')):>5s} "
            f"{_fmt(issue):>7s} {_fmt(_tensor_pct(launch)):>8s} "
            f"{_fmt(_get(launch, 'smsp__average_warp_latency_per_inst_issued.ratio'), '.1f'):>8s}  "
            + " ".join(f"{reason} {value:.1f}{unit}" for reason, value, unit in stalls(launch)))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the profiled workload (run it under ncu, on a GPU)")
    r.add_argument("--shape", choices=sorted(_shapes()), default=TARGET)
    r.add_argument("--labels", help="write the profiled cases' names here (JSON), for `table`")
    r.add_argument("--budget-s", type=float, default=math.inf, help="start no case after this many seconds")
    t = sub.add_parser("table", help="print the table from ncu's CSV")
    t.add_argument("csv")
    t.add_argument("--labels", help="the JSON that `run --labels` wrote")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args.shape, args.labels, args.budget_s)
    try:
        with open(args.csv, errors="replace") as f:
            launches = read(f.read())
    except OSError as exc:
        ap.error(f"csv: cannot read {args.csv}: {exc.strerror}")
    labels = read_labels(args.labels) if args.labels else None
    if not launches:
        print(f"{args.csv}: no kernel launches in it")
        return 1
    print(table(launches, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
