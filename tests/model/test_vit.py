"""The ViT trunk: presets, multi-resolution forward, an independent reference forward, meta-device 10B."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seer.model import PRESET_NAMES, UnknownPresetError, VisionTransformer, init_weights_, vit_preset
from seer.model.layers import LayerNorm
from seer.plan import count_parameters
from seer.swav import SwAVHead, SwAVModel, seer_head


def tiny(**kw) -> VisionTransformer:
    return VisionTransformer(vit_preset("tiny", **kw))


def reference_forward(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The ViT written out with plain ops from the model's weights (independent of seer's modules)."""
    cfg = model.cfg
    p, d, h = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    b = x.shape[0]
    tok = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
    gh, gw = tok.shape[-2:]
    tok = tok.flatten(2).transpose(1, 2)
    pos = model.pos_embed
    if (gh, gw) != (model.base_grid, model.base_grid):
        g = model.base_grid
        grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], 1)
    z = torch.cat([model.cls_token.expand(b, -1, -1), tok], 1) + pos
    for blk in model.blocks:
        y = F.layer_norm(z, (d,), blk.norm1.weight, blk.norm1.bias, cfg.norm_eps)
        w = blk.attn.qkv.weight
        bias = blk.attn.qkv.bias
        q, k, v = (F.linear(y, w[i * d:(i + 1) * d], bias[i * d:(i + 1) * d]) for i in range(3))
        q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        if cfg.qk_norm:
            q = F.layer_norm(q, (d // h,), blk.attn.q_norm.weight, blk.attn.q_norm.bias, cfg.norm_eps)
            k = F.layer_norm(k, (d // h,), blk.attn.k_norm.weight, blk.attn.k_norm.bias, cfg.norm_eps)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, -1, d), blk.attn.proj.weight, blk.attn.proj.bias)
        if cfg.layer_scale_init is not None:
            a = a * blk.ls1.gamma
        z = z + a
        y = F.layer_norm(z, (d,), blk.norm2.weight, blk.norm2.bias, cfg.norm_eps)
        y = F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        if cfg.layer_scale_init is not None:
            y = y * blk.ls2.gamma
        z = z + y
    return F.layer_norm(z, (d,), model.norm.weight, model.norm.bias, cfg.norm_eps)[:, 0]


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "layer_scale_init": 0.5}])
@pytest.mark.parametrize("size", [32, 16, 24])
def test_forward_matches_plain_reference(kw, size):
    model = tiny(**kw)
    with torch.no_grad():  # non-trivial norms and layer scales so that their parameters matter
        for name, prm in model.named_parameters():
            if "norm" in name or "gamma" in name:
                prm.add_(0.3 * torch.randn_like(prm))
    x = torch.randn(3, 3, size, size)
    torch.testing.assert_close(model(x), reference_forward(model, x), atol=2e-5, rtol=1e-4)


def test_multicrop_grouping_equals_per_crop_forward():
    model = tiny()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16),
             torch.randn(4, 3, 16, 16), torch.randn(4, 3, 32, 32)]
    out = model(crops)
    assert out.shape == (20, 64)
    torch.testing.assert_close(out, torch.cat([model(c) for c in crops]), atol=1e-5, rtol=1e-5)


def test_position_embedding_gets_gradient_from_every_resolution():
    model = tiny()
    out = model([torch.randn(2, 3, 16, 16)])
    (out * torch.randn_like(out)).sum().backward()  # (a plain sum of a LayerNorm output has no gradient)
    assert model.pos_embed.grad is not None and model.pos_embed.grad[0, 1:].abs().sum() > 0


@pytest.mark.parametrize("grid", [4, 7, 16])
def test_resampling_at_the_base_grid_is_the_identity_bit_for_bit(grid):
    """interpolate_pos_embed skips the base grid for plain sizes but resamples it for symbolic ones (a graph
    exported with a dynamic image size): both must give the same bits, forward and backward."""
    pos = torch.randn(1, 1 + grid * grid, 24, dtype=torch.float32, requires_grad=True)
    patch = pos[:, 1:].reshape(1, grid, grid, 24).permute(0, 3, 1, 2)
    same = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(same, patch)
    g = torch.randn_like(same)
    (grad,) = torch.autograd.grad(same, pos, g)
    (want,) = torch.autograd.grad(patch, pos, g)
    assert torch.equal(grad, want)


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"at least one patch\), got shape \(2, 3, 0, 32\)"):
        model(torch.randn(2, 3, 0, 32))  # (0 is a multiple of 8: it reached the convolution's own error)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="non-empty list"):
        model([])
    with pytest.raises(TypeError, match="argument 'x' must be floating-point images normalised"):
        model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))


