"""Building the training objects from a run config: the parallelised SwAV model, the optimizer and its
schedule, and the global gradient-norm clip that is correct under FSDP2 and tensor parallelism."""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..model import VisionTransformer, init_weights_
from ..model.init import local_tensor
from ..optim import OptimConfig, Scheduler, build_optimizer, build_schedule
from ..optim.config import scaled_to_batch
from ..parallel import ParallelDims, comm, parallelize, tensor_parallel_group, tensor_parallel_params
from ..parallel.state import shard_reduce_groups
from ..swav import SwAVHead, SwAVModel

log = logging.getLogger("seer.train")


def build_model(cfg: RunConfig, dims: ParallelDims, device: torch.device) -> SwAVModel:
    """Trunk + head built on the meta device, parallelised, then materialised on ``device`` and initialised
    from ``train.seed`` (so every process, whatever its shard, draws the same model)."""
    with torch.device("meta"):
        backbone = VisionTransformer(cfg.model, device="meta")
        head = SwAVHead(cfg.model.embed_dim, cfg.head)
        model = SwAVModel(backbone, head)
    parallelize(model, dims, cfg.parallel)
    model.to_empty(device=device)
    init_weights_(model, std=cfg.model.init_std, seed=cfg.train.seed)
    return model


def build_backbone(cfg: RunConfig, device: torch.device = torch.device("cpu")) -> VisionTransformer:
    """The single-device trunk of ``cfg`` initialised as a single-device training run initialises it (the
    random-init baseline). Each tensor's generator is keyed by its name in the SwAV model
    ('backbone.blocks.0...', init_weights_), so the trunk is initialised under that name: on its own its
    names lack the prefix and every weight came out different. (FSDP and tensor-parallel runs key their
    sharded tensors by shard too: their initial trunk is not this one.)"""
    with torch.device("meta"):
        backbone = VisionTransformer(cfg.model, device="meta")
    backbone.to_empty(device=device)
    named = nn.Module()
    named.backbone = backbone  # SwAVModel's attribute: the same names as in training
    init_weights_(named, std=cfg.model.init_std, seed=cfg.train.seed)
    return backbone


def build_optimizer_and_schedule(cfg: RunConfig, model: nn.Module, global_batch: Optional[int] = None
                                 ) -> tuple[torch.optim.Optimizer, Scheduler]:
    """LARS (``train.optimizer='lars'``, the issue-4 optimizer) or AdamW, with the warm-up + cosine schedule
    of ``optim`` over ``train.max_steps``; the learning rates scaled to ``global_batch`` (images per step over
    every data-parallel rank) where ``optim.lr_reference_batch`` is set."""
    o: OptimConfig = cfg.optim
    if o.lr_reference_batch and global_batch is not None:
        o = scaled_to_batch(o, global_batch)
        if global_batch != cfg.optim.lr_reference_batch:
            log.info("learning rates scaled to the global batch of %d images (optim.lr_reference_batch=%d): "
                     "peak %.4g, warm-up start %.4g, final %.4g", global_batch, cfg.optim.lr_reference_batch,
                     o.lr, o.start_warmup_lr, o.final_lr)
    total = cfg.train.max_steps
    if cfg.train.optimizer == "lars":
        return build_optimizer(model, o, total)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars": False}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(cfg.train.adamw_betas), weight_decay=o.weight_decay,
                            foreach=True)
    return opt, build_schedule(opt, o, total)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / ||g||) with ||g|| the norm of the *full* gradient.

    Shards are summed once: FSDP2 shards (DTensors) over their mesh, tensor-parallel slices over the TP group;
    replicated tensors are counted once. Returns ||g|| before clipping."""
    tp_ids = {id(p) for p in tensor_parallel_params(model)}
    tp_group = tensor_parallel_group(model)
    buckets: dict[tuple, Tensor] = {}
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = local_tensor(p.grad)
        grads.append(g)
        key = shard_reduce_groups(p.grad, tp_group if id(p) in tp_ids else None)
        sq = g.float().square().sum()
        buckets[key] = buckets[key] + sq if key in buckets else sq
    total = torch.zeros((), device=grads[0].device if grads else "cpu")
    for groups, sq in buckets.items():
        for pg in groups:
            sq = comm.all_reduce(sq, pg)
        total = total + sq
    norm = float(total.sqrt())
    if math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (else autocast to bf16 is emulated and slow)."""
    if device.type == "cuda":
        if torch.version.hip:  # every ROCm GPU torch supports computes bf16
            return torch.cuda.is_bf16_supported()
        # Not torch.cuda.is_bf16_supported(): by default it also says yes where bf16 is only emulated
        # (pre-Ampere GPUs such as V100 or T4), and it asks the current device, not ``device``.
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:  # not Linux: be conservative
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
