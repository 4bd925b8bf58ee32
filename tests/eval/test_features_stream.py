"""``seer features`` for large sets: rows streamed to FEATS.npy.part (no features held in memory), the same
bytes as the in-memory path; an error or a kill mid-way renames nothing into place, and the rerun resumes
from the recorded batches to the bytes of an uninterrupted run (a damaged record or another fingerprint
starts afresh); several gloo processes write one file, byte for byte the single process's."""
import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import seer
from seer.cli import main
from seer.config import apply_overrides, preset
from seer.eval import extract
from seer.eval.extract import extract_image_features
from seer.eval.feature_files import RowWriter, create_rows_file, drop_rows, write_outputs
from seer.eval.save_features import batch_share, resumed_share, save_image_features
from seer.train import Trainer
from tests.dist_utils import run_distributed
from tests.images import image_bytes, write_good_images

# 11 images, 3 unreadable: one in the first batch of 3, and the whole last batch (a rank's share ending in
# a batch without rows); 11 is divisible neither by the batch size nor by 2 processes.
BROKEN = (1, 9, 10)
N, BATCH = 11, "3"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step tiny run (ViT width 64, 32 px, fp32) and a list file of N images, BROKEN of them corrupt."""
    root = tmp_path_factory.mktemp("stream")
    Trainer(apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1"]), root / "run").fit()
    good = iter(write_good_images(root / "images", N - len(BROKEN)))
    paths = []
    for i in range(N):
        if i in BROKEN:
            paths.append(root / "images" / f"broken_{i}.jpg")
            paths[-1].write_text("not an image")
        else:
            paths.append(next(good))
    (root / "list.txt").write_text("".join(f"{p}\n" for p in paths))
    return root


def argv(run, out, *extra):
    return ["features", "--checkpoint", str(run / "run"), "--images", str(run / "list.txt"), "--out", str(out),
            "--workers", "0", "--batch-size", BATCH, *extra]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("dropped", [[], [0], [3, 4, 5], [9], [0, 2, 7, 8, 9]])
def test_rows_written_by_index_then_dropped_are_np_saves_bytes(tmp_path, dropped):
    rows = np.random.default_rng(0).standard_normal((10, 7)).astype(np.float32)
    create_rows_file(tmp_path / "r.npy", 10, 7)
    writer = RowWriter(tmp_path / "r.npy")
    writer([5, 6, 8], rows[[5, 6, 8]])  # out of order, with a gap: as batches of several processes arrive
    writer([0, 1, 2, 3, 4, 7, 9], rows[[0, 1, 2, 3, 4, 7, 9]])
    writer.close()
    assert drop_rows(tmp_path / "r.npy", dropped, chunk_bytes=2 * 7 * 4) == 10 - len(dropped)  # 2-row chunks
    buf = io.BytesIO()
    np.save(buf, np.delete(rows, dropped, axis=0))
    assert (tmp_path / "r.npy").read_bytes() == buf.getvalue()


def test_row_files_refuse_bad_rows(tmp_path):
    create_rows_file(tmp_path / "r.npy", 4, 3)
    writer = RowWriter(tmp_path / "r.npy")
    with pytest.raises(ValueError, match=r"expected rows of shape \(2, 3\), got \(2, 4\)"):
        writer([0, 1], np.zeros((2, 4), np.float32))
    with pytest.raises(IndexError, match="rows 3..4 are outside 0..3"):
        writer([3, 4], np.zeros((2, 3), np.float32))
    writer.close()
    with pytest.raises(ValueError, match="dropped must be increasing row indices within 0..3"):
        drop_rows(tmp_path / "r.npy", [2, 1])
    with pytest.raises(ValueError, match="rows >= 1 and width >= 1"):
        create_rows_file(tmp_path / "e.npy", 0, 3)


@pytest.mark.parametrize("n, world", [(11, 2), (11, 3), (12, 4), (2, 3), (1, 1)])
def test_shares_are_whole_batches_covering_every_path_once(n, world):
    shares = [batch_share(n, 3, r, world) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))
    assert all(s.start % 3 == 0 for s in shares if len(s))
    sizes = [-(-len(s) // 3) for s in shares]  # batches per rank: as even as whole batches allow
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, world, done", [(30, 2, set(range(5))), (30, 3, {0, 2, 4, 6, 8}), (31, 4, {9, 10}),
                                            (11, 2, set()), (9, 4, {0, 1}), (9, 2, {0, 1, 2})])
def test_a_resumed_run_spreads_the_batches_left_over_every_rank(n, world, done):
    """Resumed: the batches not written are split between the ranks as evenly as whole batches allow (a run
    that did the first half on one process, resumed on two, gave the second process all that was left)."""
    parts = [resumed_share(n, 3, r, world, done) for r in range(world)]
    ran = [[i for i in s[::3] if i not in skip] for s, skip in parts]  # the first index of each batch run
    starts = [i for r in ran for i in r]
    assert starts == [k * 3 for k in range(-(-n // 3)) if k not in done]  # each batch left once, in order
    assert max(map(len, ran)) - min(map(len, ran)) <= 1
    assert all(s.start % 3 == 0 and skip <= {k * 3 for k in done} for s, skip in parts if len(s))
    if not done:
        assert [s for s, _ in parts] == [batch_share(n, 3, r, world) for r in range(world)]


def test_features_and_attention_maps_skip_files_over_the_runs_data_max_image_bytes(run, tmp_path, capsys, caplog):
    """seer features and seer attention-maps read the images with the run's data.max_image_bytes, as training
    does: a larger file is skipped without being read, with the reason."""
    ckpt = tmp_path / "run"
    shutil.copytree(run / "run", ckpt)
    good = [p for i, p in enumerate((run / "list.txt").read_text().splitlines()) if i not in BROKEN]
    biggest = max(good, key=lambda p: Path(p).stat().st_size)
    size = Path(biggest).stat().st_size
    over = [p for p in good if Path(p).stat().st_size == size]
    for f in ckpt.rglob("config.yaml"):
        text = f.read_text()
        assert "  max_image_bytes: 536870912\n" in text
        f.write_text(text.replace("  max_image_bytes: 536870912\n", f"  max_image_bytes: {size - 1}\n"))
    why = f"(ValueError: {size} bytes exceed data.max_image_bytes={size - 1} (not read))"
    with caplog.at_level("WARNING"):
        assert main(["features", "--checkpoint", str(ckpt), *argv(run, tmp_path / "f.npy")[3:]]) == 0
    assert f"{8 - len(over)} images x 64 (cls, last 1 block(s), 32 px, cpu, fp32), {3 + len(over)} unreadable " \
        f"skipped" in capsys.readouterr().out
    assert f"skipping unreadable image {biggest} {why}" in caplog.text
    assert biggest not in (tmp_path / "f.txt").read_text().splitlines()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["attention-maps", "--checkpoint", str(ckpt), "--images", str(run / "list.txt"), "--out",
                     str(tmp_path / "maps"), "--device", "cpu"]) == 0
    assert f"{8 - len(over)} images (" in capsys.readouterr().out
    assert f"skipping unreadable image {biggest} {why}" in caplog.text
    # Another limit skips other images: an interrupted run's rows are reused only under the same one.
    from seer.eval.feature_progress import fingerprint
    fp = [fingerprint(torch.nn.Linear(2, 2), ["a.png"], backbone_id="x", image_size=32, mean=[0.5] * 3, std=[1] * 3,
                      layers=1, tokens="cls", batch_size=3, width=64, device="cpu", autocast_dtype=None,
                      max_pixels=10**8, max_bytes=limit) for limit in (size, size - 1)]
    assert (fp[0]["max_bytes"], fp[1]["max_bytes"]) == (size, size - 1)


def test_streamed_file_is_the_in_memory_files_bytes(run, tmp_path, capsys):
    assert main(argv(run, tmp_path / "s.npy")) == 0
    assert "8 images x 64 (cls, last 1 block(s), 32 px, cpu, fp32), 3 unreadable skipped" in capsys.readouterr().out
    paths = (run / "list.txt").read_text().splitlines()
    res = extract_image_features(seer.load_pretrained(run / "run"), paths, image_size=32, batch_size=3,
                                 mean=preset("tiny").data.crops.mean, std=preset("tiny").data.crops.std)
    assert write_outputs(tmp_path / "m.npy", res) == (tmp_path / "m.npy", tmp_path / "m.txt")
    assert (tmp_path / "s.npy").read_bytes() == (tmp_path / "m.npy").read_bytes()
    assert (tmp_path / "s.txt").read_bytes() == (tmp_path / "m.txt").read_bytes()
    assert leftovers(tmp_path) == ["m.npy", "m.txt", "s.npy", "s.txt"]


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """The files of an uninterrupted run (one thread, as the gloo processes run): what a resumed one must equal."""
    out = tmp_path_factory.mktemp("reference") / "ref.npy"
    with one_thread():
        assert main(argv(run, out)) == 0
    return out.read_bytes(), out.with_suffix(".txt").read_bytes()


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def same_files(out, reference):
    return (out.read_bytes(), out.with_suffix(".txt").read_bytes()) == reference


def forward_until(monkeypatch, stop_at=None, error=OSError, hook=None):
    """Count the forward passes (the list returned); the ``stop_at``-th raises ``error`` (or calls ``hook``)."""
    real, calls = extract.token_features, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            if hook is not None:
                hook()
            else:
                raise error("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "token_features", forward)
    return calls


KEPT = ["f.npy.part", "f.npy.part.progress.rank0"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_an_error_mid_way_keeps_the_rows_and_the_same_command_resumes(run, reference, tmp_path, monkeypatch,
                                                                      caplog, capsys, error):
    """An error (or Ctrl-C) in batch 2 of 4: no output renamed (the old pair stays), FEATS.npy.part and the
    record of batch 1 (with its unreadable image 1) are kept; the same command computes batches 2 and 3 only
    (batch 4 has no readable image), still drops image 1's row, and writes the uninterrupted run's bytes."""
    (tmp_path / "f.npy").write_bytes(b"old")  # an earlier pair, to be replaced (--overwrite) only on success
    calls = forward_until(monkeypatch, 2, error)
    with one_thread():
        if error is KeyboardInterrupt:  # Ctrl-C: one line and the shell's status of an interrupted command
            assert main(argv(run, tmp_path / "f.npy", "--overwrite")) == 130
        else:
            with pytest.raises(error, match="stopped"):  # (an OSError that is not about a given path: re-raised)
                main(argv(run, tmp_path / "f.npy", "--overwrite"))
        assert len(calls) == 2
        assert leftovers(tmp_path) == ["f.npy", *KEPT] and (tmp_path / "f.npy").read_bytes() == b"old"
        assert "f.npy.part keeps 1 of 4 batches: the same command resumes them" in caplog.text
        calls = forward_until(monkeypatch)
        capsys.readouterr()
        assert main(argv(run, tmp_path / "f.npy", "--overwrite")) == 0
    assert len(calls) == 2 and "resuming: 1 of 4 batches already written" in caplog.text
    out = capsys.readouterr().out
    assert "8 images x 64" in out and "3 unreadable skipped (listed below)" in out
    assert "(1 of 4 batches from an interrupted run)" in out
    assert all(f"unreadable: {run / 'images'}/broken_{i}.jpg (" in out for i in BROKEN)  # (1: the first run's)
    assert same_files(tmp_path / "f.npy", reference)
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]


def test_an_output_refused_at_the_end_keeps_the_rows(run, reference, tmp_path, monkeypatch, caplog, capsys):
    """A file that appears at --out's .txt during the run (not written by seer features) refuses the renames at
    the end: the rows are kept with their record (they were removed, with every batch computed), and once the
    file is moved the same command writes the outputs without a forward pass."""
    forward_until(monkeypatch, 2, hook=lambda: (tmp_path / "f.txt").write_text("my notes\n"))
    with one_thread():
        assert main(argv(run, tmp_path / "f.npy")) == 2
    assert "f.txt' exists and was not written by seer features" in capsys.readouterr().err
    assert "f.npy.part keeps 4 of 4 batches" in caplog.text
    assert leftovers(tmp_path) == ["f.npy.part", "f.npy.part.progress.rank0", "f.txt"]
    (tmp_path / "f.txt").unlink()
    calls = forward_until(monkeypatch)
    assert main(argv(run, tmp_path / "f.npy")) == 0
    assert len(calls) == 0 and "resuming: 4 of 4 batches already written" in caplog.text
    assert same_files(tmp_path / "f.npy", reference)
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]


def _killed_at_third_forward(run, out, threads, sig="SIGKILL", record_every_s=0):
    # (run by test_a_killed_run_resumes in a python of its own; record_every_s=0: a record after every batch)
    return f"""
