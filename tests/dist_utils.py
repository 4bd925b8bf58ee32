"""Run a test body in several torch.distributed processes (gloo on CPU) and collect the results."""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
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
    faulthandler.enable()  # a crash in native code prints the Python stack of every thread
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
        ok = True
    except BaseException:  # report the traceback to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():  # a body may have ended it itself (seer train does)
            dist.destroy_process_group()
    # Leave without interpreter finalisation: once, in a full CI run (not reproduced in 30 reruns under load),
    # a worker died with "terminate called without an active exception" (SIGABRT) after its body's last
    # output, the signature of a native thread still joinable when the interpreter tears down. The parent
    # judges the body from what it saved; a crash before that (faulthandler prints where) still fails.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


def run_distributed(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` gloo processes; return their results by rank.

    ``fn`` must be a module-level function (it is pickled); results must be torch.save-able.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        crash = None
        try:
            mp.start_processes(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True,
                               start_method="spawn")
        except mp.ProcessExitedException as exc:  # a body that raised exits 1: its traceback is in its file
            crash = exc
        paths = [os.path.join(out_dir, f"{rank}.pt") for rank in range(world)]
        recs = [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]
        for rank, rec in enumerate(recs):  # a raised error first: the others were often terminated for it
            if rec is not None and not rec["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{rec['error']}")
        missing = [rank for rank, rec in enumerate(recs) if rec is None]
        if missing:
            raise AssertionError(f"ranks {missing} saved nothing ({crash})")
        results = [rec["result"] for rec in recs]
        if crash is not None:
            raise AssertionError(f"every rank saved its result, then one crashed: {crash}")
        return results
