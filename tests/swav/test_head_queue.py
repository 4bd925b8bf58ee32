"""The SwAV head, prototype renormalisation and freezing, the queue."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from seer.model import VisionTransformer, vit_preset
from seer.optim import LARS
from seer.swav import (PrototypeFreezer, SwAVHead, SwAVHeadConfig, SwAVModel, SwAVQueue, normalize_prototypes,
                       seer_head, swav_loss)


def small_model(**head_kw) -> SwAVModel:
    cfg = SwAVHeadConfig(**{"hidden_dims": [32], "output_dim": 16, "num_prototypes": 30, **head_kw})
    return SwAVModel(VisionTransformer(vit_preset("tiny")), SwAVHead(64, cfg))


def crops(b=4):
    return [torch.randn(b, 3, 32, 32), torch.randn(b, 3, 32, 32), torch.randn(b, 3, 16, 16)]


def test_head_layouts():
    swav = SwAVHead(2048, SwAVHeadConfig())
    assert [type(m) for m in swav.projection] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert swav.projection[0].out_features == 2048 and swav.projection[3].out_features == 128
    assert swav.prototypes.weight.shape == (3000, 128) and swav.prototypes.bias is None
    seer = SwAVHead(4096, seer_head())
    assert [type(m) for m in seer.projection] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.out_features for m in seer.projection if isinstance(m, nn.Linear)] == [8192, 8192, 256]
    assert seer.prototypes.weight.shape == (16000, 256)  # regnet10B.yaml: num_prototypes [16000]
    with pytest.raises(ValueError, match="num_prototypes"):
        SwAVHead(8, SwAVHeadConfig(num_prototypes=0))


def test_embeddings_unit_norm_and_float32_scores_under_autocast():
    model = small_model()
    normalize_prototypes(model)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(crops())
    assert out.features.dtype == torch.bfloat16
    assert out.embeddings.dtype == torch.float32 and out.scores[0].dtype == torch.float32
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(12))
    assert len(out.scores) == 3 and out.scores[0].shape == (4, 30)
    want = out.embeddings @ model.head.prototypes.weight.t()  # float32 product, bit for bit the same op
    torch.testing.assert_close(torch.cat(out.scores), want, atol=1e-6, rtol=1e-6)
    assert out.scores[0].abs().max() <= 1 + 1e-5  # cosines


def test_normalize_prototypes():
    model = small_model()
    with torch.no_grad():
        model.head.prototypes.weight.mul_(torch.rand(30, 1) * 5)
    normalize_prototypes(model)
    torch.testing.assert_close(model.head.prototypes.weight.norm(dim=1), torch.ones(30))
    with pytest.raises(ValueError, match="no SwAVHead"):
        normalize_prototypes(nn.Linear(2, 2))


def test_freezer_drops_prototype_gradients_for_n_steps():
    model = small_model()
    normalize_prototypes(model)
    freezer = PrototypeFreezer(model, iterations=2)
    opt = LARS(model.parameters(), lr=0.5)
    proto = model.head.prototypes.weight
    for step in range(3):
        before = proto.detach().clone()
        swav_loss(model(crops()).scores).backward()
        assert proto.grad is not None
        frozen = freezer.after_backward()
        assert frozen == (step < 2) and (proto.grad is None) == frozen
        opt.step()
        assert torch.equal(proto, before) == frozen
        assert ("momentum_buffer" in opt.state[proto]) == (not frozen)
        opt.zero_grad()
        normalize_prototypes(model)
    resumed = PrototypeFreezer(model, iterations=2)
    resumed.load_state_dict(freezer.state_dict())
    assert resumed.step == 3 and not resumed.frozen


def test_queue_fifo_rounding_and_state():
    with pytest.raises(ValueError, match="smaller than the global batch 8"):
        SwAVQueue(5, 4, batch_size=4, world_size=2)
    q = SwAVQueue(21, 4, batch_size=4, world_size=2, start_epoch=1)
    assert q.length == 16 and q.local_length == 8  # rounded down to a multiple of 4 x 2
    emb = [torch.full((12, 4), float(i)) for i in range(4)]  # 3 crops x 4 images
    for e in emb:
        e[4:8] += 0.5  # crop 1 rows differ from crop 0 rows
    q.push(emb[0], epoch=0)
    assert q.queue is None and q.embeddings() is None  # before start_epoch
    q.push(emb[1], epoch=1)
    assert q.embeddings() is None  # not full yet
    q.push(emb[2], epoch=1)
    queued = q.embeddings()
    assert queued.shape == (2, 8, 4)
    assert torch.equal(queued[0, :4], emb[2][:4]) and torch.equal(queued[0, 4:], emb[1][:4])
    assert torch.equal(queued[1, :4], emb[2][4:8])
    saved = q.state_dict()
    q.push(emb[3], epoch=1)  # the oldest block (emb[1]) leaves
    assert torch.equal(q.embeddings()[0, 4:], emb[2][:4])
    r = SwAVQueue(21, 4, batch_size=4, world_size=2, start_epoch=1)
    r.load_state_dict(saved)
    assert torch.equal(r.embeddings(), queued) and r.filled == 8
    with pytest.raises(ValueError, match="queue length, batch size"):
        SwAVQueue(32, 4, batch_size=4, world_size=2).load_state_dict(saved)
    # Another number of assignment crops (loss.crops_for_assign) on resume: the saved queue holds 2 crops'
    # rows, this one pushes and scores 1; it loaded and failed at a later step with a torch.cat size error.
    with pytest.raises(ValueError, match=r"2 assignment crops.*this one 1.*loss.crops_for_assign"):
        SwAVQueue(21, 4, batch_size=4, world_size=2, crops_for_assign=(0,)).load_state_dict(saved)


def test_model_scores_the_queue_with_current_prototypes_without_gradient():
    model = small_model()
    normalize_prototypes(model)
    queue = torch.nn.functional.normalize(torch.randn(2, 8, 16), dim=2)
    out = model(crops(), queue)
    assert len(out.queue_scores) == 2 and out.queue_scores[0].shape == (8, 30)
    assert not out.queue_scores[0].requires_grad
    torch.testing.assert_close(out.queue_scores[1], queue[1] @ model.head.prototypes.weight.t())
    plain = model(crops())
    assert len(plain.scores) == 3 and plain.queue_scores is None
    loss = swav_loss(out.scores, queue_scores=out.queue_scores)
    loss.backward()
    assert torch.isfinite(loss)


def test_model_rejects_ragged_batches():
    with pytest.raises(ValueError, match="same images"):
        small_model()([torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)])


def test_head_gets_pytorch_default_init_and_the_trunk_timm_init():
    """seer_spec.md 1.5: SwAV's head keeps PyTorch's default Linear init (then the prototypes are renormalised);
    the trunk keeps the ViT's truncated normal. Under tensor parallelism the bound uses the whole layer's
    fan-in."""
    from seer.model import init_weights_
    from seer.model.init import _full_fan_in
    from seer.parallel.layers import RowParallelLinear
    model = SwAVModel(VisionTransformer(vit_preset("tiny")),
                      SwAVHead(64, SwAVHeadConfig(hidden_dims=[512], output_dim=256, batch_norm=False,
                                                  num_prototypes=4000)))
    init_weights_(model, std=0.02, seed=3)
    for layer, fan_in in ((model.head.projection[0], 64), (model.head.projection[2], 512),
                          (model.head.prototypes, 256)):
        bound = fan_in ** -0.5
        w = layer.weight.detach()
        assert float(w.abs().max()) <= bound and abs(float(w.std()) - bound / 3 ** 0.5) < 0.05 * bound
    assert abs(float(model.backbone.blocks[0].mlp.fc1.weight.detach().std()) - 0.02 * 0.88) < 0.003  # trunc. N(0, .02)
    row = RowParallelLinear(torch.nn.Parameter(torch.empty(8, 16)), None, group=None, tp_rank=0, tp_size=4)
    assert _full_fan_in(row) == 64 and _full_fan_in(model.head.prototypes) == 256