import os, signal, sys, torch
from pathlib import Path
from seer.cli import main
from seer.eval import extract, feature_progress
from tests.eval.test_features_stream import argv
torch.set_num_threads({threads})
feature_progress.RECORD_EVERY_S = {record_every_s}
real, calls = extract.token_features, []
def forward(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.{sig})
    return real(*args, **kwargs)
extract.token_features = forward
sys.exit(main(argv(Path({str(run)!r}), Path({str(out)!r}))))
"""


@pytest.mark.cuda
def test_a_gpu_run_resumes_with_the_gpu_in_its_fingerprint(run, tmp_path, monkeypatch, caplog):
    """On a GPU the record names the device (rows made on another GPU kind are not reused), and the rerun
    computes only the batches left."""
    forward_until(monkeypatch, 3)
    with pytest.raises(OSError, match="stopped"):
        main(argv(run, tmp_path / "f.npy", "--device", "cuda"))
    record = json.loads((tmp_path / "f.npy.part.progress.rank0").read_text())
    assert record["fingerprint"]["device"] == f"cuda ({torch.cuda.get_device_name(0)})"
    calls = forward_until(monkeypatch)
    assert main(argv(run, tmp_path / "f.npy", "--device", "cuda")) == 0
    assert len(calls) == 1 and "resuming: 2 of 4 batches already written" in caplog.text
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]


@pytest.mark.parametrize("sig, record_every_s, status", [("SIGKILL", 0, -signal.SIGKILL),
                                                         ("SIGTERM", 86400, 128 + signal.SIGTERM)])
def test_a_killed_run_resumes(run, reference, tmp_path, monkeypatch, caplog, sig, record_every_s, status):
    """Stopped in batch 3: the batches recorded before it are reused, the rest computed; the same bytes as an
    uninterrupted run. SIGKILL (no handler, no cleanup) after a record per batch; SIGTERM (torchrun stopping
    the other processes of a launch, a scheduler) with no periodic record at all (RECORD_EVERY_S a day): the
    CLI turns it into an exception, so the process records what it wrote and exits with 143 (left to
    SIGTERM's default, nothing was recorded)."""
    code = _killed_at_third_forward(run, tmp_path / "f.npy", 1, sig=sig, record_every_s=record_every_s)
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    if sig == "SIGTERM":
        assert done.stderr.endswith("seer features: terminated (SIGTERM)\n"), done.stderr
    assert leftovers(tmp_path) == KEPT
    calls = forward_until(monkeypatch)
    with one_thread():
        assert main(argv(run, tmp_path / "f.npy")) == 0
    assert len(calls) == 1 and "resuming: 2 of 4 batches already written" in caplog.text
    assert same_files(tmp_path / "f.npy", reference)
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]


