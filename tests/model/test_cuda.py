"""GPU checks (run by bench/gpu_check.sh): the bf16 training step on a GPU, and no host sync in LARS."""
from __future__ import annotations

import pytest
import torch

from seer.model import VisionTransformer, vit_preset
from seer.optim import build_lars
from seer.swav import SwAVHead, SwAVHeadConfig, SwAVModel, normalize_prototypes, swav_loss

pytestmark = pytest.mark.cuda


def _model(device):
    torch.manual_seed(0)
    with torch.device(device):
        model = SwAVModel(VisionTransformer(vit_preset("small", depth=2, img_size=64, qk_norm=True)),
                          SwAVHead(384, SwAVHeadConfig(hidden_dims=[256], output_dim=64, batch_norm=False,
                                                       num_prototypes=512)))
    normalize_prototypes(model)
    return model


def test_bf16_step_on_gpu_close_to_float32():
    model = _model("cuda")
    crops = [torch.randn(8, 3, 64, 64, device="cuda") for _ in range(2)] + \
        [torch.randn(8, 3, 32, 32, device="cuda") for _ in range(4)]
    with torch.autocast("cuda", torch.bfloat16):
        out = model(crops)
    assert out.features.dtype == torch.bfloat16 and out.scores[0].dtype == torch.float32
    loss = swav_loss(out.scores)
    loss.backward()
    ref = model(crops)
    assert torch.isfinite(loss) and abs(float(loss) - float(swav_loss(ref.scores))) < 0.05
    torch.testing.assert_close(out.features.float(), ref.features, atol=0.1, rtol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_lars_step_has_no_host_sync():
    model = _model("cuda")
    opt = build_lars(model, lr=0.5, weight_decay=1e-5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # first step creates the momentum buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
