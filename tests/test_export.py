"""seer.load_pretrained and the timm export: strict load into timm gives the same features."""
import json

import pytest
import torch

from seer import load_pretrained
from seer.config import apply_overrides, preset
from seer.export import export_timm, load_timm, timm_kwargs
from seer.train import Trainer

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # QK-norm and LayerScale exercise the optional timm layers too.
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=2", "model.qk_norm=true", "model.layer_scale_init=0.1",
                                           "train.threads=1"])
    Trainer(cfg, out).fit()
    return out


def test_load_pretrained_maps_images_to_class_token_features(run):
    model = load_pretrained(run)
    assert not model.training
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        f = model(x)
    assert f.shape == (5, 64) and torch.isfinite(f).all()
    with torch.no_grad():
        assert torch.equal(f, model.forward_features(x)[:, 0])


def test_export_loads_strictly_into_timm_with_the_same_features(run, tmp_path):
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    info = json.loads(js.read_text())
    assert info["timm_class"] == "timm.models.vision_transformer.VisionTransformer"
    assert info["kwargs"]["qk_norm"] is True and info["kwargs"]["init_values"] == 0.1
    timm_model = load_timm(st)  # strict=True inside: no missing or unexpected keys
    direct = timm.models.vision_transformer.VisionTransformer(**info["kwargs"])
    from safetensors.torch import load_file
    missing, unexpected = direct.load_state_dict(load_file(str(st)), strict=True)
    assert not missing and not unexpected
    ours = load_pretrained(run)
    for size in (32, 48):  # the training resolution and an interpolated position embedding
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(timm_model(x), ours(x), rtol=1e-5, atol=1e-5)
    reloaded = load_pretrained(st)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), ours(x))
    assert st.stat().st_mode & 0o777 == js.stat().st_mode & 0o777  # not safetensors' owner-only 0600


def test_missing_export_files_are_named(run, tmp_path):
    import pytest

    from seer.export import export_info
    with pytest.raises(FileNotFoundError, match="no such exported file"):
        export_info(tmp_path / "missing.safetensors")
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    js.unlink()
    with pytest.raises(FileNotFoundError, match=r"vit.json \(written by seer export next to the .safetensors\)"):
        load_pretrained(st)


def test_timm_kwargs_cover_the_architecture():
    kw = timm_kwargs(preset("demo").model)
    assert kw["embed_dim"] == 192 and kw["depth"] == 6 and kw["mlp_ratio"] == 4.0 and kw["num_classes"] == 0


@pytest.mark.parametrize("vit_kw", [dict(embed_dim=88, num_heads=2, mlp_dim=120),  # 88 * (120 / 88) -> 119
                                    dict(layer_scale_init=0.0)])  # timm: no LayerScale for a falsy init
def test_timm_rebuilds_awkward_configs_exactly(vit_kw):
    from seer.model import VisionTransformer, vit_preset
    cfg = vit_preset("tiny", **vit_kw)
    ours = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = timm.models.vision_transformer.VisionTransformer(**timm_kwargs(cfg)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_timm("unused", "vit.pt")
