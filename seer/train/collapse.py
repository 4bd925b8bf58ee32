r"""Collapse signals and the warning that names the remedies (those of the swav README's training tips).

From the prototype scores S (B, K) of the first assignment crop, on logging steps only:

* ``assign_entropy``: mean over images of H(q_i) / ln K, with q = Sinkhorn(S) the codes the loss trains
  towards. 1 means every image is assigned uniformly to all prototypes: the targets carry no information,
  and the loss sits at ln K.
* ``pred_entropy``: the same for the predictions softmax(S_i / tau).
* ``prototypes_used``: distinct prototypes that are the arg-max of some image of the global batch (at most
  min(global batch, K)); very few means the embeddings collapsed onto a few prototypes.
* ``embedding_std``: the per-dimension standard deviation of the L2-normalised embeddings over the batch,
  times sqrt(D) (about 1 for embeddings spread over the sphere, 0 for a constant representation).
* ``loss_over_lnk``: loss / ln K.

The monitor warns (rate-limited) when, after the warm-up, the loss stays within 2% of ln K, or the
assignments stay near uniform, or the representation is constant.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

import seer_kernels

from ..parallel import comm
from .metrics import ON_TERMINAL

log = logging.getLogger("seer.train")

REMEDIES = ("usual remedies (the swav README's training tips): lower the Sinkhorn epsilon "
            "(loss.epsilon=0.03), use a queue when the batch is small (loss.queue_length, loss.queue_start_epoch), "
            "freeze the prototypes longer at the start (loss.freeze_prototypes_iters), lower the learning rate "
            "(optim.lr), use softer augmentations or fewer local crops (data.crops.*), remove BatchNorm from the "
            "projection head (head.batch_norm=false)")


def _entropy(p: Tensor, prototype_group) -> Tensor:
    h = -(p * p.clamp_min(1e-30).log()).sum(1)
    return comm.all_reduce(h, prototype_group)


@torch.no_grad()
def collapse_signals(scores: Tensor, embeddings: Tensor, *, num_prototypes: int, temperature: float,
                     epsilon: float, iterations: int, group: Optional[dist.ProcessGroup] = None,
                     prototype_group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
    """Signals of one batch (module doc). ``scores``: (B, K or K/T) float32; ``embeddings``: (N, D).
    Collective over ``group`` (data parallel) and ``prototype_group`` (tensor parallel)."""
    scores = scores.detach().float()
    ln_k = math.log(num_prototypes)
    codes = seer_kernels.sinkhorn(scores, epsilon, iterations, group=group, prototype_group=prototype_group)
    # softmax over the full K (split over the prototype group): global max and sum.
    logits = scores / temperature
    m = comm.all_reduce(logits.max(1, keepdim=True).values, prototype_group, op="max")
    e = (logits - m).exp()
    pred = e / comm.all_reduce(e.sum(1, keepdim=True), prototype_group)
    # Arg-max over the full K: gather each rank's best (value, global index).
    k_local = scores.shape[1]
    best, idx = codes.max(1)
    idx = idx + comm.group_rank(prototype_group) * k_local
    all_best = comm.all_gather(best[None], prototype_group, dim=0)
    all_idx = comm.all_gather(idx[None], prototype_group, dim=0)
    winner = all_idx.gather(0, all_best.argmax(0, keepdim=True))[0]
    counts = torch.zeros(num_prototypes, device=scores.device)
    counts.index_add_(0, winner, torch.ones_like(winner, dtype=counts.dtype))
    counts = comm.all_reduce(counts, group)
    # The spread over the global batch (every data-parallel rank's embeddings), from summed moments in
    # float64: the mean of per-rank spreads depended on the layout and was NaN with one image per rank. One
    # embedding in all has no spread to measure: NaN (the monitor's test ignores it).
    z = embeddings.detach().double()
    d = z.shape[1]
    moments = comm.all_reduce(torch.cat([z.new_tensor([z.shape[0]]), z.sum(0), (z * z).sum(0)]), group)
    n, s1, s2 = moments[0], moments[1:d + 1], moments[d + 1:]
    var = ((s2 - s1 * s1 / n) / (n - 1).clamp(min=1)).clamp(min=0)
    spread = torch.where(n > 1, var.sqrt().mean() * math.sqrt(d), var.new_tensor(math.nan)).float()
    stats = torch.stack([
        _entropy(codes, prototype_group).mean() / ln_k,
        _entropy(pred, prototype_group).mean() / ln_k,
        spread,  # the same on every rank: the mean below gives it back
    ])
    stats = comm.all_reduce(stats, group) / comm.group_size(group)
    assign_h, pred_h, emb_std = stats.tolist()
    return {"assign_entropy": assign_h, "pred_entropy": pred_h, "prototypes_used": int((counts > 0).sum()),
            "embedding_std": emb_std}


class CollapseMonitor:
    """Decides when to warn, from a window of recent logged values.

    Args:
        num_prototypes: K.
        warmup_steps: no warning before this step (training starts near uniform).
        window: logged points averaged.
        every: minimum steps between two warnings.
    """

    def __init__(self, num_prototypes: int, warmup_steps: int, window: int = 5, every: int = 500):
        self.ln_k = math.log(num_prototypes)
        self.warmup_steps = warmup_steps
        self.loss = deque(maxlen=window)
        self.assign = deque(maxlen=window)
        self.std = deque(maxlen=window)
        self.every = every
        self.last_warning: Optional[int] = None
        self.warnings = 0

    def state_dict(self) -> dict:
        """The window and the last warning's step, for a checkpoint's meta.json: a resumed run warns at the
        steps an uninterrupted one does (its window had restarted empty and its spacing from the last warning
        was lost)."""
        return {"loss": list(self.loss), "assign": list(self.assign), "std": list(self.std),
                "last_warning": self.last_warning, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        for name in ("loss", "assign", "std"):
            window = getattr(self, name)
            window.clear()
            window.extend(float(x) for x in state[name])
        self.last_warning = state["last_warning"]
        self.warnings = int(state["warnings"])

    def update(self, step: int, loss: float, signals: dict) -> Optional[str]:
        """Record one logged step; return the warning text if one is due (also logged). Steps of the warm-up
        are not recorded: the window after it would otherwise average in the first losses, which start above
        ln K (a shortened run warned of collapse while its loss fell below ln K)."""
        if step < self.warmup_steps:
            return None
        self.loss.append(loss)
        self.assign.append(signals["assign_entropy"])
        self.std.append(signals["embedding_std"])
        if len(self.loss) < self.loss.maxlen:
            return None
        if self.last_warning is not None and step - self.last_warning < self.every:
            return None
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        reasons = []
        # Within 2% of ln K: a uniform prediction's loss. Far above it is a confident wrong prediction, no collapse.
        if abs(mean(self.loss) - self.ln_k) <= 0.02 * self.ln_k:
            reasons.append(f"the loss ({mean(self.loss):.3f}) sits at ln K = {self.ln_k:.3f}")
        if mean(self.assign) >= 0.97:
            reasons.append(f"the code assignments are near uniform (entropy {mean(self.assign):.2f} x ln K)")
        if mean(self.std) < 0.05:
            reasons.append(f"the embeddings are almost constant over the batch (std x sqrt(D) = {mean(self.std):.3f})")
        if not reasons:
            return None
        self.last_warning = step
        self.warnings += 1
        text = (f"step {step}: possible collapse: {'; '.join(reasons)}. The features are probably not learning. "
                f"The {REMEDIES}.")
        log.warning(text, extra=ON_TERMINAL)  # (the trainer shows the returned text on the terminal)
        return text
