"""Frozen class-token features of a labelled split.

Under torch.distributed the images are split over the data-parallel ranks (padded to equal batches,
because a sharded model's forward is collective) and the features gathered, so periodic evaluation costs
1/W of the forward passes per rank and holds only features, never images, for the whole split.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import DataConfig
from ..parallel import comm
from .datasets import LabelledSplit, autocast_to, channel_stats, check_image_size, load_image, preprocess
from .extract import check_batching


@torch.no_grad()
def extract_features(backbone: nn.Module, split: LabelledSplit, *, image_size: int, mean, std,
                     batch_size: int = 256, device: torch.device = torch.device("cpu"),
                     group: Optional[dist.ProcessGroup] = None, autocast_dtype: Optional[torch.dtype] = None,
                     max_pixels: int = DataConfig.max_image_pixels,
                     max_bytes: int = DataConfig.max_image_bytes) -> tuple[Tensor, Tensor, int]:
    """(features (M, D) float32 on the CPU, labels (M,), images skipped as unreadable or larger than
    ``max_pixels`` pixels or ``max_bytes`` bytes)."""
    check_image_size(image_size, getattr(backbone, "patch_size", 1))  # (any module that takes images)
    # (0 was a ZeroDivisionError; a negative size ran no batch: every image counted as unreadable)
    check_batching(batch_size)
    mean_t, std_t = channel_stats(mean, std)
    was_training = backbone.training
    backbone.eval()
    n = len(split)
    world, rank = comm.group_size(group), comm.group_rank(group)
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    steps = -(-per_rank // batch_size)
    feats, keep = [], []
    dim = None
    for s in range(steps):
        idx = mine[s * batch_size:(s + 1) * batch_size]
        if isinstance(split.images, Tensor) and tuple(split.images.shape[-2:]) == (image_size, image_size):
            # In-memory images of the right size (the digits): one vectorised normalisation.
            images = list(((split.images[idx].float() / 255 - mean_t) / std_t).unbind(0)) if idx else []
            ok = list(idx)
        else:
            images, ok = [], []
            for i in idx:
                img = split.images[i] if isinstance(split.images, Tensor) else \
                    load_image(split.images[i], max_pixels, max_bytes)
                if img is not None:
                    images.append(preprocess(img, image_size, mean_t, std_t))
                    ok.append(i)
        # Every rank runs the same number of forwards (a sharded model's forward is collective).
        x = torch.stack(images) if images else torch.zeros(1, 3, image_size, image_size)
        with autocast_to(device, autocast_dtype):
            f = backbone(x.to(device)).float().cpu()
        dim = f.shape[1]
        if images:
            feats.append(f)
            keep += ok
    if was_training:
        backbone.train()
    local = torch.cat(feats) if feats else torch.zeros(0, dim or 1)
    local_idx = torch.tensor(keep, dtype=torch.int64)
    if world > 1:
        # Pad to a common length to all-gather, then drop the padding (index -1).
        count = comm.all_reduce(torch.tensor([len(keep)], device=device), group, op="max").item()
        pad = int(count) - len(keep)
        f_pad = torch.cat([local, local.new_zeros(pad, local.shape[1])]).to(device)
        i_pad = torch.cat([local_idx, local_idx.new_full((pad,), -1)]).to(device)
        all_f = comm.all_gather(f_pad, group).cpu()
        all_i = comm.all_gather(i_pad, group).cpu()
        valid = all_i >= 0
        local, local_idx = all_f[valid], all_i[valid]
    return local, split.labels[local_idx], n - len(local_idx)
