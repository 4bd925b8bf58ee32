"""Trainer.train_step against a plain re-statement of swav's main_swav.py iteration (seer_spec.md 1.1-1.11).

The reference below is written from the spec, not from seer: prototypes renormalised at the start of the
iteration, codes from crops 0 and 1 by a float64 Sinkhorn, the queue created as zeros at its start epoch,
prepended once its last row is non-zero and then shifted, the loss averaged over (a, v != a) pairs,
prototype gradients dropped for the first iterations, apex's LARC + SGD with weight decay on every tensor
(prototypes included) at the per-step warm-up + cosine rate. It shares only the model's forward with seer.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from seer.config import apply_overrides, preset
from seer.train import Trainer
from tests.oracles import swav_sinkhorn_f64

STEPS = 8
# float32 noise between the two is ~5e-6 here; one update moves a prototype by ~2e-4 (lr 0.3, trust 0.001),
# so an iteration that differs in what it updates, or when, shows up far above this.
TOL = 3e-5


def reference_lr(o, step: int, total: int) -> float:
    if step < o.warmup_steps:
        return o.start_warmup_lr + (o.lr - o.start_warmup_lr) * step / o.warmup_steps
    p = step / total if o.cosine == "global" else (step - o.warmup_steps) / (total - o.warmup_steps)
    return o.final_lr + 0.5 * (o.lr - o.final_lr) * (1 + math.cos(math.pi * p))


class SwAVIteration:
    """One process of main_swav.py's train loop on a copy of the model."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.bufs: dict[str, torch.Tensor] = {}
        self.queue = None
        self.use_the_queue = False

    def step(self, it: int, epoch: int, crops: list[torch.Tensor]) -> None:
        lc, o, m = self.cfg.loss, self.cfg.optim, self.model
        b, n_crops = crops[0].shape[0], len(crops)
        with torch.no_grad():
            w = m.head.prototypes.weight
            w.copy_(F.normalize(w, dim=1))
        z = F.normalize(m.head.projection(m.backbone(crops)), dim=1)
        out = z @ m.head.prototypes.weight.t()
        if lc.queue_length > 0 and epoch >= lc.queue_start_epoch and self.queue is None:
            self.queue = torch.zeros(len(lc.crops_for_assign), lc.queue_length, z.shape[1])
        loss = 0.0
        for i, a in enumerate(lc.crops_for_assign):
            with torch.no_grad():
                s = out[a * b:(a + 1) * b].detach()
                if self.queue is not None:
                    if self.use_the_queue or not torch.all(self.queue[i, -1, :] == 0):
                        self.use_the_queue = True
                        s = torch.cat((self.queue[i] @ m.head.prototypes.weight.t(), s))
                    self.queue[i, b:] = self.queue[i, :-b].clone()
                    self.queue[i, :b] = z[a * b:(a + 1) * b].detach()
                q = swav_sinkhorn_f64(s, lc.epsilon, lc.sinkhorn_iterations)[-b:].float()
            sub = 0.0
            for v in range(n_crops):
                if v != a:
                    logp = F.log_softmax(out[v * b:(v + 1) * b] / lc.temperature, dim=1)
                    sub = sub - torch.mean(torch.sum(q * logp, dim=1))
            loss = loss + sub / (n_crops - 1)
        loss = loss / len(lc.crops_for_assign)
        m.zero_grad(set_to_none=True)
        loss.backward()
        if it < lc.freeze_prototypes_iters:
            for name, p in m.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        lr = reference_lr(o, it, self.cfg.train.max_steps)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.clone()
                wn, gn = float(p.norm()), float(g.norm())
                if wn != 0 and gn != 0:
                    eta = o.trust_coefficient * wn / (gn + o.weight_decay * wn + o.eps)
                    g = (g + o.weight_decay * p) * eta
                self.bufs[name] = g.clone() if name not in self.bufs else o.momentum * self.bufs[name] + g
                p.sub_(lr * self.bufs[name])
        m.zero_grad(set_to_none=True)

    def prototypes_as_next_iteration_sees_them(self) -> torch.Tensor:
        return F.normalize(self.model.head.prototypes.weight.detach(), dim=1)


@pytest.mark.parametrize("cosine", ["after_warmup", "global"])
def test_train_step_is_main_swav_iteration(tmp_path, cosine):
    # Weight decay large enough to matter, prototypes frozen for 2 steps, a queue of 2 batches that starts
    # filling at epoch 1 (2 steps per epoch here) and is used from step 4.
    cfg = apply_overrides(preset("tiny"), [
        "train.threads=1", "eval.at_end=false", f"train.max_steps={STEPS}", "optim.warmup_steps=3",
        "optim.weight_decay=0.1", f"optim.cosine={cosine}", "loss.freeze_prototypes_iters=2",
        "loss.queue_length=16", "loss.queue_start_epoch=1"])
    trainer = Trainer(cfg, tmp_path)
    try:
        ref = SwAVIteration(copy.deepcopy(trainer.model), cfg)
        gen = torch.Generator().manual_seed(1)
        b = cfg.data.batch_size
        for it in range(STEPS):
            epoch = it // 2
            crops = [torch.randn(b, 3, 32, 32, generator=gen) for _ in range(2)] + \
                [torch.randn(b, 3, 16, 16, generator=gen) for _ in range(2)]
            rec = trainer.train_step([c.clone() for c in crops], epoch, want_signals=False)
            ref.step(it, epoch, crops)
            assert rec["prototypes_frozen"] == (it < 2)
            assert rec["lr"] == pytest.approx(reference_lr(cfg.optim, it, STEPS), rel=1e-12, abs=1e-15)
            # Filled by the pushes of steps 2 and 3, used from step 4 on (the reference sees its last row set).
            assert (trainer.queue.embeddings() is not None) == (it >= 3)
            assert ref.use_the_queue == (it >= 4)
            ours = dict(trainer.model.named_parameters())
            for name, p in ref.model.named_parameters():
                want = ref.prototypes_as_next_iteration_sees_them() if "prototypes" in name else p.detach()
                diff = float((ours[name].detach() - want).abs().max())
                assert diff < TOL, f"step {it}: {name} differs by {diff:.2e}"
    finally:
        trainer.release()
