"""The run configuration: one typed dataclass tree, YAML files, dotted overrides and named presets.

The tree composes the model side's configs (``model``: :class:`seer.model.ViTConfig`, ``head`` and ``loss``:
:mod:`seer.swav`, ``optim``: :class:`seer.optim.OptimConfig`, ``parallel``: :class:`seer.parallel.ParallelConfig`)
with the run's own sections (``data``, ``train``, ``checkpoint``, ``eval``, ``logging``), defined here.

    cfg = preset("demo")                                   # a complete config
    cfg = apply_overrides(cfg, ["train.max_steps=50"])     # dotted keys, YAML-typed values
    cfg = load_yaml("run.yaml")                            # optional top-level 'preset: NAME' to start from
    save_yaml(cfg, "out/config.yaml")                      # what every run writes next to its outputs

An unknown key is a :class:`ConfigError` that names the key and suggests the nearest valid ones; a value of
the wrong type names the key and the expected type. Semantic checks (ranges, divisibility) are in
:func:`validate`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .model.config import ViTConfig, suggest, validate_vit_config, vit_preset
from .optim.config import COSINE_SHAPES, OptimConfig
from .parallel.config import DTYPE_NAMES as PARALLEL_DTYPES
from .parallel.config import ParallelConfig, checkpoint_every
from .swav.config import SwAVHeadConfig, SwAVLossConfig, seer_head, seer_loss


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what was expected."""


# ---------------------------------------------------------------------------------------------------------
# The run's own sections.

@dataclass
class CropsConfig:
    """Multi-crop and its augmentations (seer_spec.md 1.2-1.3; ``seer_kernels.MultiCropSpec`` semantics).

    Global crops come first (they are the assignment crops), then local crops. ``rotation_degrees`` and
    ``noise_std`` are not part of SwAV: they are applied after the multi-crop op, for data such as the
    digits demo where colour jitter and local crops destroy the signal (demo_notes.md).
    """
    global_count: int = 2
    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])
    local_count: int = 6
    local_size: int = 96
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    rotation_degrees: float = 0.0
    noise_std: float = 0.0


