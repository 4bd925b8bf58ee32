"""Continued pretraining (checkpoint.init_from): a new run at step 0 whose weights are another run's (all of them,
or the backbone with a fresh head), with its own optimizer state, schedules, data position and queue; a rerun
continues the new run; sources that cannot be this run's are refused before any work."""
import json
import os

import pytest
import torch

from seer import load_pretrained
from seer.cli import main
from seer.config import ConfigError, apply_overrides, preset
from seer.model.layers import interpolate_pos_embed
from seer.parallel.state import full_state_dict
from seer.pretrained import checkpoint_model_state, iter_checkpoint_model_state
from seer.train import Trainer, list_checkpoints
from seer.train.checkpoint import read_meta, resolve_checkpoint
from tests.dist_utils import run_distributed
from tests.images import write_good_images

BASE = ["train.max_steps=2", "checkpoint.every=2", "train.threads=1", "logging.progress=off", "eval.at_end=false",
        "logging.plot=false"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 2-step run (1 process), and its config."""
    out = tmp_path_factory.mktemp("source")
    cfg = apply_overrides(preset("tiny"), BASE)
    Trainer(cfg, out).fit()
    return out, cfg


@pytest.fixture(scope="module")
def export(source, tmp_path_factory):
    from seer.export import export_timm
    out = tmp_path_factory.mktemp("export") / "vit.safetensors"
    export_timm(source[0], out)
    return out


def _source_tensors(run, parts=("backbone", "head")):
    return checkpoint_model_state(resolve_checkpoint(run), parts)


def _equal(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def _fresh(cfg, out):
    """The run as it starts without checkpoint.init_from (released: only its state is looked at)."""
    t = Trainer(apply_overrides(cfg, ["checkpoint.init_from="]), out)
    t.release()
    return t


def test_init_all_parts_takes_the_weights_and_starts_everything_else_fresh(source, tmp_path, caplog):
    run, cfg = source
    images = tmp_path / "images"
    write_good_images(images, 12)
    new_cfg = apply_overrides(cfg, [f"checkpoint.init_from={run}", f"data.source={images}", "model.dropout=0.1",
                                    "model.drop_path_rate=0.1", "train.max_steps=3", "checkpoint.every=0"])
    with caplog.at_level("INFO", logger="seer.train"):
        t = Trainer(new_cfg, tmp_path / "new")
    src = _source_tensors(run)
    now = full_state_dict(t.model)
    assert now.keys() == src.keys() and _equal(src, now)
    assert f"initialised from {run} (step 2 of that run, all)" in caplog.text
    assert "model.dropout: source 0.0, config 0.1" in caplog.text  # shapes no tensor: allowed, said
    fresh = _fresh(new_cfg, tmp_path / "fresh")
    assert not _equal(src, full_state_dict(fresh.model))  # (the weights above did come from the source)
    assert t.step == 0 and t.resumed_from is None and not t.opt.state
    assert t.sched.state_dict() == fresh.sched.state_dict() and t.sched.lr == fresh.sched.lr  # warm-up from 0
    assert t.data.state_dict() == fresh.data.state_dict() and not t.queue.full
    assert t.freezer.state_dict() == fresh.freezer.state_dict()
    t.fit()
    out = tmp_path / "new"
    assert "init_from: " + str(run) in (out / "config.yaml").read_text()
    meta = read_meta(list_checkpoints(out / "checkpoints")[-1])
    assert meta["step"] == 3 and meta["init_from"]["step"] == 2 and meta["init_from"]["parts"] == "all"
    assert meta["init_from"]["path"] == str(run) and meta["origin"] is None
    assert f"initialised from {run}" in (out / "train.log").read_text()


def test_init_backbone_only_gives_a_fresh_head_of_another_shape(source, tmp_path):
    run, cfg = source
    new_cfg = apply_overrides(cfg, [f"checkpoint.init_from={run}", "checkpoint.init_parts=backbone",
                                    "head.num_prototypes=24", "head.output_dim=8"])
    t = Trainer(new_cfg, tmp_path / "new")
    t.release()
    now, fresh = full_state_dict(t.model), full_state_dict(_fresh(new_cfg, tmp_path / "fresh").model)
    assert _equal(_source_tensors(run, ("backbone",)), now, "backbone.")
    assert _equal(fresh, now, "head.")  # the head a run without init_from starts with (the run's seed)
    assert now["head.prototypes.weight"].shape[0] == 24


def test_init_from_a_timm_export_takes_its_backbone(source, export, tmp_path, caplog):
    run, cfg = source
    new_cfg = apply_overrides(cfg, [f"checkpoint.init_from={export}", "checkpoint.init_parts=backbone"])
    with caplog.at_level("INFO", logger="seer.train"):
        t = Trainer(new_cfg, tmp_path / "new")
    t.release()
    now, fresh = full_state_dict(t.model), full_state_dict(_fresh(new_cfg, tmp_path / "fresh").model)
    assert _equal(_source_tensors(run, ("backbone",)), now, "backbone.") and _equal(fresh, now, "head.")
    # the export's JSON names the checkpoint and step it was made from: said and kept (it said 'no step recorded')
    made_from = json.loads(export.with_suffix(".json").read_text())["source"]
    assert made_from["step"] == 2
    assert (f"initialised from {export} (an export of step 2 of {made_from['checkpoint']}, backbone)"
            in caplog.text)
    t = Trainer(apply_overrides(new_cfg, ["train.max_steps=1", "checkpoint.every=1"]), tmp_path / "new")
    t.fit()
    meta = read_meta(list_checkpoints(tmp_path / "new" / "checkpoints")[-1])
    assert meta["init_from"]["step"] is None and meta["init_from"]["exported_from"] == made_from


def _watch_reads(monkeypatch) -> dict:
    """Records what a load of full tensors does: its reads (dcp.load, safetensors opens), the keys of each
    dcp.load, the checksum verifications, the
    reads of the tensor index, the groups placed into the model, and the most tensors of groups placed
    earlier still alive when a read (a dcp.load, a safetensors open) starts."""
    import weakref

    import safetensors

    import seer.parallel.state as parallel_state
    import seer.train.checkpoint as checkpoint_module
    import seer.train.safe_load as safe_load
    rec = {"reads": 0, "loads": [], "verified": 0, "index_reads": 0, "placed": [], "alive_at_read": 0}
    placed = []  # weak references to every tensor placed so far
    load, verify = checkpoint_module.dcp.load, checkpoint_module.verify_checkpoint_files
    unpickle, place, open_ = safe_load.safe_unpickle, parallel_state.load_full_state_dict, safetensors.safe_open

    def reading():
        rec["reads"] += 1
        rec["alive_at_read"] = max(rec["alive_at_read"], sum(r() is not None for r in placed))

    def dcp_load(dest, **kwargs):
        reading()
        rec["loads"].append(sorted(dest))
        return load(dest, **kwargs)

    def safe_open(*args, **kwargs):
        reading()
        return open_(*args, **kwargs)

    def verify_files(*args, **kwargs):
        rec["verified"] += 1
        return verify(*args, **kwargs)

    def read_index(*args, **kwargs):
        rec["index_reads"] += 1
        return unpickle(*args, **kwargs)

    def load_full(model, full):
        rec["placed"].append(sorted(full))
        placed.extend(weakref.ref(t) for t in full.values())
        return place(model, full)

    for owner, name, fn in ((checkpoint_module.dcp, "load", dcp_load), (safetensors, "safe_open", safe_open),
                            (checkpoint_module, "verify_checkpoint_files", verify_files),
                            (safe_load, "safe_unpickle", read_index),
                            (parallel_state, "load_full_state_dict", load_full)):
        monkeypatch.setattr(owner, name, fn)
    return rec


def _block_groups(names) -> list[list[str]]:
    """The groups a load of full tensors of the 2-block source takes: the tensors outside the blocks, then
    each block's."""
    rest = sorted(n for n in names if ".blocks." not in n)
    return [rest] + [sorted(n for n in names if f".blocks.{b}." in n) for b in (0, 1)]


def test_tensor_groups_are_the_rest_then_a_block_each_with_a_parameters_slices_together():
    from seer.train.state import tensor_groups
    qkv = "model/backbone.blocks.10.attn.qkv.weight"
    keys = [f"{qkv}@tp1", "model/backbone.blocks.2.norm1.weight", f"{qkv}@tp0", "model/head.prototypes.weight",
            "model/backbone.pos_embed"]
    assert tensor_groups(keys) == [["model/backbone.pos_embed", "model/head.prototypes.weight"],
                                   ["model/backbone.blocks.2.norm1.weight"], [f"{qkv}@tp0", f"{qkv}@tp1"]]
    assert tensor_groups(["blocks.0.mlp.fc1.weight", "cls_token"]) == [["cls_token"], ["blocks.0.mlp.fc1.weight"]]


def test_full_tensors_are_read_and_placed_a_block_at_a_time_as_the_whole_would_be(source, export, tmp_path,
                                                                                 monkeypatch):
    """Through the full-tensor path (a checkpoint of another parallel.tp, an export) a process holds one group
    of full tensors at a time: a group per transformer block, one for the rest (each a dcp.load, or tensors
    read on their own from the .safetensors), the files verified and the index read once; the model ends as
    the whole read at once and placed would have left it (the source, bit for bit)."""
    import dataclasses

    from seer.export import read_export
    from seer.parallel.state import load_full_state_dict
    from seer.train.init_from import load_init_weights, resolve_init_source
    run, cfg = source
    ckpt = resolve_checkpoint(run)
    # A checkpoint written with another parallel.tp takes the path: this one (tp=1) said to be tp=2 makes one
    # process take it (no slices to merge; the two-process test merges a tp=2 source's).
    other_tp = dataclasses.replace(resolve_init_source(str(run)), tp=2)
    whole = {"all": checkpoint_model_state(ckpt), "backbone": {f"backbone.{k}": v for k, v in
                                                               read_export(export)[1].items()}}
    for name, src, parts in (("ckpt", other_tp, "all"), ("export", resolve_init_source(str(export)), "backbone")):
        streamed, at_once = (_fresh(cfg, tmp_path / f"{name}-{i}") for i in range(2))
        with monkeypatch.context() as m:
            rec = _watch_reads(m)
            load_init_weights(src, streamed.model, streamed.dims, parts)
        load_full_state_dict(at_once.model, whole[parts])  # (how the full-tensor path placed them before)
        a, b = full_state_dict(streamed.model), full_state_dict(at_once.model)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert _equal(whole[parts], a)
        assert rec["placed"] == _block_groups(whole[parts]), name
        assert rec["alive_at_read"] == 0, name  # (each group freed before the next is read)
        if name == "ckpt":
            assert rec["loads"] == [[f"model/{k}" for k in g] for g in rec["placed"]]
            assert rec["verified"] == 1 and rec["index_reads"] == 1  # not once per group
        else:
            assert rec["loads"] == [] and rec["verified"] == 0


def _json_for_hand_made(export, made):
    """``export``'s JSON beside the .safetensors file ``made`` by hand, without the CRC32 of export's file."""
    info = json.loads(export.with_suffix(".json").read_text())
    del info["safetensors_crc32"]
    made.with_suffix(".json").write_text(json.dumps(info))


def test_a_group_that_does_not_fit_stops_the_load_once_the_rest_is_read(source, export, tmp_path, monkeypatch):
    """An export with a tensor the model does not have (in the first group): named, after the other groups
    were read but not placed (in a collective load, a process that stopped at once would leave the others
    waiting in their next dcp.load)."""
    from safetensors.torch import save_file

    from seer.export import read_export
    from seer.train.init_from import load_init_weights, resolve_init_source
    bad = tmp_path / "bad.safetensors"
    save_file(dict(read_export(export)[1], extra=torch.zeros(2)), str(bad))
    _json_for_hand_made(export, bad)
    t = _fresh(source[1], tmp_path / "run")
    rec = _watch_reads(monkeypatch)
    with pytest.raises(ValueError, match=f"{bad}: its tensors do not fit the model: tensors the model does not "
                                         f"have: backbone.extra"):
        load_init_weights(resolve_init_source(str(bad)), t.model, t.dims, "backbone")
    assert len(rec["placed"]) == 1 and rec["reads"] == 4  # (its names, then each of the 3 groups)


def test_a_source_lacking_some_of_the_models_tensors_is_refused_not_half_loaded(source, export, tmp_path,
                                                                                monkeypatch):
    """Through the full-tensor path, tensors no group gives stayed as the model was initialised, without a word
    (an export missing a block whose JSON describes it; a checkpoint index without a tensor): refused, as the
    own-shards path (DCP) refuses a checkpoint without a tensor of the model."""
    import dataclasses

    from safetensors.torch import save_file

    import seer.pretrained as pretrained
    from seer.export import read_export
    from seer.train.init_from import load_init_weights, resolve_init_source
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in read_export(export)[1].items() if not k.startswith("blocks.1.")}, str(bad))
    _json_for_hand_made(export, bad)
    t = _fresh(source[1], tmp_path / "run")
    with pytest.raises(ValueError, match=rf"{bad}: its tensors do not fit the model: tensors of the model it does "
                                         rf"not have: backbone.blocks.1.attn.proj.bias, .* \(\d+\)"):
        load_init_weights(resolve_init_source(str(bad)), t.model, t.dims, "backbone")
    index = pretrained.read_tensor_index

    def without_a_tensor(path):
        meta = index(path)
        del meta.state_dict_metadata["model/head.prototypes.weight"]
        return meta

    monkeypatch.setattr(pretrained, "read_tensor_index", without_a_tensor)
    other_tp = dataclasses.replace(resolve_init_source(str(source[0])), tp=2)  # (the full-tensor path)
    with pytest.raises(ValueError, match=r"tensors of the model it does not have: head.prototypes.weight \(1\)"):
        load_init_weights(other_tp, t.model, t.dims, "all")


