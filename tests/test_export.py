"""seer.load_pretrained and the timm export: strict load into timm gives the same features."""
import json
import os

import pytest
import torch

from seer import load_pretrained
from seer.config import apply_overrides, preset
from seer.export import export_timm, load_timm, read_export, timm_kwargs
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
    (ckpt,) = (run / "checkpoints").glob("step_*")  # where the weights come from, resolved
    assert info["source"] == {"checkpoint": str(ckpt.resolve()), "step": int(ckpt.name.split("_")[1])}
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


def test_damaged_or_foreign_exports_are_named(run, tmp_path):
    """Each was a raw traceback (SafetensorError, a size-mismatch RuntimeError, a TypeError, a KeyError)."""
    from seer.cli import main
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    info = json.loads(js.read_text())
    cases = {
        "header.safetensors": (lambda p: p.write_bytes(b"\xff" * 64), None,
                               "not a safetensors file that seer can read"),
        "other.safetensors": (None, dict(info, seer_vit_config=dict(info["seer_vit_config"], embed_dim=64,
                                                                      num_heads=2)),
                              "its tensors do not fit the ViT that other.json describes"),
        "newer.safetensors": (None, dict(info, seer_vit_config=dict(info["seer_vit_config"], rope=True)),
                              "'seer_vit_config' is not a seer ViT config"),
        "foreign.safetensors": (None, {"kwargs": info["kwargs"]}, "not the JSON that seer export writes "
                                                                  "\\(no 'seer_vit_config', 'mean'"),
    }
    for name, (write, meta, match) in cases.items():
        path = tmp_path / name
        write(path) if write else path.write_bytes(st.read_bytes())
        path.with_suffix(".json").write_text(json.dumps(meta if meta is not None else info))
        with pytest.raises(ValueError, match=match):
            load_pretrained(path)
        assert main(["eval", "knn", "--checkpoint", str(path), "--set", "eval.max_images=10"]) == 2, name


def test_a_flipped_bit_in_an_export_is_named_not_loaded(run, tmp_path):
    """safetensors has no checksum: a flipped bit in a weight loaded without an error (checkpoints' shards are
    CRC-checked); the JSON records the file's CRC32 and every reader checks it."""
    from seer.export import CRC_KEY, iter_export_state
    from seer.train.checkpoint import file_crc32
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    info = json.loads(js.read_text())
    assert info[CRC_KEY] == file_crc32(st)
    want = {k: v.clone() for k, v in load_pretrained(st).state_dict().items()}
    data = bytearray(st.read_bytes())
    data[-5] ^= 0x10  # a bit of the last tensor's bytes
    st.write_bytes(bytes(data))
    for read in (load_pretrained, read_export, load_timm, lambda p: list(iter_export_state(p))):
        with pytest.raises(ValueError, match="its bytes changed since seer export wrote it"):
            read(st)
    del info[CRC_KEY]  # an export written before the checksum: loads as it did (the flip unseen)
    js.write_text(json.dumps(info))
    got = load_pretrained(st).state_dict()
    assert sum(not torch.equal(got[k], want[k]) for k in want) == 1