@dataclass
class DataConfig:
    """Unlabelled training images.

    Attributes:
        source: 'digits' (scikit-learn's digits, built in), 'synthetic' (random images made on the fly: the
            training step without storage or decoding, to measure throughput), a folder (searched
            recursively), a text file with one image path per line, or webdataset-style tar shards (a .tar
            file, a folder of them, or a glob such as 'shards/train-*.tar').
        format: 'auto' (from ``source``), 'folder', 'list', 'tar', 'digits' or 'synthetic'.
        exclude: a text file naming images of ``source`` to leave out of the run's data index ('' = none), one
            a line as the index names them: absolute paths, '/abs/shard.tar:MEMBER' for tar members. The reports
            of ``seer data dedup --report`` (the duplicates and the unreadable files), ``seer data check
            --report`` and OUT/skipped_files.txt are taken as they are (grammar: :mod:`seer.data.exclude`). Read
            when the index is built; the index records the file (SHA-256) and a resumed run with another file,
            or the file changed, is refused. Not with the built-in sets.
        batch_size: images per data-parallel rank per step.
        augment_on: 'workers' (decode and multi-crop in DataLoader worker processes, the C++ CPU op) or
            'device' (workers only decode; the multi-crop op runs on the training device).
        num_workers: DataLoader worker processes (0 = in the training process).
        prefetch_factor: batches prefetched per worker.
        digits_size: side of the upscaled digits images (source 'digits').
        digits_split: 'train' (the 1200 images that are not in the evaluation's test split) or 'all'.
        synthetic_count: images of the synthetic set (source 'synthetic'; default ImageNet-1k's 1,281,167):
            an epoch's length. None is held in memory: image i is made when it is read, from ``train.seed``
            and i (:mod:`seer.data.synthetic`).
        synthetic_size: their size in pixels, 'S' (S x S) or 'HxW' (height x width), e.g. 256 or 240x320.
        max_image_pixels: larger images are skipped as decompression bombs.
        max_image_bytes: image files (and tar members) larger than this many bytes are skipped as unreadable
            without being read: a video or a disk image named .jpg, or a tar member of a huge size, would
            otherwise be read whole into memory by every DataLoader worker that meets it; 0 = no limit. The
            default, 512 MiB, is about the size of an 8-bit RGB image of ``max_image_pixels``' default stored
            without compression (BMP, PPM, TIFF: 3 bytes a pixel; compressed ones are smaller): it refuses
            almost no image that the pixel guard lets through, while one read holds less memory than decoding
            an image at the pixel limit already does (Pillow keeps 4 bytes a pixel).
        max_bad_fraction: stop with an error if more than this fraction of the dataset turns out unreadable
            (a wrong path or format, not a few bad files); 1.0 never stops.
        timeout_s: stop with an error naming this key when the DataLoader workers deliver no batch for this
            many seconds (a read that hangs on a stuck NFS or FUSE mount would otherwise wait forever); 0 = wait
            forever. The default, 600, is hundreds of times what one worker takes for a batch (SwAV's crops of
            photos: 85 images/s on one core, bench/results/cpu-loader.json, so 128 images in 1.5 s): slow
            storage, busy cores and the workers' start (counted in the first batch's wait) stay far below it,
            while a hung run stops within 10 minutes instead of holding its GPUs for hours. Worker processes
            only: with ``num_workers`` 0 the reads run in the training process, which no timeout interrupts.
        index_workers: processes that index tar shards on the first run (global rank 0, while every other rank
            waits): 0 = automatic (the CPUs rank 0 may use, at most 32 and one per shard; a small source is
            indexed in the training process, where starting processes would cost more than it saves), 1 = in
            the training process only. The index is the same whatever this is.
    """
    source: str = "digits"
    format: str = "auto"
    exclude: str = ""
    batch_size: int = 64
    augment_on: str = "workers"
    num_workers: int = 4
    prefetch_factor: int = 2
    digits_size: int = 32
    digits_split: str = "train"
    synthetic_count: int = 1_281_167
    synthetic_size: str = "256"
    max_image_pixels: int = 178_956_970
    max_image_bytes: int = 512 * 2**20
    max_bad_fraction: float = 0.5
    timeout_s: float = 600.0
    index_workers: int = 0
    crops: CropsConfig = field(default_factory=CropsConfig)


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        max_steps: optimizer steps of the whole run (the schedules span them).
        device: 'auto' (CUDA if available), 'cpu' or 'cuda'.
        seed: seeds the model initialisation, the data order and every augmentation.
        precision: 'bf16' (autocast; float32 master weights), 'fp16' (autocast + gradient scaler), 'fp32', or
            'auto': bf16 where the hardware computes it natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or
            AMX), else fp32 (emulated bf16 on an older CPU is slower than fp32). With several data-parallel
            processes FSDP also casts the trunk's and the projection head's weights to parallel.param_dtype
            (bfloat16 by default) for the compute: 'fp32' computes in float32 only with
            parallel.param_dtype=float32 (the prototype scores are float32 either way).
        optimizer: 'lars' (SGD + LARC, SwAV/SEER) or 'adamw'.
        adamw_betas: AdamW's betas (optimizer 'adamw').
        grad_clip: clip the global gradient norm to this value (0 = off; SwAV/SEER do not clip).
        max_nonfinite_steps: stop after this many consecutive steps with a NaN/inf loss (each is skipped).
        threads: torch intra-op threads per process (0 = torch's default).
        attention_backend: 'auto' or a ``seer_kernels`` attention backend to force ('sdpa', 'reference',
            'triton') while the run trains and evaluates (SEER_KERNELS_BACKEND_ATTENTION, if set, wins); one
            that cannot run the model on this device and precision is refused at the start.
        collapse_warmup_steps: steps before collapse warnings may fire (early training is naturally
            near-uniform); -1 = max(50, 10% of max_steps).
    """
    max_steps: int = 1000
    device: str = "auto"
    seed: int = 31
    precision: str = "bf16"
    optimizer: str = "lars"
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0
    max_nonfinite_steps: int = 20
    threads: int = 0
    attention_backend: str = "auto"
    collapse_warmup_steps: int = -1


@dataclass
class CheckpointConfig:
    """Attributes:
        every: save every this many steps (0 = only at the end).
        keep: number of complete checkpoints kept (older ones are deleted after a new one is complete).
        dir: checkpoint folder ('' = OUT/checkpoints).
        resume: 'auto' (resume from the latest complete checkpoint in ``dir`` if there is one), 'never'
            (refuse to start over existing checkpoints), or the path of a checkpoint to start from.
        at_end: save when the run finishes.
        init_from: continued pretraining: the path of a run folder or checkpoint (what ``seer eval
            --checkpoint`` accepts) or of a ``seer export --format timm`` .safetensors file whose weights
            initialise a new run at step 0; everything else starts fresh (optimizer state, the learning-rate
            and weight-decay schedules with their warm-up, the data position, an empty queue, this run's
            seed). Used only when the run has no checkpoint of its own yet: a rerun after a stop resumes from
            the run's latest checkpoint. Not with a path in ``resume`` ('' = off). The source's architecture
            must be the run's but for ``model.img_size`` (the same ``model.patch_size``): continued at another
            resolution, the position embedding is the source's resampled to the new patch grid.
        init_parts: what ``init_from`` initialises: 'all' (backbone, projection head and prototypes; from a
            run or checkpoint only) or 'backbone' (the head and prototypes are initialised afresh from this
            run's seed, so they may have another shape: ``head.num_prototypes``, ``head.output_dim``, ...).
    """
    every: int = 1000
    keep: int = 3
    dir: str = ""
    resume: str = "auto"
    at_end: bool = True
    init_from: str = ""
    init_parts: str = "all"


@dataclass
class EvalConfig:
    """kNN and linear-probe evaluation on frozen class-token features (seer_spec.md 4).

    Attributes:
        dataset: 'digits' or a folder with one subfolder per class (or with 'train/' and 'val/' folders
            that each have one subfolder per class).
        every: evaluate every this many training steps (0 = not during training).
        at_end: evaluate after training and write eval.json.
        random_init_baseline: also evaluate the same model at its random initialisation.
        knn: run the kNN evaluation.  knn_k, knn_temperature: DINO's k = 20, T = 0.07, cosine.
        linear: run the linear probe.
        linear_weight_decays: L2 strengths tried on a validation split of the training features.
        linear_max_iter: L-BFGS iterations of the probe.
        test_fraction: held-out fraction when the dataset has no train/val split.
        split_seed: seed of that split.
        image_size: side of the evaluation images (0 = data.crops.global_size); photos are resized
            (shorter side to size * 8/7) and centre-cropped.
        batch_size: images per forward pass when extracting features.
        max_images: cap on the images used from each split (0 = all).
    """
    dataset: str = "digits"
    every: int = 0
    at_end: bool = True
    random_init_baseline: bool = False
    knn: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear: bool = True
    linear_weight_decays: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    linear_max_iter: int = 200
    test_fraction: float = 0.33
    split_seed: int = 0
    image_size: int = 0
    batch_size: int = 256
    max_images: int = 0


@dataclass
class LoggingConfig:
    """Attributes:
        every: log metrics (metrics.jsonl, TensorBoard, progress bar) every this many steps.
        tensorboard: write TensorBoard events to OUT/tensorboard.
        progress: 'auto' (a progress bar when stderr is a terminal), 'on' or 'off'.
        plot: write OUT/plot.png (loss and throughput) at the end.
        nvtx: NVTX ranges around data, forward, backward, optimizer and communication.
    """
    every: int = 10
    tensorboard: bool = True
    progress: str = "auto"
    plot: bool = True
    nvtx: bool = True


@dataclass
class RunConfig:
    """Everything a run needs; saved as OUT/config.yaml."""
    description: str = ""
    model: ViTConfig = field(default_factory=ViTConfig)
    head: SwAVHeadConfig = field(default_factory=SwAVHeadConfig)
    loss: SwAVLossConfig = field(default_factory=SwAVLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------------------
# Presets.

def _tiny() -> RunConfig:
    return RunConfig(
        description="tiny: seconds per step on a CPU, for tests (2 x 32 px + 2 x 16 px crops of the digits).",
        model=vit_preset("tiny"),
        head=SwAVHeadConfig(hidden_dims=[64], output_dim=16, batch_norm=True, num_prototypes=32),
        loss=SwAVLossConfig(freeze_prototypes_iters=2, queue_length=0, queue_start_epoch=0),
        optim=OptimConfig(lr=0.3, start_warmup_lr=0.0, final_lr=0.0003, warmup_steps=2, weight_decay=1e-6),
        parallel=ParallelConfig(param_dtype="float32"),
        data=DataConfig(source="digits", batch_size=8, num_workers=0, augment_on="device",
                        crops=CropsConfig(global_size=32, global_scale=[0.3, 1.0], local_count=2, local_size=16,
                                          local_scale=[0.1, 0.3])),
        train=TrainConfig(max_steps=6, precision="fp32"),
        checkpoint=CheckpointConfig(every=3, keep=2),
        eval=EvalConfig(at_end=False, max_images=200),
        logging=LoggingConfig(every=1, tensorboard=False, plot=False),
    )


def _demo() -> RunConfig:
    # demo_notes.md: what reached kNN 85-87% vs 62-64% at random initialisation in under 5 min on 2 cores.
    # Departures from the SwAV recipe, because the data calls for them: 32 px digits (8 x 8 upscaled) have
    # no colour and little detail, so colour jitter, grayscale, blur and local crops make every view
    # ambiguous and the loss sticks at ln K; flips change digits. Small rotations and pixel noise take
    # their place. AdamW instead of LARS, and a queue because the batch (64) is tiny.
    # Measured (docs/training.md): lr 3e-4 and 2e-4 collapse once the queue starts; 1.5e-4 works for seed 0
    # (kNN 84.9%) but collapsed mid-run for seed 2 (gradient clipping at 3 did not prevent it); 1e-4 trains
    # every seed tried (0, 1, 2).
    # 1300 steps = 72 epochs of the 1,200 training images; the queue starts at epoch 10 (15% of the run).
    # Two cores, no oversubscription: the model on one thread, multi-crop in one DataLoader worker (two
    # threads on two cores are faster only while nothing else runs: 0.13 s vs 0.19 s per step idle, but
    # 0.5-0.7 s as soon as another process takes a core). Attention runs on the reference path: at 17
    # tokens in bf16 on a CPU it costs 0.17-0.18 s per step against 0.26 s for torch's SDPA kernel.
    return RunConfig(
        description=("demo: SwAV on scikit-learn's digits (labels hidden), 2 CPU cores, under 5 minutes. "
                     "Departs from SwAV for this data: no colour jitter/grayscale/blur/flip, no local crops, "
                     "rotations of up to 10 degrees and pixel noise instead; AdamW; queue of 512."),
        model=ViTConfig(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_dim=768),
        head=SwAVHeadConfig(hidden_dims=[512], output_dim=32, batch_norm=True, num_prototypes=300),
        loss=SwAVLossConfig(epsilon=0.05, sinkhorn_iterations=3, temperature=0.1, freeze_prototypes_iters=30,
                            queue_length=512, queue_start_epoch=10),
        optim=OptimConfig(lr=1e-4, start_warmup_lr=0.0, final_lr=1e-6, warmup_steps=65, weight_decay=0.05),
        parallel=ParallelConfig(param_dtype="float32"),
        data=DataConfig(source="digits", batch_size=64, num_workers=1, augment_on="workers",
                        crops=CropsConfig(global_size=32, global_scale=[0.5, 1.0], local_count=0, flip_p=0.0,
                                          jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=[0.5, 0.5, 0.5],
                                          std=[0.5, 0.5, 0.5], rotation_degrees=10.0, noise_std=0.03)),
        train=TrainConfig(max_steps=1300, precision="auto", optimizer="adamw", seed=0, threads=1,
                          attention_backend="reference"),
        checkpoint=CheckpointConfig(every=500, keep=2),
        eval=EvalConfig(dataset="digits", at_end=True, random_init_baseline=True),
        logging=LoggingConfig(every=10, tensorboard=True, plot=True),
    )


def _swav_vit_small() -> RunConfig:
    # SwAV's ImageNet recipe (bs 4096 = 64 ranks x 64, 2 x 224 + 6 x 96) on ViT-S/16; its learning rates are
    # for that batch, scaled to the run's own.
    return RunConfig(
        description="swav-vit-small: SwAV's ImageNet recipe (seer_spec.md 1) on a ViT-S/16; set data.source.",
        model=vit_preset("small"), head=SwAVHeadConfig(), loss=SwAVLossConfig(),
        optim=OptimConfig(lr_reference_batch=4096),
        data=DataConfig(source="", batch_size=64, num_workers=8),
        train=TrainConfig(max_steps=313 * 100, precision="bf16", optimizer="lars"),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        eval=EvalConfig(at_end=False),
    )


def _seer_vit_10b() -> RunConfig:
    # SEER-10B's recipe (seer_spec.md 2.4) on the dense ViT-10B, SEER head, eps 0.03. SEER's 2 x 160 + 4 x 96
    # does not tile with patch 14: 2 x 224 + 4 x 98 (257 and 50 tokens, seer_spec.md 3.3).
    return RunConfig(
        description="seer-vit-10b: SEER-10B's recipe on the dense ViT-10B; set data.source and parallel.tp.",
        model=vit_preset("vit-10b"), head=seer_head(), loss=seer_loss(),
        # SEER's learning rates are for its global batch of 7936 images (16 per GPU x 496 GPUs): scaled to
        # the run's own batch (on 496 GPUs at tp=8, 62 data-parallel ranks of 128 images: 7936, unscaled).
        optim=OptimConfig(lr=9.3, start_warmup_lr=0.15, final_lr=0.0093, warmup_steps=5500, weight_decay=1e-5,
                          cosine="global", lr_reference_batch=7936),
        parallel=ParallelConfig(tp=8, activation_checkpointing="full"),
        # data.batch_size is per data-parallel rank, and the 8 GPUs of a tensor-parallel group share one:
        # SEER's 16 images per GPU are 128 per rank (16 per rank gave 1/8 of SEER's batch at its full rate).
        data=DataConfig(source="", batch_size=128, num_workers=8,
                        crops=CropsConfig(global_size=224, local_count=4, local_size=98)),
        # One epoch of ~1B images at a global batch of 7936: the schedule's length, seer_spec.md 2.4 (the
        # released checkpoint is iteration 124,500 of it).
        train=TrainConfig(max_steps=126_008, precision="bf16", optimizer="lars"),
        checkpoint=CheckpointConfig(every=500, keep=2),
        eval=EvalConfig(at_end=False),
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "swav-vit-small": _swav_vit_small, "seer-vit-10b": _seer_vit_10b}


def preset(name: str) -> RunConfig:
    """A complete run config by name (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{suggest(name, PRESETS, cutoff=0.5)}; "
                          f"available: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------------------
# Keys, overrides, YAML.

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree, e.g. 'train.max_steps'."""
    obj = obj if obj is not None else RunConfig()
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += all_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _unknown(key: str, valid: list[str]) -> ConfigError:
    # Compare whole dotted keys, then the last part alone (a misspelt field in the right section).
    hint = suggest(key, valid, cutoff=0.5)
    if not hint:
        tail = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tail), n=3, cutoff=0.6)
        hint = (" (did you mean " + " or ".join(repr(tail[c]) for c in close) + "?)") if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` (from YAML) as type ``tp``, or ConfigError naming the key and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return None
        return _coerce(key, value, inner[0])
    if isinstance(value, _Plain):  # a string key takes the text as written, any other the YAML value
        if tp in (int, float) and _YAML11_OCTAL.fullmatch(value.text.strip()):
            value = int(value.text.strip().replace("_", ""), 10)  # 'seed: 010' is 10, not YAML 1.1's octal 8
        else:
            value = value.text if tp is str else value.value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} expects true or false, got {value!r}")
    if isinstance(value, str) and tp in (int, float):
        try:  # YAML 1.1 reads '2e-4' (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans ('progress: off')
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported type {tp}")  # pragma: no cover - a new field type


def _set(cfg: Any, key: str, value: Any, path: str = "") -> None:
    head, _, rest = key.partition(".")
    full = path + head
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise _unknown(path + key, all_keys())
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        if not rest:
            if isinstance(value, dict):
                for k, v in value.items():
                    _set(current, str(k), v, full + ".")
                return
            raise ConfigError(f"config key {full!r} is a section; set its fields, e.g. "
                              f"{all_keys(current, full + '.')[0]!r}")
        _set(current, rest, value, full + ".")
        return
    if rest:
        raise _unknown(path + key, all_keys())
    setattr(cfg, head, _coerce(full, value, _hints(type(cfg))[head]))


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=100")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value: {_yaml_problem(e)}") from None
    return key, value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of ``cfg`` with each 'dotted.key=value' applied in order.

    The value of a string key (a path, a name) is taken as written, not as YAML: 'data.source=photos #1'
    is that folder, not 'photos' (YAML comment), '010' stays '010' (not 8), 'no' stays 'no' (not false).
    A numeric key reads '010' as 10 (YAML 1.1 would read octal 8).
    Quotes around it are removed; an optional string key takes 'null' or '~' for None."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        kind = _leaf_type(cfg, text.partition("=")[0]) if "=" in text else None
        if kind in (str, Optional[str]):  # as written: not even parsed as YAML ('[2020] photos', '*.tar')
            key, raw = text.partition("=")[0].strip(), text.partition("=")[2].strip()
            if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
                raw = raw[1:-1]
            elif kind is not str and raw in ("null", "~", "None"):
                raw = None
            value = raw
        else:
            key, value = parse_override(text)
            if value != "":  # read again keeping each number's text, as a YAML file is: '010' is 10 (_coerce),
                # also in a list ('[010, 1]') or a section ('{seed: 010}'), and after a '# comment'
                value = yaml.load(text.partition("=")[2], Loader=_ConfigLoader)
        _set(cfg, key, value)
    return cfg


def _leaf_type(cfg: Any, key: str) -> Any:
    """The annotated type of the dotted ``key`` of ``cfg``, or None where it is not a leaf field."""
    obj = cfg
    parts = key.strip().split(".")
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return _hints(type(obj))[name]
        obj = getattr(obj, name)
    return None


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, base: Optional[RunConfig] = None) -> RunConfig:
    """A config from a nested mapping; an optional top-level 'preset' names the starting point."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("preset", None)
    cfg = preset(str(name)) if name is not None else copy.deepcopy(base if base is not None else RunConfig())
    for key, value in data.items():
        _set(cfg, str(key), value)
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line report in one line: the problem and where (line, column; 1-based)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


class _Plain:
    """An unquoted YAML scalar that YAML 1.1 resolved to a number or a boolean, with its text: a string key of
    a config file takes the text, as ``--set`` does ('source: 010' is the folder '010', not '8'; 'resume: no'
    is 'no', not false)."""

    __slots__ = ("value", "text")

    def __init__(self, value, text: str):
        self.value, self.text = value, text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return repr(self.value)


# What PyYAML (YAML 1.1) reads as an octal integer: '010' is 8 there, 10 in YAML 1.2 and to everyone who writes a
# seed or a step count with a leading zero; numeric keys take such text as decimal.
_YAML11_OCTAL = re.compile(r"[-+]?0[0-7_]+")


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, keeping the text of the scalars it resolves to numbers and booleans."""


def _keep_text(construct):
    return lambda loader, node: _Plain(construct(loader, node), node.value)


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float),
                         ("bool", yaml.SafeLoader.construct_yaml_bool),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):  # 'source: 2024-01-15'
    _ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_text(_construct))


def load_yaml(path: str | Path) -> RunConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_ConfigLoader)
        data = (data.value if isinstance(data, _Plain) else data) or {}  # a file of just 'false' or '0
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); expected a "
                          f"YAML file") from None
    return from_dict(data)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def dumps(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------
# Semantic checks.

def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} must be {expected}, got {value!r}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                          f"{suggest(str(value), choices, cutoff=0.5)}")


INIT_PARTS = ("all", "backbone")


def _check_init_from(c: CheckpointConfig) -> None:
    """checkpoint.init_from / init_parts: what the config alone can tell (the path is read by the trainer)."""
    _choice("checkpoint.init_parts", c.init_parts, INIT_PARTS)
    if not c.init_from:
        return
    if c.resume not in ("auto", "never"):
        raise ConfigError(f"checkpoint.init_from={c.init_from!r} and checkpoint.resume={c.resume!r} cannot be "
                          f"combined: checkpoint.resume=PATH continues a run's whole training state, "
                          f"checkpoint.init_from starts a new run from its weights; set only one")
    if c.init_from.endswith(".safetensors") and c.init_parts == "all":
        raise ConfigError(f"checkpoint.init_from={c.init_from!r} is an export, which holds the backbone only: "
                          f"set checkpoint.init_parts=backbone (a fresh head), or give the run or checkpoint "
                          f"folder it was exported from for checkpoint.init_parts=all")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_crop_law(c: CropsConfig) -> None:
    """The rest of data.crops (colour jitter strengths, blur range, ...) as the multi-crop sampler checks
    them, its message naming the key."""
    from .data.augment import crop_spec
    try:
        crop_spec(c)
    except ValueError as e:
        keys = {f.name for f in dataclasses.fields(CropsConfig)}
        raise ConfigError(re.sub(r"^MultiCropSpec: argument '(\w+)'",
                                 lambda m: f"config key 'data.crops.{m[1]}'" if m[1] in keys else
                                 "data.crops (global_*/local_* sizes and scales)", str(e))) from None


def _check_synthetic(d: DataConfig) -> None:
    """data.synthetic_count / synthetic_size: their form whatever the source (as data.digits_size), what they
    must be beside the other data keys where the source is 'synthetic'."""
    from .data.synthetic import parse_size
    _check(1 <= d.synthetic_count < 2**62, "data.synthetic_count", "an integer in [1, 2^62)", d.synthetic_count)
    try:
        h, w = parse_size(d.synthetic_size)
    except ValueError as e:
        raise ConfigError(f"config key 'data.synthetic_size': {e}") from None
    if d.source == "synthetic" or d.format == "synthetic":  # never held against a run that reads files
        _check(h * w <= d.max_image_pixels, "data.synthetic_size",
               f"at most data.max_image_pixels={d.max_image_pixels} pixels (H x W)", d.synthetic_size)
        _check(d.synthetic_count >= d.batch_size, "data.synthetic_count",  # (the sampler would say 'add images')
               f"at least data.batch_size={d.batch_size} (one batch)", d.synthetic_count)


def _check_exclude(d: DataConfig) -> None:
    """data.exclude: a readable file, for a source of files (its names are read when the index is built)."""
    if not d.exclude:
        return
    if d.format in ("digits", "synthetic") or (d.format == "auto" and d.source in ("digits", "synthetic")):
        raise ConfigError(f"config key 'data.exclude' leaves out images of files; data.source {d.source!r} is a "
                          f"built-in set made in memory: set data.exclude=''")
    path = os.path.expanduser(d.exclude)
    what = ("does not exist" if not os.path.exists(path) else "is a folder" if os.path.isdir(path) else
            "cannot be read" if not os.access(path, os.R_OK) else None)
    if what:
        # A resumed run needs the file too (its index was made with it, and is checked against it): a report
        # made again from the same data by the same command has the same bytes, and passes that check.
        again = ("; to resume a run made with it, put it back or write it again (seer data dedup --report of "
                 "the same data gives the same bytes)" if what == "does not exist" else "")
        raise ConfigError(f"config key 'data.exclude' must be a readable text file naming images to leave out, "
                          f"got {d.exclude!r}, which {what}{again}")


def _check_sequence_split(cfg: RunConfig) -> None:
    """parallel.sequence_parallel splits the sequences of each resolution group (its crops x data.batch_size, the
    crops of one size going through the trunk together) over parallel.tp ranks: a remainder failed the first
    training step, once the data was indexed and the model built."""
    tp, c, b = cfg.parallel.tp, cfg.data.crops, cfg.data.batch_size
    if not cfg.parallel.sequence_parallel or tp <= 1:
        return
    groups: dict[int, int] = {}
    for size, count in ((c.global_size, c.global_count), (c.local_size, c.local_count)):
        if count:
            groups[size] = groups.get(size, 0) + count
    for size, count in groups.items():
        if b * count % tp:
            raise ConfigError(f"config key 'data.batch_size' must make the {count} crops of {size} px a multiple of "
                              f"parallel.tp={tp} sequences per rank under parallel.sequence_parallel=true, got "
                              f"{b} ({b * count} sequences): use a multiple of {tp // math.gcd(count, tp)}, or "
                              f"parallel.sequence_parallel=false")


def validate(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError naming the key for values no run can use; return ``cfg``."""
    try:
        validate_vit_config(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e).replace("ViTConfig.", "model.")) from None
    d, t, c = cfg.data, cfg.train, cfg.data.crops
    _check(d.batch_size >= 1, "data.batch_size", "an integer >= 1", d.batch_size)
    _check(d.num_workers >= 0, "data.num_workers", "an integer >= 0", d.num_workers)
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", "an integer >= 1", d.prefetch_factor)
    _choice("data.format", d.format, ("auto", "folder", "list", "tar", "digits", "synthetic"))
    _choice("data.augment_on", d.augment_on, ("workers", "device"))
    _choice("data.digits_split", d.digits_split, ("train", "all"))
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "in [0, 1]", d.max_bad_fraction)
    _check(d.max_image_pixels >= 1, "data.max_image_pixels", "an integer >= 1", d.max_image_pixels)
    _check(d.max_image_bytes >= 0, "data.max_image_bytes", "an integer >= 0 (bytes; 0 = no limit)",
           d.max_image_bytes)
    _check(math.isfinite(d.timeout_s) and d.timeout_s >= 0, "data.timeout_s",
           "a finite number >= 0 (seconds; 0 = no timeout)", d.timeout_s)
    _check(d.index_workers >= 0, "data.index_workers", "an integer >= 0 (0 = automatic, 1 = no worker processes)",
           d.index_workers)
    _check(c.global_count >= 1, "data.crops.global_count", "an integer >= 1", c.global_count)
    _check(c.local_count >= 0, "data.crops.local_count", "an integer >= 0", c.local_count)
    p = cfg.model.patch_size
    for name, size, count in (("global_size", c.global_size, c.global_count), ("local_size", c.local_size,
                                                                               c.local_count)):
        if count:
            _check(size >= p and size % p == 0, f"data.crops.{name}", f"a multiple of model.patch_size ({p})",
                   size)
    for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
        v = getattr(c, name)
        _check(len(v) == 2 and 0 < v[0] <= v[1], f"data.crops.{name}", "a [low, high] pair with 0 < low <= high",
               v)
    for name in ("mean", "std"):
        v = getattr(c, name)
        _check(len(v) == 3 and (name == "mean" or min(v) > 0), f"data.crops.{name}", "3 numbers (std > 0)", v)
    # (the crops, the evaluation images and seer features' are RGB: any other width failed at the first step)
    _check(cfg.model.in_chans == 3, "model.in_chans", "3 (the images are decoded to RGB)", cfg.model.in_chans)
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        v = getattr(c, name)
        _check(0.0 <= v <= 1.0, f"data.crops.{name}", "a probability in [0, 1]", v)
    for name in ("rotation_degrees", "noise_std"):  # (noise of an infinite spread made every loss NaN)
        _check(0 <= getattr(c, name) < math.inf, f"data.crops.{name}", "a finite number >= 0", getattr(c, name))
    _check_crop_law(c)
    n_crops = c.global_count + c.local_count
    assign = cfg.loss.crops_for_assign
    _check(n_crops >= 2, "data.crops.global_count", "such that there are at least 2 crops (global + local)",
           c.global_count)
    # (distinct: the loss refuses a repeated crop, which it did only at the first step, after the data index)
    _check(bool(assign) and all(0 <= a < c.global_count for a in assign) and len(set(assign)) == len(assign),
           "loss.crops_for_assign", f"distinct indices of global crops (< data.crops.global_count = "
           f"{c.global_count})", assign)
    _check(t.max_steps >= 1, "train.max_steps", "an integer >= 1", t.max_steps)
    for key, seed in (("train.seed", t.seed), ("eval.split_seed", cfg.eval.split_seed)):
        _check(-2**63 <= seed < 2**63, key, "an integer in [-2^63, 2^63) (a torch generator's seed)", seed)
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
    _choice("train.optimizer", t.optimizer, ("lars", "adamw"))
    _choice("train.attention_backend", t.attention_backend, ("auto", "sdpa", "reference", "triton"))
    _check(len(t.adamw_betas) == 2 and all(0 <= b < 1 for b in t.adamw_betas), "train.adamw_betas",
           "two numbers in [0, 1)", t.adamw_betas)
    _check(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 = off)", t.grad_clip)
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "an integer >= 1", t.max_nonfinite_steps)
    _check(t.threads >= 0, "train.threads", "an integer >= 0", t.threads)
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "an integer >= 0 (steps; 0 = only at the end)",
           cfg.checkpoint.every)
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "an integer >= 1", cfg.checkpoint.keep)
    _check_init_from(cfg.checkpoint)
    e = cfg.eval
    _check(e.every >= 0, "eval.every", "an integer >= 0", e.every)
    _check(e.dataset.strip() != "", "eval.dataset", "'digits' or a folder of class folders (not empty)", e.dataset)
    _check(e.knn_k >= 1, "eval.knn_k", "an integer >= 1", e.knn_k)
    _check(0 < e.knn_temperature < math.inf, "eval.knn_temperature", "a finite number > 0", e.knn_temperature)
    _check(0 < e.test_fraction < 1, "eval.test_fraction", "in (0, 1)", e.test_fraction)
    _check(bool(e.linear_weight_decays) and all(0 <= w < math.inf for w in e.linear_weight_decays),
           "eval.linear_weight_decays", "a non-empty list of finite numbers >= 0", e.linear_weight_decays)
    _check(e.image_size == 0 or e.image_size > 0 and e.image_size % p == 0, "eval.image_size",
           f"0 or a positive multiple of model.patch_size ({p})", e.image_size)
    _check(cfg.logging.every >= 1, "logging.every", "an integer >= 1", cfg.logging.every)
    _choice("logging.progress", cfg.logging.progress, ("auto", "on", "off"))
    _check(cfg.head.num_prototypes >= 2, "head.num_prototypes", "an integer >= 2", cfg.head.num_prototypes)
    _check(cfg.loss.queue_length >= 0, "loss.queue_length", "an integer >= 0", cfg.loss.queue_length)
    _check(0 < cfg.loss.epsilon < math.inf, "loss.epsilon", "a finite number > 0", cfg.loss.epsilon)
    _check(0 < cfg.loss.temperature < math.inf, "loss.temperature", "a finite number > 0", cfg.loss.temperature)
    h = cfg.head
    _check(all(_positive_int(d) for d in h.hidden_dims), "head.hidden_dims", "positive integers", h.hidden_dims)
    _check(_positive_int(h.output_dim), "head.output_dim", "an integer >= 1", h.output_dim)
    for name in ("param_dtype", "reduce_dtype"):
        _choice(f"parallel.{name}", getattr(cfg.parallel, name), tuple(PARALLEL_DTYPES))
    _check(cfg.loss.sinkhorn_iterations >= 1, "loss.sinkhorn_iterations", "an integer >= 1",
           cfg.loss.sinkhorn_iterations)
    _check(cfg.loss.freeze_prototypes_iters >= 0, "loss.freeze_prototypes_iters", "an integer >= 0",
           cfg.loss.freeze_prototypes_iters)
    _check(cfg.loss.queue_start_epoch >= 0, "loss.queue_start_epoch", "an integer >= 0", cfg.loss.queue_start_epoch)
    o = cfg.optim
    # A negative learning rate would train by gradient ascent without an error.
    for name in ("lr", "start_warmup_lr", "final_lr", "weight_decay", "trust_coefficient", "eps"):
        v = getattr(o, name)
        _check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"optim.{name}", "a finite number >= 0", v)
    _check(o.final_weight_decay is None or 0 <= o.final_weight_decay < math.inf, "optim.final_weight_decay",
           "None or a finite number >= 0", o.final_weight_decay)
    _check(0 <= o.momentum < 1, "optim.momentum", "in [0, 1)", o.momentum)
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", o.warmup_steps)
    _check(o.lr_reference_batch >= 0, "optim.lr_reference_batch", "an integer >= 0 (0 = learning rates as given)",
           o.lr_reference_batch)
    _choice("optim.cosine", o.cosine, COSINE_SHAPES)
    _check(e.batch_size >= 1, "eval.batch_size", "an integer >= 1", e.batch_size)
    _check(e.max_images >= 0, "eval.max_images", "an integer >= 0 (0 = all)", e.max_images)
    _check(e.linear_max_iter >= 1, "eval.linear_max_iter", "an integer >= 1", e.linear_max_iter)
    _check(d.digits_size >= 8, "data.digits_size", "an integer >= 8 (the digits are 8 x 8)", d.digits_size)
    _check_synthetic(d)
    _check_exclude(d)
    _check(cfg.parallel.tp >= 1, "parallel.tp", "an integer >= 1", cfg.parallel.tp)
    _check(cfg.parallel.dp == -1 or cfg.parallel.dp >= 1, "parallel.dp", "-1 (world size / parallel.tp) or an "
           "integer >= 1", cfg.parallel.dp)
    _check_sequence_split(cfg)
    try:
        checkpoint_every(cfg.parallel.activation_checkpointing)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg
