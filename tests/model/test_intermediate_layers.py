"""VisionTransformer.get_intermediate_layers (DINOv2's method) against a plain loop over the blocks."""
import pytest
import torch

from seer.model import VisionTransformer, vit_preset


def deep_tiny() -> VisionTransformer:
    model = VisionTransformer(vit_preset("tiny", depth=4)).eval()
    with torch.no_grad():  # a non-trivial final norm, so that applying it or not shows
        model.norm.weight.add_(0.3 * torch.randn_like(model.norm.weight))
        model.norm.bias.add_(0.3 * torch.randn_like(model.norm.bias))
    return model


def block_outputs(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (B, 1 + L, D), by hand."""
    z, outs = model.norm_pre(model._embed(x)), []
    for block in model.blocks:
        z = block(z)
        outs.append(z)
    return outs


@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (8, 16)])  # the training size, interpolated, tiny
@pytest.mark.parametrize("n, idx", [(1, [3]), (3, [1, 2, 3]), ([0, 2], [0, 2]), ((3, 0), [3, 0])])
def test_equals_a_loop_over_the_blocks(hw, n, idx):
    model = deep_tiny()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        outs = block_outputs(model, x)
        got = model.get_intermediate_layers(x, n, return_class_token=True)
        raw = model.get_intermediate_layers(x, n, norm=False)
        maps = model.get_intermediate_layers(x, n, reshape=True)
    assert isinstance(got, tuple) and len(got) == len(idx) == len(raw) == len(maps)
    gh, gw = hw[0] // 8, hw[1] // 8
    for (patches, cls), plain, fmap, i in zip(got, raw, maps, idx):
        normed = model.norm(outs[i])
        assert patches.shape == (2, gh * gw, 64) and cls.shape == (2, 64) and fmap.shape == (2, 64, gh, gw)
        assert torch.equal(patches, normed[:, 1:]) and torch.equal(cls, normed[:, 0])
        assert torch.equal(plain, outs[i][:, 1:])
        # (B, D, h, w): the token of patch row r, column c at [:, :, r, c] (row-major patch order)
        assert torch.equal(fmap[:, :, gh - 1, 0], patches[:, (gh - 1) * gw])
        assert torch.equal(fmap.flatten(2).transpose(1, 2), patches)


def test_the_last_class_token_is_the_forward_output():
    model = deep_tiny()
    x = torch.randn(3, 3, 24, 40)
    with torch.no_grad():
        (patches, cls), = model.get_intermediate_layers(x, return_class_token=True)
        assert torch.equal(cls, model(x))
        assert torch.equal(patches, model.forward_features(x)[:, 1:])


def test_under_autocast():
    model = deep_tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.get_intermediate_layers(x, 2, return_class_token=True)
        with torch.autocast("cpu", torch.bfloat16):
            got = model.get_intermediate_layers(x, 2, return_class_token=True)
    for (p, c), (wp, wc) in zip(got, want):
        assert p.dtype == c.dtype == torch.bfloat16
        torch.testing.assert_close(c.float(), wc, atol=0.1, rtol=0.05)
        torch.testing.assert_close(p.float(), wp, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("n", [0, 5, -1, True, 2.0, [], [4], [-1], [1, 1], [0, True], "01", None])
def test_a_bad_n_is_named_with_the_depth(n):
    with pytest.raises(ValueError, match=r"argument 'n' .*depth 4"):
        deep_tiny().get_intermediate_layers(torch.randn(1, 3, 32, 32), n)


def test_bad_images():
    model = deep_tiny()
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model.get_intermediate_layers(torch.randn(1, 3, 30, 32))
    with pytest.raises(TypeError, match="floating-point images"):
        model.get_intermediate_layers(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