@pytest.mark.parametrize("extra, why", [
    (["--no-resume"], "resume is off (--no-resume)"),
    (["--batch-size", "4"], "f.npy.part.progress.rank0 was written with another batch_size (3, now 4)"),
    (["--tokens", "cls+patch-mean"], 'with another tokens ("cls", now "cls+patch-mean"); another width (64, now 128)'),
    (["--image-size", "16"], "with another image_size (32, now 16)"),
    (["--precision", "bf16"], 'with another autocast ("None", now "torch.bfloat16")'),
])
def test_another_fingerprint_or_no_resume_starts_afresh(run, tmp_path, monkeypatch, caplog, extra, why):
    """Rows made otherwise (or --no-resume) are not reused: one warning naming what differs, every batch
    computed."""
    forward_until(monkeypatch, 2)
    with pytest.raises(OSError, match="stopped"):
        main(argv(run, tmp_path / "f.npy"))
    calls = forward_until(monkeypatch)
    assert main(argv(run, tmp_path / "f.npy", *extra)) == 0
    assert "f.npy.part: starting afresh: " in caplog.text and why in caplog.text
    assert "resuming" not in caplog.text
    assert len(calls) == 3  # (every batch with a readable image, of 3 or of 4)
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def _edit_record(key, value):
    def edit(folder):
        rec = json.loads((folder / KEPT[1]).read_text())
        rec[key] = value
        (folder / KEPT[1]).write_text(json.dumps(rec))
    return edit


