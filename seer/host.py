"""What this machine gives the process (no torch: the CLI's start and spawned index workers read it)."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, a SLURM or container cpuset), not the
    machine's count. A CPU quota without a cpuset (docker --cpus) is not seen."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
