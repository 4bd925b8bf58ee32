"""The ``seer`` command (also ``python -m seer``).

    seer train --preset demo --out runs/demo                   # the README's first command
    seer train --config run.yaml --set train.max_steps=100 --out runs/x
    torchrun --nproc_per_node=8 -m seer train --preset seer-vit-10b --set parallel.tp=8 --out runs/big
    seer eval knn --checkpoint runs/demo [--dataset digits|FOLDER] [--random-init]
    seer features --checkpoint runs/demo --images photos/ --out feats.npy [--layers 4 --tokens cls+patch-mean]
    torchrun --nproc_per_node=8 -m seer features --checkpoint runs/demo --images list.txt --out feats.npy
    seer attention-maps --checkpoint runs/demo --images photos/ --out maps/ [--layer -1]
    seer export --checkpoint runs/demo --format timm --out vit.safetensors
    seer export --checkpoint runs/demo --format onnx --out vit.onnx [--onnx-external-data] [--onnx-dynamic-size]
    seer plan --model vit-10b --gpus 64 --tp 8 --micro-batch 16
    seer data check FOLDER
    seer data dedup FOLDER --out keep.txt [--report dups.tsv]     # then: --set data.source=keep.txt
    seer data dedup --features feats.npy --threshold 0.95 --out keep.txt
    seer bench [PYTEST ARGS]

Bad input (unknown preset or key, wrong value type, missing files) prints one line naming the argument and
exits with status 2; ``SEER_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import config as C
from .host import usable_cpus

log = logging.getLogger("seer")


class Terminated(BaseException):
    """SIGTERM while ``seer features`` writes (torchrun stopping the other processes after one died, a
    scheduler's preemption or time limit): raised in the main thread so that each process records the batches
    it wrote, as on Ctrl-C, before it exits (status 143), instead of dying with up to
    ``feature_progress.RECORD_EVERY_S`` of rows unrecorded. Likewise while ``seer export`` writes: its scratch
    folder is removed as on Ctrl-C. (A BaseException, as KeyboardInterrupt: no
    ``except Exception`` on the way swallows it.)"""


@contextlib.contextmanager
def _sigterm_raises():
    def on_term(signum, frame):
        raise Terminated()
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class CLIError(Exception):
    """Bad command-line input (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seer", description="SEER-style SwAV pretraining of Vision Transformers.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="pretrain (resumes from OUT/checkpoints when present)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"one of: {', '.join(C.PRESETS)}")
    src.add_argument("--config", help="a YAML config (may start from a preset with 'preset: NAME')")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    t.add_argument("--out", help="output folder (config, metrics, checkpoints, plot, eval.json)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    e = sub.add_parser("eval", help="kNN or linear-probe evaluation of a pretrained backbone")
    e.add_argument("protocol", choices=["knn", "linear"])
    e.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or exported .safetensors")
    e.add_argument("--dataset", help="'digits' or a folder with one subfolder per class (default: eval.dataset "
                                     "of the run)")
    e.add_argument("--random-init", action="store_true", help="evaluate the same architecture at its random "
                                                               "initialisation instead")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval.* key, e.g. --set eval.knn_k=10")
    e.add_argument("--json", help="also write the result to this JSON file")
    _device_arguments(e)

    f = sub.add_parser("features", help="features of your images from a pretrained backbone (FEATS.npy + FEATS.txt)",
                       description="Features of your images from a pretrained backbone, written to FEATS.npy as "
                                   "they come (one batch in memory). Under torchrun (e.g. torchrun "
                                   "--nproc_per_node=8 -m seer features ...) each process, on GPU LOCAL_RANK, takes "
                                   "a share of the images and writes its rows into the same file (--out on a "
                                   "filesystem every node mounts); each batch is the one a single process runs, so "
                                   "the rows are the same. An interrupted run (killed, or stopped by an error) "
                                   "keeps FEATS.npy.part and a progress record beside it: the same command "
                                   "resumes it, computing only the batches it lacks.")
    _checkpoint_and_images(f)
    f.add_argument("--out", required=True, help="FEATS.npy: float32 (N, F), one row per readable image; FEATS.txt "
                                                "next to it lists their paths in row order")
    f.add_argument("--layers", type=int, default=1, help="take the tokens of the last N blocks, concatenated (DINO's "
                                                         "linear protocol: 4 for ViT-S) (default: %(default)s)")
    f.add_argument("--tokens", default="cls", choices=["cls", "patch-mean", "cls+patch-mean"],
                   help="per block: the class token and/or the mean of the patch tokens, after the final norm; a row "
                        "is the class tokens of the blocks, then their patch means (default: %(default)s, the "
                        "features seer eval scores)")
    f.add_argument("--image-size", type=int, help="side the images are resized and centre-cropped to, a multiple of "
                                                  "the patch size (default: the run's evaluation size)")
    f.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    _decoding_arguments(f)
    _device_arguments(f)
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out (and the .txt written with it)")
    f.add_argument("--no-resume", action="store_true",
                   help="start afresh, even where an interrupted run of the same images, checkpoint and options left "
                        "FEATS.npy.part to resume (by default reused when its record's fingerprint matches; "
                        "another one starts afresh by itself, saying what differs)")

    a = sub.add_parser("attention-maps", help="the class token's attention over the patches, per head, as images "
                                              "(DIR/<index>_<stem>.png + .npy)",
                       description="For each image, resized and centre-cropped as seer features does: the softmax "
                                   "attention of the class token over the patch tokens in one block, per head. "
                                   "DIR/<index>_<stem>.npy: float32 (heads, S/p, S/p); DIR/<index>_<stem>.png: S "
                                   "high, S * (heads + 2) wide: the crop, the mean of the heads, then each head, each "
                                   "map coloured relative to its own maximum.")
    _checkpoint_and_images(a)
    a.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty or new "
                                                               "unless --overwrite)")
    a.add_argument("--layer", type=int, default=-1, help="the block, python-style: 0 the first, -1 the last "
                                                         "(default: %(default)s)")
    a.add_argument("--image-size", type=int, help="side the images are resized and centre-cropped to, a multiple of "
                                                  "the patch size (default: the run's evaluation size)")
    a.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    _device_arguments(a, precision="fp32")
    a.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing only files of "
                                                            "the names written")

    x = sub.add_parser("export", help="export the backbone: timm layout (safetensors + JSON of timm arguments) or "
                                      "ONNX (float32, dynamic batch, checked in onnxruntime)")
    x.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    x.add_argument("--format", required=True, choices=["timm", "onnx"])
    x.add_argument("--out", required=True, help="FILE.safetensors for timm, FILE.onnx for onnx (FILE.json is "
                                                "written next to it)")
    x.add_argument("--onnx-external-data", action="store_true", default=None,
                   help="--format onnx: the weights in FILE.onnx.data beside FILE.onnx (default: only where they "
                        "pass the 2 GiB that one .onnx file holds: huge, giant, vit-10b)")
    x.add_argument("--onnx-dynamic-size", action="store_true",
                   help="--format onnx: images of any height and width that are multiples of the patch size (the "
                        "position embedding resampled in the graph, as seer does), not the run's evaluation size "
                        "alone")

    sub.add_parser("plan", help="memory/FLOPs/communication planner (seer plan --help)", add_help=False)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dc = dsub.add_parser("check", help="decode every image and report the unreadable ones")
    dc.add_argument("source", metavar="SOURCE", help="folder, list file or tar shards")
    _decoding_arguments(dc)
    dc.add_argument("--report", help="write the unreadable files (path<TAB>reason) to this file")
    dc.add_argument("--fail-on-bad", action="store_true", help="exit with status 1 if any file is unreadable")
    dc.add_argument("--exclude", metavar="FILE", default="", help="leave out the images FILE names, as "
                                                                  "data.exclude (e.g. a report of seer data dedup)")
    dc.add_argument("--format", default="auto", choices=["auto", "folder", "list", "tar"],
                    help="what the source is, as data.format (default: auto, as training detects it)")
    dc.add_argument("--max-image-pixels", type=int, default=C.DataConfig.max_image_pixels,
                    help="larger images count as unreadable (decompression bombs), as data.max_image_pixels "
                         "(default: %(default)s)")
    dc.add_argument("--max-image-bytes", type=int, default=C.DataConfig.max_image_bytes,
                    help="larger files (and tar members) count as unreadable, without being read, as "
                         "data.max_image_bytes; 0 = no limit (default: %(default)s)")

    dd = dsub.add_parser("dedup", help="find duplicate images: identical bytes (SOURCE) or near duplicates "
                                       "(--features of seer features); write the list to keep",
                         description="Exact duplicates: every image of SOURCE is read as training reads it and "
                                     "hashed (SHA-256 of its bytes); of each group of identical files the first "
                                     "in the source's order is kept. Near duplicates (--features): rows of seer "
                                     "features' FEATS.npy whose cosine similarity is at least --threshold, "
                                     "clustered (a~b, b~c: one cluster); each cluster keeps its first row. "
                                     "--out writes the kept images as a list file for data.source.")
    dd.add_argument("source", metavar="SOURCE", nargs="?", help="folder, list file or tar shards (exact duplicates)")
    dd.add_argument("--features", metavar="FEATS.npy", help="seer features' output, FEATS.txt beside it (near "
                                                            "duplicates, instead of SOURCE)")
    dd.add_argument("--threshold", type=float, help="--features: cosine similarity in [-1, 1] from which two "
                                                    "images are near duplicates (e.g. 0.95; computed in float32, "
                                                    "identical rows score 1 +- 1e-6: 1 misses some)")
    dd.add_argument("--out", metavar="KEEP.txt", help="the kept images, absolute paths one a line in source order: "
                                                     "a list file for data.source (not for tar shards)")
    dd.add_argument("--report", metavar="DUPS.tsv", help="one line per duplicate, dup_path<TAB>kept_path, then "
                                                        "#unreadable<TAB>path<TAB>reason per unreadable file; "
                                                        "data.exclude takes it as it is (tar shards: the way to "
                                                        "train without the duplicates)")
    dd.add_argument("--exclude", metavar="FILE", help="SOURCE: leave out the images FILE names first, as "
                                                      "data.exclude")
    dd.add_argument("--overwrite", action="store_true", help="replace an existing --out or --report")
    dd.add_argument("--format", choices=["auto", "folder", "list", "tar"],
                    help="SOURCE: what it is, as data.format (default: auto, as training detects it)")
    dd.add_argument("--workers", type=int, help="SOURCE: reading processes, 0 = this one (default: 4, at most the "
                                                "CPUs this process may use)")
    dd.add_argument("--timeout-s", type=float, help=f"SOURCE: stop with an error when the workers deliver nothing "
                                                    f"for this many seconds, as data.timeout_s (default: "
                                                    f"{C.DataConfig.timeout_s:g})")
    dd.add_argument("--max-image-bytes", type=int, help=f"SOURCE: larger files (and tar members) are unreadable, "
                                                        f"not read, as data.max_image_bytes; 0 = no limit (default: "
                                                        f"{C.DataConfig.max_image_bytes})")
    dd.add_argument("--device", choices=["cpu", "cuda"], help="--features: where the similarities are computed "
                                                              "(default: cpu)")
    dd.add_argument("--block-rows", type=int, help="--features: rows per similarity block (default: 4096)")

    sub.add_parser("bench", help="run the benchmark suites (pytest bench ...)", add_help=False)
    return p


def _checkpoint_and_images(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --images of the commands that run a trained backbone on the user's images."""
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or exported .safetensors")
    p.add_argument("--images", required=True, help="a folder (its images, recursively, sorted), a text file of image "
                                                   "paths (one a line) or one image")


def _image_size_and_paths(args, cfg: C.RunConfig) -> tuple[int, list[str]]:
    """``--image-size`` (default: seer eval's size) and the paths of ``--images`` of the commands that run a
    trained backbone on the user's images (:func:`_checkpoint_and_images`), refused by flag."""
    from .data.sources import DataSourceError
    from .eval.extract import image_paths
    patch = cfg.model.patch_size
    if args.image_size is not None and (args.image_size < 1 or args.image_size % patch):
        raise CLIError(f"--image-size must be a positive multiple of the patch size {patch}, got {args.image_size}")
    size = args.image_size or cfg.eval.image_size or cfg.data.crops.global_size
    try:
        paths = image_paths(args.images, setting="--images")
    except DataSourceError as e:  # (a folder's: named after the setting already)
        raise CLIError(str(e)) from None
    except (OSError, ValueError) as e:  # (its messages name the list file or folder, not the flag)
        raise CLIError(f"--images: {e}") from None
    if not paths:
        raise CLIError(f"--images {args.images!r} holds no images")
    return size, paths


def _device_arguments(p: argparse.ArgumentParser, precision: str = "run") -> None:
    """--device and --precision of the commands that run a trained backbone (:func:`_eval_device_and_precision`);
    ``precision``: the command's default."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the backbone runs: auto = the GPU when there is one (default: %(default)s)")
    p.add_argument("--precision", default=precision, choices=["run", "auto", "bf16", "fp16", "fp32"],
                   help="autocast of the forward passes: run = the run's train.precision, as its evaluations during "
                        "training used (fp32 for an export that does not record it); auto = bf16 where the device "
                        "computes it natively, else fp32 (default: %(default)s)")


def _decoding_arguments(p: argparse.ArgumentParser) -> None:
    """--workers and --timeout-s of the commands that decode images in DataLoader worker processes."""
    p.add_argument("--workers", type=int, default=min(4, usable_cpus()),
                   help="decoding processes, 0 = this one (default: 4, at most the CPUs this process may use)")
    p.add_argument("--timeout-s", type=float, default=C.DataConfig.timeout_s,
                   help="stop with an error when the workers deliver no batch for this many seconds (a hung read), "
                        "as data.timeout_s; 0 = no limit (default: %(default)g)")


# ---------------------------------------------------------------------------------------------------------

def _resolve_config(args) -> C.RunConfig:
    cfg = C.preset(args.preset) if args.preset else C.load_yaml(args.config)
    cfg = C.apply_overrides(cfg, args.overrides)
    return C.validate(cfg)


def cmd_train(args) -> int:
    cfg = _resolve_config(args)
    if args.print_config:
        print(C.dumps(cfg), end="")
        return 0
    if not args.out:
        raise CLIError("--out DIR is required (the run's output folder)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out!r} is a file; expected the run's output folder (new or existing)")
    from .train import Trainer
    from .train.distributed import shutdown_distributed
    t0 = time.perf_counter()
    trainer = Trainer(cfg, args.out)
    if trainer.resumed_from is not None and trainer.dist.is_main:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step} of {cfg.train.max_steps})", flush=True)
    result = trainer.fit()
    if trainer.dist.is_main:
        _print_summary(result, time.perf_counter() - t0)
    shutdown_distributed()
    # Stopped by Ctrl-C (after its checkpoint): the shell's status of an interrupted command (128 + SIGINT), so
    # that 'seer train ... && seer export ...' or a loop of runs stops too. SIGTERM's stop exits 0.
    return 128 + signal.SIGINT if result.get("signal") == signal.SIGINT else 0


def _print_summary(result: dict, seconds: float) -> None:
    out = Path(result.get("out", "."))
    # A stop before the last step (its checkpoint saved) is no 'done': the run is to be resumed.
    cut = result.get("stopped") and not result.get("eval_interrupted")
    print(f"{'stopped' if cut else 'done'}: step {result['step']} in {seconds:.0f} s; outputs in {out}"
          f"{' (rerun the same command to resume)' if cut else ''}", flush=True)
    if result.get("eval_interrupted"):
        # The same command finds the run complete and evaluates it as the run does (kNN and linear probe, eval.json
        # with the random-initialisation baseline, plot.png); seer eval prints one protocol's scores alone.
        print(f"evaluation interrupted: rerun the same command to evaluate the finished run (eval.json), or seer "
              f"eval knn|linear --checkpoint {out}", flush=True)
    ev = result.get("eval")
    if ev:
        for key, name in (("knn_top1", "kNN top-1"), ("linear_top1", "linear probe top-1")):
            if key in ev:
                base = ev.get(f"{key}_random_init")
                extra = f" vs {base:.1f}% at random initialisation ({ev[key] - base:+.1f} points)" if base is not None \
                    else ""
                print(f"{name}: {ev[key]:.1f}%{extra}", flush=True)
        print(f"evaluation: {out / 'eval.json'}", flush=True)
    if result.get("plot"):
        print(f"plot: {result['plot']}", flush=True)


def _eval_device(args, local_rank: int = 0):
    """``--device`` resolved: auto = the GPU when there is one (GPU ``local_rank`` of those visible)."""
    import torch

    from .train.distributed import resolve_device
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU is available (use --device cpu or auto)")
    return resolve_device(args.device, local_rank)  # (CUDA_VISIBLE_DEVICES picks others)


def _eval_device_and_precision(args, cfg: C.RunConfig, recorded: bool, local_rank: int = 0):
    """(device, precision) of ``seer eval``: ``--device`` (auto: the GPU when there is one; GPU ``local_rank``
    of those visible), ``--precision`` ('run': the run's train.precision, which its evaluations during training
    used, so that the two agree; fp32 where the export does not record the run's config), 'auto' resolved for
    the device."""
    from .train.build import resolve_precision
    device = _eval_device(args, local_rank)
    precision = args.precision if args.precision != "run" else (cfg.train.precision if recorded else "fp32")
    return device, resolve_precision(precision, device)


def _run_attention(cfg: C.RunConfig, recorded: bool, device, precision: str):
    """Context in which ``seer eval`` and ``seer features`` run the backbone: the run's
    ``train.attention_backend`` forced, as during the run's own evaluations, so that both give the same scores
    (the demo's 'reference' and torch's SDPA round differently in bf16). ``SEER_KERNELS_BACKEND_ATTENTION``, if
    set, wins; 'auto' where the export does not record the run's config or the backend cannot run here (a
    Triton run evaluated on the CPU), with a warning."""
    from .train.build import autocast_dtype
    from .train.trainer import _check_attention_backend, _forced_attention
    name = cfg.train.attention_backend if recorded else "auto"
    if name != "auto":
        try:
            _check_attention_backend(cfg, device, autocast_dtype(precision))
        except ValueError as e:
            reason = str(e).split(". Use 'auto'")[0]  # (the trainer's advice to the user does not apply here)
            log.warning("%s; evaluating with the automatic choice instead", reason)
            name = "auto"
    return _forced_attention(name)


def _checkpoint_run_config(ckpt: Path, *, random_init: bool = False):
    """(run config, whether it is the run's own, checkpoint folder or None for an export) of ``--checkpoint``:
    a run's or checkpoint's saved config; for an export, the run config its JSON records (defaults where an
    older export lacks it) with the export's ViT, normalisation and evaluation image size."""
    from .pretrained import checkpoint_config
    if ckpt.suffix == ".onnx":  # (seer runs torch modules; an ONNX file is for onnxruntime)
        raise CLIError(f"--checkpoint {str(ckpt)!r} is an ONNX export, which seer cannot load: give the run "
                       f"folder, a checkpoint folder or a timm export (.safetensors)")
    if ckpt.suffix != ".safetensors":
        ckpt_dir = _checkpoint_folder(ckpt, "a run folder, a checkpoint folder or an exported .safetensors")
        return checkpoint_config(ckpt_dir), True, ckpt_dir
    from safetensors import SafetensorError, safe_open

    from .export import export_vit_config
    from .pretrained import export_info
    info = export_info(ckpt)
    vit = export_vit_config(ckpt, info)
    try:
        with safe_open(str(ckpt), framework="pt"):
            pass  # header only: a missing or corrupt file fails here, as loading its tensors would
    except (SafetensorError, OSError) as e:
        raise CLIError(f"--checkpoint {str(ckpt)!r} is not a safetensors file that seer can read "
                       f"({type(e).__name__}: {e})") from None
    recorded = "seer_run_config" in info
    if recorded:  # the run's evaluation settings and seed (exports since 2026-11-27)
        cfg = C.from_dict(info["seer_run_config"])
    elif random_init:
        raise CLIError(f"{ckpt.with_suffix('.json')} does not record the run's seed (an export written before "
                       f"seer kept the run's config in it): run --random-init on the run's checkpoint")
    else:
        cfg = C.RunConfig()
    cfg.model = vit
    cfg.data.crops.mean, cfg.data.crops.std = info["mean"], info["std"]
    cfg.eval.image_size = info["image_size"]
    return cfg, recorded, None


def _checkpoint_folder(ckpt: Path, expected: str) -> Path:
    """The complete checkpoint folder that ``--checkpoint`` names (a run, checkpoints or checkpoint folder).
    A path that does not exist is said to be one, naming the flag (a typo read as "no complete checkpoint at",
    a damaged or still empty run)."""
    from .train.checkpoint import resolve_checkpoint
    _checkpoint_exists(ckpt, expected)
    try:
        return resolve_checkpoint(ckpt)
    except FileNotFoundError as e:
        raise CLIError(f"--checkpoint: {e}") from None


def _checkpoint_exists(ckpt: Path, expected: str) -> None:
    if not ckpt.exists():
        raise CLIError(f"--checkpoint {str(ckpt)!r} does not exist (expected {expected})")


def _pretrained_backbone(ckpt: Path, ckpt_dir: Optional[Path], saved: C.RunConfig):
    """The trained backbone of ``--checkpoint`` (``ckpt_dir`` and ``saved`` from :func:`_checkpoint_run_config`)."""
    from .pretrained import backbone_module, checkpoint_backbone_state, load_pretrained
    if ckpt_dir is None:
        return load_pretrained(ckpt)
    return backbone_module(saved.model, checkpoint_backbone_state(ckpt_dir, saved)[1])


def _backbone_id(ckpt: Path, ckpt_dir: Optional[Path]) -> str:
    """What identifies ``--checkpoint``'s weights in ``seer features``' resume fingerprint, without reading
    them: a checkpoint folder's path and meta.json (its step and the CRC32 of its tensor files); an export's
    path, size and modification time, and its JSON."""
    import hashlib
    if ckpt_dir is not None:
        meta = hashlib.sha256((ckpt_dir / "meta.json").read_bytes()).hexdigest()
        return f"checkpoint {ckpt_dir.resolve()}, meta.json sha256 {meta}"
    st = ckpt.stat()
    js = hashlib.sha256(ckpt.with_suffix(".json").read_bytes()).hexdigest()
    return f"export {ckpt.resolve()}, {st.st_size} bytes, modified {st.st_mtime_ns} ns, JSON sha256 {js}"


def _json_not_an_input(path: str, ckpt: Path, ckpt_dir: Optional[Path]) -> None:
    """CLIError where ``seer eval --json`` (written in place) would replace a file that a checkpoint or the
    export is made of: a file in a checkpoint folder (the one evaluated or another: its meta.json replaced, the
    checkpoint no longer loads), or the exported .safetensors or its JSON (checked before the evaluation)."""
    from .data.dedup_files import _same_file
    from .train.checkpoint import is_complete
    folder = Path(os.path.realpath(path)).parent
    if is_complete(folder) or (ckpt_dir is not None and _same_file(str(folder), str(ckpt_dir))):
        raise CLIError(f"--json {path!r} is in the checkpoint folder {str(folder)!r}, whose files it would "
                       f"replace: write it elsewhere")
    if ckpt_dir is None:
        for given in (ckpt, ckpt.with_suffix(".json")):
            if _same_file(path, str(given)):
                raise CLIError(f"--json {path!r} is {str(given)!r}, the export that --checkpoint reads: write it "
                               f"elsewhere")


def _evaluated_step(ckpt: Path, ckpt_dir: Optional[Path], random_init: bool) -> Optional[int]:
    """The training step of the weights ``seer eval`` scored, as the run's eval.json and eval_history record it:
    the checkpoint folder's (a run folder's latest, which moves on while the run trains), the step an export
    was made from (its JSON's ``source``; None for an export written before it recorded one), 0 for
    ``--random-init``."""
    if random_init:
        return 0
    if ckpt_dir is not None:
        from .train.checkpoint import read_meta
        return int(read_meta(ckpt_dir)["step"])
    from .export import export_source
    from .pretrained import export_info
    source = export_source(export_info(ckpt))
    return source["step"] if source is not None else None


def cmd_eval(args) -> int:
    from .eval import Evaluator
    bad = [o for o in args.overrides if not o.strip().startswith("eval.")]
    if bad:
        raise CLIError(f"--set accepts only eval.* keys, got {bad[0]!r}")
    if args.json:
        _output_file(args.json, "--json")
    if args.dataset and args.dataset != "digits" and not Path(args.dataset).expanduser().is_dir():
        # (before the backbone is read; the evaluation's own check names eval.dataset, which --dataset sets)
        raise CLIError(f"--dataset {args.dataset!r} is neither 'digits' nor a folder (expected one subfolder per "
                       f"class, or train/ and val/ folders of them)")
    ckpt = Path(args.checkpoint)
    saved, recorded, ckpt_dir = _checkpoint_run_config(ckpt, random_init=args.random_init)
    if args.json:
        _json_not_an_input(args.json, ckpt, ckpt_dir)
    cfg = C.apply_overrides(saved, args.overrides)
    if args.dataset:
        cfg.eval.dataset = args.dataset
    C.validate(cfg)
    device, precision = _eval_device_and_precision(args, cfg, recorded)
    if args.random_init:
        from .train.build import build_backbone
        backbone = build_backbone(cfg).eval()  # built on the CPU (the run's initialisation), then moved
    else:
        backbone = _pretrained_backbone(ckpt, ckpt_dir, saved)
    from .train.build import autocast_dtype
    ev = Evaluator(cfg.eval, image_size=cfg.data.crops.global_size, mean=cfg.data.crops.mean, std=cfg.data.crops.std,
                   digits_size=cfg.data.digits_size, device=device, autocast_dtype=autocast_dtype(precision),
                   max_pixels=cfg.data.max_image_pixels, max_bytes=cfg.data.max_image_bytes)
    with _run_attention(cfg, recorded, device, precision):
        res = ev.evaluate(backbone.to(device), knn=args.protocol == "knn", linear=args.protocol == "linear")
    step = _evaluated_step(ckpt, ckpt_dir, args.random_init)
    res = {"protocol": args.protocol, "checkpoint": str(ckpt), "step": step, "random_init": args.random_init,
           "dataset": cfg.eval.dataset, "device": device.type, "precision": precision, **res}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def cmd_features(args) -> int:
    from .data.sources import printable
    from .eval.feature_files import check_outputs
    from .eval.save_features import NoReadableImagesError, save_image_features
    from .train.build import autocast_dtype
    check_outputs(args.out, overwrite=args.overwrite)  # before the work, not after it
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < low:
            raise CLIError(f"{flag} must be an integer >= {low}, got {value}")
    from .data.workers import check_timeout
    check_timeout(args.timeout_s, "--timeout-s")
    ckpt = Path(args.checkpoint)
    cfg, recorded, ckpt_dir = _checkpoint_run_config(ckpt)
    depth = cfg.model.depth
    if not 1 <= args.layers <= depth:
        raise CLIError(f"--layers must be between 1 and the backbone's depth {depth}, got {args.layers}")
    size, paths = _image_size_and_paths(args, cfg)
    # Under torchrun: one process per GPU (LOCAL_RANK's), each with a share of the images (save_features).
    device, precision = _eval_device_and_precision(args, cfg, recorded, int(os.environ.get("LOCAL_RANK", "0")))
    main_rank = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train.distributed import init_distributed
        main_rank = init_distributed(device.type).is_main
    backbone = _pretrained_backbone(ckpt, ckpt_dir, cfg).to(device)
    t0 = time.perf_counter()
    try:
        with _run_attention(cfg, recorded, device, precision), _sigterm_raises():
            res = save_image_features(backbone, paths, args.out, image_size=size, mean=cfg.data.crops.mean,
                                      std=cfg.data.crops.std, layers=args.layers, tokens=args.tokens,
                                      batch_size=args.batch_size, overwrite=args.overwrite, workers=args.workers,
                                      device=device, autocast_dtype=autocast_dtype(precision),
                                      max_pixels=cfg.data.max_image_pixels, max_bytes=cfg.data.max_image_bytes,
                                      timeout_s=args.timeout_s,
                                      resume=not args.no_resume, backbone_id=_backbone_id(ckpt, ckpt_dir))
    except NoReadableImagesError:
        raise CLIError(f"--images {args.images!r}: none of its {len(paths)} images is readable (listed above)") \
            from None
    if main_rank:
        # Each process warned of its own unreadable images: where some were another's (another node's output,
        # perhaps) or an interrupted run's, rank 0, which has them all, lists them here.
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1 or res.resumed > 0
        listed = "" if not res.skipped else " (listed below)" if several else " (listed above)"
        resumed = f" ({res.resumed} of {-(-len(paths) // args.batch_size)} batches from an interrupted run)" \
            if res.resumed else ""
        print(f"features: {res.rows} images x {res.width} ({args.tokens}, last {args.layers} block(s), {size} px, "
              f"{device.type}, {precision}), {len(res.skipped)} unreadable skipped{listed}, in "
              f"{time.perf_counter() - t0:.1f} s{resumed}; wrote {res.npy} and {res.txt}", flush=True)
        if several and res.skipped:
            print("".join(f"unreadable: {printable(p)} ({why})\n" for p, why in res.skipped), end="", flush=True)
    from .train.distributed import shutdown_distributed
    shutdown_distributed()
    return 0


def cmd_attention_maps(args) -> int:
    from .eval.attention import block_index
    from .eval.attention_images import check_out_dir, save_attention_maps
    check_out_dir(args.out, overwrite=args.overwrite)  # before the work, not after it
    ckpt = Path(args.checkpoint)
    cfg, recorded, ckpt_dir = _checkpoint_run_config(ckpt)
    depth = cfg.model.depth
    try:
        block = block_index(args.layer, depth, "--layer")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    size, paths = _image_size_and_paths(args, cfg)
    from .train.build import autocast_dtype
    device, precision = _eval_device_and_precision(args, cfg, recorded)
    backbone = _pretrained_backbone(ckpt, ckpt_dir, cfg).to(device)
    res = save_attention_maps(backbone, paths, args.out, image_size=size, mean=cfg.data.crops.mean,
                              std=cfg.data.crops.std, layer=args.layer, device=device,
                              max_pixels=cfg.data.max_image_pixels, batch_size=args.batch_size,
                              autocast_dtype=autocast_dtype(precision), max_bytes=cfg.data.max_image_bytes)
    if not res.written:
        raise CLIError(f"--images {args.images!r}: none of its {len(paths)} images is readable (listed above)")
    # (--layer counts from 0, as Python does: said so, 'block 1 of 2' read as the first of two)
    print(f"attention maps: {len(res.written)} images (--layer {block}: block {block + 1} of {depth}, "
          f"{cfg.model.num_heads} heads, "
          f"{size} px, {device.type}, {precision}), {len(res.skipped)} unreadable skipped"
          f"{' (listed above)' if res.skipped else ''}; wrote {args.out}", flush=True)
    return 0


def _output_file(path: str, flag: str) -> None:
    """Refuse an output path that cannot be written before the work, not after it. The file is written in
    place: an existing one's own permission counts (a writable file in a read-only folder, /dev/stdout)."""
    from .out_paths import check_file_paths
    try:
        check_file_paths(flag, path, in_place=True)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_export(args) -> int:
    # SIGTERM (a scheduler's time limit, timeout(1)) stops the export as Ctrl-C does, through the exception
    # path that removes its scratch folder OUT.part/, its lock file and the folders made for --out (status
    # 143): its default action left them behind, beside the earlier export, until an export to the same --out.
    with _sigterm_raises():
        return _export(args)


def _export(args) -> int:
    if Path(args.checkpoint).suffix in (".safetensors", ".onnx") and Path(args.checkpoint).is_file():
        # (said as what it is: 'no complete checkpoint at' read as a damaged or missing run)
        raise CLIError(f"--checkpoint {args.checkpoint!r} is an export; seer export reads the run folder or a "
                       f"checkpoint folder it was exported from (its JSON's 'source' names it)")
    try:
        return _export_checkpoint(args)
    except FileNotFoundError:
        # (both exports check --out before they read the checkpoint: a missing one is said only after that)
        _checkpoint_exists(Path(args.checkpoint), "a run folder or a checkpoint folder")
        raise


def _export_checkpoint(args) -> int:
    if args.format == "onnx":
        from .export_onnx import VERIFY_BATCHES, export_onnx
        done = export_onnx(args.checkpoint, args.out, external_data=args.onnx_external_data,
                           dynamic_size=args.onnx_dynamic_size)
        data = f" (its weights in {done.external_data})" if done.external_data else ""
        sizes = ", and other image sizes" if args.onnx_dynamic_size else ""
        print(f"wrote {done.onnx}{data} and {done.json}; onnxruntime matches torch on random images (batch "
              f"{' and '.join(map(str, VERIFY_BATCHES))}{sizes}): max |diff| {done.max_abs_diff:.2g}, tolerance "
              f"{done.tolerance:.2g}")
        return 0
    for flag in ("onnx_external_data", "onnx_dynamic_size"):
        if getattr(args, flag):
            raise CLIError(f"--{flag.replace('_', '-')} is for --format onnx")
    from .export import export_timm
    st, js = export_timm(args.checkpoint, args.out)
    print(f"wrote {st} and {js}")
    return 0


def _as_check_arguments(message: str) -> str:
    """A data source message in ``seer data check``'s words (SOURCE, --format and --exclude for data.source,
    data.format and data.exclude)."""
    return (re.sub(r"data\.format=(\w+)", r"--format \1", message).replace("data.source", "SOURCE")
            .replace("data.exclude", "--exclude"))


def cmd_data(args) -> int:
    if args.data_command == "dedup":
        return cmd_data_dedup(args)
    if args.data_command != "check":
        raise CLIError("expected an action: check or dedup")
    from .data.check import check_dataset, check_report_path
    if args.report:
        _output_file(args.report, "--report")
    from .data.sources import DataSourceError
    try:
        if args.report:
            check_report_path(args.report, args.source, args.format, args.exclude)
        report = check_dataset(args.source, fmt=args.format, workers=args.workers,
                               max_pixels=args.max_image_pixels, timeout_s=args.timeout_s, exclude=args.exclude,
                               max_bytes=args.max_image_bytes)
    except DataSourceError as e:  # the source's messages name training's settings: name this command's arguments
        raise CLIError(_as_check_arguments(str(e))) from None
    print(report.format())
    if args.report:  # a name that is not UTF-8 as its own bytes, as training's skipped_files.txt
        from .data.exclude import skipped_line
        Path(args.report).write_text("".join(skipped_line(n, r) for n, r in report.bad), encoding="utf-8",
                                     errors="surrogateescape")
    return 1 if (args.fail_on_bad and report.bad) else 0


def cmd_data_dedup(args) -> int:
    near = args.features is not None
    if near == (args.source is not None):
        raise CLIError("give SOURCE (duplicate files, from their bytes) or --features FEATS.npy (near duplicates, "
                       "from seer features' rows), one of the two")
    # The arguments of one mode, with their defaults (None in the parser: given to the other mode, refused).
    exact = {"format": "auto", "workers": min(4, usable_cpus()), "timeout_s": C.DataConfig.timeout_s, "exclude": "",
             "max_image_bytes": C.DataConfig.max_image_bytes}
    near_only = {"threshold": None, "device": "cpu", "block_rows": 4096}
    for name in (exact if near else near_only):
        if getattr(args, name) is not None:
            raise CLIError(f"--{name.replace('_', '-')} is for {'SOURCE' if near else '--features'}")
    for name, default in (near_only if near else exact).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    from .data.sources import DataSourceError
    if near:
        if args.threshold is None:
            raise CLIError("--features needs --threshold (a cosine similarity in [-1, 1], e.g. 0.95)")
        from .data.near_dedup import dedup_features
        res = dedup_features(args.features, args.threshold, out=args.out, report=args.report, device=args.device,
                             block_rows=args.block_rows, overwrite=args.overwrite)
        print(f"{res.total} images, {res.kept} kept, {res.groups.duplicates} near duplicates in "
              f"{res.groups.groups} clusters (cosine >= {args.threshold:g}), {res.zero_rows} zero rows (kept: no "
              f"direction to compare) ({res.seconds:.1f} s)")
        if res.relative_to:
            print(f"FEATS.txt lists relative paths: taken from the current folder, {res.relative_to!r} (run this "
                  f"where seer features ran)")
    else:
        from .data.dedup import dedup_source
        try:
            res = dedup_source(args.source, out=args.out, report=args.report, fmt=args.format, workers=args.workers,
                               timeout_s=args.timeout_s, overwrite=args.overwrite, exclude=args.exclude,
                               max_bytes=args.max_image_bytes)
        except DataSourceError as e:  # (named after training's settings: this command's arguments instead)
            raise CLIError(_as_check_arguments(str(e))) from None
        print(f"{res.total} images, {res.kept} unique, {res.groups.duplicates} duplicates in {res.groups.groups} "
              f"groups, {res.unreadable} unreadable ({res.seconds:.1f} s)")
        from .data.dedup_files import cell
        for name, why in res.shown:
            print(f"UNREADABLE {cell(name)}\t{why}")  # (one line, as the report writes it)
        if res.unreadable > len(res.shown):
            print(f"... and {res.unreadable - len(res.shown)} more" + (" (see the report)" if args.report else ""))
    if res.groups.unlisted:
        print(f"{res.groups.unlisted} kept image(s) left out of {args.out}: a carriage return in the name, which a "
              f"list file cannot hold (named in the warnings above)")
    wrote = [f for f in (args.out, args.report) if f]
    print(f"wrote {' and '.join(wrote)}" + (f"; train on the kept images with --set data.source={args.out}"
                                              if args.out else f"; train without the duplicates with --set "
                                                               f"data.exclude={args.report}"))
    return 0


def cmd_bench(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    bench = root / "bench"
    if not bench.is_dir():
        raise CLIError(f"the benchmark suites live in the source tree ({bench} not found); run it "
                       f"from a checkout of the repository")
    cmd = [sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider", *argv]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root)


# ---------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        from .plan import main as plan_main
        return plan_main(argv[1:])
    if argv and argv[0] == "bench":
        try:
            return cmd_bench(argv[1:])
        except CLIError as e:  # an installed package has no bench/: one line, as the other commands' bad input
            print(f"seer bench: error: {e}", file=sys.stderr)
            return 2
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .train.metrics import not_shown_yet
    for handler in logging.getLogger().handlers:  # what the trainer prints itself is not logged there again
        handler.addFilter(not_shown_yet)
    handlers = {"train": cmd_train, "eval": cmd_eval, "features": cmd_features, "attention-maps": cmd_attention_maps,
                "export": cmd_export, "data": cmd_data}
    from seer_kernels import BackendError

    from .data.dataset import DataError
    from .deps import MissingDependencyError
    from .eval.save_features import OtherRankError
    from .export_onnx import ExportMismatchError
    from .train.checkpoint import CorruptCheckpointError
    from .train.distributed import MainRankError
    from .train.safe_load import UnsafeCheckpointError
    from .train.trainer import NonFiniteLossError
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        # Ctrl-C that the command does not handle itself (training's second one, a long evaluation): one line and
        # the shell's status of an interrupted command, not a traceback (SEER_DEBUG=1 shows it).
        if os.environ.get("SEER_DEBUG"):
            raise
        print(f"seer {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        if os.environ.get("SEER_DEBUG"):
            raise
        print(f"seer {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as e:
        # Bad input (2), a run that cannot go on (1: also a package the feature needs is missing, an ONNX export
        # that onnxruntime does not run as torch does), a refused or unreadable checkpoint (3): one line naming
        # the cause. Subclasses count as their class (a data timeout is a DataError). Another process of a
        # torchrun launch that failed (1): it printed its own error.
        status = next((code for cls, code in ((UnsafeCheckpointError, 3), (CorruptCheckpointError, 3),
                                              (NonFiniteLossError, 1), (DataError, 1), (MissingDependencyError, 1),
                                              (ExportMismatchError, 1), (OtherRankError, 1), (MainRankError, 1))
                       if isinstance(e, cls)), None)
        # The OSErrors of a path the user gave (missing, a folder, no permission) are bad input; others (a full
        # disk, an I/O error) are not, and keep their traceback.
        if status is None and (isinstance(e, (CLIError, ValueError, KeyError, FileNotFoundError, FileExistsError,
                                              IsADirectoryError, NotADirectoryError, PermissionError,
                                              BackendError))  # a forced backend that cannot run: its reasons
                               or isinstance(e, OSError) and e.errno == errno.EROFS):  # (--out on a read-only mount)
            status = 2
        if status is None or os.environ.get("SEER_DEBUG"):
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
        print(f"seer {command}: error: {e}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
