r"""Linear probe: multinomial logistic regression on frozen, precomputed features.

Features are standardised with the training set's mean and std; then W, b minimise

    1/N sum_i CE(W x_i + b, y_i) + lambda ||W||^2

by full-batch L-BFGS (strong-Wolfe line search), which converges in a few hundred iterations and needs no
learning rate. lambda is chosen among ``weight_decays`` on a held-out 20% of the training features
(fixed seed), then the probe is refitted on all training features and scored on the test split.

This is the fast protocol for small labelled sets and for monitoring during pretraining; the VISSL/DINO
protocols (SGD over augmented crops for 28-100 epochs, seer_spec.md 4.1) train on augmentations and give
higher numbers on ImageNet-scale data.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """(W (C, D), b (C,)) minimising the regularised cross-entropy (module doc), float64 for a stable L-BFGS."""
    x = x.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> float:
    return 100.0 * ((x.double() @ w.T + b).argmax(1) == y).double().mean().item()


@torch.no_grad()
def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
                 weight_decays: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2), max_iter: int = 200,
                 seed: int = 0) -> dict:
    """{'top1': test accuracy in percent, 'weight_decay': the chosen lambda, 'val_top1': its validation score}."""
    mean = train_features.float().mean(0)
    std = train_features.float().std(0).clamp_min(1e-6)
    xtr = (train_features.float() - mean) / std
    xte = (test_features.float() - mean) / std
    c = int(max(train_labels.max(), test_labels.max())) + 1
    best = (float(weight_decays[0]), -1.0)
    if len(weight_decays) > 1:
        perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(seed))
        n_val = max(1, xtr.shape[0] // 5)
        val, fit = perm[:n_val], perm[n_val:]
        for wd in weight_decays:
            w, b = fit_logistic(xtr[fit], train_labels[fit], c, float(wd), max_iter)
            acc = _accuracy(w, b, xtr[val], train_labels[val])
            if acc > best[1]:
                best = (float(wd), acc)
    w, b = fit_logistic(xtr, train_labels, c, best[0], max_iter)
    return {"top1": _accuracy(w, b, xte, test_labels), "weight_decay": best[0], "val_top1": best[1]}