def test_a_rerun_continues_the_new_run_from_its_own_checkpoint(source, tmp_path, caplog):
    run, cfg = source
    out = tmp_path / "new"
    longer = apply_overrides(cfg, [f"checkpoint.init_from={run}", "train.max_steps=4", "checkpoint.every=2"])
    Trainer(apply_overrides(longer, ["train.max_steps=2"]), out).fit()  # stopped at step 2, as if preempted
    own = _source_tensors(out)
    assert not _equal(_source_tensors(run), own)  # it trained: its step 2 is not the source's
    caplog.clear()
    with caplog.at_level("INFO", logger="seer.train"):
        again = Trainer(longer, out)  # the same command again
    assert again.step == 2 and again.resumed_from.name == "step_00000002"
    assert _equal(own, full_state_dict(again.model)) and again.opt.state  # its own weights and momentum
    assert "this run has checkpoints of its own" in caplog.text and f"initialised from {run} (" not in caplog.text
    again.fit()
    assert read_meta(list_checkpoints(out / "checkpoints")[-1])["init_from"]["path"] == str(run)
    assert Trainer(apply_overrides(cfg, ["train.max_steps=4"]), out).step == 4  # without the key: resumes too
    # The new run's checkpoints are like any run's: the backbone loads, exports and evaluates.
    from seer.export import export_timm
    exported, _ = export_timm(out, tmp_path / "vit.safetensors")
    a, b = load_pretrained(out).state_dict(), load_pretrained(exported).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["eval", "knn", "--checkpoint", str(out), "--set", "eval.max_images=64", "--json",
                 str(tmp_path / "eval.json")]) == 0
    assert "knn_top1" in json.loads((tmp_path / "eval.json").read_text())


