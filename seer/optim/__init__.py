"""Optimisation: LARS (SGD + LARC) as one multi-tensor step, warm-up + cosine schedules.

Names are imported on first use (:mod:`seer._lazy`): the config needs no torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"OptimConfig": "config", "LARS": "lars", "build_lars": "lars", "lars_param_groups": "lars",
            "Scheduler": "schedules", "WarmupCosine": "schedules", "build_schedule": "schedules"}
__all__ = sorted([*_EXPORTS, "build_optimizer"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def build_optimizer(model, cfg: OptimConfig, total_steps: int) -> tuple[LARS, Scheduler]:
    """LARS over ``model`` and its per-step scheduler (warm-up then cosine; weight decay cosine if configured)."""
    from .lars import build_lars
    from .schedules import build_schedule
    opt = build_lars(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     trust_coefficient=cfg.trust_coefficient, eps=cfg.eps, clip=cfg.clip,
                     exclude_bias_and_norm=cfg.exclude_bias_and_norm)
    return opt, build_schedule(opt, cfg, total_steps)


if TYPE_CHECKING:  # what static tools see
    from .config import OptimConfig
    from .lars import LARS, build_lars, lars_param_groups
    from .schedules import Scheduler, WarmupCosine, build_schedule
