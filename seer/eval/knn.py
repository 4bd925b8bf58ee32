r"""Weighted k-nearest-neighbour classification on frozen features, as DINO's eval_knn.py (seer_spec.md 4.2).

Features are L2-normalised; for a test feature x the k training features with the largest cosine
similarity s_j vote for their class with weight exp(s_j / T):

    score(c) = sum_{j in top-k} exp(s_j / T) [y_j = c],     prediction = argmax_c score(c)

DINO reports k = 20, T = 0.07. The weights are computed as exp((s_j - max_j s_j) / T), the same vote up to a
factor per test feature, which cannot overflow at a small T. Test features are processed in chunks so memory
stays at chunk x N_train.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Predicted labels (N_test,) (module doc): always labels of the training features, which may be any
    integers >= 0 (sparse ids too: the vote holds one score per label present). ``num_classes``, where given,
    is only checked to cover the train labels."""
    _check(train_features, train_labels, test_features, k=k, temperature=temperature, chunk=chunk)
    k = min(k, train_features.shape[0])
    c = int(train_labels.max()) + 1
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < c:
            raise ValueError(f"knn_predict: num_classes must be an int >= the largest train label + 1 ({c}), got "
                             f"{num_classes!r}")
    device = test_features.device
    train = F.normalize(train_features.float(), dim=1).to(device)
    test = F.normalize(test_features.float(), dim=1)
    # The vote runs over the labels present, in increasing order (ties still go to the lowest label): one column
    # per label up to the largest was chunk x (max + 1) floats, the process killed for sparse ids such as 10^9.
    # (int64: scatter_add_ indexes with int64 only, uint8 and int16 failed)
    present, labels = torch.unique(train_labels.to(device, torch.int64), return_inverse=True)
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], present.shape[0], dtype=torch.float32, device=device)
        # exp((s_j - s_max) / T): the votes of a row scaled by one factor, which leaves its argmax; exp(s_j / T)
        # itself overflows float32 for s_j / T > 88 (T < 0.0113 near s = 1): classes tied at inf, the lowest won.
        votes.scatter_add_(1, labels[idx], ((top - top[:, :1]) / temperature).exp())
        preds.append(present[votes.argmax(1)])
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=device)


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
             k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    if not (isinstance(test_labels, Tensor) and test_labels.dim() == 1 and _is_index(test_labels)
            and test_labels.shape[0] == getattr(test_features, "shape", (None,))[0]):
        raise ValueError(f"knn_top1: test_labels must be a 1-D integer tensor of one class index >= 0 per test "
                         f"feature ({_shape(test_features)}), got {_shape(test_labels)}"
                         f"{' ' + str(test_labels.dtype) if isinstance(test_labels, Tensor) else ''}")
    if test_labels.numel() == 0:  # an accuracy of nothing is no number (it was a RuntimeError from max())
        raise ValueError("knn_top1: no test features")
    # (Classes beyond the largest train label get no votes: num_classes need not cover the test labels.)
    pred = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature)
    # Counted exactly: a float32 mean printed 20.000000298023224 for 1 in 5.
    return 100.0 * int((pred.cpu() == test_labels.cpu()).sum()) / test_labels.numel()


def _is_index(t: Tensor) -> bool:
    """An integer tensor of class indices >= 0 (bool and float labels are refused, not cast)."""
    return (not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
            and (t.numel() == 0 or int(t.min()) >= 0))


def _non_finite_rows(t: Tensor) -> int:
    """How many rows of a 2-D tensor hold a NaN or an inf."""
    return int((~torch.isfinite(t)).any(1).sum())


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check(train_features, train_labels, test_features, *, k, temperature, chunk) -> None:
    """Refuse what would otherwise vote wrongly without an error (k = 0 picks class 0 everywhere, T <= 0
    inverts or breaks the weights, surplus labels are ignored, one NaN training feature is every test
    feature's nearest neighbour and wins every vote) or fail deep inside torch."""
    for name, t in (("train_features", train_features), ("test_features", test_features)):
        if not (isinstance(t, Tensor) and t.dim() == 2 and t.is_floating_point()):
            raise ValueError(f"knn_predict: {name} must be a 2-D float tensor (N, D), got "
                             f"{_shape(t)}{'' if not isinstance(t, Tensor) else ' ' + str(t.dtype)}")
    for name, t in (("train_features", train_features), ("test_features", test_features)):
        bad = _non_finite_rows(t)
        if bad:
            raise ValueError(f"knn_predict: {name} has {bad} rows with NaN or inf (of {t.shape[0]}); drop them or "
                             f"find why the backbone overflows")
    if train_features.shape[0] == 0:
        raise ValueError("knn_predict: no training features")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"knn_predict: test_features have {test_features.shape[1]} dims, train_features "
                         f"{train_features.shape[1]}")
    if not (isinstance(train_labels, Tensor) and train_labels.dim() == 1
            and train_labels.shape[0] == train_features.shape[0] and _is_index(train_labels)):
        raise ValueError(f"knn_predict: train_labels must be a 1-D integer tensor of one class index >= 0 per "
                         f"training feature ({train_features.shape[0]}), got {_shape(train_labels)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn_predict: k must be a positive int, got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"knn_predict: temperature must be a positive finite number, got {temperature!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"knn_predict: chunk must be a positive int, got {chunk!r}")
