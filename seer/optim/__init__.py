"""Optimisation: LARS (SGD + LARC) as one multi-tensor step, warm-up + cosine schedules."""
from .config import OptimConfig
from .lars import LARS, build_lars, lars_param_groups
from .schedules import Scheduler, WarmupCosine


def build_optimizer(model, cfg: OptimConfig, total_steps: int) -> tuple[LARS, Scheduler]:
    """LARS over ``model`` and its per-step scheduler (warm-up then cosine; weight decay cosine if configured)."""
    opt = build_lars(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     trust_coefficient=cfg.trust_coefficient, eps=cfg.eps, clip=cfg.clip,
                     exclude_bias_and_norm=cfg.exclude_bias_and_norm)
    warmup = min(cfg.warmup_steps, total_steps)
    lr = WarmupCosine(cfg.lr, total_steps, warmup, start=cfg.start_warmup_lr, final=cfg.final_lr)
    wd = None
    if cfg.final_weight_decay is not None:
        wd = WarmupCosine(cfg.weight_decay, total_steps, 0, start=cfg.weight_decay, final=cfg.final_weight_decay)
    return opt, Scheduler(opt, lr, wd)


__all__ = ["LARS", "OptimConfig", "Scheduler", "WarmupCosine", "build_lars", "build_optimizer",
           "lars_param_groups"]
