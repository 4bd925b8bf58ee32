"""Checkpoint files: atomic commit, keep-last-N, and loading that never unpickles arbitrary objects."""
import os
import pickle

import pytest
import torch

from seer import load_pretrained
from seer.config import apply_overrides, preset
from seer.train import CheckpointManager, CorruptCheckpointError, Trainer, UnsafeCheckpointError, list_checkpoints
from seer.train.checkpoint import load_rank_state, load_tensors, read_meta


def _save(mgr, step, value):
    return mgr.save(step, {"w": torch.full((3,), float(value))}, {"rank": 0}, {"step": step}, "x: 1\n")


def test_keep_last_n_and_incomplete_folders_are_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(mgr, step, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # A folder left by a killed writer (no meta.json, never renamed) is invisible, then cleaned up.
    (tmp_path / ".tmp-step_00000004").mkdir()
    (tmp_path / ".tmp-step_00000004" / "__0_0.distcp").write_bytes(b"partial")
    assert mgr.latest().name == "step_00000003"
    CheckpointManager(tmp_path, keep=2)
    assert not (tmp_path / ".tmp-step_00000004").exists()
    dest = {"w": torch.zeros(3)}
    load_tensors(mgr.latest(), dest)
    assert torch.equal(dest["w"], torch.full((3,), 3.0))
    assert read_meta(mgr.latest())["step"] == 3 and load_rank_state(mgr.latest(), 0) == {"rank": 0}
    _save(mgr, 3, 7)  # the same step again replaces it atomically
    load_tensors(mgr.latest(), dest)
    assert torch.equal(dest["w"], torch.full((3,), 7.0))


def test_the_commit_syncs_the_folder_and_its_names_before_the_rename(tmp_path, monkeypatch):
    """The files are fsynced as written; their names in the .tmp folder are durable only once the folder is:
    renamed unsynced, a power loss could leave a step_* folder without some of its files."""
    from seer.train import checkpoint as ck
    events = []
    monkeypatch.setattr(ck, "sync_folder", lambda folder: events.append(("sync", folder.name)))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", os.path.basename(a))),
                                                    real_replace(a, b)))
    _save(CheckpointManager(tmp_path, keep=2), 1, 1)
    tmp = ".tmp-step_00000001"
    assert events.index(("sync", tmp)) < events.index(("rename", tmp)) < events.index(("sync", tmp_path.name))