def test_export_checks_out_before_reading_and_keeps_the_runs_config(run, tmp_path, capsys):
    from seer.cli import main
    from seer.config import from_dict
    (tmp_path / "dir.safetensors").mkdir()
    for out, match in ((tmp_path / "dir.safetensors", "is a folder"), (tmp_path / "v.pt", "must end with "
                                                                                             ".safetensors")):
        assert main(["export", "--checkpoint", str(tmp_path / "no-such-run"), "--format", "timm", "--out",
                     str(out)]) == 2  # refused before the (missing) checkpoint is read
        assert match in capsys.readouterr().err
    if os.access("/proc", os.W_OK):  # root: the check passes, the write fails: one line naming the path
        assert main(["export", "--checkpoint", str(run), "--format", "timm", "--out", "/proc/v.safetensors"]) == 2
        err = capsys.readouterr().err
        assert "/proc/v.safetensors.part" in err and "Traceback" not in err
    st, js = export_timm(run, tmp_path / "deep" / "er" / "vit.safetensors")
    saved = from_dict(json.loads(js.read_text())["seer_run_config"])
    assert saved.model.qk_norm and saved.train.max_steps == 2  # the run's own config, evaluation settings too
    # --random-init of the export is the run's initialisation (its seed), as of the run's checkpoint
    results = []
    for ckpt in (run, st):
        assert main(["eval", "knn", "--checkpoint", str(ckpt), "--random-init", "--set", "eval.max_images=60"]) == 0
        results.append(json.loads(capsys.readouterr().out)["knn_top1"])
    assert results[0] == results[1]
    old = dict(json.loads(js.read_text()))
    del old["seer_run_config"]  # an export written before it was kept
    js.write_text(json.dumps(old))
    assert main(["eval", "knn", "--checkpoint", str(st), "--random-init"]) == 2
    assert "does not record the run's seed" in capsys.readouterr().err


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


def test_a_failed_export_never_pairs_new_weights_with_the_old_json(run, tmp_path, monkeypatch):
    """Overwriting an export wrote the weights in place, then the JSON: a failure in between (a full disk, a
    kill) left the new weights beside the replaced export's JSON, which loaded without an error."""
    import os
    from pathlib import Path
    other = tmp_path / "other"
    # the same architecture as ``run``'s: a mismatched pair loads without an error
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1", "train.seed=5",
                                           "model.qk_norm=true", "model.layer_scale_init=0.1",
                                           "data.crops.mean=[0.1,0.2,0.3]"])
    Trainer(cfg, other).fit()
    st, js = export_timm(run, tmp_path / "e" / "vit.safetensors")
    old_json, x = js.read_text(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        old = load_pretrained(st)(x)
    write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if ".json" in self.name:
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_timm(other, st)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(load_pretrained(st)(x), old) and js.read_text() == old_json  # the old export, whole
    assert sorted(p.name for p in st.parent.iterdir()) == ["vit.json", "vit.safetensors"]  # no parts left
    # killed between the two renames: weights without a JSON, refused by name, never a mismatched pair
    replace, calls = os.replace, []

    def killed(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export_timm(other, st)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="vit.json"):
        load_pretrained(st)
    export_timm(other, st)  # and a complete export replaces both
    assert json.loads(js.read_text())["mean"] == [0.1, 0.2, 0.3]
    with torch.no_grad():
        assert torch.equal(load_pretrained(st)(x), load_pretrained(other)(x))


def test_a_model_that_timm_cannot_build_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch):
    import seer.pretrained
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1", "model.norm_eps=1e-5"])
    Trainer(cfg, tmp_path / "run").fit()

    def no_read(*args, **kwargs):
        raise AssertionError("the checkpoint's tensors were read")

    monkeypatch.setattr(seer.pretrained, "load_tensors", no_read)
    with pytest.raises(ValueError, match="model.norm_eps=1e-05: timm's VisionTransformer uses LayerNorm eps 1e-6"):
        export_timm(tmp_path / "run", tmp_path / "vit.safetensors")
    assert not (tmp_path / "vit.safetensors").exists()


def test_export_never_overwrites_a_json_it_did_not_write(run, tmp_path, capsys):
    from seer.cli import main
    mine = tmp_path / "eval.json"  # --out next to a run's eval.json: the export's JSON would replace it
    mine.write_text('{"knn_top1": 80.9}')
    for text in ('{"knn_top1": 80.9}', "not json", '{"seer_vit_config": {}}'):
        mine.write_text(text)
        assert main(["export", "--checkpoint", str(run), "--format", "timm", "--out",
                     str(tmp_path / "eval.safetensors")]) == 2
        assert "is not a JSON that seer export wrote" in capsys.readouterr().err
        assert mine.read_text() == text and not (tmp_path / "eval.safetensors").exists()
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    first = js.read_text()
    export_timm(run, st)  # its own JSON: exporting again replaces it
    assert js.read_text() == first