def _skip_image_1_again(folder):  # (its reason differs: the set of pairs keeps both)
    rec = json.loads((folder / KEPT[1]).read_text())
    rec["skipped"].append([1, "another reason"])
    (folder / KEPT[1]).write_text(json.dumps(rec))


def _base_record_without_unreadable_images(folder):  # batch 0 as a second record, image 1 readable there
    rec = json.loads((folder / KEPT[1]).read_text())
    rec["skipped"] = []
    (folder / "f.npy.part.progress").write_text(json.dumps(rec))


@pytest.mark.parametrize("damage, why", [
    (lambda d: _truncate(d / KEPT[1], 40), "f.npy.part.progress.rank0 is unreadable (JSONDecodeError"),
    (lambda d: (d / KEPT[1]).write_text("[" * 10**5 + "]" * 10**5), "is unreadable (RecursionError"),
    (_skip_image_1_again, "f.npy.part.progress.rank0 is malformed (it lists an unreadable image twice)"),
    (_base_record_without_unreadable_images, "f.npy.part.progress.rank0 and another record list other unreadable "
                                             "images in the batches both list"),
    (lambda d: (d / KEPT[1]).write_bytes(b"\xff\x00"), "f.npy.part.progress.rank0 is unreadable (UnicodeDecodeError"),
    (lambda d: (d / KEPT[1]).write_text("[]"), "is not a progress record of this seer features"),
    (_edit_record("batches", [[0, 9]]), "is malformed (batches [0, 9]: expected [first, end) within 0..4)"),
    (_edit_record("batches", [[1, 2]]), "is malformed (unreadable image [1,"),  # (image 1 is in batch 0)
    (_edit_record("skipped", [[1, 7]]), "is malformed (unreadable image [1, 7]"),
    (lambda d: (d / KEPT[0]).unlink(), "f.npy.part is missing"),
    (lambda d: _truncate(d / KEPT[0], 128 + 4 * 64 * 5), "f.npy.part holds 1408 bytes of (11, 64) rows, not the 2944"),
    (lambda d: (d / KEPT[0]).write_bytes(b"rows"), "f.npy.part is unreadable (ValueError"),
])
def test_a_damaged_record_or_part_starts_afresh(run, reference, tmp_path, monkeypatch, caplog, damage, why):
    """A record that is unreadable or malformed, or a .part missing or shorter than its rows (the record would
    name rows that are not there): never reused, never a crash; a warning naming it, every batch computed.
    (Brackets nested too deep raised RecursionError out of the run; an unreadable image listed twice, with two
    reasons, was reused, and the run failed once every batch was computed, in drop_rows, removing all its rows;
    two records that disagree on a batch's unreadable images were merged.)"""
    forward_until(monkeypatch, 2)
    with one_thread():
        with pytest.raises(OSError, match="stopped"):
            main(argv(run, tmp_path / "f.npy"))
        damage(tmp_path)
        calls = forward_until(monkeypatch)
        assert main(argv(run, tmp_path / "f.npy")) == 0
    assert "f.npy.part: starting afresh: " in caplog.text and why in caplog.text and "resuming" not in caplog.text
    assert len(calls) == 3 and same_files(tmp_path / "f.npy", reference)
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]


