"""Peak host memory and time of ``checkpoint.init_from`` through the full-tensor path (a source written with
another ``parallel.tp``, or a timm export).

    python bench/init_from_memory.py make DIR --vit base --depth 16     # DIR/tp2 (a checkpoint written by 2
                                                                        # gloo processes at parallel.tp=2) and
                                                                        # DIR/vit.safetensors (its export)
    python bench/init_from_memory.py measure DIR --vit base --depth 16  # fresh process(es) per source
    python bench/init_from_memory.py measure DIR ... --procs 2          # 2 gloo processes (FSDP over 2): the
                                                                        # collective reads
    python bench/init_from_memory.py export DIR                         # seer export --format timm of DIR/tp2
    python bench/init_from_memory.py pretrained DIR                     # seer.load_pretrained of DIR/tp2

Each measurement builds the run's model (parallel.tp=1), then resets the process's peak RSS (VmHWM, through
/proc/self/clear_refs) and runs resolve_init_source + load_init_weights: ``peak_extra_mib`` is the peak
resident memory above what the process held before the load (torch's allocations are not seen by
tracemalloc). ``load_s``: the best of --repeat loads into the same model. The script takes ``seer`` from
PYTHONPATH (not from its own folder), so the same script measures two revisions of the code: run it with
PYTHONPATH set to each checkout on one machine (results: docs/training.md, checkpoint.init_from).

``export``, ``pretrained``: the same two numbers for ``seer.export.export_timm`` of DIR/tp2 (the checkpoint at
parallel.tp=2) into a temporary folder, or for ``seer.load_pretrained`` of it, in a fresh process: the peak of
the first call, the best time of --repeat (results: docs/training.md, export; bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run_config(vit: str, depth: int, tp: int, init: str = "", parts: str = "all"):
    from seer.config import apply_overrides, preset
    from seer.model.config import vit_preset
    m = vit_preset(vit)
    sets = [f"model.embed_dim={m.embed_dim}", f"model.depth={depth}", f"model.num_heads={m.num_heads}",
            f"model.mlp_dim={m.mlp_dim}", f"model.patch_size={m.patch_size}", "model.img_size=32",
            f"parallel.tp={tp}", "data.batch_size=4", "train.threads=1", "logging.progress=off",
            "eval.at_end=false", f"checkpoint.init_from={init}", f"checkpoint.init_parts={parts}"]
    return apply_overrides(preset("tiny"), sets)


def _spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` processes (they join one gloo group)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(fn, args=(world, port, *args), nprocs=world, start_method="spawn")


def _join(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _save_tp2(rank: int, world: int, port: int, out: str, vit: str, depth: int) -> None:
    import torch.distributed as dist
    _join(rank, world, port)
    from seer.train import Trainer
    t = Trainer(run_config(vit, depth, tp=2), out)
    t.save()  # (step 0: the model's tensors, no optimizer state)
    t.release()
    dist.destroy_process_group()


def make(args) -> None:
    from seer.export import export_timm
    _spawn(_save_tp2, 2, f"{args.dir}/tp2", args.vit, args.depth)
    export_timm(f"{args.dir}/tp2", f"{args.dir}/vit.safetensors")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _load(args, world: int = 1) -> dict:
    import gc

    import torch
    from seer.parallel import ParallelDims
    from seer.train.build import build_model
    from seer.train.init_from import check_init_architecture, load_init_weights, pos_resize, resolve_init_source
    torch.set_num_threads(1)
    cfg = run_config(args.vit, args.depth, tp=1, init=args.source, parts=args.parts)
    dims = ParallelDims(cfg.parallel, "cpu", world)
    model = build_model(cfg, dims, torch.device("cpu"))
    times, peak = [], None
    for _ in range(args.repeat):
        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM, ru_maxrss) back to the current RSS
        t0 = time.perf_counter()
        src = resolve_init_source(args.source)
        check_init_architecture(src, cfg)
        load_init_weights(src, model, dims, args.parts, pos_resize(src, cfg))
        times.append(time.perf_counter() - t0)
        peak = (_status_kib("VmHWM") - before) / 1024 if peak is None else peak
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # (a DTensor's numel: the whole's)
    return {"model_mib": round(size / 2**20), "peak_extra_mib": round(peak), "load_s": round(min(times), 3)}


def _load_in_group(rank: int, world: int, port: int, args, out: str) -> None:
    _join(rank, world, port)
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(_load(args, world), f)


def one(args) -> None:
    got = {"source": os.path.basename(args.source), "parts": args.parts, "procs": args.procs}
    if args.procs == 1:
        got.update(_load(args))
    else:  # (every process reads the full tensors collectively and keeps its FSDP shard)
        with tempfile.TemporaryDirectory() as out:
            _spawn(_load_in_group, args.procs, args, out)
            got["ranks"] = [json.load(open(f"{out}/{r}.json")) for r in range(args.procs)]
    print(json.dumps(got))


def measure(args) -> None:
    for source, parts in ((f"{args.dir}/tp2", "all"), (f"{args.dir}/vit.safetensors", "backbone")):
        cmd = [sys.executable, __file__, "_one", source, "--parts", parts, "--vit", args.vit,
               "--depth", str(args.depth), "--repeat", str(args.repeat), "--procs", str(args.procs)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


def _tool(args) -> dict:
    import gc

    from seer import load_pretrained
    from seer.export import export_timm
    times, peak, got = [], None, {"source": os.path.basename(args.source), "call": args.call}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeat):
            gc.collect()
            before = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            t0 = time.perf_counter()
            if args.call == "export":
                export_timm(args.source, f"{out}/vit.safetensors")
                got["export_mib"] = round(os.path.getsize(f"{out}/vit.safetensors") / 2**20)
            else:
                model = load_pretrained(args.source)
                got["model_mib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
                del model
            times.append(time.perf_counter() - t0)
            peak = (_status_kib("VmHWM") - before) / 1024 if peak is None else peak
    return got | {"peak_extra_mib": round(peak), "time_s": round(min(times), 3)}


def tool(args) -> None:
    cmd = [sys.executable, __file__, "_tool", f"{args.dir}/tp2", "--repeat", str(args.repeat), "--call", args.mode]
    print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("make", "measure", "export", "pretrained", "_one", "_tool"))
    p.add_argument("dir", nargs="?", default=tempfile.gettempdir(), help="the sources' folder (_one: the source)")
    p.add_argument("--vit", default="base", help="the ViT preset whose widths the model takes")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--parts", default="all")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--procs", type=int, default=1, help="measure: processes that load (gloo; 2: FSDP over 2)")
    p.add_argument("--call", choices=("export", "pretrained"), default="export", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode in ("_one", "_tool"):
        args.source = args.dir
    if args.mode == "_tool":
        print(json.dumps(_tool(args)))
        return
    {"make": make, "measure": measure, "export": tool, "pretrained": tool, "_one": one}[args.mode](args)


if __name__ == "__main__":
    main()
