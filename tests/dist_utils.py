"""Run a test body in several torch.distributed processes (gloo on CPU) and collect the results."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report the traceback to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` gloo processes; return their results by rank.

    ``fn`` must be a module-level function (it is pickled); results must be torch.save-able.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True,
                           start_method="spawn")
        results = []
        for rank in range(world):
            rec = torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False)
            if not rec["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{rec['error']}")
            results.append(rec["result"])
        return results