def test_checkpoints_that_do_not_continue_the_initialisation_are_refused(source, tmp_path):
    run, cfg = source
    other = tmp_path / "other"
    Trainer(apply_overrides(cfg, ["train.max_steps=1", "checkpoint.every=1"]), other).fit()
    with pytest.raises(FileExistsError, match="was not initialised by checkpoint.init_from.*use another --out"):
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}"]), other)
    Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}", "train.max_steps=1"]), tmp_path / "new").fit()
    with pytest.raises(FileExistsError, match=f"was initialised from {run}"):
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={other}"]), tmp_path / "new")
    with pytest.raises(FileExistsError, match="checkpoint.resume='never'"):
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}", "checkpoint.resume=never"]), tmp_path / "new")


def test_sources_that_cannot_be_this_run_are_refused_before_any_work(source, export, tmp_path):
    run, cfg = source
    init = [f"checkpoint.init_from={run}"]
    with pytest.raises(ConfigError, match="another architecture than the config: model.depth: source 2, config 3"):
        Trainer(apply_overrides(cfg, init + ["model.depth=3"]), tmp_path / "a")
    assert not (tmp_path / "a" / "config.yaml").exists() and not list_checkpoints(tmp_path / "a" / "checkpoints")
    with pytest.raises(ConfigError, match=r"\(checkpoint.init_parts=backbone starts the head afresh\).*"
                                          r"head.num_prototypes: source 32, config 24"):
        Trainer(apply_overrides(cfg, init + ["head.num_prototypes=24"]), tmp_path / "b")
    with pytest.raises(ConfigError, match=r"model.patch_size: source 8, config 4"):  # backbone: the trunk's keys
        Trainer(apply_overrides(cfg, init + ["checkpoint.init_parts=backbone", "model.patch_size=4"]), tmp_path / "c")
    with pytest.raises(ConfigError, match="is an export, which holds the backbone only: set checkpoint.init_parts="
                                          "backbone"):
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={export}"]), tmp_path / "d")
    with pytest.raises(ConfigError, match="checkpoint.init_from=.* and checkpoint.resume=.* cannot be combined"):
        Trainer(apply_overrides(cfg, init + [f"checkpoint.resume={run}"]), tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="checkpoint.init_from: '/no/such/run' does not exist"):
        Trainer(apply_overrides(cfg, ["checkpoint.init_from=/no/such/run"]), tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint.init_from: no complete checkpoint at"):
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={tmp_path / 'empty'}"]), tmp_path / "g")
    with pytest.raises(ConfigError, match="'checkpoint.init_parts' must be one of 'all', 'backbone', got 'head'"):
        Trainer(apply_overrides(cfg, init + ["checkpoint.init_parts=head"]), tmp_path / "h")


def _resized(src: dict, grid: int, base_grid: int = 4) -> torch.Tensor:
    """The source's position embedding on a grid x grid patch grid, as the run should start with it."""
    return interpolate_pos_embed(src["backbone.pos_embed"].float(), (grid, grid), base_grid).to(torch.float32)


def _rest_equal(src: dict, now: dict, prefix: str = "") -> bool:
    """Every tensor but the position embedding is the source's."""
    return _equal({k: v for k, v in src.items() if k != "backbone.pos_embed"}, now, prefix)


def test_another_img_size_takes_the_weights_with_the_position_embedding_resampled(source, tmp_path, caplog):
    """Pretrained at 32 px (4x4 patches of 8), continued at 48 px (6x6): the source's embedding, bicubic."""
    run, cfg = source
    new_cfg = apply_overrides(cfg, [f"checkpoint.init_from={run}", "model.img_size=48", "train.max_steps=1",
                                    "checkpoint.every=1"])
    with caplog.at_level("INFO", logger="seer.train"):
        t = Trainer(new_cfg, tmp_path / "new")
    src, now = _source_tensors(run), full_state_dict(t.model)
    assert now.keys() == src.keys() and _rest_equal(src, now)
    assert now["backbone.pos_embed"].shape == (1, 37, 64)
    assert torch.equal(now["backbone.pos_embed"], _resized(src, 6))  # bitwise
    assert torch.equal(now["backbone.pos_embed"][:, 0], src["backbone.pos_embed"][:, 0])  # the class token's
    assert "checkpoint.init_from: position embedding resized from 4x4 to 6x6 patches (model.img_size 32 -> 48)" \
        in caplog.text
    t.fit()
    meta = read_meta(list_checkpoints(tmp_path / "new" / "checkpoints")[-1])
    assert meta["init_from"]["pos_embed_resized"] == {"img_size": [32, 48], "grid": [4, 6]}
    assert load_pretrained(tmp_path / "new").pos_embed.shape == (1, 37, 64)
    # The same size: no resampling, said or recorded.
    caplog.clear()
    with caplog.at_level("INFO", logger="seer.train"):
        same = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}"]), tmp_path / "same")
    same.release()
    assert "position embedding resized" not in caplog.text and "pos_embed_resized" not in same.initialised_from