def test_eval_json_never_replaces_the_checkpoint_or_export_it_reads(run, tmp_path, capsys):
    """seer eval writes --json in place: naming a file of a checkpoint folder (its meta.json: the checkpoint no
    longer loaded) or the export it evaluates (its JSON: the export no longer loaded) replaced it. Refused
    before the evaluation, the files left as they were; a --json beside them is written."""
    from seer.cli import main
    from seer.train.checkpoint import resolve_checkpoint
    st, js = export_timm(run, tmp_path / "vit.safetensors")
    ckpt = resolve_checkpoint(run)
    for checkpoint, target, said in ((run, ckpt / "meta.json", "is in the checkpoint folder"),
                                     (st, ckpt / "meta.json", "is in the checkpoint folder"),
                                     (run, ckpt / "knn.json", "is in the checkpoint folder"),
                                     (st, js, "the export that --checkpoint reads"),
                                     (st, tmp_path / "." / "vit.safetensors", "the export that --checkpoint reads")):
        before = {p: p.read_bytes() for p in (ckpt / "meta.json", st, js)}
        assert main(["eval", "knn", "--checkpoint", str(checkpoint), "--json", str(target)]) == 2
        assert said in capsys.readouterr().err
        assert {p: p.read_bytes() for p in before} == before and not (ckpt / "knn.json").exists()
    assert main(["eval", "knn", "--checkpoint", str(st), "--set", "eval.max_images=50", "--json",
                 str(tmp_path / "knn.json")]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())["protocol"] == "knn"


def test_a_second_export_to_the_same_out_is_refused_while_one_runs(run, tmp_path, monkeypatch, capsys):
    """Two exports on one --out removed each other's scratch folder and could rename one's weights in beside
    the other's JSON: the second is refused (one line, status 2), the first one's work untouched."""
    import seer.export as export
    from seer.cli import main
    out = tmp_path / "vit.safetensors"
    real, seen = export._write_scratch, {}

    def meanwhile(out_, json_path, scratch, write, side):  # the first export, holding its lock
        seen["status"] = main(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(out)])
        return real(out_, json_path, scratch, write, side)

    monkeypatch.setattr(export, "_write_scratch", meanwhile)
    # (the lock is per open file: a second process is refused the same way, as test_features_stream shows)
    export_timm(run, out)
    assert seen["status"] == 2
    assert f"--out '{out}' is being written by another seer export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.safetensors"]  # lock file removed
    assert read_export(out)[1].keys()  # the first export, whole


def test_a_checkpoint_pruned_while_the_export_reads_it_is_said_so(run, tmp_path, monkeypatch):
    """The export reads the checkpoint that was the run's latest when it began; the run, still training, may
    prune it meanwhile: that is said, not reported as a damaged checkpoint to move away."""
    import shutil

    import seer.pretrained as P
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    real = P.load_tensors

    def pruned(ckpt, dest, **kw):
        shutil.rmtree(ckpt)  # (the run saved a newer one and pruned this one)
        return real(ckpt, dest, **kw)

    monkeypatch.setattr(P, "load_tensors", pruned)
    with pytest.raises(FileNotFoundError, match=r"step_\d+ was removed while it was read \(its run pruned it"):
        export_timm(copy, tmp_path / "vit.safetensors")
    assert not (tmp_path / "vit.safetensors").exists() and not (tmp_path / "vit.json").exists()


