"""Trunk + SwAV head in one module: what the trainer calls, and what ``seer.parallel.parallelize`` shards."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..model import VisionTransformer, ViTConfig
from .config import SwAVHeadConfig
from .head import SwAVHead


class SwAVOutput(NamedTuple):
    """One forward pass over V crops of B images (a NamedTuple, so FSDP sees every tensor in it).

    features: (V*B, d) trunk class tokens, crop-major. embeddings: (V*B, D) float32, unit rows.
    scores: V tensors (B, K) float32 (K/T columns each under tensor parallelism), in crop order.
    queue_scores: None, or one (Q, K) float32 tensor per queued assignment crop, scored by the current
    prototypes and detached (SwAV computes them without gradient).
    """
    features: Tensor
    embeddings: Tensor
    scores: list[Tensor]
    queue_scores: Optional[list[Tensor]]


class SwAVModel(nn.Module):
    """``backbone`` (a :class:`VisionTransformer`) followed by ``head`` (a :class:`SwAVHead`)."""

    def __init__(self, backbone: VisionTransformer, head: SwAVHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor], queue: Optional[Tensor] = None) -> SwAVOutput:
        """crops: V tensors (B, C, H_v, W_v) with the same B; queue: None or (A, Q, D) queued embeddings."""
        crops = list(crops)
        if not crops:
            raise ValueError("SwAVModel: expected a non-empty list of crops")
        batch = crops[0].shape[0]
        if any(c.shape[0] != batch for c in crops):
            raise ValueError(f"SwAVModel: every crop must hold the same images, got batch sizes "
                             f"{[c.shape[0] for c in crops]}")
        feats = self.backbone(crops)
        z = self.head.embed(feats)
        if queue is None:
            return SwAVOutput(feats, z, _per_crop(self.head.score(z), batch), None)
        # One prototype pass for batch and queue (one weight all-gather under FSDP); the queue's rows
        # are detached so they add nothing to the gradient.
        n_queue = queue.shape[0] * queue.shape[1]
        scores = self.head.score(torch.cat([z, queue.reshape(n_queue, -1).to(z.dtype)]))
        queue_scores = _per_crop(scores[z.shape[0]:].detach(), queue.shape[1])
        return SwAVOutput(feats, z, _per_crop(scores[:z.shape[0]], batch), queue_scores)


def _per_crop(scores: Tensor, rows: int) -> list[Tensor]:
    # Copies, not views: FSDP2 cannot keep its backward hooks on views of a module output if someone
    # modifies them in place, and warns on every step. (V*B, K) float32 is small next to the trunk.
    return [s.clone() for s in scores.split(rows)]


def build_swav_model(model: ViTConfig, head: SwAVHeadConfig, *,
                     device: Optional[Union[str, torch.device]] = None) -> SwAVModel:
    """Trunk + head from their configs, created on ``device`` ("meta": no memory; materialise after
    ``seer.parallel.parallelize`` with ``to_empty`` + ``seer.model.init_weights_(model, seed=...)`` +
    ``seer.swav.normalize_prototypes``). On a real device the weights are initialised (global RNG) and the
    prototypes are not yet normalised: call ``normalize_prototypes`` before the first step."""
    trunk = VisionTransformer(model, device=device)
    with torch.device(device if device is not None else torch.get_default_device()):
        return SwAVModel(trunk, SwAVHead(model.embed_dim, head))
