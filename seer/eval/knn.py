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
    _check(train_features, train_labels, test_features, k=k, temperature=temperature, chunk=chunk)
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
    if not (isinstance(test_labels, Tensor) and test_labels.dim() == 1
            and test_labels.shape[0] == test_features.shape[0]):
        raise ValueError(f"knn_top1: test_labels must be a 1-D tensor of one label per test feature "
                         f"({test_features.shape[0]}), got {_shape(test_labels)}")
    c = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature, num_classes=c)
    return 100.0 * (pred == test_labels).float().mean().item()


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check(train_features, train_labels, test_features, *, k, temperature, chunk) -> None:
    """Refuse what would otherwise vote wrongly without an error (k = 0 picks class 0 everywhere, T <= 0
    inverts or breaks the weights, surplus labels are ignored) or fail deep inside torch."""
    for name, t in (("train_features", train_features), ("test_features", test_features)):
        if not (isinstance(t, Tensor) and t.dim() == 2 and t.is_floating_point()):
            raise ValueError(f"knn_predict: {name} must be a 2-D float tensor (N, D), got "
                             f"{_shape(t)}{'' if not isinstance(t, Tensor) else ' ' + str(t.dtype)}")
    if train_features.shape[0] == 0:
        raise ValueError("knn_predict: no training features")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"knn_predict: test_features have {test_features.shape[1]} dims, train_features "
                         f"{train_features.shape[1]}")
    if not (isinstance(train_labels, Tensor) and train_labels.dim() == 1
            and train_labels.shape[0] == train_features.shape[0] and not train_labels.is_floating_point()
            and train_labels.dtype != torch.bool and (train_labels.numel() == 0 or int(train_labels.min()) >= 0)):
        raise ValueError(f"knn_predict: train_labels must be a 1-D integer tensor of one class index >= 0 per "
                         f"training feature ({train_features.shape[0]}), got {_shape(train_labels)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn_predict: k must be a positive int, got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"knn_predict: temperature must be a positive finite number, got {temperature!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"knn_predict: chunk must be a positive int, got {chunk!r}")