def test_relative_image_paths_run_from_another_folder_start_afresh(run, tmp_path, monkeypatch, caplog):
    """--images relative to the current folder: the same command run from another folder reads other files under
    the same paths (the same list, the same fingerprint): it was resumed with the first folder's rows. The
    folder is part of the fingerprint where a path is relative."""
    for folder, seeds in (("a", [0, 1, 2, 3]), ("b", [3, 2, 1, 0])):  # the same names, other images
        (tmp_path / folder / "imgs").mkdir(parents=True)
        for i, seed in enumerate(seeds):
            (tmp_path / folder / "imgs" / f"img_{i}.png").write_bytes(image_bytes(seed))
    (tmp_path / "out").mkdir()

    def args(out):
        return ["features", "--checkpoint", str(run / "run"), "--images", "imgs", "--out", str(out), "--workers",
                "0", "--batch-size", "2"]
    monkeypatch.chdir(tmp_path / "b")
    assert main(args(tmp_path / "ref.npy")) == 0  # b's images, uninterrupted
    monkeypatch.chdir(tmp_path / "a")
    forward_until(monkeypatch, 2)
    with pytest.raises(OSError, match="stopped"):
        main(args(tmp_path / "out" / "f.npy"))
    monkeypatch.chdir(tmp_path / "b")
    calls = forward_until(monkeypatch)
    assert main(args(tmp_path / "out" / "f.npy")) == 0
    assert "starting afresh: f.npy.part.progress.rank0 was written with another image list" in caplog.text
    assert len(calls) == 2 and "resuming" not in caplog.text
    assert (tmp_path / "out" / "f.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert (tmp_path / "out" / "f.txt").read_bytes() == (tmp_path / "ref.txt").read_bytes()


def test_outs_folder_removed_mid_way_is_one_line_naming_it(run, tmp_path, monkeypatch, capsys):
    """The folder of --out removed during the run: one line naming it (it was a bare FileNotFoundError about
    the .part file, or about the record's temporary file), not a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    forward_until(monkeypatch, 2, hook=lambda: shutil.rmtree(out))
    assert main(argv(run, out / "f.npy")) == 2
    err = capsys.readouterr().err
    assert f"seer features: error: --out '{out / 'f.npy'}': its folder '{out}' was removed while the features " \
           f"were being written" in err and "Traceback" not in err


def test_the_python_function_resumes_and_another_backbone_starts_afresh(run, tmp_path, monkeypatch, caplog):
    """Without a backbone_id (the CLI's checkpoint identity), the weights themselves are fingerprinted."""
    paths = (run / "list.txt").read_text().splitlines()
    backbone = seer.load_pretrained(run / "run")
    kwargs = dict(image_size=32, mean=preset("tiny").data.crops.mean, std=preset("tiny").data.crops.std, batch_size=3)
    forward_until(monkeypatch, 2)
    with pytest.raises(OSError, match="stopped"):
        save_image_features(backbone, paths, tmp_path / "f.npy", **kwargs)
    with torch.no_grad():
        backbone.norm.weight[0] += 1
    calls = forward_until(monkeypatch)
    res = save_image_features(backbone, paths, tmp_path / "f.npy", overwrite=True, **kwargs)
    assert "starting afresh: f.npy.part.progress.rank0 was written with another backbone" in caplog.text
    assert len(calls) == 3 and res.resumed == 0
    with torch.no_grad():  # the same weights again: the next interrupted run is resumed
        backbone.norm.weight[0] -= 1
    forward_until(monkeypatch, 3)
    with pytest.raises(OSError, match="stopped"):
        save_image_features(backbone, paths, tmp_path / "f.npy", overwrite=True, **kwargs)
    calls = forward_until(monkeypatch)
    res = save_image_features(backbone, paths, tmp_path / "f.npy", overwrite=True, **kwargs)
    assert len(calls) == 1 and res.resumed == 2 and res.rows == 8 and len(res.skipped) == 3


def test_a_second_run_on_the_same_out_is_refused_and_leaves_the_first_ones_rows(run, tmp_path, monkeypatch, capsys):
    """A second seer features on the --out that a run is writing is refused (status 2, nothing of the first
    run's touched: it used to truncate the first one's .part, whose rows then went into the renamed file);
    the first one finishes with its own bytes."""
    assert main(argv(run, tmp_path / "ref.npy")) == 0
    real, seen = extract.token_features, []

    def forward(*args, **kwargs):
        if not seen:  # during the first run's first batch: the same command again
            before = (tmp_path / "f.npy.part").read_bytes()
            seen.append(main(argv(run, tmp_path / "f.npy")))
            seen.append(capsys.readouterr().err)
            assert (tmp_path / "f.npy.part").read_bytes() == before
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "token_features", forward)
    assert main(argv(run, tmp_path / "f.npy")) == 0
    assert seen[0] == 2 and "is being written by another seer features" in seen[1]
    assert (tmp_path / "f.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert (tmp_path / "f.txt").read_bytes() == (tmp_path / "ref.txt").read_bytes()
    assert leftovers(tmp_path) == ["f.npy", "f.txt", "ref.npy", "ref.txt"]


def test_a_part_file_without_a_record_is_replaced(run, tmp_path, caplog):
    """A .part without a record (a run killed before its first one) and the failure flag of a killed launch:
    the next run replaces them."""
    (tmp_path / "f.npy.part").write_bytes(b"stale rows")
    (tmp_path / "f.npy.part.failed").write_text("rank 1: killed\n")
    assert main(argv(run, tmp_path / "f.npy")) == 0
    assert "starting afresh: f.npy.part has no progress record" in caplog.text
    assert leftovers(tmp_path) == ["f.npy", "f.txt"] and np.load(tmp_path / "f.npy").shape == (8, 64)


def test_write_outputs_on_an_interrupted_runs_out_removes_its_records(run, reference, tmp_path, monkeypatch, caplog):
    """write_outputs (features held in memory, another backbone's here) on the --out of an interrupted seer
    features replaces FEATS.npy.part: killed before its renames, it left that run's record beside its own rows
    (same shape), and seer features then resumed those batches from them."""
    forward_until(monkeypatch, 2)
    with one_thread():
        with pytest.raises(OSError, match="stopped"):
            main(argv(run, tmp_path / "f.npy"))
    paths = (run / "list.txt").read_text().splitlines()
    other = extract.ImageFeatures(torch.ones(len(paths), 64), paths, [])
    kept = tmp_path / "kept"

    def killed(*args, **kwargs):  # what a kill before the renames leaves on disk
        shutil.copy(tmp_path / "f.npy.part", kept)
        raise KeyboardInterrupt
    monkeypatch.setattr("seer.eval.feature_files.commit_outputs", killed)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "f.npy", other)
    monkeypatch.undo()
    kept.rename(tmp_path / "f.npy.part")
    with one_thread():
        assert main(argv(run, tmp_path / "f.npy")) == 0
    assert "starting afresh: f.npy.part has no progress record" in caplog.text and "resuming" not in caplog.text
    assert same_files(tmp_path / "f.npy", reference)


def test_an_image_path_with_a_newline_is_refused_before_the_work(run, tmp_path, capsys):
    """FEATS.txt is one path a line: a single --images file with a newline in its name gave 2 lines for 1 row
    (and the pair was then refused as foreign by --overwrite); a folder's scan leaves such names out."""
    image = tmp_path / "a\nb.png"
    image.write_bytes((next(p for p in (run / "images").iterdir() if p.suffix == ".png")).read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    args = ["features", "--checkpoint", str(run / "run"), "--images", str(image), "--out", str(out / "f.npy")]
    assert main(args) == 2
    assert "image path 0 (" in capsys.readouterr().err
    assert leftovers(out) == []
    with pytest.raises(ValueError, match="contains a newline"):
        write_outputs(out / "m.npy", extract.ImageFeatures(torch.zeros(1, 2), [str(image)], []))
    assert leftovers(out) == []


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                                           ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
                                           ({"workers": -1}, "workers must be an integer >= 0, got -1")])
