"""``seer features`` for large sets: rows streamed to FEATS.npy.part (no features held in memory), the same
bytes as the in-memory path; an error mid-way leaves nothing behind; several gloo processes write one file,
byte for byte the single process's."""
import contextlib
import io
import time

import numpy as np
import pytest
import torch

import seer
from seer.cli import main
from seer.config import apply_overrides, preset
from seer.eval import extract
from seer.eval.extract import extract_image_features
from seer.eval.feature_files import RowWriter, create_rows_file, drop_rows, write_outputs
from seer.eval.save_features import batch_share, save_image_features
from seer.train import Trainer
from tests.dist_utils import run_distributed
from tests.images import write_good_images

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


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_an_error_mid_way_leaves_no_files(run, tmp_path, monkeypatch, error):
    (tmp_path / "f.npy").write_bytes(b"old")  # an earlier pair, to be replaced (--overwrite) only on success
    real, calls = extract.token_features, []

    def fails_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            assert np.load(tmp_path / "f.npy.part")[0].any()  # the first batch's rows are in the file
            raise error("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "token_features", fails_second_batch)
    if error is KeyboardInterrupt:  # Ctrl-C: one line and the shell's status of an interrupted command
        assert main(argv(run, tmp_path / "f.npy", "--overwrite")) == 130
    else:
        with pytest.raises(error, match="stopped"):  # (an OSError that is not about a given path: re-raised)
            main(argv(run, tmp_path / "f.npy", "--overwrite"))
    assert len(calls) == 2
    assert leftovers(tmp_path) == ["f.npy"] and (tmp_path / "f.npy").read_bytes() == b"old"


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


def test_a_killed_runs_part_files_are_replaced(run, tmp_path):
    """A killed run leaves FEATS.npy.part (and maybe the failure flag), unlocked: the next run replaces them."""
    (tmp_path / "f.npy.part").write_bytes(b"stale rows")
    (tmp_path / "f.npy.part.failed").write_text("rank 1: killed\n")
    assert main(argv(run, tmp_path / "f.npy")) == 0
    assert leftovers(tmp_path) == ["f.npy", "f.txt"] and np.load(tmp_path / "f.npy").shape == (8, 64)


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


def test_one_failing_process_stops_all_and_leaves_no_files(run, tmp_path):
    """Rank 1 fails at once: it raises its error; rank 0 stops after the batch it is in (not after its whole
    share) and names rank 1's error (status 1); no output or .part file is left."""
    (status0, _, err0, calls0), (status1, _, _, _) = run_distributed(_features_body, 2, run, tmp_path / "f.npy", 1)
    assert status1 == "OSError: disk on fire"  # (an OSError that is not about a given path: raised)
    assert status0 == 1 and "rank 1 of 2 failed (OSError: disk on fire); nothing was written" in err0
    assert calls0 == 1  # of its 2 batches
    assert leftovers(tmp_path) == []
