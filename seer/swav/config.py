"""SwAV configs: the projection head with its prototypes, and the loss with its queue and freezing.

Plain typed dataclasses whose defaults are SwAV's ImageNet values (seer_spec.md section 1); ``seer_head``
gives SEER's head. Lists (not tuples) so that YAML round-trips them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SwAVHeadConfig:
    """Projection MLP then L2 normalisation then prototypes (a bias-free Linear, rows kept unit-norm).

    Attributes:
        hidden_dims: widths of the hidden layers (each Linear [+ BatchNorm] + ReLU); [] = one Linear.
        output_dim: embedding dimension D after the last Linear.
        batch_norm: BatchNorm1d after each hidden Linear (SwAV's ResNet head; SEER heads have none).
        num_prototypes: K.
    """
    hidden_dims: list[int] = field(default_factory=lambda: [2048])
    output_dim: int = 128
    batch_norm: bool = True
    num_prototypes: int = 3000


def seer_head() -> SwAVHeadConfig:
    """SEER's head: 3-layer MLP without BatchNorm (trunk -> 8192 -> 8192 -> 256), 16000 prototypes
    ("proto16k", regnet10B.yaml's num_prototypes [16000]; seer_spec.md 2.4). 16000 splits evenly over tensor
    parallelism up to 128 ranks."""
    return SwAVHeadConfig(hidden_dims=[8192, 8192], output_dim=256, batch_norm=False, num_prototypes=16000)


@dataclass
class SwAVLossConfig:
    """Swapped prediction, codes by Sinkhorn-Knopp, queue and prototype freezing.

    Attributes:
        crops_for_assign: crops whose codes are computed (the global crops).
        temperature: tau of softmax(scores / tau).
        epsilon: Sinkhorn entropy regularisation (SEER-10B: 0.03).
        sinkhorn_iterations: Sinkhorn iterations (SEER: 10).
        freeze_prototypes_iters: optimizer steps during which the prototypes get no update (313 = one
            ImageNet epoch at batch 4096).
        queue_length: queued embeddings over all data-parallel ranks (0 = no queue); rounded down to a
            multiple of the global batch, as SwAV does.
        queue_start_epoch: epoch at which the queue starts filling; it is used once full.
    """
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_iters: int = 313
    queue_length: int = 0
    queue_start_epoch: int = 15


def seer_loss() -> SwAVLossConfig:
    """SEER-10B's loss settings: epsilon 0.03, 10 Sinkhorn iterations, no queue."""
    return dataclasses.replace(SwAVLossConfig(), epsilon=0.03, sinkhorn_iterations=10)
