"""Optimizer config: SGD + LARC with SwAV's ImageNet bs-4096 values (seer_spec.md 1.10-1.11)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


COSINE_SHAPES = ("after_warmup", "global")  # OptimConfig.cosine (seer/optim/schedules.py)


@dataclass
class OptimConfig:
    """Attributes:
        lr: peak learning rate (SwAV bs 4096: 4.8 = 0.3 x 4096/256; SEER-10B 9.3).
        start_warmup_lr: learning rate at step 0 (SwAV 0.3; SEER 0.15).
        final_lr: learning rate at the end of the cosine (peak / 1000).
        warmup_steps: linear warm-up length in optimizer steps (SwAV: 10 epochs x 313 steps).
        cosine: 'after_warmup' (swav's main_swav.py: the cosine runs from the end of the warm-up) or 'global'
            (VISSL's composite schedule, SEER: the cosine is evaluated on the whole run's progress).
        momentum: SGD momentum.
        weight_decay: weight decay (SwAV 1e-6; SEER 1e-5), applied through LARC.
        final_weight_decay: None for a constant weight decay, else cosine from weight_decay to this value.
        trust_coefficient: LARC trust coefficient.
        eps: LARC epsilon.
        clip: LARC clipping (per-tensor lr = min(lr, eta)).
        exclude_bias_and_norm: no weight decay and no adaptation for 1-D tensors (not SwAV/SEER's choice).
        lr_reference_batch: 0: ``lr``, ``start_warmup_lr`` and ``final_lr`` are used as given. N > 0: they
            are the values for a global batch of N images, and the run scales them linearly to its own
            (``data.batch_size`` x data-parallel ranks), as VISSL derives the peak and the final rate from
            the global batch (seer_spec.md 1.11): SwAV's 4.8 at 4096 images becomes 0.6 on 8 ranks of 64.
            (VISSL's warm-up start follows the batch of one node instead; here it keeps its ratio to the peak.) (``warmup_steps`` and
            ``train.max_steps`` stay steps: at another batch they cover another number of images.)
    """
    lr: float = 4.8
    start_warmup_lr: float = 0.3
    final_lr: float = 0.0048
    warmup_steps: int = 3130
    cosine: str = "after_warmup"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    final_weight_decay: Optional[float] = None
    trust_coefficient: float = 0.001
    eps: float = 1e-8
    clip: bool = False
    exclude_bias_and_norm: bool = False
    lr_reference_batch: int = 0


def scaled_to_batch(o: OptimConfig, global_batch: int) -> OptimConfig:
    """``o`` with its learning rates scaled by global_batch / o.lr_reference_batch (unchanged when that is 0)."""
    if not o.lr_reference_batch:
        return o
    f = global_batch / o.lr_reference_batch
    return dataclasses.replace(o, lr=o.lr * f, start_warmup_lr=o.start_warmup_lr * f, final_lr=o.final_lr * f)