def test_the_export_holds_one_group_of_tensors_at_a_time(run, tmp_path, monkeypatch):
    """The tensors are read and written a block at a time (ViT-10B: 40 GB of float32 weights, which
    save_file copied once more): each group read is let go before the next one is read, and the file holds
    the checkpoint's backbone exactly."""
    import weakref

    import seer.pretrained as P
    from safetensors import safe_open
    from safetensors.torch import load_file
    real, held, groups = P._read_group, [], []

    def watched(*args, **kwargs):
        assert all(r() is None for r in held), "a group was read while an earlier one was still held"
        group = real(*args, **kwargs)
        groups.append(sorted(group))
        held.extend(weakref.ref(t) for t in group.values())
        return group

    monkeypatch.setattr(P, "_read_group", watched)
    st, _ = export_timm(run, tmp_path / "vit.safetensors")
    assert len(groups) == 3  # (the tiny model: the tensors outside its 2 blocks, then a block each)
    monkeypatch.undo()
    whole = P.checkpoint_backbone_state(run)[1]
    got = load_file(str(st))
    assert got.keys() == whole.keys() and all(torch.equal(got[k], v) and got[k].dtype == v.dtype
                                              for k, v in whole.items())
    with safe_open(str(st), "pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "seer", "layout": "timm"}


def test_a_damaged_checkpoint_is_refused_before_the_export_touches_anything(run, tmp_path, monkeypatch):
    """The tensors are read while the file is written (a group at a time), but their checksums are checked
    first: a damaged checkpoint fails before any output file or folder exists, as when the export read the
    whole backbone first; and the folders an export made for --out go again when it fails."""
    import shutil

    import seer.safetensors_stream as S
    from seer.train import CorruptCheckpointError
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shard = sorted(next((copy / "checkpoints").glob("step_*")).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    out = tmp_path / "new" / "deeper" / "vit.safetensors"
    with pytest.raises(CorruptCheckpointError, match="ChecksumMismatch"):
        export_timm(copy, out)
    assert not (tmp_path / "new").exists()

    def full(*args, **kwargs):  # a failure while writing: a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "write_safetensors", full)
    with pytest.raises(OSError, match="No space left"):
        export_timm(run, out)
    assert not (tmp_path / "new").exists()


def test_sigterm_during_an_export_leaves_nothing_behind(run, tmp_path):
    """SIGTERM (a scheduler's time limit, timeout(1)) while the weights are written: the export stops as on
    Ctrl-C (one line, status 143) and removes its scratch folder, its lock file and the folder it made for
    --out. Left to SIGTERM's default action, OUT.part/, OUT.part.lock and the new folder stayed behind."""
    import signal
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "new" / "vit.safetensors"
    code = f"""
import os, signal, sys
import seer.safetensors_stream as stream
from seer.cli import main
real = stream.write_safetensors
def write(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
stream.write_safetensors = write
sys.exit(main(["export", "--checkpoint", {str(run)!r}, "--format", "timm", "--out", {str(out)!r}]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.endswith("seer export: terminated (SIGTERM)\n"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_seer_eval_records_the_step_it_scored(run, tmp_path, capsys):
    """seer eval's result named the --checkpoint as given ('runs/x', whose latest checkpoint moves on while the
    run trains) but not the step it scored, which the run's own eval.json and eval_history record: the step of
    the checkpoint read, of the checkpoint an export was made from, 0 at the random initialisation."""
    from seer.cli import main
    st, _ = export_timm(run, tmp_path / "vit.safetensors")
    for checkpoint, extra, step in ((run, [], 2), (st, [], 2), (st, ["--random-init"], 0)):
        out = tmp_path / "knn.json"
        assert main(["eval", "knn", "--checkpoint", str(checkpoint), "--set", "eval.max_images=30", "--json",
                     str(out), *extra]) == 0
        assert json.loads(out.read_text())["step"] == step
        assert json.loads(capsys.readouterr().out)["step"] == step


def test_exporting_an_export_is_refused_as_what_it_is(run, tmp_path, capsys):
    """--checkpoint of an export (a timm .safetensors to convert to ONNX, say) said 'no complete checkpoint at
    ...', as if a run were damaged or missing: it names the export and where to export from instead."""
    from seer.cli import main
    st, _ = export_timm(run, tmp_path / "vit.safetensors")
    for fmt, out in (("onnx", "vit2.onnx"), ("timm", "vit2.safetensors")):
        assert main(["export", "--checkpoint", str(st), "--format", fmt, "--out", str(tmp_path / out)]) == 2
        assert "is an export; seer export reads the run folder or a checkpoint folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.safetensors"]
