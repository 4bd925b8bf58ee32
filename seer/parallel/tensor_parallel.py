"""Apply Megatron tensor parallelism (and optionally sequence parallelism) to a ViT / SwAV model in place.

Per block: attn.qkv and mlp.fc1 become column-parallel (each rank: H/T heads, m/T MLP columns), attn.proj and
mlp.fc2 row-parallel; QK-norm parameters see only the local heads, so their gradients are completed over
the group. The SwAV prototypes become column-parallel (K/T prototypes per rank); the projection MLP stays
replicated. With sequence parallelism the tokens are scattered after the embedding (norm_pre) and gathered
after the final norm, so everything between the matmuls runs on 1/T of the sequences.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model import VisionTransformer
from ..model.config import ViTConfig
from ..model.layers import DropPath, LayerNorm, LayerScale
from ..swav.config import SwAVHeadConfig
from ..swav.head import SwAVHead
from .layers import (ColumnParallelLinear, RowParallelLinear, TPLayerNorm, TPLayerScale,
                     make_tensor_parallel_replicated)
from .mappings import gather_from_sequence_region, scatter_to_sequence_region
from .random import ForkedRNG, RNGStatesTracker, get_rng_tracker


def model_parts(model: nn.Module) -> tuple[VisionTransformer, Optional[SwAVHead]]:
    """(trunk, head or None) of a VisionTransformer or a SwAVModel."""
    if isinstance(model, VisionTransformer):
        return model, None
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if isinstance(backbone, VisionTransformer) and isinstance(head, SwAVHead):
        return backbone, head
    raise TypeError(f"expected a VisionTransformer or a SwAVModel, got {type(model).__name__}")


def validate_tensor_parallel(vit: ViTConfig, head: Optional[SwAVHeadConfig], tp: int, *,
                             said: Optional[dict[str, str]] = None) -> None:
    """Raise ValueError naming the setting when the model cannot be split ``tp`` ways. ``said``: how a command
    whose own flags set them names the settings, key -> the text before the value (default "key="; seer plan's
    "--tp ", "the --model's num_heads=")."""
    if tp == 1:
        return
    said = said or {}
    checks = [("model.num_heads", vit.num_heads, "whole attention heads"),
              ("model.mlp_dim", vit.mlp_dim, "MLP columns")]
    if head is not None:
        checks.append(("head.num_prototypes", head.num_prototypes, "prototypes"))
    for name, value, what in checks:
        if value % tp:
            setting, tp_setting = said.get(name, f"{name}="), said.get("parallel.tp", "parallel.tp=")
            raise ValueError(f"{setting}{value} is not divisible by {tp_setting}{tp}: tensor parallelism gives "
                             f"every rank {name.split('.')[1]}/tp {what}")


def split_module(model: nn.Module) -> Optional[str]:
    """Name and class of the first module that tensor parallelism put in ``model``; None if there is none."""
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, TPLayerNorm, TPLayerScale)):
            return f"{name} ({type(module).__name__})"
    return None


def _fork(module: nn.Module, tracker: RNGStatesTracker) -> nn.Module:
    if isinstance(module, (nn.Dropout, DropPath)):
        return ForkedRNG(module, tracker)
    return module


def _make_sequence_hooks(trunk: VisionTransformer, group, tp: int) -> None:
    # Sequences the scatter hook added in eval mode, for the gather hook to drop (the forward between them is
    # one call: the hooks of a trunk never interleave). Set by every scatter, kept by the gathers: a forward may
    # gather more than once (get_intermediate_layers normalises each block it returns).
    padded = [0]
    # Where the trunk's tokens are sharded by sequence (get_intermediate_layers refuses norm=False there: its
    # blocks' outputs reach no gather).
    trunk.sequence_parallel_size = tp

    def scatter(module, inputs, output):
        extra = -output.shape[0] % tp
        if extra and trunk.training:
            raise ValueError(f"sequence parallelism splits the {output.shape[0]} sequences of a resolution group "
                             f"(crops x images per rank) over parallel.tp={tp} ranks: make the per-rank batch "
                             f"size a multiple of {tp} or turn parallel.sequence_parallel off")
        # In eval mode (features for kNN / the linear probe, inference) any batch runs: zero sequences fill it
        # up to a multiple of tp and are dropped after the gather. Sequences never mix (attention and the norms
        # are per sequence), so the real ones come out unchanged.
        padded[0] = extra
        if extra:
            output = torch.cat([output, output.new_zeros((extra,) + tuple(output.shape[1:]))])
        return scatter_to_sequence_region(output, group)

    def gather(module, inputs, output):
        # What follows (class-token pooling, the head) is replicated: the backward only splits.
        out = gather_from_sequence_region(output, group, to_tensor_parallel=False)
        extra = padded[0]
        return out[:out.shape[0] - extra] if extra else out

    trunk.norm_pre.register_forward_hook(scatter)
    trunk.norm.register_forward_hook(gather)


def apply_tensor_parallel(model: nn.Module, *, group, tp_rank: int, tp_size: int, sequence_parallel: bool = False,
                          tracker: Optional[RNGStatesTracker] = None) -> nn.Module:
    """Split ``model`` (VisionTransformer or SwAVModel) for rank ``tp_rank`` of ``tp_size`` in place.

    ``group`` may be None to only reshape the parameters (e.g. checking a meta-device model's shards in one
    process); the forward then needs the real group. A model that is already split is refused (ValueError):
    splitting it again would silently cut each shard into smaller ones.
    """
    trunk, head = model_parts(model)
    validate_tensor_parallel(trunk.cfg, head.cfg if head is not None else None, tp_size)
    if tp_size == 1:
        return model
    split = split_module(model)
    if split is not None:
        raise ValueError(f"apply_tensor_parallel: the model is already tensor-parallel ({split}); "
                         f"apply it once, to the single-device model")
    tracker = tracker if tracker is not None else get_rng_tracker()
    sp = sequence_parallel
    kw = dict(group=group, tp_rank=tp_rank, tp_size=tp_size)
    for block in trunk.blocks:
        attn, mlp = block.attn, block.mlp
        attn.qkv = ColumnParallelLinear.from_linear(attn.qkv, chunks=3, sequence_parallel=sp, **kw)
        attn.proj = RowParallelLinear.from_linear(attn.proj, sequence_parallel=sp, **kw)
        for norm in (attn.q_norm, attn.k_norm):
            if isinstance(norm, LayerNorm):
                make_tensor_parallel_replicated(norm, group)
        mlp.fc1 = ColumnParallelLinear.from_linear(mlp.fc1, sequence_parallel=sp, **kw)
        mlp.fc2 = RowParallelLinear.from_linear(mlp.fc2, sequence_parallel=sp, **kw)
        mlp.drop1 = _fork(mlp.drop1, tracker)  # on this rank's MLP columns: independent masks
        if sp:
            for name in ("norm1", "norm2", "ls1", "ls2"):
                sub = getattr(block, name)
                if isinstance(sub, (LayerNorm, LayerScale)):
                    make_tensor_parallel_replicated(sub, group)
            # On this rank's sequences: independent masks. Without SP these act on replicated activations
            # and stay on the default generator, identical on every rank of the group.
            attn.proj_drop = _fork(attn.proj_drop, tracker)
            mlp.drop2 = _fork(mlp.drop2, tracker)
            block.drop_path1 = _fork(block.drop_path1, tracker)
            block.drop_path2 = _fork(block.drop_path2, tracker)
    if sp:
        make_tensor_parallel_replicated(trunk.norm, group)
        _make_sequence_hooks(trunk, group, tp_size)
    if head is not None:
        head.prototypes = ColumnParallelLinear.from_linear(head.prototypes, **kw)
    return model


def tensor_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters split over a tensor-parallel group (the others are replicated on its ranks)."""
    out = []
    for module in model.modules():
        if getattr(module, "tp_size", 1) > 1:
            out.extend(getattr(module, name) for name in getattr(module, "tp_split_params", ())
                       if getattr(module, name, None) is not None)
    return out


def tensor_parallel_group(model: nn.Module):
    """The tensor-parallel process group of ``model`` (None if it is not tensor-parallel)."""
    for module in model.modules():
        if getattr(module, "tp_size", 1) > 1:
            return module.tp_group
    return None