def test_a_newest_checkpoint_that_lost_files_is_named_and_prune_leaves_no_half_folder(tmp_path, monkeypatch,
                                                                                       caplog):
    import shutil
    from seer.train import latest_checkpoint
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(mgr, step, step)
    (tmp_path / "step_00000003" / "meta.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="lacks meta.json.*move the folder out of .* to resume from "
                                                     "step_00000002"):
        latest_checkpoint(tmp_path)  # was step_00000002, without a word
    shutil.rmtree(tmp_path / "step_00000003")
    # A kill inside a deletion: the pruned folder is already renamed, so no step_* folder is half there ...
    real = shutil.rmtree

    def killed(path, *a, **k):
        if ".del-step_00000002" in str(path) and (tmp_path / ".del-step_00000002").exists():
            (tmp_path / ".del-step_00000002" / "meta.json").unlink()  # part of it gone, then the kill
            raise KeyboardInterrupt
        return real(path, *a, **k)
    monkeypatch.setattr(shutil, "rmtree", killed)
    _save(mgr, 3, 3)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 4, 4)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    # ... and the next run removes it, with what an older version left: a step_* folder older than every
    # complete checkpoint, cut short while it was deleted in place
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "__0_0.distcp").write_bytes(b"half")
    with caplog.at_level("WARNING"):
        CheckpointManager(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    assert "step_00000001: an old checkpoint whose deletion was cut short" in caplog.text
    # a folder that cannot be renamed away (NFS: a busy file of an earlier deletion) stays, with a warning: rank
    # 0 prunes alone while the other ranks wait in a barrier, so it must not raise
    real_replace = os.replace

    def busy(src, dst):
        if ".del-" in str(dst):
            raise OSError(39, "Directory not empty")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", busy)
    with caplog.at_level("WARNING"):
        _save(mgr, 5, 5)
    assert "cannot remove old checkpoint" in caplog.text and (tmp_path / "step_00000003").is_dir()


def test_a_full_disk_is_named_with_the_checkpoint_that_survives(tmp_path, monkeypatch):
    # torch's writers report a full disk as "unexpected pos 704 vs 598"; the error says what happened
    import errno
    import shutil
    from collections import namedtuple
    mgr = CheckpointManager(tmp_path, keep=2)
    _save(mgr, 3, 3)

    def broken(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr("seer.train.checkpoint.dcp.save", broken)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(OSError, match=r"failed \(1 MiB free there: the disk is full; RuntimeError: .*unexpected pos"
                                      r".*\(step_00000003\) is intact") as e:
        _save(mgr, 4, 4)
    assert e.value.errno == errno.ENOSPC
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    monkeypatch.setattr("seer.train.checkpoint.dcp.save", denied)
    with pytest.raises(PermissionError):  # another cause stays itself, however little space is left
        _save(mgr, 4, 4)
    monkeypatch.setattr("seer.train.checkpoint.dcp.save", broken)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 0, 10 * 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: the error as it was
        _save(mgr, 4, 4)
    assert mgr.latest().name == "step_00000003"


def test_resave_killed_between_its_renames_keeps_the_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=1)
    _save(mgr, 3, 3)

    def killed(src, dst):  # the process dies after moving the complete copy aside
        if str(src).endswith("step_00000003") and ".old-" in str(dst):
            real_replace(src, dst)
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr("seer.train.checkpoint.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 3, 9)
    monkeypatch.setattr("seer.train.checkpoint.os.replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-step_00000003", ".tmp-step_00000003"]
    mgr = CheckpointManager(tmp_path, keep=1)  # the next run: the copy moved aside is the checkpoint again
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]
    dest = {"w": torch.zeros(3)}
    load_tensors(mgr.latest(), dest)
    assert torch.equal(dest["w"], torch.full((3,), 3.0))


class _Evil:
    """Unpickling this runs a command (what a tampered pickle can do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=2", "checkpoint.every=2", "train.threads=1"])
    Trainer(cfg, out).fit()
    return out, cfg


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_the_collapse_monitor_is_saved_and_resumed(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=3", "train.threads=1", "train.collapse_warmup_steps=0",
                                           "logging.every=1"])
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    saved = read_meta(list_checkpoints(tmp_path / "checkpoints")[-1])["collapse"]
    assert len(saved["loss"]) == 3 and saved == trainer.monitor.state_dict()
    resumed = Trainer(apply_overrides(cfg, ["train.max_steps=4"]), tmp_path)
    try:
        assert resumed.step == 3 and resumed.monitor.state_dict() == saved
    finally:
        resumed.release()


def test_tampered_index_is_refused_without_running_it(run, tmp_path):
    out, cfg = run
    bad_run = _copy(out, tmp_path / "bad")
    ckpt = list_checkpoints(bad_run / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_pretrained(bad_run)
    with pytest.raises(UnsafeCheckpointError):
        Trainer(cfg, bad_run)  # resuming refuses it too
    assert not marker.exists()


def _attribute_path_gadget(marker) -> bytes:
    """A protocol-4 index whose globals are attribute paths walked from an allowed module: the path
    torch.inspect.attrgetter reaches a class, which fetches a function's builtins, then eval runs a command."""
    def s(text):
        b = text.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b
    mod = "torch.distributed.checkpoint.metadata"
    return (pickle.PROTO + b"\x04" + s(mod) + s("torch.inspect.attrgetter") + pickle.STACK_GLOBAL
            + s("__init__.__builtins__.get") + pickle.TUPLE1 + pickle.REDUCE
            + s(mod) + s("Metadata") + pickle.STACK_GLOBAL + pickle.TUPLE1 + pickle.REDUCE
            + s("eval") + pickle.TUPLE1 + pickle.REDUCE
            + s(f"__import__('os').system('touch {marker}')") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def test_index_naming_an_attribute_path_is_refused_without_running_it(tmp_path):
    from seer.train.safe_load import safe_unpickle
    marker = tmp_path / "pwned3"
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        safe_unpickle(_attribute_path_gadget(marker))
    assert not marker.exists()
    # Nor may the index build a class with behaviour (a reader) or one only imported into an allowed module.
    for mod, name in (("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
                      ("torch.distributed.checkpoint.metadata", "Enum")):
        with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
            safe_unpickle(pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{mod}\n{name}\n".encode() + pickle.STOP)


def test_tampered_rank_file_is_refused(run, tmp_path):
    out, cfg = run
    bad_run = _copy(out, tmp_path / "bad_rank")
    ckpt = list_checkpoints(bad_run / "checkpoints")[-1]
    marker = tmp_path / "pwned2"
    torch.save({"rng": _Evil(marker)}, ckpt / "rank_00000.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        Trainer(cfg, bad_run)
    assert not marker.exists()


def test_resume_needs_the_same_architecture(run, tmp_path):
    out, cfg = run
    other = apply_overrides(cfg, ["model.depth=3"])
    with pytest.raises(ValueError, match="model.depth: checkpoint 2, config 3"):
        Trainer(other, _copy(out, tmp_path / "arch"))
    with pytest.raises(FileExistsError, match="checkpoint.resume='never'"):
        Trainer(apply_overrides(cfg, ["checkpoint.resume=never"]), _copy(out, tmp_path / "never"))


def test_resume_with_other_regularisation_is_said_not_refused(run, tmp_path, caplog):
    """Keys that shape no tensor may differ, as they may from checkpoint.init_from's source (they were refused
    as 'another architecture')."""
    out, cfg = run
    other = apply_overrides(cfg, ["model.drop_path_rate=0.2", "model.dropout=0.1"])
    with caplog.at_level("WARNING", logger="seer"):
        trainer = Trainer(other, _copy(out, tmp_path / "reg"))
    try:
        assert trainer.step > 0
        assert "model.drop_path_rate: checkpoint 0.0, config 0.2" in caplog.text
        assert "model.dropout: checkpoint 0.0, config 0.1" in caplog.text
    finally:
        trainer.release()


def test_a_checkpoint_whose_config_predates_data_max_image_bytes_resumes_without_a_word(run, tmp_path, caplog):
    """A run saved before data.max_image_bytes existed (no such key in its config.yaml files) resumes, with the
    default or another limit, and says nothing of it: the key reads files, it shapes no tensor."""
    out, cfg = run
    copy = _copy(out, tmp_path / "old")
    for saved in [copy / "config.yaml", *(p / "config.yaml" for p in list_checkpoints(copy / "checkpoints"))]:
        text = saved.read_text()
        assert "  max_image_bytes: 536870912\n" in text
        saved.write_text(text.replace("  max_image_bytes: 536870912\n", ""))
    for overrides, limit in (([], 512 * 2**20), (["data.max_image_bytes=100000"], 100000)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="seer"):
            t = Trainer(apply_overrides(cfg, overrides + ["train.max_steps=3"]), copy)
        try:
            assert t.step == 2 and t.cfg.data.max_image_bytes == limit
            assert "max_image_bytes" not in caplog.text and "architecture" not in caplog.text
        finally:
            t.release()
    t = Trainer(apply_overrides(cfg, ["train.max_steps=3"]), copy)
    assert t.fit()["step"] == 3


def test_a_new_max_steps_on_resume_is_said(run, tmp_path, caplog):
    out, cfg = run
    with caplog.at_level("WARNING", logger="seer.train"):
        t = Trainer(apply_overrides(cfg, ["train.max_steps=5"]), _copy(out, tmp_path / "longer"))
    assert t.step == 2 and "train.max_steps is 5, the checkpoint's run had 2" in caplog.text
    assert "recomputed over the new length from step 2 on" in caplog.text
    t.release()
    caplog.clear()
    with caplog.at_level("WARNING", logger="seer.train"):  # the CLI printed "step 2 of 1" without a word
        t = Trainer(apply_overrides(cfg, ["train.max_steps=1", "data.batch_size=4"]), _copy(out, tmp_path / "b"))
    assert "train.max_steps is 1 and the checkpoint is at step 2: nothing is left to train" in caplog.text
    assert "the global batch is now 4 images per step (data.batch_size 4 x 1 data-parallel ranks), the " \
        "checkpoint's run had 8" in caplog.text
    assert "peak learning rate" not in caplog.text  # no reference batch: the rate is as given
    t.release()
    caplog.clear()
    with caplog.at_level("WARNING", logger="seer.train"):  # a reference batch set on resume rescales the rate
        t = Trainer(apply_overrides(cfg, ["optim.lr_reference_batch=16"]), _copy(out, tmp_path / "c"))
    assert f"the peak learning rate is now {cfg.optim.lr / 2:.4g}, the checkpoint's run had {cfg.optim.lr:.4g}" \
        in caplog.text and "optim.lr_reference_batch 0 -> 16, global batch 8 -> 8" in caplog.text


def test_refused_run_leaves_the_run_config_alone(run, tmp_path):
    out, cfg = run
    copy = _copy(out, tmp_path / "cfg")
    before = (copy / "config.yaml").read_text()
    with pytest.raises(ValueError, match="another architecture"):
        Trainer(apply_overrides(cfg, ["model.depth=3"]), copy)
    with pytest.raises(ValueError, match="train.optimizer='adamw'"):  # its state is LARS's
        Trainer(apply_overrides(cfg, ["train.optimizer=adamw"]), copy)
    assert (copy / "config.yaml").read_text() == before


@pytest.mark.parametrize("damage, error, match", [
    ("truncate_shard", CorruptCheckpointError, "unreadable tensors"),
    ("truncate_rank", CorruptCheckpointError, "unreadable per-rank state"),
    ("delete_rank", CorruptCheckpointError, r"rank_00000.pt: unreadable per-rank state \(FileNotFoundError: missing"),
    # torch.load fails on this one with OSError (Errno 22), which is the file's fault, not the machine's
    ("halve_rank", CorruptCheckpointError, r"rank_00000.pt: unreadable per-rank state \(ChecksumMismatch"),
    ("empty_meta", CorruptCheckpointError, "unreadable meta.json"),
    # a meta.json of the format before checksums (no meta_crc32) that lacks a key; any edit of one with them
    ("meta_without_data", CorruptCheckpointError, "meta.json lacks data"),
    ("meta_edited", CorruptCheckpointError, r"unreadable meta.json \(ChecksumMismatch: its bytes changed"),
    # the architecture check reads it: a traceback (truncated, a list), or no check at all (deleted)
    ("truncate_config", CorruptCheckpointError, "config.yaml: unreadable run config"),
    ("list_config", CorruptCheckpointError, "config.yaml: unreadable run config"),
    ("delete_config", CorruptCheckpointError, "config.yaml is missing, so the checkpoint's architecture"),
    # was skipped as if never written: the run started over and overwrote the folder, eval took an older one
    ("delete_meta", CorruptCheckpointError, r"step_00000002 lacks meta.json: a step_\* folder is complete when "
                                            r"it is named.*start the run over \(it has no other checkpoint\)"),
    ("delete_index", CorruptCheckpointError, r"step_00000002 lacks .metadata"),
])
def test_damaged_checkpoint_is_named_not_resumed_inexactly(run, tmp_path, damage, error, match):
    import json
    out, cfg = run
    copy = _copy(out, tmp_path / damage)
    ckpt = list_checkpoints(copy / "checkpoints")[-1]
    if damage == "truncate_shard":
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "truncate_rank":
        f = ckpt / "rank_00000.pt"
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "halve_rank":
        f = ckpt / "rank_00000.pt"
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    elif damage == "delete_rank":
        (ckpt / "rank_00000.pt").unlink()
    elif damage == "empty_meta":
        (ckpt / "meta.json").write_text("")
    elif damage == "truncate_config":
        (ckpt / "config.yaml").write_text((ckpt / "config.yaml").read_text()[:30] + "\n  - [")
    elif damage == "list_config":
        (ckpt / "config.yaml").write_text("- 1\n")
    elif damage == "delete_config":
        (ckpt / "config.yaml").unlink()
    elif damage == "delete_meta":
        (ckpt / "meta.json").unlink()
    elif damage == "delete_index":
        (ckpt / ".metadata").unlink()
    elif damage == "meta_edited":
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["data"]["position"] = meta["data"].get("position", 0) + 1
        (ckpt / "meta.json").write_text(json.dumps(meta))
    else:
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["data"], meta["meta_crc32"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(error, match=match):
        Trainer(cfg, copy)
    if "config" in damage or damage in ("delete_meta", "delete_index"):  # eval and export read it too
        from seer import load_pretrained
        with pytest.raises(error, match=match):
            load_pretrained(copy)
    assert ckpt.is_dir()  # nothing of it was removed


@pytest.mark.parametrize("damage", ["truncate_shard", "truncate_index"])
def test_damaged_checkpoint_is_named_by_eval_and_export_too(run, tmp_path, damage, capsys):
    from seer.cli import main
    out, cfg = run
    copy = _copy(out, tmp_path / damage)
    ckpt = list_checkpoints(copy / "checkpoints")[-1]
    f = next(ckpt.glob("*.distcp")) if damage == "truncate_shard" else ckpt / ".metadata"
    f.write_bytes(f.read_bytes()[:100])
    # (a truncated index fails the safe unpickler first, which says so: UnsafeCheckpointError, also exit 3)
    match = "unreadable tensors" if damage == "truncate_shard" else r"\.metadata: unreadable checkpoint index"
    errors = (CorruptCheckpointError, UnsafeCheckpointError)
    with pytest.raises(errors, match=match):
        load_pretrained(copy)
    for argv in (["export", "--checkpoint", str(copy), "--format", "timm", "--out", str(tmp_path / "v.safetensors")],
                 ["eval", "knn", "--checkpoint", str(copy), "--set", "eval.max_images=50"]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "CorruptCheckpointError" not in err and "Traceback" not in err and "unreadable" in err
    with pytest.raises(errors, match=match):
        Trainer(cfg, copy)


def test_a_run_with_its_own_checkpoint_dir_is_found_from_its_folder(tmp_path, monkeypatch):
    from seer.train.checkpoint import resolve_checkpoint
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1", "eval.at_end=false",
                                           "checkpoint.dir=~/ckpts"])
    Trainer(cfg, tmp_path / "run").fit()
    assert list_checkpoints(tmp_path / "home" / "ckpts")  # ~ is the home folder, not a folder named '~'
    assert resolve_checkpoint(tmp_path / "run") == list_checkpoints(tmp_path / "home" / "ckpts")[-1]
    load_pretrained(tmp_path / "run")


def test_explicit_resume_starts_a_lineage_that_reruns_continue(run, tmp_path):
    """checkpoint.resume=<step 2 of another run>: the rerun of that same command (after a stop) continues the
    new run instead of starting over; a folder whose newer checkpoints belong to another lineage is refused
    rather than shadowing the new run's."""
    out, cfg = run
    start = list_checkpoints(out / "checkpoints")[-1]
    longer = apply_overrides(cfg, [f"checkpoint.resume={start}", "train.max_steps=6", "checkpoint.every=2"])
    new = tmp_path / "branch"
    t = Trainer(apply_overrides(longer, ["train.max_steps=4"]), new)
    assert t.step == 2
    t.fit()  # saves step 4, as if stopped there
    again = Trainer(longer, new)  # the same command again
    assert again.resumed_from.name == "step_00000004" and again.step == 4
    rollback = Trainer(apply_overrides(cfg, [f"checkpoint.resume={new / 'checkpoints' / 'step_00000004'}",
                                              "train.max_steps=8", "checkpoint.every=2"]), new)
    assert rollback.step == 4  # from its own latest checkpoint: nothing newer to shadow
    elsewhere = list_checkpoints(_copy(out, tmp_path / "elsewhere") / "checkpoints")[-1]  # another step 2
    with pytest.raises(FileExistsError, match="step_00000004, which do not continue from it"):
        Trainer(apply_overrides(cfg, [f"checkpoint.resume={elsewhere}", "train.max_steps=8"]), new)


def test_a_branch_from_a_run_folder_that_trains_on_continues_on_a_rerun(run, tmp_path):
    """checkpoint.resume=<a run folder>: that run's latest checkpoint starts the new run. The other run, still
    training, saves newer ones; the same command rerun after a stop took the newest of them, dropping the new
    run's own checkpoints without a word, instead of continuing the new run."""
    out, cfg = run
    source = _copy(out, tmp_path / "source")  # at step 2
    branch = apply_overrides(cfg, [f"checkpoint.resume={source}", "train.max_steps=8", "checkpoint.every=2"])
    t = Trainer(apply_overrides(branch, ["train.max_steps=4"]), tmp_path / "branch")
    assert t.step == 2
    t.fit()  # saves step 4, as if stopped there
    Trainer(apply_overrides(cfg, ["train.max_steps=6", "checkpoint.every=6"]), source).fit()  # the source goes on
    again = Trainer(branch, tmp_path / "branch")
    try:
        assert again.resumed_from == tmp_path / "branch" / "checkpoints" / "step_00000004" and again.step == 4
    finally:
        again.release()  # (its run lock and train.log handler would outlive the test)


def test_rollback_within_a_run_moves_the_newer_checkpoints_aside(run, tmp_path):
    out, cfg = run
    copy = _copy(out, tmp_path / "rb")
    Trainer(apply_overrides(cfg, ["train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=5"]), copy).fit()
    ckpts = copy / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000004", "step_00000006"]
    back = Trainer(apply_overrides(cfg, [f"checkpoint.resume={ckpts / 'step_00000002'}", "train.max_steps=6",
                                         "checkpoint.every=2", "checkpoint.keep=5"]), copy)
    assert back.step == 2 and [p.name for p in list_checkpoints(ckpts)] == ["step_00000002"]
    aside = next(ckpts.glob("superseded-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]  # kept, out of the way
    back.fit()
    assert Trainer(cfg, copy).resumed_from.name == "step_00000006"  # the new branch's latest, not the old one


def test_refused_rollback_moves_nothing_and_reruns_outlive_the_pruned_start(run, tmp_path):
    out, cfg = run
    copy = _copy(out, tmp_path / "rb2")
    Trainer(apply_overrides(cfg, ["train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=5"]), copy).fit()
    ckpts = copy / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(ValueError, match="another architecture"):  # refused after its checks: nothing moved
        Trainer(apply_overrides(cfg, [f"checkpoint.resume={ckpts / 'step_00000002'}", "model.depth=3"]), copy)
    assert sorted(p.name for p in ckpts.iterdir()) == before
    # A rollback to step 2 with keep=1: the new branch's saves prune step 2, the checkpoint it started from;
    # the same command again still continues the new branch.
    again = apply_overrides(cfg, [f"checkpoint.resume={ckpts / 'step_00000002'}", "train.max_steps=6",
                                  "checkpoint.every=2", "checkpoint.keep=1"])
    Trainer(apply_overrides(again, ["train.max_steps=4"]), copy).fit()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004"]
    rerun = Trainer(again, copy)
    assert rerun.resumed_from.name == "step_00000004" and rerun.step == 4


def test_periodic_save_and_evaluation_on_the_last_step_happen_without_their_at_end_ones(tmp_path):
    """checkpoint.every=2 of 4 steps with checkpoint.at_end=false saved step 2 only: steps 3-4 were trained and
    thrown away (a rerun trained them again, an export took step 2's weights); eval.every likewise."""
    import json
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=4", "checkpoint.every=2", "checkpoint.at_end=false",
                                           "eval.every=2", "eval.at_end=false", "eval.linear=false",
                                           "eval.max_images=40", "train.threads=1"])
    Trainer(cfg, tmp_path).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000004"]
    evals = (tmp_path / "eval_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in evals] == [2, 4]


def test_resumed_run_drops_what_an_earlier_attempt_logged_after_its_checkpoint(tmp_path):
    import json

    from seer.train.metrics import MetricsWriter
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    (tmp_path / "eval_history.jsonl").write_text("".join(json.dumps({"step": s, "knn_top1": 50.0}) + "\n"
                                                         for s in (2, 4)))
    MetricsWriter(tmp_path, active=True, tensorboard=False, progress="off", total_steps=9, start_step=3).close()
    steps = {name: [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()]
             for name in ("metrics.jsonl", "eval_history.jsonl")}
    assert steps == {"metrics.jsonl": [1, 2, 3], "eval_history.jsonl": [2]}


def test_a_rerun_from_step_0_hides_the_earlier_attempts_tensorboard_events(tmp_path):
    """A run killed before its first checkpoint starts over at step 0: its TensorBoard curves showed both
    attempts' steps 1, 2, ... one after the other (metrics.jsonl dropped the first attempt's records)."""
    import time
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from seer.train.metrics import MetricsWriter
    for steps, loss in (([1, 2, 3], 5.0), ([1, 2], 4.0)):  # killed at step 3; the rerun is at step 2
        w = MetricsWriter(tmp_path, active=True, tensorboard=True, progress="off", total_steps=9, start_step=0)
        for step in steps:
            w.write({"step": step, "loss": loss, "images_per_s": 1.0})
        w.close()
        time.sleep(1.1)  # (an event file's name holds the second it was created)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 4.0), (2, 4.0)]


def test_unreadable_random_init_scores_are_dropped_not_fatal(run, tmp_path):
    out, cfg = run
    copy = _copy(out, tmp_path / "init")
    (copy / "eval_random_init.json").write_text("")  # cut short by a kill (older versions wrote it in place)
    t = Trainer(apply_overrides(cfg, ["eval.at_end=true", "eval.random_init_baseline=true"]), copy)
    assert t.step == 2 and t._random_init_eval(metrics=None) is None


def test_random_init_scores_of_other_evaluation_settings_are_not_reused(tmp_path, caplog):
    """A rerun that evaluates on another eval.dataset compared its scores with the random initialisation's on
    the first one ("kNN top-1: 33.3% vs 49.2% at random initialisation", the 49.2 on digits)."""
    import json
    from tests.images import write_good_images
    labelled = tmp_path / "labelled"
    for c in ("a", "b"):
        write_good_images(labelled / c, 4, nested=False)
    out = tmp_path / "run"
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1", "eval.at_end=true",
                                           "eval.random_init_baseline=true", "eval.linear=false",
                                           "eval.max_images=40"])
    assert "knn_top1_random_init" in Trainer(cfg, out).fit()["eval"]
    again = Trainer(apply_overrides(cfg, [f"eval.dataset={labelled}"]), out).fit()["eval"]
    assert "knn_top1" in again and "knn_top1_random_init" not in again
    assert "eval.dataset: 'digits' then" in caplog.text
    # A protocol that was off then has no score to compare with: said, not silently left out
    again = Trainer(apply_overrides(cfg, ["eval.linear=true"]), out).fit()["eval"]
    assert "knn_top1_random_init" in again and "linear_top1_random_init" not in again
    assert "has no linear_top1" in caplog.text
    # Another autocast is another measurement too
    again = Trainer(apply_overrides(cfg, ["train.precision=bf16"]), out).fit()["eval"]
    assert "knn_top1_random_init" not in again and "train.precision: 'fp32' then, 'bf16' now" in caplog.text
    # Files written before the settings were recorded are used as they are
    (out / "eval_random_init.json").write_text(json.dumps({"knn_top1": 49.2}))
    again = Trainer(apply_overrides(cfg, [f"eval.dataset={labelled}"]), out).fit()["eval"]
    assert again["knn_top1_random_init"] == 49.2


def test_resume_with_another_queue_length_restarts_the_queue(run, tmp_path, caplog):
    """The collapse warning's remedy, a queue (loss.queue_length), added to the same command stopped the
    resume with "SwAVQueue.load_state_dict: saved queue has 0 rows of dim 16 per rank, this one 16 ..."."""
    out, cfg = run
    copy = _copy(out, tmp_path / "queue")
    t = Trainer(apply_overrides(cfg, ["loss.queue_length=16", "train.max_steps=4"]), copy)
    assert t.step == 2 and t.queue.enabled and t.queue.filled == 0 and t.queue.queue is None
    assert "the SwAV queue restarts empty" in caplog.text and "loss.queue_length 0 -> 16" in caplog.text
    assert t.fit()["step"] == 4 and t.queue.filled == 16
    # and back to no queue: the saved one is dropped, said as much
    t = Trainer(apply_overrides(cfg, ["train.max_steps=5"]), copy)
    assert t.step == 4 and not t.queue.enabled and "the SwAV queue is dropped" in caplog.text
    t.release()


def test_queue_moves_to_the_training_device():
    from seer.swav import SwAVQueue
    q = SwAVQueue(8, 4, batch_size=4, crops_for_assign=(0,), start_epoch=0)
    q.push(torch.randn(4, 4), epoch=0)
    loaded = SwAVQueue(8, 4, batch_size=4, crops_for_assign=(0,), start_epoch=0)
    loaded.load_state_dict(q.state_dict())
    assert loaded.to(torch.device("meta")).queue.device.type == "meta"


def test_machine_errors_while_loading_are_not_called_damage(run, tmp_path, monkeypatch):
    """An I/O error of the machine is raised as it is: the damaged-checkpoint message would tell the user to
    move a good checkpoint away."""
    from seer.train.safe_load import SafeFileSystemReader
    out, cfg = run

    def io_error(*a, **k):  # inside DCP's load, which gathers it into its own exception
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(SafeFileSystemReader, "read_data", io_error)
    with pytest.raises(OSError, match="Input/output error") as e:
        Trainer(cfg, _copy(out, tmp_path / "io"))
    assert not isinstance(e.value, CorruptCheckpointError)


def _flip_a_weight_bit(ckpt):
    """Flip one bit in the middle of the largest tensor's stored bytes (DCP's index says where they are; the
    middle of a large one is its data, not its header): the file still loads, one tensor is wrong."""
    from seer.train.checkpoint import read_tensor_index
    info = max(read_tensor_index(ckpt).storage_data.values(), key=lambda i: i.length)
    shard = ckpt / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + info.length // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard


def _all_tensors(ckpt):
    """Zeroed destinations for every tensor of checkpoint ``ckpt`` (model and optimizer)."""
    from seer.train.checkpoint import read_tensor_index
    index = read_tensor_index(ckpt)
    return {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in index.state_dict_metadata.items()
            if hasattr(m, "size")}


def test_a_flipped_bit_in_a_shard_is_named_not_loaded(run, tmp_path):
    """A bit flip inside tensor data (a bad disk, a damaged copy) loads without any error from DCP: the run
    would resume with a wrong weight. The CRC32s written with the checkpoint name the file instead."""
    import json
    out, cfg = run
    copy = _copy(out, tmp_path / "flip")
    ckpt = list_checkpoints(copy / "checkpoints")[-1]
    good = _all_tensors(ckpt)
    load_tensors(ckpt, good)
    shard = _flip_a_weight_bit(ckpt)
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: unreadable tensors \(ChecksumMismatch: its "
                                                     r"bytes changed after it was written: CRC32 [0-9a-f]{8}, "
                                                     r"written as [0-9a-f]{8}\); move this checkpoint away"):
        load_tensors(ckpt, _all_tensors(ckpt))
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        Trainer(cfg, copy)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        load_pretrained(copy)
    # The same checkpoint without its checksums (the format before them) loads, with a changed weight.
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["checksums"], meta["meta_crc32"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    bad = _all_tensors(ckpt)
    load_tensors(ckpt, bad)
    assert sum(not torch.equal(bad[k], good[k]) for k in good) == 1


def test_a_changed_rank_file_is_named(run, tmp_path):
    out, cfg = run
    copy = _copy(out, tmp_path / "rankflip")
    ckpt = list_checkpoints(copy / "checkpoints")[-1]
    f = ckpt / "rank_00000.pt"
    state = load_rank_state(ckpt, 0)
    state["bad_files"] = ["an extra entry that still unpickles"]
    torch.save(state, f)
    with pytest.raises(CorruptCheckpointError, match=r"rank_00000.pt: unreadable per-rank state \(ChecksumMismatch"):
        load_rank_state(ckpt, 0)
    with pytest.raises(CorruptCheckpointError, match="rank_00000.pt"):
        Trainer(cfg, copy)


def test_checksums_cover_every_file_but_the_config(tmp_path):
    from seer.train.checkpoint import file_crc32
    mgr = CheckpointManager(tmp_path, keep=2)
    # integer keys come back as strings: meta.json's own checksum must not see that as a change
    ckpt = mgr.save(1, {"w": torch.ones(3)}, {"rank": 0}, {"step": 1, "counts": {2: 1, 10: 2, "x": float("nan")}},
                    "x: 1\n")
    meta = read_meta(ckpt)
    files = {p.name for p in ckpt.iterdir()} - {"meta.json", "config.yaml"}
    assert set(meta["checksums"]) == files and {".metadata", "rank_00000.pt"} <= files
    assert all(file_crc32(ckpt / n) == crc for n, crc in meta["checksums"].items())
    assert not list(ckpt.glob(".crc-*"))  # the ranks' lists are merged into meta.json and removed


def _load_flipped(rank, world, ckpt):
    from seer.train.checkpoint import load_tensors as load
    try:
        load(ckpt, {"w": torch.zeros(4)})
    except CorruptCheckpointError as exc:
        return str(exc)
    return None


def _save_two_ranks(rank, world, directory):
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    w = DTensor.from_local(torch.full((2,), float(rank + 1)), mesh, [Shard(0)])
    mgr = CheckpointManager(directory, rank=rank, barrier=torch.distributed.barrier)
    return str(mgr.save(1, {"w": w}, {"rank": rank}, {"step": 1}, "x: 1\n"))


@pytest.mark.dist
def test_every_rank_names_a_flipped_shard_that_another_rank_checked(tmp_path):
    """The ranks split the files to check (rank 0 reads every other one): a damaged file that only rank 1
    reads still stops every rank with the same error, instead of rank 0 waiting in the load's collectives."""
    from tests.dist_utils import run_distributed
    ckpt = run_distributed(_save_two_ranks, 2, str(tmp_path))[0]
    from pathlib import Path
    names = sorted(n for n in read_meta(ckpt)["checksums"] if n == ".metadata" or n.endswith(".distcp"))
    assert len(names) == 3  # .metadata, __0_0.distcp, __1_0.distcp: rank 1 checks __0_0.distcp
    target = Path(ckpt) / names[1]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    errors = run_distributed(_load_flipped, 2, ckpt)
    assert errors[0] == errors[1] and f"{names[1]}: unreadable tensors (ChecksumMismatch" in errors[0]


def test_a_flipped_bit_in_the_index_says_the_file_changed(run, tmp_path):
    """A flipped bit in the pickled index often makes the safe unpickler refuse it as foreign; the refusal
    then also says that the file changed since it was written."""
    from seer.train import UnsafeCheckpointError
    out, cfg = run
    copy = _copy(out, tmp_path / "index")
    ckpt = list_checkpoints(copy / "checkpoints")[-1]
    f = ckpt / ".metadata"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x04
    f.write_bytes(bytes(data))
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError), match="its bytes changed after it was written"):
        Trainer(cfg, copy)


def test_a_file_the_machine_cannot_read_keeps_its_error(tmp_path, monkeypatch):
    import errno
    from seer.train import checkpoint as C
    ckpt = _save(CheckpointManager(tmp_path), 1, 1)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(C, "file_crc32", denied)
    with pytest.raises(PermissionError, match=r"\.metadata: cannot be read \(PermissionError: Permission denied\) "
                                              r"\(and 2 more\)"):
        C.verify_checkpoint_files(ckpt)


def _load_with_rank_state(rank, world, ckpt):
    from seer.train.checkpoint import load_tensors as load
    try:
        load(ckpt, {"w": torch.zeros(4)})
        return load_rank_state(ckpt, rank, required=True)
    except CorruptCheckpointError as exc:
        return str(exc)


@pytest.mark.dist
def test_every_rank_names_a_changed_rank_file_of_another_rank(tmp_path):
    """Each rank loads only its own rank file; one that changed stops every rank in load_tensors (before
    the trainer goes on to rewrite the run's config and metrics), not only the rank that reads it."""
    from pathlib import Path
    from tests.dist_utils import run_distributed
    ckpt = run_distributed(_save_two_ranks, 2, str(tmp_path))[0]
    assert run_distributed(_load_with_rank_state, 2, ckpt) == [{"rank": 0}, {"rank": 1}]
    torch.save({"rank": 7}, Path(ckpt) / "rank_00001.pt")  # still plain data, not what was written
    errors = run_distributed(_load_with_rank_state, 2, ckpt)
    assert errors[0] == errors[1] and "rank_00001.pt: unreadable per-rank state (ChecksumMismatch" in errors[0]


def test_checkpoint_resume_expands_the_home_folder(run, tmp_path, monkeypatch):
    """'~/...' in checkpoint.resume (a YAML file or a quoted --set, which no shell expanded) was looked up
    literally, 'no complete checkpoint at ~/...', while checkpoint.dir, data.source and eval.dataset expand it."""
    out, cfg = run
    _copy(out, tmp_path / "home" / "earlier")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    t = Trainer(apply_overrides(cfg, ["checkpoint.resume=~/earlier", "train.max_steps=3"]), tmp_path / "new")
    assert t.step == 2
    t.release()


def test_a_rerun_that_lost_its_checkpoint_dir_is_refused_not_started_over(tmp_path):
    """A run with checkpoint.dir=D rerun without it (or with another folder): its checkpoints are in D, so
    starting over from step 0 would drop the run's metrics history and train from scratch without a word."""
    import json
    out, elsewhere = tmp_path / "run", tmp_path / "ckpts"
    sets = ["train.max_steps=2", "checkpoint.every=2", "train.threads=1", "logging.every=1"]
    Trainer(apply_overrides(preset("tiny"), sets + [f"checkpoint.dir={elsewhere}"]), out).fit()
    logged = (out / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in logged.splitlines()] == [1, 2]
    for other in ([], [f"checkpoint.dir={tmp_path / 'new'}"]):
        with pytest.raises(FileExistsError, match=f"checkpoints are in {elsewhere}.*set checkpoint.dir={elsewhere}"):
            Trainer(apply_overrides(preset("tiny"), sets + ["train.max_steps=4"] + other), out)
        assert (out / "metrics.jsonl").read_text() == logged
    # The same folder again continues; a run folder whose old checkpoints are gone starts over as before.
    assert Trainer(apply_overrides(preset("tiny"), sets + [f"checkpoint.dir={elsewhere}"]), out).step == 2
    import shutil
    shutil.rmtree(elsewhere)
    assert Trainer(apply_overrides(preset("tiny"), sets), out).step == 0


def test_an_empty_checkpoint_resume_is_refused_not_taken_for_the_current_folder(run, tmp_path, monkeypatch):
    """checkpoint.resume='' (--set checkpoint.resume=) was Path(''), the current folder: started in another
    run's folder, the new run continued that run's training state."""
    from seer.config import ConfigError
    out, cfg = run
    monkeypatch.chdir(out)
    with pytest.raises(ConfigError, match="'checkpoint.resume' must be 'auto', 'never' or the path"):
        Trainer(apply_overrides(cfg, ["checkpoint.resume="]), tmp_path / "new")
    assert not list_checkpoints(tmp_path / "new" / "checkpoints")


def test_a_file_where_the_checkpoint_folder_goes_is_named_as_not_a_folder(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoints").write_text("not a folder")
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1"])
    with pytest.raises(NotADirectoryError, match="expected a folder for the run's checkpoints, found a file"):
        Trainer(cfg, tmp_path / "r")
    with pytest.raises(NotADirectoryError, match="expected a folder for the run's output"):
        Trainer(cfg, tmp_path / "r" / "checkpoints")
