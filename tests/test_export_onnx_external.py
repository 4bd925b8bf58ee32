"""seer export --format onnx with the weights as ONNX external data (OUT.onnx.data): the .onnx names the data
by its final file name, onnxruntime runs the pair, and no replacement, failure or crash ever pairs a .onnx
with another export's data or replaces a data file that seer did not write."""
import json
import os
import shutil

import pytest
import torch

from seer.cli import main
from seer.config import apply_overrides, preset
from seer.model import VisionTransformer, vit_preset
from seer.train import Trainer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import seer.export_onnx as export_onnx  # noqa: E402  (after the packages it needs are known to be there)
from seer.export_onnx import ExportMismatchError, export_onnx_model, uses_external_data  # noqa: E402

CFG = apply_overrides(preset("tiny"), ["model.qk_norm=true", "model.layer_scale_init=0.1", "train.threads=1"])


_TRACED: dict = {}


@pytest.fixture(autouse=True)
def _trace_each_model_once():
    """torch.onnx's trace of a model, once per set of weights (most of an export's time at this size): later
    exports of the same weights get a fresh copy of it (each export edits its metadata). Its own MonkeyPatch:
    a test's ``monkeypatch.undo()`` (after the kill it stages) must not take the cache away with its own
    patches, as it did (23 traces of 3 s for 2 sets of weights)."""
    from types import SimpleNamespace

    from onnxscript import ir
    real = export_onnx._to_onnx

    def traced(model, size, dynamic_size=False):
        key = (size, dynamic_size, tuple(float(p.detach().double().sum()) for p in model.parameters()))
        if key not in _TRACED:
            _TRACED[key] = ir.to_proto(real(model, size, dynamic_size).model).SerializeToString()
        proto = onnx.ModelProto()
        proto.ParseFromString(_TRACED[key])
        return SimpleNamespace(model=ir.from_proto(proto))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_onnx, "_to_onnx", traced)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(apply_overrides(CFG, ["train.max_steps=1"]), out).fit()
    return out


def _model(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(CFG.model).eval()


def _features(onnx_path, x):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])


