"""``seer.eval.attention_maps`` and ``seer attention-maps``: the class token's attention probabilities equal a
float64 softmax built by hand from the block's weights; the CLI writes one PNG and one NPY per readable image."""
import io
import logging

import numpy as np
import pytest
import torch

from seer.cli import main
from seer.eval import attention_maps
from seer.eval.attention_images import png_bytes
from seer.eval.datasets import load_image, preprocess
from seer.eval.extract import image_paths
from seer.model import VisionTransformer, vit_preset
from seer.pretrained import checkpoint_config, load_pretrained
from tests.eval.runs import tiny_run_with_images


def tiny_vit(qk_norm: bool) -> VisionTransformer:
    """ViT tiny (depth 2, 4 heads of 16, patch 8) with every parameter perturbed: peaked, not uniform,
    attention, and non-trivial norm weights and biases (the qk-norm's included)."""
    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset("tiny", qk_norm=qk_norm))
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return vit


def layer_norm64(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight.double() + bias.double()


def reference(vit: VisionTransformer, images: torch.Tensor, layer: int) -> torch.Tensor:
    """The full (B, heads, N, N) attention matrix of block ``layer`` in float64, from its weights."""
    with torch.no_grad():
        if layer == 0:
            x = vit._embed(images)
        else:
            patches, cls = vit.get_intermediate_layers(images, [layer - 1], norm=False, return_class_token=True)[0]
            x = torch.cat([cls[:, None], patches], 1)
    block, cfg = vit.blocks[layer], vit.cfg
    d, heads = cfg.embed_dim, cfg.num_heads
    hd = d // heads
    h = layer_norm64(x.double(), block.norm1.weight, block.norm1.bias, cfg.norm_eps)
    w, b = block.attn.qkv.weight.detach().double(), block.attn.qkv.bias.detach().double()
    q = (h @ w[:d].T + b[:d]).unflatten(-1, (heads, hd)).transpose(1, 2)  # (B, heads, N, hd)
    k = (h @ w[d:2 * d].T + b[d:2 * d]).unflatten(-1, (heads, hd)).transpose(1, 2)
    if cfg.qk_norm:
        q = layer_norm64(q, block.attn.q_norm.weight.detach(), block.attn.q_norm.bias.detach(), cfg.norm_eps)
        k = layer_norm64(k, block.attn.k_norm.weight.detach(), block.attn.k_norm.bias.detach(), cfg.norm_eps)
    return torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_maps_are_the_class_rows_of_a_float64_attention_matrix(qk_norm, layer):
    vit = tiny_vit(qk_norm)
    images = torch.randn(3, 3, 32, 32)
    maps = attention_maps(vit, images, layer=layer)
    assert maps.dtype == torch.float32 and maps.device.type == "cpu" and maps.shape == (3, 4, 4, 4)
    full = reference(vit, images, layer % 2)
    want = full[:, :, 0, 1:].reshape(3, 4, 4, 4)
    assert want.amax() > 0.1  # peaked: a wrong scale or head split would show
    torch.testing.assert_close(maps.double(), want, rtol=1e-4, atol=1e-6)
    # With the class token's own column, each row sums to 1.
    sums = maps.double().sum((-2, -1))
    assert (sums <= 1 + 1e-6).all()
    torch.testing.assert_close(sums, 1 - full[:, :, 0, 0], rtol=0, atol=1e-5)


def test_non_square_images_and_the_mode_restored():
    vit = tiny_vit(False).train()
    images = torch.randn(2, 3, 24, 40)
    maps = attention_maps(vit, images, layer=1)
    assert maps.shape == (2, 4, 3, 5) and vit.training
    torch.testing.assert_close(maps.double(), reference(vit.eval(), images, 1)[:, :, 0, 1:].reshape(2, 4, 3, 5),
                               rtol=1e-4, atol=1e-6)


def test_under_autocast_the_scores_of_the_kernels_inputs_are_not_rounded(monkeypatch):
    """Under bf16 autocast the block gives the kernel bf16 q and k, whose scores it forms in float32; the maps
    are the float32 softmax of those same q and k, not of scores rounded to bf16 by an autocast matmul."""
    import seer.model.layers as layers
    vit = tiny_vit(True).eval()
    images = torch.randn(2, 3, 32, 32)
    seen, kernel = [], layers.seer_kernels.attention
    monkeypatch.setattr(layers.seer_kernels, "attention",
                        lambda q, k, v, **kw: seen.append((q, k)) or kernel(q, k, v, **kw))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        vit.forward_features(images)
        q, k = seen[-1]  # (the last block's)
        maps = attention_maps(vit, images)
    assert q.dtype == torch.bfloat16
    scores = q.double()[:, :, :1] @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    want = scores.softmax(-1)[:, :, 0, 1:].reshape(2, 4, 4, 4)
    torch.testing.assert_close(maps.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", [2, -3, True, 1.0, "0"])
def test_a_bad_layer_is_named(layer):
    with pytest.raises(ValueError, match=r"argument 'layer' must be an integer in \[-2, 2\)"):
        attention_maps(tiny_vit(False), torch.randn(1, 3, 32, 32), layer=layer)


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (3, 32, 32), (1, 1, 32, 32), (0, 3, 32, 32)])
def test_bad_images_are_named(shape):
    with pytest.raises(ValueError, match="argument 'images'"):
        attention_maps(tiny_vit(False), torch.randn(shape))


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return im.size  # (width, height)


