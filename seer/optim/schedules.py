r"""Per-step schedules: linear warm-up then cosine decay, for the learning rate and, optionally, the weight
decay, in the shape of swav's main_swav.py (``cosine="after_warmup"``) or of VISSL's composite schedule
(``cosine="global"``, SEER; seer_spec.md 1.11):

    t < W:        v(t) = start + (peak - start) * t / W          (swav: np.linspace(start, peak, W))
    W <= t < T:   v(t) = final + (peak - final) / 2 * (1 + cos(pi * p))
                      p = (t - W) / (T - W)     after_warmup: the cosine starts at peak when the warm-up ends
                      p = t / T                 global: VISSL's "fixed" cosine interval, evaluated on the whole
                                                run's progress (a small drop from peak where the warm-up ends)
    t >= T:       v(t) = final

(np.linspace(start, peak, W) has W points ending *at* peak; we use t / W so that step W is the first cosine
step at exactly peak; the two agree up to one step of the ramp.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch.optim import Optimizer

from .config import COSINE_SHAPES, OptimConfig


@dataclass(frozen=True)
class WarmupCosine:
    """v(step) as in the module doc. ``total_steps`` includes the warm-up."""
    peak: float
    total_steps: int
    warmup_steps: int = 0
    start: float = 0.0
    final: float = 0.0
    cosine: str = "after_warmup"

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"WarmupCosine: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                             f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}")
        if self.cosine not in COSINE_SHAPES:
            raise ValueError(f"WarmupCosine: cosine must be one of {', '.join(COSINE_SHAPES)}, got {self.cosine!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.final
        if self.cosine == "global":
            progress = step / self.total_steps
        else:
            progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.final + 0.5 * (self.peak - self.final) * (1.0 + math.cos(math.pi * progress))


class Scheduler:
    """Sets every param group's ``lr`` (and ``weight_decay`` if a schedule is given) for the current step.

    The value for step 0 is applied at construction; call :meth:`step` after each optimizer step. A group's
    optional ``lr_scale`` / ``wd_scale`` multiply the scheduled values. Its step counter is checkpointed.
    """

    def __init__(self, optimizer: Optimizer, lr: WarmupCosine, weight_decay: Optional[WarmupCosine] = None):
        self.optimizer = optimizer
        self.lr_schedule = lr
        self.wd_schedule = weight_decay
        self.last_step = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.lr_schedule(self.last_step)

    def _apply(self) -> None:
        lr = self.lr_schedule(self.last_step)
        wd = self.wd_schedule(self.last_step) if self.wd_schedule is not None else None
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if wd is not None and group.get("lars", True):  # excluded groups keep weight decay 0
                group["weight_decay"] = wd * group.get("wd_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def build_schedule(optimizer: Optimizer, cfg: OptimConfig, total_steps: int) -> Scheduler:
    """The per-step :class:`Scheduler` of ``cfg`` over ``total_steps``: learning rate warm-up (at most
    ``total_steps``) then cosine, and the weight decay cosine from ``weight_decay`` to ``final_weight_decay``
    if that is set."""
    warmup = min(cfg.warmup_steps, total_steps)
    lr = WarmupCosine(cfg.lr, total_steps, warmup, start=cfg.start_warmup_lr, final=cfg.final_lr,
                      cosine=cfg.cosine)
    wd = None
    if cfg.final_weight_decay is not None:
        wd = WarmupCosine(cfg.weight_decay, total_steps, 0, start=cfg.weight_decay, final=cfg.final_weight_decay)
    return Scheduler(optimizer, lr, wd)
