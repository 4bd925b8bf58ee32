"""Optimisation: LARS (SGD + LARC) as one multi-tensor step, warm-up + cosine schedules."""
from .config import OptimConfig
from .lars import LARS, build_lars, lars_param_groups
from .schedules import Scheduler, WarmupCosine, build_schedule


def build_optimizer(model, cfg: OptimConfig, total_steps: int) -> tuple[LARS, Scheduler]:
    """LARS over ``model`` and its per-step scheduler (warm-up then cosine; weight decay cosine if configured)."""
    opt = build_lars(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     trust_coefficient=cfg.trust_coefficient, eps=cfg.eps, clip=cfg.clip,
                     exclude_bias_and_norm=cfg.exclude_bias_and_norm)
    return opt, build_schedule(opt, cfg, total_steps)


__all__ = ["LARS", "OptimConfig", "Scheduler", "WarmupCosine", "build_lars", "build_optimizer",
           "build_schedule", "lars_param_groups"]