def test_an_export_at_another_img_size_gives_its_backbone_with_the_embedding_resampled(source, export, tmp_path):
    """Shrinking too (32 px to 16 px: 4x4 to 2x2 patches, antialiased)."""
    run, cfg = source
    for img, grid in ((16, 2), (64, 8)):
        t = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={export}", "checkpoint.init_parts=backbone",
                                          f"model.img_size={img}"]), tmp_path / str(img))
        t.release()
        src, now = _source_tensors(run, ("backbone",)), full_state_dict(t.model)
        assert _rest_equal(src, now, "backbone.") and torch.equal(now["backbone.pos_embed"], _resized(src, grid))
        assert t.initialised_from["pos_embed_resized"] == {"img_size": [32, img], "grid": [4, grid]}


def test_another_patch_size_is_refused_with_another_img_size_too(source, export, tmp_path):
    run, cfg = source
    for src, parts in ((run, "all"), (export, "backbone")):
        with pytest.raises(ConfigError) as e:
            Trainer(apply_overrides(cfg, [f"checkpoint.init_from={src}", f"checkpoint.init_parts={parts}",
                                          "model.img_size=48", "model.patch_size=16"]), tmp_path / parts)
        msg = str(e.value)
        assert "model.patch_size: source 8, config 16" in msg and "model.img_size: source 32, config 48" in msg
        assert "another model.img_size alone is allowed" in msg
        assert not (tmp_path / parts / "config.yaml").exists()
    for other in ("model.depth=3", "head.num_prototypes=24"):  # another shaping key with it: that one is named
        with pytest.raises(ConfigError) as e:
            Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}", "model.img_size=48", other]), tmp_path / "x")
        assert other.split("=")[0] + ": source" in str(e.value) and "model.img_size" not in str(e.value)


