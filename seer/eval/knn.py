r"""Weighted k-nearest-neighbour classification on frozen features, as DINO's eval_knn.py (seer_spec.md 4.2).

Features are L2-normalised; for a test feature x the k training features with the largest cosine
similarity s_j vote for their class with weight exp(s_j / T):

    score(c) = sum_{j in top-k} exp(s_j / T) [y_j = c],     prediction = argmax_c score(c)

DINO reports k = 20, T = 0.07. Test features are processed in chunks so memory stays at chunk x N_train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Predicted labels (N_test,) (module doc)."""
    if train_features.shape[0] == 0:
        raise ValueError("knn_predict: no training features")
    k = min(k, train_features.shape[0])
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], c, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
             k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    c = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature, num_classes=c)
    return 100.0 * (pred == test_labels).float().mean().item()
