"""kNN and linear-probe evaluation of a backbone, during pretraining (every ``eval.every`` steps) and after."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import DataConfig, EvalConfig
from .datasets import load_labelled
from .features import extract_features
from .knn import knn_top1
from .linear import linear_probe

log = logging.getLogger(__name__)


class Evaluator:
    """Loads the labelled data once; :meth:`evaluate` extracts features and scores them.

    Args:
        cfg: the ``eval`` section.
        image_size: evaluation image side (``eval.image_size`` or the global crop size).
        mean, std: the normalisation the backbone was trained with.
        device: where the backbone runs.
        group: data-parallel group the feature extraction is split over.
        compute: whether this process computes the scores (global rank 0); others only extract features.
        digits_size: side of the built-in digits.
        max_pixels: images with more pixels are skipped as unreadable (``data.max_image_pixels``: the
            decompression-bomb guard of training).
        max_bytes: image files of more bytes are skipped as unreadable, not read (``data.max_image_bytes``;
            0 = no limit).
    """

    def __init__(self, cfg: EvalConfig, *, image_size: int, mean, std, device: torch.device = torch.device("cpu"),
                 group: Optional[dist.ProcessGroup] = None, compute: bool = True, digits_size: int = 32,
                 autocast_dtype: Optional[torch.dtype] = None, max_pixels: int = DataConfig.max_image_pixels,
                 max_bytes: int = DataConfig.max_image_bytes):
        self.cfg = cfg
        self.image_size = cfg.image_size or image_size
        self.mean, self.std = list(mean), list(std)
        self.device, self.group, self.compute = device, group, compute
        self.autocast_dtype = autocast_dtype
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.splits = load_labelled(cfg.dataset, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed,
                                    digits_size=digits_size, max_images=cfg.max_images)

    def features(self, backbone: nn.Module):
        out = {}
        skipped = 0
        for name, split in self.splits.items():
            f, y, bad = extract_features(backbone, split, image_size=self.image_size, mean=self.mean, std=self.std,
                                         batch_size=self.cfg.batch_size, device=self.device, group=self.group,
                                         autocast_dtype=self.autocast_dtype, max_pixels=self.max_pixels,
                                         max_bytes=self.max_bytes)
            out[name] = (f, y)
            skipped += bad
        return out, skipped

    def evaluate(self, backbone: nn.Module, *, knn: Optional[bool] = None, linear: Optional[bool] = None) -> dict:
        """{'knn_top1', 'linear_top1' (percent, as enabled; with the probe 'linear_weight_decay' and
        'linear_converged'), 'n_train', 'n_test', 'skipped', 'seconds', and
        'non_finite' where images were dropped for NaN/inf features}; only on the computing process (others
        return {})."""
        t0 = time.perf_counter()
        knn = self.cfg.knn if knn is None else knn
        linear = self.cfg.linear if linear is None else linear
        feats, skipped = self.features(backbone)
        non_finite = 0
        for name, (f, y) in feats.items():  # every rank holds the gathered features: all raise alike
            # A NaN row is every test feature's nearest neighbour in the kNN (it won every vote) and makes the
            # probe's standardisation NaN for all: such images (an fp16 overflow, say) are dropped and counted.
            finite = torch.isfinite(f).all(1)
            dropped = int((~finite).sum())
            if dropped:
                log.warning("evaluation drops %d of the %d images of its %s split: the backbone gave them NaN or "
                            "inf features", dropped, f.shape[0], name)
                feats[name] = f, y = f[finite], y[finite]
                non_finite += dropped
            if f.shape[0] == 0:
                raise ValueError(f"eval.dataset {self.cfg.dataset!r}: every image of its {name} split "
                                 f"({len(self.splits[name])} files) is unreadable"
                                 f"{' or has NaN/inf features' if dropped else ''} (logged above); nothing to "
                                 f"evaluate")
        if not self.compute:
            return {}
        (ftr, ytr), (fte, yte) = feats["train"], feats["test"]
        out = {"n_train": int(ftr.shape[0]), "n_test": int(fte.shape[0]), "skipped": skipped}
        if non_finite:
            out["non_finite"] = non_finite
        if knn:
            out["knn_top1"] = knn_top1(ftr, ytr, fte, yte, k=self.cfg.knn_k, temperature=self.cfg.knn_temperature)
        if linear:
            probe = linear_probe(ftr, ytr, fte, yte, weight_decays=self.cfg.linear_weight_decays,
                                 max_iter=self.cfg.linear_max_iter)
            out["linear_top1"] = probe["top1"]
            out["linear_weight_decay"] = probe["weight_decay"]
            out["linear_converged"] = probe["converged"]  # (False: logged, the score may be below the optimum)
        out["seconds"] = time.perf_counter() - t0
        return out