def test_png_writer_round_trips():
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(png_bytes(rgb))) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), rgb)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step tiny run and 3 images + 1 corrupt one (:func:`tests.eval.runs.tiny_run_with_images`)."""
    return tiny_run_with_images(tmp_path_factory.mktemp("attention"), 3)


def attention_cli(run, out, *extra):
    return main(["attention-maps", "--checkpoint", str(run / "run"), "--images", str(run / "images"), "--out",
                 str(out), "--device", "cpu", *extra])


def test_cli_writes_a_png_and_an_npy_per_readable_image(run, capsys, caplog):
    out = run / "maps"
    with caplog.at_level(logging.WARNING):
        assert attention_cli(run, out) == 0
    paths = image_paths(run / "images")
    broken = paths.index(str(run / "images" / "part1" / "broken.jpg"))
    assert f"skipping unreadable image {paths[broken]}" in caplog.text
    said = capsys.readouterr().out
    assert "3 images (--layer 1: block 2 of 2, 4 heads, 32 px, cpu, fp32), 1 unreadable skipped" in said
    names = [f"{i}_{p.rsplit('/', 1)[1].rsplit('.', 1)[0]}" for i, p in enumerate(paths) if i != broken]
    assert sorted(f.name for f in out.iterdir()) == sorted([n + ".npy" for n in names] + [n + ".png" for n in names])
    crops = checkpoint_config(run / "run").data.crops
    mean, std = torch.tensor(crops.mean).view(3, 1, 1), torch.tensor(crops.std).view(3, 1, 1)
    vit = load_pretrained(run / "run")
    for i, name in zip([i for i in range(len(paths)) if i != broken], names):
        maps = np.load(out / f"{name}.npy")
        assert maps.shape == (4, 4, 4) and maps.dtype == np.float32
        want = attention_maps(vit, preprocess(load_image(paths[i]), 32, mean, std)[None])[0]
        np.testing.assert_allclose(maps, want.numpy(), rtol=1e-5, atol=1e-7)
        assert png_size((out / f"{name}.png").read_bytes()) == (32 * (4 + 2), 32)


def test_cli_image_size_layer_and_a_non_empty_out(run, capsys):
    out = run / "maps40"
    assert attention_cli(run, out, "--image-size", "40", "--layer", "0") == 0
    first = sorted(out.glob("*.npy"))[0]
    assert np.load(first).shape == (4, 5, 5)
    assert png_size(first.with_suffix(".png").read_bytes()) == (40 * 6, 40)
    (out / "mine.txt").write_text("keep me")
    assert attention_cli(run, out) == 2
    assert "is not empty" in capsys.readouterr().err
    assert attention_cli(run, out, "--overwrite") == 0  # replaces its own files, leaves the others
    assert np.load(first).shape == (4, 4, 4) and (out / "mine.txt").read_text() == "keep me"
    for extra, fragment in ((["--layer", "2"], "--layer must be an integer in [-2, 2)"),
                            (["--image-size", "30"], "--image-size must be a positive multiple of the patch size 8")):
        assert attention_cli(run, run / "other", *extra) == 2
        assert fragment in capsys.readouterr().err


def test_cli_batches_and_precision(run, capsys):
    """--batch-size images per forward pass give each image's own maps (the default of 16 holds all 3 here:
    one image a pass is the reference); --precision bf16 runs the blocks under autocast, the maps within
    bf16's rounding of fp32's; a batch size below 1 is refused."""
    one, bf16 = run / "maps_b1", run / "maps_bf16"
    assert attention_cli(run, one, "--batch-size", "1") == 0
    assert attention_cli(run, bf16, "--precision", "bf16") == 0
    assert ", cpu, bf16), 1 unreadable skipped" in capsys.readouterr().out
    full = run / "maps"
    if not full.exists():
        assert attention_cli(run, full) == 0
    names = sorted(p.name for p in one.glob("*.npy"))
    assert len(names) == 3 and names == sorted(p.name for p in full.glob("*.npy"))
    for name in names:
        np.testing.assert_allclose(np.load(full / name), np.load(one / name), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.load(bf16 / name), np.load(one / name), rtol=0, atol=2e-3)
        assert not np.array_equal(np.load(bf16 / name), np.load(one / name))
    assert attention_cli(run, run / "other", "--batch-size", "0") == 2
    assert "--batch-size must be a positive integer, got 0" in capsys.readouterr().err
    from seer.eval.attention_images import save_attention_maps
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=rf"argument 'batch_size' must be a positive integer, got {bad!r}"):
            save_attention_maps(load_pretrained(run / "run"), [], str(run / "other"), image_size=32, mean=[0.5] * 3,
                                std=[0.25] * 3, batch_size=bad)


def test_maps_that_are_not_finite_are_warned(run, tmp_path, caplog):
    """A diverged checkpoint's NaN maps: the NPY holds them, the PNG draws black tiles; the warning says so."""
    from seer.eval.attention_images import save_attention_maps
    vit = load_pretrained(run / "run")
    with torch.no_grad():
        vit.blocks[-1].norm1.weight.fill_(float("nan"))
    paths = [p for p in image_paths(run / "images") if not p.endswith("broken.jpg")][:1]
    with caplog.at_level(logging.WARNING):
        done = save_attention_maps(vit, paths, str(tmp_path / "maps"), image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    assert len(done.written) == 1 and np.isnan(np.load(tmp_path / "maps" / f"{done.written[0]}.npy")).all()
    assert "are not finite (NaN or inf: a diverged checkpoint?)" in caplog.text