def test_presets_and_unknown_names():
    for name in PRESET_NAMES:
        cfg = vit_preset(name)
        assert cfg.embed_dim % cfg.num_heads == 0
        assert cfg.mlp_dim == (6144 if name == "giant" else 4 * cfg.embed_dim)  # ViT-g's MLP is not 4 d
    ten = vit_preset("vit-10b")
    assert (ten.embed_dim, ten.depth, ten.num_heads, ten.mlp_dim, ten.patch_size) == (4096, 48, 32, 16384, 14)
    with pytest.raises(UnknownPresetError, match="did you mean 'vit-10b'"):
        vit_preset("vit10b")
    with pytest.raises(UnknownPresetError, match="did you mean 'giant'"):
        vit_preset("gaint")
    with pytest.raises(TypeError, match="did you mean 'depth'"):
        vit_preset("tiny", deph=3)


@pytest.mark.parametrize("kw, match", [({"num_heads": 5}, "embed_dim .* divisible by num_heads"),
                                       ({"img_size": 30}, "img_size .* multiple of patch_size"),
                                       ({"depth": 0}, "depth must be a positive integer"),
                                       ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
                                       ({"qk_norm": "yes"}, "qk_norm must be true or false"),
                                       ({"dropout": "0.1"}, "dropout must be a finite number"),
                                       ({"layer_scale_init": float("nan")}, "layer_scale_init must be a finite"),
                                       ({"norm_eps": None}, "norm_eps must be a finite number")])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(vit_preset("tiny", **kw))


def test_vit_10b_on_meta_device():
    model = VisionTransformer(vit_preset("vit-10b"), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert 9.6e9 <= n <= 9.8e9
    # seer_spec.md 3.3: 9,669,709,824 without QK-norm; QK-norm adds 2 x 2 x 128 per block.
    assert n == 9_669_709_824 + 48 * 512


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_planner_counts_match_meta_models(name):
    cfg = vit_preset(name)
    head_cfg = seer_head()
    model = SwAVModel(VisionTransformer(cfg, device="meta"), SwAVHead(cfg.embed_dim, head_cfg).to("meta"))
    counts = count_parameters(cfg, head_cfg)
    assert counts.trunk == sum(p.numel() for p in model.backbone.parameters())
    assert counts.head == sum(p.numel() for p in model.head.parameters())


def test_meta_then_seeded_init():
    cfg = vit_preset("tiny", layer_scale_init=1e-3)
    a = VisionTransformer(cfg, device="meta").to_empty(device="cpu")
    b = VisionTransformer(cfg, device="meta").to_empty(device="cpu")
    init_weights_(a, std=cfg.init_std, seed=7)
    init_weights_(b, std=cfg.init_std, seed=7)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    init_weights_(b, std=cfg.init_std, seed=8)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    w = a.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.003 and w.abs().max() <= 0.04 + 1e-6
    assert torch.all(a.blocks[0].norm1.weight == 1) and torch.all(a.blocks[0].ls1.gamma == 1e-3)
    assert torch.all(a.blocks[0].attn.qkv.bias == 0) and a.cls_token.abs().max() < 1e-4


def test_layer_norm_statistics_in_float32():
    ln = LayerNorm(512)
    with torch.no_grad():
        ln.weight.normal_()
    x = (torch.randn(4, 512) * 0.01 + 100).bfloat16()  # large mean, small spread: bf16 statistics would fail
    want = F.layer_norm(x.double(), (512,), ln.weight.double(), ln.bias.double(), ln.eps)
    out = ln(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, atol=0.05, rtol=0.02)


def test_drop_path_and_eval_mode():
    model = tiny(drop_path_rate=0.5)
    blk = model.blocks[1]
    assert blk.drop_path1.drop_prob == 0.5 and not hasattr(model.blocks[0].drop_path1, "drop_prob")
    x = torch.randn(256, 5, 64)
    branch = torch.ones_like(x)
    out = blk.drop_path1(branch)
    per_sample = out[:, 0, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # whole samples dropped, kept ones scaled 1/(1-p)
    assert torch.all(out == per_sample[:, None, None])
    assert 0.3 < (per_sample == 0).float().mean() < 0.7
    model.eval()
    assert torch.equal(blk.drop_path1(branch), branch)


def test_autocast_bf16_is_close_to_float32():
    model = tiny(qk_norm=True)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.autocast("cpu", torch.bfloat16):
        out = model(crops)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(crops), atol=0.1, rtol=0.05)


def test_layer_scale_computes_in_its_inputs_dtype():
    """A float32 gamma (no FSDP) made x * gamma float32 under autocast, and with it the residual stream of every
    later block: twice the activation memory and tensor-parallel traffic. gamma's gradient stays float32."""
    from seer.model.layers import LayerScale
    ls = LayerScale(8, 0.1)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = ls(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ls.gamma.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert ls(torch.ones(1, 8)).dtype == torch.float32  # float32 inputs: unchanged