@pytest.mark.parametrize("sets, fragment", [
    (["checkpoint.init_from={run}", "checkpoint.resume={run}"], "checkpoint.resume='{run}' cannot be combined"),
    (["checkpoint.init_from=/no/such/run"], "checkpoint.init_from: '/no/such/run' does not exist"),
    (["checkpoint.init_from={run}", "model.depth=3"], "model.depth: source 2, config 3"),
])
def test_refusals_are_one_line_from_the_cli(source, tmp_path, capsys, sets, fragment):
    run, _ = source
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path / "r")]
    for s in sets:
        argv += ["--set", s.replace("{run}", str(run))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment.replace("{run}", str(run)) in err and "Traceback" not in err


def _init_in_processes(rank, world, source, export, root):
    """Each rank's view of runs initialised under dp=2 (from the 1-process checkpoint: DCP reshards it),
    tp=2 (another split: full tensors, each rank its slice) and dp=2 from the export (each rank its shard)."""
    import seer.train.checkpoint as checkpoint_module
    base = apply_overrides(preset("tiny"), BASE + ["data.batch_size=4", "loss.queue_length=0"])
    got, reads = {}, {"loads": [], "verified": 0}  # (tp2's: the keys of each dcp.load, the verifications)
    load, verify = checkpoint_module.dcp.load, checkpoint_module.verify_checkpoint_files

    def dcp_load(dest, **kwargs):
        reads["loads"].append(sorted(dest))
        return load(dest, **kwargs)

    def verify_files(*args, **kwargs):
        reads["verified"] += 1
        return verify(*args, **kwargs)

    for name, sets in (("dp2", [f"checkpoint.init_from={source}"]),
                       ("tp2", [f"checkpoint.init_from={source}", "parallel.tp=2"]),
                       ("dp2_export", [f"checkpoint.init_from={export}", "checkpoint.init_parts=backbone"])):
        if name == "tp2":
            checkpoint_module.dcp.load, checkpoint_module.verify_checkpoint_files = dcp_load, verify_files
        t = Trainer(apply_overrides(base, sets + ["train.max_steps=1", "checkpoint.every=1"]), f"{root}/{name}")
        checkpoint_module.dcp.load, checkpoint_module.verify_checkpoint_files = load, verify
        got[name] = {k: v.detach().cpu().clone() for k, v in full_state_dict(t.model).items()}
        if name != "dp2_export":  # trains on (its checkpoint says where it started; tp2's: a tp=2 source below)
            t.fit()
        else:
            t.release()
    got["tp2_reads"] = reads
    return got


@pytest.mark.slow
@pytest.mark.dist
def test_init_in_two_processes_from_a_one_process_source(source, export, tmp_path):
    run, cfg = source
    ranks = run_distributed(_init_in_processes, 2, str(run), str(export), str(tmp_path))
    src = _source_tensors(run)
    for got in ranks:
        assert _equal(src, got["dp2"]) and got["dp2"].keys() == src.keys()
        assert _equal(src, got["tp2"]) and got["tp2"].keys() == src.keys()
        assert _equal(src, got["dp2_export"], "backbone.")
        # tp2 read the full tensors collectively: every process the same groups (a block each, the rest), in
        # one dcp.load each, the files verified once.
        assert got["tp2_reads"] == {"loads": [[f"model/{k}" for k in g] for g in _block_groups(src)], "verified": 1}
    meta = read_meta(list_checkpoints(tmp_path / "dp2" / "checkpoints")[-1])
    assert meta["world_size"] == 2 and meta["init_from"]["step"] == 2 and meta["init_from"]["path"] == str(run)
    # A source written with parallel.tp=2 into one process: its slices merged into full tensors, a group at a
    # time (each block's slices in its group) as all at once.
    t = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={tmp_path / 'tp2'}"]), tmp_path / "from_tp2")
    t.release()
    tp2 = _source_tensors(tmp_path / "tp2")
    assert _equal(tp2, full_state_dict(t.model)) and not _equal(src, tp2)
    groups = list(iter_checkpoint_model_state(resolve_checkpoint(tmp_path / "tp2")))
    assert [sorted(g) for g in groups] == _block_groups(tp2)
    assert _equal(tp2, {k: v for g in groups for k, v in g.items()})
    # Its timm export: the merged shapes come from the index alone (the slices merged as meta tensors), the
    # tensors a block at a time.
    from safetensors.torch import load_file

    from seer.export import export_timm
    st, _ = export_timm(tmp_path / "tp2", tmp_path / "tp2.safetensors")
    got = {f"backbone.{k}": v for k, v in load_file(str(st)).items()}
    assert _equal(tp2, got, "backbone.") and got.keys() == {k for k in tp2 if k.startswith("backbone.")}


def _init_at_another_size_in_processes(rank, world, source, root):
    """Runs at model.img_size=48 from 32 px sources: dp=2 from the 1-process source (DCP, resharded), tp=2 from it
    (another split: full tensors) and tp=2 from a tp=2 source (DCP, the replicated embedding read whole)."""
    base = apply_overrides(preset("tiny"), BASE + ["data.batch_size=4", "loss.queue_length=0", "train.max_steps=1",
                                                   "checkpoint.every=1"])
    Trainer(apply_overrides(base, ["parallel.tp=2"]), f"{root}/tp2_source").fit()
    got = {}
    for name, sets in (("dp2", [f"checkpoint.init_from={source}"]),
                       ("tp2", [f"checkpoint.init_from={source}", "parallel.tp=2"]),
                       ("tp2_dcp", [f"checkpoint.init_from={root}/tp2_source", "parallel.tp=2"])):
        t = Trainer(apply_overrides(base, sets + ["model.img_size=48"]), f"{root}/{name}")
        got[name] = {k: v.detach().cpu().clone() for k, v in full_state_dict(t.model).items()}
        t.fit() if name == "dp2" else t.release()  # (dp2 trains on: a step at 48 and a checkpoint)
    return got


@pytest.mark.slow
@pytest.mark.dist
def test_init_at_another_img_size_in_two_processes(source, tmp_path):
    run, cfg = source
    ranks = run_distributed(_init_at_another_size_in_processes, 2, str(run), str(tmp_path))
    src, tp2 = _source_tensors(run), _source_tensors(tmp_path / "tp2_source")
    for got in ranks:
        for name, s in (("dp2", src), ("tp2", src), ("tp2_dcp", tp2)):
            assert got[name].keys() == s.keys() and _rest_equal(s, got[name]), name
            assert torch.equal(got[name]["backbone.pos_embed"], _resized(s, 6)), name
    meta = read_meta(list_checkpoints(tmp_path / "dp2" / "checkpoints")[-1])
    assert meta["world_size"] == 2 and meta["init_from"]["pos_embed_resized"] == {"img_size": [32, 48], "grid": [4, 6]}
    # Back to 32 px in one process from that 2-process source (DCP: its embedding's FSDP shards read whole).
    t = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={tmp_path / 'dp2'}"]), tmp_path / "back")
    t.release()
    dp2, now = _source_tensors(tmp_path / "dp2"), full_state_dict(t.model)
    assert _rest_equal(dp2, now) and torch.equal(now["backbone.pos_embed"], _resized(dp2, 4, base_grid=6))


@pytest.mark.cuda
def test_a_gpu_run_starts_from_a_cpu_runs_weights(source, export, tmp_path):
    """The source's tensors (written by a CPU run) land on the GPU run's device, all parts and from an export,
    and the run trains on."""
    run, cfg = source
    gpu = ["train.device=cuda", "train.max_steps=3", "checkpoint.every=0"]
    t = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}", *gpu]), tmp_path / "all")
    now = {k: v.cpu() for k, v in full_state_dict(t.model).items()}
    assert next(t.model.parameters()).device.type == "cuda" and _equal(_source_tensors(run), now)
    assert t.fit()["step"] == 3
    t = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={export}", "checkpoint.init_parts=backbone", *gpu]),
                tmp_path / "export")
    now = {k: v.cpu() for k, v in full_state_dict(t.model).items()}
    assert _equal(_source_tensors(run, ("backbone",)), now, "backbone.")
    t.release()
    t = Trainer(apply_overrides(cfg, [f"checkpoint.init_from={run}", "model.img_size=48", *gpu]), tmp_path / "48")
    now, src = {k: v.cpu() for k, v in full_state_dict(t.model).items()}, _source_tensors(run)
    assert _rest_equal(src, now) and torch.equal(now["backbone.pos_embed"], _resized(src, 6))  # (resampled on the CPU)
    assert t.fit()["step"] == 3


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 2-step run with a checkpoint at each step (step_1 and step_2), and its config."""
    out = tmp_path_factory.mktemp("source2")
    cfg = apply_overrides(preset("tiny"), BASE + ["checkpoint.every=1", "checkpoint.keep=2"])
    Trainer(cfg, out).fit()
    return out, cfg


def test_a_damaged_source_is_named_as_the_init_source_before_any_work(two_checkpoints, tmp_path):
    run, cfg = two_checkpoints
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(run / "checkpoints", bad / "checkpoints")
    shard = sorted((bad / "checkpoints" / "step_00000002").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    from seer.train.checkpoint import CorruptCheckpointError
    with pytest.raises(CorruptCheckpointError) as e:
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={bad}"]), tmp_path / "new")
    msg = str(e.value)
    assert msg.startswith(f"checkpoint.init_from={bad}: ") and "ChecksumMismatch" in msg and shard.name in msg
    assert f"checkpoint.init_from={bad / 'checkpoints' / 'step_00000001'}" in msg  # the remedy: the one before
    assert "to resume from" not in msg  # (not this run's own checkpoint to move away)
    assert not (tmp_path / "new" / "config.yaml").exists() and not list_checkpoints(tmp_path / "new" / "checkpoints")


def test_a_source_checkpoint_pruned_while_it_is_read_is_said_so(two_checkpoints, tmp_path, monkeypatch):
    """The source run, still training, removes (prunes) the checkpoint this run is reading: not reported as
    a damaged checkpoint to move away."""
    import shutil

    import seer.train.trainer as trainer_module
    run, cfg = two_checkpoints
    live = tmp_path / "live"
    shutil.copytree(run, live)
    check = trainer_module.check_init_architecture

    def then_pruned(src, c):
        check(src, c)
        os.replace(src.file, src.file.with_name(".del-" + src.file.name))  # as CheckpointManager._delete does

    monkeypatch.setattr(trainer_module, "check_init_architecture", then_pruned)
    with pytest.raises(FileNotFoundError, match=r"checkpoint.init_from=.*step_00000002 was removed while it was "
                                                r"read .*still training"):
        Trainer(apply_overrides(cfg, [f"checkpoint.init_from={live}"]), tmp_path / "new")


def test_the_source_normalisation_differing_is_warned(source, export, tmp_path, caplog):
    run, cfg = source
    other = ["data.crops.mean=[0.5,0.5,0.5]", "data.crops.std=[0.5,0.5,0.5]"]
    for src, parts in ((run, "all"), (export, "backbone")):
        caplog.clear()
        with caplog.at_level("INFO", logger="seer.train"):
            Trainer(apply_overrides(cfg, [f"checkpoint.init_from={src}", f"checkpoint.init_parts={parts}", *other]),
                    tmp_path / parts).release()
        warned = [r for r in caplog.records if r.levelname == "WARNING" and "normalis" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert "data.crops.mean: source [0.485, 0.456, 0.406], config [0.5, 0.5, 0.5]" in warned[0].getMessage()
        caplog.clear()
        with caplog.at_level("INFO", logger="seer.train"):  # the same normalisation: nothing said
            Trainer(apply_overrides(cfg, [f"checkpoint.init_from={src}", f"checkpoint.init_parts={parts}"]),
                    tmp_path / f"{parts}-same").release()
        assert "normalis" not in caplog.text


def test_a_relative_source_rerun_from_another_folder_is_refused_saying_where_it_leads(source, tmp_path,
                                                                                   monkeypatch):
    run, cfg = source
    monkeypatch.chdir(run.parent)
    init = [f"checkpoint.init_from={run.name}", "train.max_steps=1", "checkpoint.every=1"]
    Trainer(apply_overrides(cfg, init), tmp_path / "new").fit()
    assert read_meta(list_checkpoints(tmp_path / "new" / "checkpoints")[-1])["init_from"]["path"] == str(run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match=f"checkpoint.init_from={run.name} \\(here {tmp_path / run.name}\\): "
                                              f".*was initialised from {run}"):
        Trainer(apply_overrides(cfg, init), tmp_path / "new")


def _init_while_the_source_saves(rank, world, source, root):
    """Rank 0 looks at the source before it wrote its step 2 (as if it were still training), rank 1 after."""
    import seer.train.checkpoint as checkpoint_module
    if rank == 0:
        monkeypatch_resolve = checkpoint_module.resolve_checkpoint
        checkpoint_module.resolve_checkpoint = lambda p: monkeypatch_resolve(f"{source}/checkpoints/step_00000001")
    base = apply_overrides(preset("tiny"), BASE + ["data.batch_size=4", "loss.queue_length=0"])
    t = Trainer(apply_overrides(base, [f"checkpoint.init_from={source}"]), f"{root}/run")
    got = {k: v.detach().cpu().clone() for k, v in full_state_dict(t.model).items()}
    record = t.initialised_from
    t.release()
    return got, record


@pytest.mark.slow
@pytest.mark.dist
def test_every_process_takes_the_same_checkpoint_of_a_source_that_is_saving(two_checkpoints, tmp_path):
    run, _ = two_checkpoints
    ranks = run_distributed(_init_while_the_source_saves, 2, str(run), str(tmp_path))
    (got0, record0), (got1, record1) = ranks
    assert record0 == record1
    src = _source_tensors(record0["file"])
    assert _equal(src, got0) and _equal(src, got1)  # every shard from the checkpoint the run records


def test_a_symbolic_link_source_leading_elsewhere_on_the_rerun_is_warned(source, tmp_path, caplog):
    run, cfg = source
    link = tmp_path / "latest"
    link.symlink_to(run)
    init = [f"checkpoint.init_from={link}", "train.max_steps=1", "checkpoint.every=1"]
    Trainer(apply_overrides(cfg, init), tmp_path / "new").fit()
    link.unlink()
    link.symlink_to(tmp_path)  # another folder now
    caplog.clear()
    with caplog.at_level("INFO", logger="seer.train"):
        Trainer(apply_overrides(cfg, init), tmp_path / "new").release()  # resumes its own, saying so
    assert f"checkpoint.init_from={link} leads to {tmp_path} now, but to {run} when" in caplog.text
