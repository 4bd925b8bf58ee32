"""End-to-end runs of a few steps: one process (the CLI, every output), CPU multi-crop in DataLoader workers,
and torchrun with 2 processes for data parallelism (then resumed by 1 process) and tensor parallelism."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seer import load_pretrained
from seer.config import apply_overrides, preset
from seer.data.dataset import DataError
from seer.train import Trainer
from seer.train.checkpoint import list_checkpoints, read_meta
from tests.images import write_bad_images, write_good_images
from tests.together import together

from .common import ROOT, env, records, seer

pytestmark = pytest.mark.slow

METRIC_KEYS = {"step", "epoch", "loss", "lr", "images_per_s", "data_wait", "assign_entropy", "prototypes_used"}


def test_one_process_cli_writes_every_output(tmp_path):
    out = tmp_path / "run"
    proc = seer("train", "--preset", "tiny", "--out", str(out), "--set", "train.max_steps=4", "--set",
                "eval.at_end=true", "--set", "eval.random_init_baseline=true", "--set", "eval.max_images=150",
                "--set", "logging.plot=true", "--set", "logging.tensorboard=true", "--set", "logging.every=2",
                "--set", "eval.every=2")
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "eval_random_init.json", "plot.png", "train.log"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    recs = records(out)
    assert [r["step"] for r in recs] == [2, 4] and all(METRIC_KEYS <= set(r) for r in recs)
    during = records(out, "eval_history.jsonl")
    assert [r["step"] for r in during] == [2] and 0 <= during[0]["knn_top1"] <= 100
    ev = json.loads((out / "eval.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init"):
        assert 0.0 <= ev[key] <= 100.0
    assert "kNN top-1" in proc.stdout and "at random initialisation" in proc.stdout and "plot.png" in proc.stdout
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003", "step_00000004"]
    again = seer("train", "--preset", "tiny", "--out", str(out), "--set", "train.max_steps=4")
    assert "step 4 of 4" in again.stdout  # nothing left to do: resumes at the end and exits


def test_multicrop_in_workers_over_files_with_bad_ones(tmp_path):
    data = tmp_path / "images"
    write_good_images(data, 12)
    bad = write_bad_images(data / "junk")
    cfg = apply_overrides(preset("tiny"), [f"data.source={data}", "data.augment_on=workers", "data.num_workers=2",
                                           "train.max_steps=2", "train.threads=1"])
    result = Trainer(cfg, tmp_path / "run").fit()  # 16 files, 8 per step: 2 steps read every file once
    assert result["step"] == 2
    skipped = (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in skipped} == {str(p) for p in bad.values()}
    assert records(tmp_path / "run")[-1]["skipped_files"] == 4
    # 4 of the 16 files are bad: more than a fifth of the dataset stops the run, naming the key
    with pytest.raises(DataError, match="more than data.max_bad_fraction=0.2"):
        Trainer(apply_overrides(cfg, ["data.max_bad_fraction=0.2"]), tmp_path / "strict").fit()


def test_bad_fraction_gathers_names_again_only_when_the_limit_may_be_passed(monkeypatch):
    # 10 images, limit 5. The summed counts overstate the distinct files (here 2 processes x the same 3
    # files): once the sum passes the limit the names are gathered (3 distinct), and again only when the
    # files met since could take 3 past 5, i.e. when the sum has grown by 3 more.
    from types import SimpleNamespace
    gathers = []

    def gather(out, names):
        gathers.append(list(names))
        out[:] = [names, names]
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    fake = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(max_bad_fraction=0.5)), data=[0] * 10,
                           dist=SimpleNamespace(world=2), bad_files={"a", "b", "c"}, _bad_gathered=(0, 0),
                           out=Path("OUT"))
    for total in (4, 5, 6, 7, 8):
        Trainer._check_bad_fraction(fake, total, epoch=0)
    assert len(gathers) == 1 and fake._bad_gathered == (6, 3)
    fake.bad_files |= {"d", "e", "f"}
    with pytest.raises(DataError, match="6 of the 10 images"):
        Trainer._check_bad_fraction(fake, 9, epoch=0)  # 3 + (9 - 6) > 5: gathered again
    Trainer._check_bad_fraction(fake, 99, epoch=1)  # later epochs meet the same files: never checked
    assert len(gathers) == 2


def test_each_unreadable_file_is_listed_once_over_tensor_parallel_ranks_and_resumes(tmp_path):
    """OUT/skipped_files.txt had each bad file once per tensor-parallel rank (they read the same images), and
    again after a resume for those met after its checkpoint (which does not count them)."""
    from types import SimpleNamespace

    from seer.data.dataset import Skipped
    listed = tmp_path / "skipped_files.txt"
    listed.write_text("/d/a.jpg\tValueError: bad\n/d/b.jpg\tValueError: bad\n")  # an earlier attempt's
    met = [Skipped("/d/b.jpg", "ValueError: bad"), Skipped("/d/c.jpg", "ValueError: bad"),
           Skipped("/d/t\tab.jpg", "ValueError: bad")]
    for tp_rank in (1, 0):  # each rank's own Trainer; the checkpoint counted a.jpg alone
        fake = SimpleNamespace(bad_files={"/d/a.jpg"}, _listed=set(), _listed_at=0, out=tmp_path,
                               dims=SimpleNamespace(tp_rank=tp_rank))
        Trainer._record_skipped(fake, met)
        Trainer._record_skipped(fake, met)
        assert fake.bad_files == {"/d/a.jpg", "/d/b.jpg", "/d/c.jpg", "/d/t\tab.jpg"}  # counted on every rank
    assert [line.split("\t")[0] for line in listed.read_text().splitlines()] == \
        ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg", "/d/t\\tab.jpg"]


def test_data_parallel_ranks_list_a_file_they_both_meet_once(tmp_path):
    """Each data-parallel process read the list once, at its first bad file: a file that two of them met (one
    rank's bad file is another's replacement read) was listed twice. A line cut short by a kill kept the next
    name on it."""
    from types import SimpleNamespace

    from seer.data.dataset import Skipped
    listed = tmp_path / "skipped_files.txt"
    listed.write_text("/d/a.jpg\tValueError: bad\n/d/cut.jpg\tValueEr")  # an earlier attempt, killed mid-line
    ranks = [SimpleNamespace(bad_files=set(), _listed=set(), _listed_at=0, out=tmp_path,
                             dims=SimpleNamespace(tp_rank=0)) for _ in range(2)]
    bad = lambda name: Skipped(name, "ValueError: bad")  # noqa: E731
    Trainer._record_skipped(ranks[0], [bad("/d/b.jpg")])
    Trainer._record_skipped(ranks[1], [bad("/d/c.jpg")])
    Trainer._record_skipped(ranks[0], [bad("/d/c.jpg"), bad("/d/d.jpg")])  # c.jpg: listed by the other rank
    Trainer._record_skipped(ranks[1], [bad("/d/b.jpg"), bad("/d/d.jpg")])
    assert [line.split("\t")[0] for line in listed.read_text().splitlines()] == \
        ["/d/a.jpg", "/d/cut.jpg", "/d/b.jpg", "/d/c.jpg", "/d/d.jpg"]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.dist
def test_bad_fraction_counts_distinct_files_over_processes(tmp_path):
    """4 of 16 files unreadable, side by side: two processes both walk past them to replacements, so their
    summed counts pass 0.3 of the dataset; the distinct count (gathered) does not, and the run goes on. A
    limit below 0.25 stops it."""
    data = tmp_path / "images"
    write_good_images(data, 12)
    write_bad_images(data / "junk")
    base = ["-m", "seer", "train", "--preset", "tiny", "--set", f"data.source={data}", "--set", "train.max_steps=2",
            "--set", "train.threads=1", "--set", "logging.progress=off"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base,
           "--out", str(tmp_path / "stop"), "--set", "data.max_bad_fraction=0.2"]
    _, proc = together(  # (--standalone: each job its own free port)
        lambda: _torchrun(*base, "--out", str(tmp_path / "ok"), "--set", "data.max_bad_fraction=0.3"),
        lambda: subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT))
    assert proc.returncode != 0 and "4 of the 16 images of data.source are unreadable" in proc.stderr


def test_torchrun_data_parallel_then_resume_with_one_process(tmp_path):
    out = tmp_path / "dp"
    _torchrun("-m", "seer", "train", "--preset", "tiny", "--out", str(out), "--set", "train.max_steps=4",
              "--set", "checkpoint.every=2", "--set", "train.threads=1", "--set", "loss.freeze_prototypes_iters=0",
              "--set", "train.grad_clip=1.0")
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    meta = read_meta(ckpt)
    assert (meta["world_size"], meta["dp"], meta["step"]) == (2, 2, 4)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    saved = load_pretrained(out).state_dict()
    # One process resumes the 2-process run: model and optimizer state resharded by DCP.
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=6", "train.threads=1", "loss.freeze_prototypes_iters=0"])
    trainer = Trainer(cfg, out)
    assert trainer.step == 4 and trainer.data.state_dict()["offset"] == meta["data"]["offset"]
    live = trainer.model.backbone.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    momentum = [s["momentum_buffer"] for s in trainer.opt.state.values()]
    assert len(momentum) == len(list(trainer.model.parameters())) and all(m.abs().sum() > 0 for m in momentum)
    trainer.fit()
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]


def test_torchrun_tensor_parallel_and_the_merged_checkpoint(tmp_path):
    out = tmp_path / "tp"
    _torchrun(str(ROOT / "tests" / "train" / "dist_features.py"), str(out), "parallel.tp=2", "train.max_steps=3",
              "checkpoint.every=3", "train.threads=1", "model.qk_norm=true", "train.grad_clip=1.0")
    meta = read_meta(list_checkpoints(out / "checkpoints")[-1])
    assert meta["tp"] == 2 and meta["dp"] == 1
    assert "backbone.blocks.0.attn.qkv.weight" in meta["tp_layout"] and meta["tp_layout"]["head.prototypes.weight"]
    # The checkpoint's per-rank slices merged back: the single-process backbone computes what the
    # tensor-parallel one computed.
    ref = torch.load(out / "features.pt")
    model = load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"]), ref["features"], rtol=1e-4, atol=1e-4)


def _train_then_report_process_group(rank, world, out):
    import torch.distributed as dist

    from seer.cli import main
    code = main(["train", "--preset", "tiny", "--out", out, "--set", "train.max_steps=1", "--set",
                 "train.threads=1", "--set", "logging.progress=off"])
    return {"code": code, "initialized": dist.is_initialized()}


def test_seer_train_destroys_its_process_group(tmp_path):
    # Left to interpreter teardown, a gloo process group can abort the process ("terminate called without an
    # active exception") after a finished run, and NCCL warns of leaked resources.
    from tests.dist_utils import run_distributed
    for res in run_distributed(_train_then_report_process_group, 2, str(tmp_path / "run")):
        assert res == {"code": 0, "initialized": False}