def test_save_image_features_names_a_bad_batch_size_before_any_file(run, tmp_path, kwargs, match):
    """batch_size=0 was a ZeroDivisionError from the shares (and 2.5 a TypeError), after the .part was made."""
    paths = (run / "list.txt").read_text().splitlines()
    with pytest.raises(ValueError, match=match):
        save_image_features(seer.load_pretrained(run / "run"), paths, tmp_path / "f.npy", image_size=32,
                            mean=[0.5] * 3, std=[0.2] * 3, **kwargs)
    assert leftovers(tmp_path) == []



@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 30}, "image_size must be a positive integer multiple of the patch size 8, got 30"),
    ({"image_size": 0}, "image_size must be a positive integer multiple of the patch size 8, got 0"),
    ({"image_size": 32.0}, "image_size must be a positive integer multiple of the patch size 8, got 32.0"),
    ({"std": [0.2, 0.0, 0.2]}, r"std must be 3 finite numbers, one per RGB channel \(all > 0\)"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean must be 3 finite numbers")])
def test_a_bad_image_size_or_normalisation_is_named_before_any_file(run, tmp_path, kwargs, match):
    """std 0 wrote inf/NaN rows without a word; the others were torch errors (a resize to 0 x 0, a reshape of 2
    numbers, a TypeError for a float size, the patch embedding's shape error) at the first batch."""
    paths = (run / "list.txt").read_text().splitlines()
    args = dict({"image_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3}, **kwargs)
    backbone = seer.load_pretrained(run / "run")
    with pytest.raises(ValueError, match=match):
        save_image_features(backbone, paths, tmp_path / "f.npy", **args)
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match=match):
        extract_image_features(backbone, paths, **args)
    from seer.eval.attention_images import save_attention_maps
    with pytest.raises(ValueError, match=match):
        save_attention_maps(backbone, paths, str(tmp_path / "maps"), **args)
    assert leftovers(tmp_path) == []

def _features_body(rank, world, run, out, fail_rank=None):
    """One process of a gloo launch: ``seer features`` as torchrun runs it; its exit status (or the error it
    raised), stdout, stderr and number of forward passes. Rank ``fail_rank`` fails at its first forward
    pass; the others' first forward pass waits (up to 60 s) for that failure to be flagged."""
    real, calls = extract.token_features, []

    def forward(*args, **kwargs):
        calls.append(1)
        if rank == fail_rank:
            raise OSError("disk on fire")
        flag = out.with_name(out.name + ".part.failed")
        for _ in range(600 if fail_rank is not None and len(calls) == 1 else 0):
            if flag.exists():
                break
            time.sleep(0.1)
        return real(*args, **kwargs)
    extract.token_features = forward
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv(run, out))
        except Exception as e:  # (an error main does not turn into a status: it re-raises)
            status = f"{type(e).__name__}: {e}"
    return status, stdout.getvalue(), stderr.getvalue(), len(calls)


def test_two_processes_write_the_single_process_bytes(run, tmp_path):
    """2 gloo processes (11 images in batches of 3: shares of 2 batches each, the last one all unreadable)
    and 1 process, each launched alike (one thread): the same files; only rank 0 prints."""
    (one, out1, _, _), = run_distributed(_features_body, 1, run, tmp_path / "one.npy")
    two = run_distributed(_features_body, 2, run, tmp_path / "two.npy")
    assert one == 0 and [status for status, _, _, _ in two] == [0, 0]
    assert [calls for _, _, _, calls in two] == [2, 1]  # rank 0: images 0-5, rank 1: 6-8 (9, 10 unreadable)
    assert all("8 images x 64 (cls, last 1 block(s), 32 px, cpu, fp32), 3 unreadable skipped" in out
               for out in (out1, two[0][1]))
    assert two[1][1] == ""  # rank 1 prints nothing
    # rank 0's summary lists every process's unreadable images (each process warned of its own only)
    assert all(f"broken_{i}.jpg (" in two[0][1] for i in BROKEN) and "skipped (listed below)" in two[0][1]
    assert (tmp_path / "two.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    assert (tmp_path / "two.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()
    assert leftovers(tmp_path) == ["one.npy", "one.txt", "two.npy", "two.txt"]


def test_one_failing_process_stops_all_and_a_single_process_resumes(run, reference, tmp_path, monkeypatch, caplog):
    """Rank 1 fails at once: it raises its error; rank 0 stops after the batch it is in (not after its whole
    share) and names rank 1's error (status 1); no output is written, but rank 0's batch is kept, and one
    process (another world size: batches, not shares, are recorded) resumes from it to the same bytes."""
    (status0, _, err0, calls0), (status1, _, _, _) = run_distributed(_features_body, 2, run, tmp_path / "f.npy", 1)
    assert status1 == "OSError: disk on fire"  # (an OSError that is not about a given path: raised)
    assert status0 == 1 and "rank 1 of 2 failed (OSError: disk on fire); nothing was written" in err0
    assert calls0 == 1  # of its 2 batches
    assert "f.npy.part keeps 1 of 4 batches" in err0
    assert leftovers(tmp_path) == KEPT  # (rank 1 wrote no batch: no record of its own)
    calls = forward_until(monkeypatch)
    with one_thread():
        assert main(argv(run, tmp_path / "f.npy")) == 0
    assert len(calls) == 2 and "resuming: 1 of 4 batches already written" in caplog.text
    assert same_files(tmp_path / "f.npy", reference)


def test_two_processes_resume_a_single_process_run(run, reference, tmp_path, monkeypatch):
    """One process stopped in batch 3 (batches 1 and 2 recorded); then 2 gloo processes share the batches left
    (resumed_share): rank 0 computes batch 3, rank 1 batch 4 (no readable image: no forward). Split as a fresh
    run splits (batch_share), rank 0 had nothing left and rank 1 both. The uninterrupted bytes."""
    forward_until(monkeypatch, 3)
    with one_thread(), pytest.raises(OSError, match="stopped"):
        main(argv(run, tmp_path / "f.npy"))
    two = run_distributed(_features_body, 2, run, tmp_path / "f.npy")
    assert [status for status, _, _, _ in two] == [0, 0] and [calls for _, _, _, calls in two] == [1, 0]
    assert "resuming: 2 of 4 batches already written" in two[0][2]
    assert "(2 of 4 batches from an interrupted run)" in two[0][1]
    assert same_files(tmp_path / "f.npy", reference)
    assert leftovers(tmp_path) == ["f.npy", "f.txt"]
