"""Timing that survives noisy machines: the kernel and its baseline are timed in the same run,
interleaved round by round, and compared by the ratio of their medians.

Every ``bench_<op>.py`` builds callables per case, calls :func:`compare` and hands the result to the
``bench_record`` fixture (bench/conftest.py), which prints the table, writes JSON rows with the machine,
versions and git revision, and applies the gate (bench/gate.py).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    rounds: int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], device: str, inner: int) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def compare(fns: dict[str, Callable[[], object]], device: str, *, min_time: float = 0.3, max_rounds: int = 50,
            min_rounds: int = 5, warmup: int = 2) -> dict[str, Timing]:
    """Time every callable, interleaved: round r runs each of them once (or ``inner`` times if it is fast).

    Stops after ``min_time`` seconds per callable (at least ``min_rounds`` and at most ``max_rounds`` rounds).
    ``warmup`` calls of each come first, untimed (at least one: the last is timed to size the samples).
    """
    # The last warm-up call is timed: it says how many calls one sample needs (repeating very fast calls
    # inside a sample, so that timer resolution does not dominate), without a call of its own (a reference
    # Sinkhorn at (4096, 16384) takes 6 s a call on the CI CPU).
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup - 1):
            fn()
        _sync(device)
        t = _time_once(fn, device, 1)
        inner[name] = max(1, min(1000, int(1e-3 / max(t, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or spent < min_time * len(fns)):
        for name, fn in fns.items():
            t = _time_once(fn, device, inner[name])
            samples[name].append(t)
            spent += t * inner[name]
        rounds += 1
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
        out[name] = Timing(statistics.median(s), q[1], q[7], len(s))
    return out


def cuda_graphed(fn: Callable[[], object]) -> Optional[Callable[[], object]]:
    """``fn`` captured in a CUDA graph; timing its replay measures the GPU work alone, without Python or
    launch overhead. None if ``fn`` cannot be captured (a host sync, a backend that refuses capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init, autotuning, workspace allocation
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return graph.replay


def compare_gpu_time(fns: dict, device: str, **kwargs) -> dict[str, Timing]:
    """:func:`compare` of the GPU work alone where it can be had: on a GPU each callable runs as a CUDA-graph
    replay (one that cannot be captured runs eagerly). For choosing between kernel variants whose eager
    calls are bound by host time, where every variant would time the same launch overhead."""
    runs = dict(fns)
    if device.startswith("cuda"):
        graphs = {name: cuda_graphed(fn) for name, fn in fns.items()}
        failed = sorted(str(name) for name, g in graphs.items() if g is None)  # names may be Tiles, unordered
        if failed:  # one eager time among replays would compare host time with GPU time: all run eagerly
            print(f"compare_gpu_time: {failed} cannot be captured in a CUDA graph; timing every callable eagerly")
        else:
            runs = graphs
        del graphs
    try:
        return compare(runs, device, **kwargs)
    finally:
        runs.clear()  # the graphs' private memory pools go with them
        _sync(device)


def device_slug(device: str) -> str:
    """'cpu', or the GPU's name as a file-name-safe slug (floors are stored per GPU type)."""
    if device.startswith("cuda"):
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(torch.device(device)).lower()).strip("-")
    return "cpu"


def _git_revision() -> str:
    """HEAD (short, "-dirty" with uncommitted changes outside bench/results), or SEER_GIT_REVISION where set: a
    copy of the tree on another machine (the device tool's) may carry a stale .git, so the caller names it."""
    given = os.environ.get("SEER_GIT_REVISION", "").strip()
    if given:
        return given
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
        # bench/results/ does not count: the run being recorded rewrites its own file there.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)bench/results"], capture_output=True, text=True,
                               cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Machine, versions and revision recorded next to every result."""
    env = {
        "device": device_slug(device),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": _git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    # Settings that change what the kernels run (gpu_check.sh turns TMA off after a failed TMA test): a run
    # with them is not one the selector table may be written from (bench/attention_table.py refuses it).
    env["settings"] = {k: os.environ[k] for k in sorted(os.environ) if k.startswith("SEER_KERNELS_")}
    return env


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


# Memory bandwidth ceilings used for "% of floor" columns (device-to-device copy measured on the lent GPU machines: about 3.0 TB/s H100, 4.3 TB/s H200).
BANDWIDTH_GBPS = {"nvidia-h100-80gb-hbm3": 3000.0, "nvidia-h200": 4300.0}


def bandwidth_ceiling(device: str) -> Optional[float]:
    slug = device_slug(device)
    for key, value in BANDWIDTH_GBPS.items():
        if slug.startswith(key):
            return value
    return None