def _assert_runs_as(onnx_path, model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(_features(onnx_path, x), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def _locations(onnx_path) -> set:
    """The data file names that the .onnx's initializers give (read without their data)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {entry.value for t in graph.initializer for entry in t.external_data if entry.key == "location"}


def _names(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_forced_external_data_is_named_by_its_final_name_and_runs_from_any_folder(tmp_path):
    model = _model(0)
    out = tmp_path / "vit.onnx"
    done = export_onnx_model(model, out, CFG, external_data=True)
    data = tmp_path / "vit.onnx.data"
    assert done.external_data == data and done.max_abs_diff <= done.tolerance
    assert _names(tmp_path) == ["vit.json", "vit.onnx", "vit.onnx.data"]  # no scratch folder left
    # the name in place, never the scratch folder's or a .part name
    assert _locations(out) == {"vit.onnx.data"}
    graph = onnx.load(str(out), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    lengths = sum(int(dict((e.key, e.value) for e in t.external_data)["length"]) for t in external)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert 0.95 * weights <= lengths <= data.stat().st_size  # the weights are in the data file, not the .onnx
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta == {"producer": "seer", "external_data": "vit.onnx.data"}
    assert json.loads(done.json.read_text())["external_data"] == "vit.onnx.data"
    _assert_runs_as(out, model)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("vit.onnx", "vit.onnx.data"):
        shutil.copy(tmp_path / name, moved / name)
    _assert_runs_as(moved / "vit.onnx", model)  # the two files go together, by the relative name


def test_reexport_replaces_both_files_and_an_inline_export_removes_the_old_data(tmp_path):
    out, data = tmp_path / "vit.onnx", tmp_path / "vit.onnx.data"
    export_onnx_model(_model(0), out, CFG, external_data=True)
    first = data.read_bytes()
    second_model = _model(1)
    export_onnx_model(second_model, out, CFG, external_data=True)
    assert data.read_bytes() != first and _names(tmp_path) == ["vit.json", "vit.onnx", "vit.onnx.data"]
    _assert_runs_as(out, second_model)
    inline = _model(2)
    done = export_onnx_model(inline, out, CFG, external_data=False)
    assert done.external_data is None and json.loads(done.json.read_text())["external_data"] is None
    assert _names(tmp_path) == ["vit.json", "vit.onnx"] and _locations(out) == set()  # the stale data removed
    _assert_runs_as(out, inline)
    export_onnx_model(second_model, out, CFG, external_data=True)
    _assert_runs_as(out, second_model)


def test_a_data_file_that_no_seer_export_names_is_never_replaced(tmp_path):
    out, data = tmp_path / "vit.onnx", tmp_path / "vit.onnx.data"
    precious = b"precious \x08\x07 bytes"
    data.write_bytes(precious)  # alone: a user's file (or the data of an export killed between its renames)
    for external in (True, False, None):  # (an inline export would remove it: refused all the same)
        with pytest.raises(ValueError, match="'.*vit.onnx.data' exists and is not the external data of the seer "
                                             "export at '.*vit.onnx'.*remove it or choose another --out"):
            export_onnx_model(_model(0), out, CFG, external_data=external)
    assert _names(tmp_path) == ["vit.onnx.data"] and data.read_bytes() == precious
    # beside an inline seer export (its JSON: external_data null)
    data.unlink()
    export_onnx_model(_model(0), out, CFG)
    before = out.read_bytes()
    data.write_bytes(precious)
    with pytest.raises(ValueError, match="is not the external data of the seer export"):
        export_onnx_model(_model(1), out, CFG, external_data=True)
    assert out.read_bytes() == before and data.read_bytes() == precious
    # torch.onnx's own export with external data: vit.onnx is not seer's (nor is its data)
    other = tmp_path / "torch"
    other.mkdir()
    torch.onnx.export(_model(0), (torch.randn(2, 3, 32, 32),), str(other / "vit.onnx"), dynamo=True,
                      external_data=True)
    assert _names(other) == ["vit.onnx", "vit.onnx.data"]  # (torch.onnx names the data as seer does)
    (other / "vit.onnx").write_bytes((other / "vit.onnx").read_bytes().replace(b"producer", b"produced"))
    saved = {name: (other / name).read_bytes() for name in _names(other)}
    with pytest.raises(ValueError, match="exists and is not a file that seer export wrote"):
        export_onnx_model(_model(1), other / "vit.onnx", CFG, external_data=True)
    assert {name: (other / name).read_bytes() for name in _names(other)} == saved


def test_a_failed_check_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    out = tmp_path / "vit.onnx"
    export_onnx_model(_model(0), out, CFG, external_data=True)
    saved = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)}

    def mismatch(path, model, size, dynamic_size=False):
        external = _locations(path) == {"vit.onnx.data"}  # (final names, in the scratch folder)
        assert path.parent != tmp_path and _names(path.parent) == ["vit.onnx", "vit.onnx.data"][:1 + external]
        raise ExportMismatchError("no; nothing was written")

    monkeypatch.setattr(export_onnx, "verify", mismatch)
    for external in (True, False):
        with pytest.raises(ExportMismatchError, match="no; nothing was written"):
            export_onnx_model(_model(1), out, CFG, external_data=external)
        assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == saved


def _stopped_at_rename(monkeypatch, folder, k, export) -> None:
    """Run ``export()`` stopped (KeyboardInterrupt) at its k-th rename into ``folder``."""
    replace, calls = os.replace, []

    def killed(src, dst):
        if os.path.dirname(dst) == str(folder):  # (not onnx_ir's own rename inside the scratch folder)
            calls.append(dst)
            if len(calls) == k:
                raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export()
    monkeypatch.undo()


@pytest.mark.parametrize("killed_at", [1, 2, 3])
def test_a_kill_between_the_renames_never_pairs_files_of_two_exports(tmp_path, monkeypatch, killed_at):
    """The renames into place: the data, the .onnx, the JSON (the old JSON and the old .onnx removed first).
    Killed before the k-th, what is left is a lone data file beside the scratch folder, whose .onnx names it
    (so the next export replaces it; without the scratch folder it is refused by name: seer cannot tell it
    from a user's), or the new pair without its JSON (replaced by the next export), never a .onnx beside
    another export's data."""
    out, data = tmp_path / "vit.onnx", tmp_path / "vit.onnx.data"
    old, new = _model(0), _model(1)
    export_onnx_model(old, out, CFG, external_data=True)
    old_data = data.read_bytes()
    _stopped_at_rename(monkeypatch, tmp_path, killed_at, lambda: export_onnx_model(new, out, CFG, external_data=True))
    if killed_at < 3:
        assert _names(tmp_path) == ["vit.onnx.data", "vit.onnx.part"]
        assert (data.read_bytes() == old_data) == (killed_at == 1)
        kept = {name: (tmp_path / name).read_bytes() for name in ("vit.onnx.data",)}
        # the scratch folder's .onnx is the evidence: without it the lone file is refused, untouched
        shutil.move(tmp_path / "vit.onnx.part", tmp_path.parent / f"aside-{killed_at}")
        with pytest.raises(ValueError, match="is not the external data of the seer export"):
            export_onnx_model(new, out, CFG, external_data=True)
        assert _names(tmp_path) == ["vit.onnx.data"] and data.read_bytes() == kept["vit.onnx.data"]
        # nor does a scratch .onnx that names no such file (an inline export's) vouch for it
        inline = tmp_path.parent / f"inline-{killed_at}"
        inline.mkdir()
        export_onnx_model(new, inline / "vit.onnx", CFG, external_data=False)
        (tmp_path / "vit.onnx.part").mkdir()
        shutil.copy(inline / "vit.onnx", tmp_path / "vit.onnx.part" / "vit.onnx")
        with pytest.raises(ValueError, match="is not the external data of the seer export"):
            export_onnx_model(new, out, CFG, external_data=True)
        shutil.rmtree(tmp_path / "vit.onnx.part")
        shutil.move(tmp_path.parent / f"aside-{killed_at}", tmp_path / "vit.onnx.part")
        export_onnx_model(new, out, CFG, external_data=True)  # replaces it
        assert _names(tmp_path) == ["vit.json", "vit.onnx", "vit.onnx.data"]
        _assert_runs_as(out, new)
    else:
        assert _names(tmp_path) == ["vit.onnx", "vit.onnx.data"] and data.read_bytes() != old_data
        _assert_runs_as(out, new)
    export_onnx_model(old, out, CFG, external_data=True)
    assert _names(tmp_path) == ["vit.json", "vit.onnx", "vit.onnx.data"]
    _assert_runs_as(out, old)


def test_the_weights_go_to_external_data_above_the_limit(tmp_path, monkeypatch):
    """Automatic by size (None): the tiny model's 0.4 MB under a limit of 100 kB; False refused there."""
    assert not uses_external_data(vit_preset("large"))  # 304M parameters, 1.1 GiB: one file
    assert uses_external_data(vit_preset("huge")) and uses_external_data(vit_preset("large"), True)
    with pytest.raises(ValueError, match=r"631M parameters, 2.3 GiB in float32: one .onnx file holds at most "
                                         r"2 GiB \(protobuf\), so external_data=False cannot be written"):
        uses_external_data(vit_preset("huge"), False)
    with pytest.raises(TypeError, match="argument 'external_data' must be True, False or None"):
        uses_external_data(vit_preset("tiny"), 1)
    small = tmp_path / "small" / "vit.onnx"
    assert export_onnx_model(_model(0), small, CFG).external_data is None
    assert _names(small.parent) == ["vit.json", "vit.onnx"]
    monkeypatch.setattr(export_onnx, "MAX_WEIGHT_BYTES", 100_000)
    model, large = _model(0), tmp_path / "large" / "vit.onnx"
    with pytest.raises(ValueError, match="external_data=False cannot be written"):
        export_onnx_model(model, large, CFG, external_data=False)
    assert not large.parent.exists()
    done = export_onnx_model(model, large, CFG)
    assert done.external_data == large.with_name("vit.onnx.data") and _locations(large) == {"vit.onnx.data"}
    _assert_runs_as(large, model)


def test_the_cli_flag(run, tmp_path, capsys):
    out = tmp_path / "e" / "vit.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out),
                 "--onnx-external-data"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (its weights in {out}.data) and "
                                              f"{out.with_suffix('.json')}; onnxruntime matches torch")
    assert _names(out.parent) == ["vit.json", "vit.onnx", "vit.onnx.data"]
    assert main(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(tmp_path / "v.safetensors"),
                 "--onnx-external-data"]) == 2
    assert "--onnx-external-data is for --format onnx" in capsys.readouterr().err



def test_a_checkpoint_too_large_for_one_file_is_refused_before_its_tensors_are_read(run, tmp_path, monkeypatch):
    """external_data=False where the weights pass the limit: from the run's config alone."""
    import seer.pretrained

    def unread(*args, **kwargs):
        raise AssertionError("the checkpoint's tensors were read")

    monkeypatch.setattr(export_onnx, "MAX_WEIGHT_BYTES", 100_000)
    monkeypatch.setattr(seer.pretrained, "checkpoint_backbone_state", unread)
    with pytest.raises(ValueError, match=r"0M parameters, 0.0 GiB in float32: .* external_data=False cannot"):
        export_onnx.export_onnx(run, tmp_path / "vit.onnx", external_data=False)
    with pytest.raises(TypeError, match="argument 'external_data' must be True, False or None"):
        export_onnx.export_onnx(run, tmp_path / "vit.onnx", external_data="no")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("external", [False, True])
def test_an_inline_export_killed_over_an_external_one_is_replaced_by_the_next(tmp_path, monkeypatch, killed_at,
                                                                              external):
    """An inline export (no data file) replacing an export with external data removes the old data file as it
    renames: killed at any of its steps, what it leaves is never a lone data file that nothing vouches for (its
    scratch .onnx names none), so the next export, inline or not, replaces it instead of refusing it as a
    user's file."""
    out = tmp_path / "vit.onnx"
    old, new = _model(0), _model(1)
    export_onnx_model(old, out, CFG, external_data=True)
    replace, unlink, calls = os.replace, type(out).unlink, []

    def step(dst):
        if os.path.dirname(dst) == str(tmp_path) and not str(dst).endswith((".part", ".lock")):
            calls.append(dst)
            if len(calls) == killed_at:
                raise KeyboardInterrupt

    def killed_replace(src, dst):
        step(dst)
        return replace(src, dst)

    def killed_unlink(self, missing_ok=False):
        step(self)
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", killed_replace)
    monkeypatch.setattr(type(out), "unlink", killed_unlink)
    with pytest.raises(KeyboardInterrupt):
        export_onnx_model(new, out, CFG, external_data=False)
    monkeypatch.undo()
    # (the old JSON, the old data, the old .onnx removed; the new .onnx, its JSON renamed)
    assert [os.path.basename(c) for c in calls] == ["vit.json", "vit.onnx.data", "vit.onnx", "vit.onnx",
                                                    "vit.json"][:killed_at]
    export_onnx_model(new, out, CFG, external_data=external)
    assert _names(tmp_path) == ["vit.json", "vit.onnx"] + (["vit.onnx.data"] if external else [])
    _assert_runs_as(out, new)


@pytest.mark.parametrize("killed_at", [1, 2])
def test_an_export_stopped_while_writing_after_one_stopped_between_its_renames_leaves_no_lone_data(
        tmp_path, monkeypatch, killed_at):
    """An export killed between its renames leaves a data file alone, vouched for by its scratch folder's .onnx.
    The next export removes that scratch folder before it writes its own: stopped while writing (Ctrl-C in
    the trace, a failed verification), it must not leave the data file alone without that evidence, which
    the export after it would refuse as a user's file."""
    out = tmp_path / "vit.onnx"
    old, new = _model(0), _model(1)
    export_onnx_model(old, out, CFG, external_data=True)
    _stopped_at_rename(monkeypatch, tmp_path, killed_at, lambda: export_onnx_model(new, out, CFG, external_data=True))
    assert _names(tmp_path) == ["vit.onnx.data", "vit.onnx.part"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_onnx, "_to_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx_model(new, out, CFG, external_data=True)
    monkeypatch.undo()
    assert "vit.onnx.data" not in _names(tmp_path) or "vit.onnx.part" in _names(tmp_path)
    export_onnx_model(new, out, CFG, external_data=True)
    assert _names(tmp_path) == ["vit.json", "vit.onnx", "vit.onnx.data"]
    _assert_runs_as(out, new)
