"""seer export --format onnx: onnxruntime gives the torch model's features at batch sizes other than the traced
one, the JSON describes the file, and a file that disagrees with torch is never kept."""
import contextlib
import copy
import io
import json
import shutil
import sys

import pytest
import torch

from seer import load_pretrained
from seer.cli import main
from seer.config import apply_overrides, from_dict, preset
from seer.export import export_timm
from seer.export_onnx import _to_onnx as real_to_onnx  # (before any test replaces it)
from seer.train import Trainer

onnx = pytest.importorskip("onnx")
onnxscript = pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # QK-norm and LayerScale: the optional layers go through the exporter too
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=2", "model.qk_norm=true", "model.layer_scale_init=0.1",
                                           "train.threads=1", "data.crops.mean=[0.5,0.4,0.3]"])
    Trainer(cfg, out).fit()
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """(the .onnx path, what the CLI printed) of one export through the CLI."""
    out = tmp_path_factory.mktemp("onnx") / "vit.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_onnxruntime_gives_the_torch_features_at_batch_1_and_3(run, exported):
    """Traced at batch 2: at 1 and 3 onnxruntime refused the file ("Expected: 2") while the batch was pinned."""
    path = exported[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    assert outp.name == "features" and isinstance(outp.shape[0], str) and outp.shape[1:] == [64]
    model = load_pretrained(run)
    for n in (1, 3):
        x = torch.randn(n, 3, 32, 32)
        got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        assert got.shape == (n, 64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    graph = onnx.load(str(path))
    # plain ONNX operators: no seer:: custom op (the triton/reference attention has no ONNX translation)
    assert {node.domain for node in graph.graph.node} <= {""}
    assert [(o.domain, o.version) for o in graph.opset_import if o.domain == ""] == [("", 18)]


def test_the_json_describes_the_file_and_the_run(run, exported):
    path = exported[0]
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["format"] == "onnx" and info["producer"] == "seer" and info["file"] == "vit.onnx"
    assert info["input"] == {"name": "images", "dtype": "float32", "shape": ["batch", 3, 32, 32]}
    assert info["output"] == {"name": "features", "dtype": "float32", "shape": ["batch", 64]}
    graph = onnx.load(str(path), load_external_data=False).graph  # the JSON's shapes are the graph's own
    for value, want in ((graph.input[0], info["input"]), (graph.output[0], info["output"])):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert (value.name, dims) == (want["name"], want["shape"])
    assert info["mean"] == [0.5, 0.4, 0.3] and info["image_size"] == 32 and info["features"] == "class token (N, D)"
    assert info["opset"] == 18 and info["external_data"] is None  # (0.4 MB: the weights in the .onnx)
    assert (info["onnx_version"], info["onnxscript_version"], info["onnxruntime_version"], info["torch_version"]) \
        == (onnx.__version__, onnxscript.__version__, ort.__version__, torch.__version__)
    check = info["verification"]
    assert check["batch_sizes"] == [1, 3] and 0 <= check["max_abs_diff"] <= check["tolerance"] < 1e-2
    saved = from_dict(info["seer_run_config"])
    assert saved.model.qk_norm and saved.train.max_steps == 2 and info["seer_vit_config"]["layer_scale_init"] == 0.1
    assert sorted(p.name for p in path.parent.iterdir()) == ["vit.json", "vit.onnx"]  # no .part files left
    (ckpt,) = (run / "checkpoints").glob("step_*")
    assert info["source"] == {"checkpoint": str(ckpt.resolve()), "step": 2}


def test_an_image_prepared_as_the_json_says_gives_seer_features_row(run, exported, tmp_path):
    """The JSON said "resized and centre-cropped to image_size": read so (a resize to 32), the features were
    not seer's, which resizes the shorter side to 8/7 of it first."""
    import re

    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from seer.eval import extract_image_features
    info = json.loads(exported[0].with_suffix(".json").read_text())
    text = info["preprocessing"]
    side = int(re.search(r"shorter side resized to (\d+) px \(bicubic, antialiased\)", text).group(1))
    crop = [int(v) for v in re.search(r"centre-cropped to (\d+) x (\d+)", text).groups()]
    assert side == 37 and crop == [info["image_size"]] * 2
    pixels = np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = TF.center_crop(TF.resize(torch.from_numpy(pixels).permute(2, 0, 1), [side], antialias=True,
                                 interpolation=TF.InterpolationMode.BICUBIC), crop).float() / 255
    x = (x - torch.tensor(info["mean"]).view(3, 1, 1)) / torch.tensor(info["std"]).view(3, 1, 1)
    got = ort.InferenceSession(str(exported[0])).run(["features"], {"images": x[None].numpy()})[0]
    crops = from_dict(info["seer_run_config"]).data.crops
    want = extract_image_features(load_pretrained(run), [str(tmp_path / "a.png")], image_size=info["image_size"],
                                  mean=crops.mean, std=crops.std).features
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    timm_json = export_timm(run, tmp_path / "vit.safetensors")[1]
    assert json.loads(timm_json.read_text())["preprocessing"] == text

def test_the_cli_prints_the_measured_difference(exported):
    path, printed = exported
    check = json.loads(path.with_suffix(".json").read_text())["verification"]
    assert printed == (f"wrote {path} and {path.with_suffix('.json')}; onnxruntime matches torch on random images "
                       f"(batch 1 and 3): max |diff| {check['max_abs_diff']:.2g}, tolerance "
                       f"{check['tolerance']:.2g}\n")


def test_out_is_checked_before_the_checkpoint_is_read(run, exported, tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    for fmt, out, match in (("onnx", "v.safetensors", "--out must end with .onnx for --format onnx"),
                            ("timm", "v.onnx", "--out must end with .safetensors for --format timm")):
        assert main(["export", "--checkpoint", missing, "--format", fmt, "--out", str(tmp_path / out)]) == 2
        assert match in capsys.readouterr().err
    # vit.onnx beside a timm export: both write vit.json, which the timm export needs; and the other way round
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    timm_json = js.read_text()
    assert main(["export", "--checkpoint", missing, "--format", "onnx", "--out", str(tmp_path / "vit.onnx")]) == 2
    assert "is the JSON of the timm export" in capsys.readouterr().err and js.read_text() == timm_json
    shutil.copy(exported[0].with_suffix(".json"), tmp_path / "o.json")
    assert main(["export", "--checkpoint", missing, "--format", "timm", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "is the JSON of the onnx export" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text('{"knn_top1": 80.9}')  # a run's own JSON
    assert main(["export", "--checkpoint", missing, "--format", "onnx", "--out", str(tmp_path / "eval.onnx")]) == 2
    assert "is not a JSON that seer export wrote" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx*"))


def test_a_file_at_out_that_no_export_wrote_is_never_replaced(run, exported, tmp_path, capsys):
    """A vit.onnx (or vit.safetensors) without an export's JSON beside it is the user's: refused, kept (it was
    replaced without a word). An export's own file without its JSON (killed between the two renames; marked
    producer=seer in its metadata) is replaced, as an earlier export with its JSON is."""
    missing = str(tmp_path / "no-such-run")
    for name, fmt in (("mine.onnx", "onnx"), ("mine.safetensors", "timm"), ("timm.onnx", "onnx"),
                      ("onnx.safetensors", "timm")):
        path = tmp_path / name
        if name.startswith("timm"):  # a seer export of the other format under this name: not this format's
            shutil.copy(export_timm(run, tmp_path / "t" / "v.safetensors")[0], path)
        elif name.startswith("onnx"):
            shutil.copy(exported[0], path)
        else:
            path.write_bytes(b"precious \x08\x07 bytes")
        before = path.read_bytes()
        assert main(["export", "--checkpoint", missing, "--format", fmt, "--out", str(path)]) == 2
        assert "exists and is not a file that seer export wrote" in capsys.readouterr().err
        assert path.read_bytes() == before
    assert dict((p.key, p.value) for p in onnx.load(str(exported[0])).metadata_props)["producer"] == "seer"
    orphan = tmp_path / "o" / "vit.onnx"
    orphan.parent.mkdir()
    shutil.copy(exported[0], orphan)  # no vit.json beside it
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(orphan)]) == 0
    assert sorted(p.name for p in orphan.parent.iterdir()) == ["vit.json", "vit.onnx"]


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_package_is_one_line(run, tmp_path, monkeypatch, capsys, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "v.onnx")]) == 1
    assert capsys.readouterr().err == (f"seer export: error: seer export --format onnx needs {package}, which is not "
                                       f"installed (pip install {package}, or the 'onnx' extra: pip install "
                                       f"--no-build-isolation \".[onnx]\")\n")
    assert not list(tmp_path.iterdir())


def _off_by_one_percent(model, size, dynamic_size=False):
    """The graph of a model whose final norm is 1% off: features that differ from the model's."""
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.norm.weight.mul_(1.01)
    return real_to_onnx(wrong, size)


def _batch_fixed_at_2(model, size, dynamic_size=False):
    """What the export gave while the attention dispatcher pinned the batch: a graph for 2 images only."""
    return torch.onnx.export(model, (torch.randn(2, 3, size, size),), dynamo=True, input_names=["images"],
                             output_names=["features"], opset_version=18, verbose=False)


@pytest.mark.parametrize("wrong_graph,message", [
    (_off_by_one_percent, "the exported ONNX model disagrees with the torch model: max |onnxruntime - torch| = "),
    (_batch_fixed_at_2, "onnxruntime cannot run the exported ONNX model on 1 images of 32 x 32 (traced on 2 of 32 x 32): "),
])
def test_an_export_that_onnxruntime_does_not_run_as_torch_is_not_kept(run, exported, tmp_path, monkeypatch,
                                                                       capsys, wrong_graph, message):
    """Refused by the check in onnxruntime: one line, no new file, the earlier export at that path untouched;
    a correct export then replaces it."""
    import seer.export_onnx as export_onnx
    old = tmp_path / "vit.onnx"
    shutil.copy(exported[0], old)
    shutil.copy(exported[0].with_suffix(".json"), old.with_suffix(".json"))
    before = (old.read_bytes(), old.with_suffix(".json").read_text())
    monkeypatch.setattr(export_onnx, "_to_onnx", wrong_graph)
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(old)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seer export: error: " + message) and err.endswith("; nothing was written\n")
    assert err.count("\n") == 1
    assert (old.read_bytes(), old.with_suffix(".json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.onnx"]
    monkeypatch.undo()
    done = export_onnx.export_onnx(run, old)  # its own earlier JSON: replaced
    assert done.max_abs_diff <= done.tolerance and json.loads(done.json.read_text())["format"] == "onnx"


def test_python_api_checks_its_arguments(tmp_path):
    from seer.export_onnx import export_onnx_model
    from seer.model import VisionTransformer
    cfg = preset("tiny")
    model = VisionTransformer(cfg.model)
    with pytest.raises(ValueError, match="must be in eval mode, float32, on the CPU"):
        export_onnx_model(model, tmp_path / "v.onnx", cfg)  # (built in training mode)
    with pytest.raises(ValueError, match="describes another architecture"):
        export_onnx_model(model.eval(), tmp_path / "v.onnx", apply_overrides(cfg, ["model.depth=3"]))
    with pytest.raises(TypeError, match="argument 'model' must be a seer VisionTransformer"):
        export_onnx_model(torch.nn.Linear(2, 2), tmp_path / "v.onnx", cfg)
    with pytest.raises(TypeError, match="argument 'external_data' must be True, False or None"):
        export_onnx_model(model.eval(), tmp_path / "v.onnx", cfg, external_data="yes")
    # (above protobuf's 2 GiB the weights go to OUT.onnx.data: test_export_onnx_external.py)
    assert not list(tmp_path.iterdir())


def test_dynamic_size_runs_at_any_multiple_of_the_patch_size_as_the_torch_model(run, tmp_path, capsys):
    """--onnx-dynamic-size: the position embedding is resampled in the graph (ONNX Resize, cubic, antialiased)
    as the torch model resamples it; the export is verified at other sizes than the traced one, so a graph
    whose size was fixed while tracing is never kept."""
    out = tmp_path / "vit.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out),
                 "--onnx-dynamic-size"]) == 0
    assert "and other image sizes" in capsys.readouterr().out
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["input"]["shape"] == ["batch", 3, "height", "width"] and info["input"]["multiple_of"] == 8
    assert info["dynamic_size"] is True and info["image_size"] == 32 and info["patch_size"] == 8
    assert info["verification"]["image_sizes"] == [[32, 32], [16, 16], [40, 56]]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_pretrained(run)
    for hw in ((8, 8), (24, 72), (32, 32), (64, 40)):  # smaller, larger, not square, the base grid
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # A fixed-size export keeps its size (and the flag is for onnx only)
    fixed = tmp_path / "fixed.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(fixed)]) == 0
    assert json.loads(fixed.with_suffix(".json").read_text())["dynamic_size"] is False
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"]).run(
            ["features"], {"images": torch.randn(1, 3, 40, 40).numpy()})
    assert main(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(tmp_path / "v.safetensors"),
                 "--onnx-dynamic-size"]) == 2
    assert "--onnx-dynamic-size is for --format onnx" in capsys.readouterr().err


def test_dynamic_size_verification_refuses_a_graph_of_one_size(run, tmp_path, monkeypatch):
    """A graph traced with the size fixed (what the position embedding's base-grid shortcut did under
    torch.export before it was skipped for symbolic sizes): onnxruntime cannot run it at the other sizes."""
    from seer import export_onnx
    monkeypatch.setattr(export_onnx, "_to_onnx", lambda model, size, dynamic_size=False: real_to_onnx(model, size))
    with pytest.raises(export_onnx.ExportMismatchError, match=r"cannot run the exported ONNX model on 1 images of "
                                                              r"16 x 16 \(traced on 2 of 32 x 32\)"):
        export_onnx.export_onnx(run, tmp_path / "vit.onnx", dynamic_size=True)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="argument 'dynamic_size' must be True or False"):
        export_onnx.export_onnx(run, tmp_path / "vit.onnx", dynamic_size="yes")
