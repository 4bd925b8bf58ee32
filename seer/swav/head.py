"""The SwAV projection head and prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SwAVHeadConfig


def validate_head_config(cfg: SwAVHeadConfig) -> None:
    dims = list(cfg.hidden_dims) + [cfg.output_dim, cfg.num_prototypes]
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"SwAVHeadConfig: hidden_dims, output_dim and num_prototypes must be positive "
                         f"integers, got hidden_dims={cfg.hidden_dims!r}, output_dim={cfg.output_dim!r}, "
                         f"num_prototypes={cfg.num_prototypes!r}")


class SwAVHead(nn.Module):
    """z = normalize(MLP(x)); scores = z C^T with C the (K, D) prototype matrix.

    MLP = [Linear (+ BatchNorm1d) + ReLU] per hidden width, then Linear to D (SwAV: 2048 -> BN/ReLU -> 128).
    The normalisation and the scores are computed in float32 even under bf16 autocast: scores are cosines
    that Sinkhorn divides by epsilon (0.03-0.05), and bf16's resolution of ~0.004 near 1 would become an
    error of ~0.1 in the exponent (seer_spec.md 1.5).
    """

    # seer.model.init_weights_ gives the head PyTorch's default Linear init, as SwAV's and VISSL's heads keep
    # (seer_spec.md 1.5), not the trunk's truncated normal.
    torch_default_init = True

    def __init__(self, in_dim: int, cfg: SwAVHeadConfig):
        super().__init__()
        validate_head_config(cfg)
        self.cfg = cfg
        dims = [in_dim, *cfg.hidden_dims, cfg.output_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
        self.projection = nn.Sequential(*layers)
        self.prototypes = nn.Linear(cfg.output_dim, cfg.num_prototypes, bias=False)

    def embed(self, x: Tensor) -> Tensor:
        """Trunk features (N, d) -> L2-normalised float32 embeddings (N, D)."""
        return F.normalize(self.projection(x).float(), dim=1)

    def score(self, z: Tensor) -> Tensor:
        """Embeddings (N, D) -> float32 prototype scores (N, K) (or this rank's K/T columns under TP)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.prototypes(z.float())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.embed(x)
        return z, self.score(z)
