"""The ``seer`` command: bad input gets one line naming the argument (exit status 2); every subcommand runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seer.cli import main
from seer.config import apply_overrides, preset
from seer.train import Trainer
from tests.images import write_bad_images, write_good_images


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--preset", "tinyy", "--out", "x"], "unknown preset 'tinyy' (did you mean 'tiny'?)"),
    (["train", "--preset", "tiny", "--set", "train.max_step=3", "--out", "x"], "did you mean 'train.max_steps'"),
    (["train", "--preset", "tiny", "--set", "train.max_steps=three", "--out", "x"], "expects an integer"),
    (["train", "--preset", "tiny", "--set", "data.timeout_s=-5", "--out", "x"],
     "config key 'data.timeout_s' must be a finite number >= 0 (seconds; 0 = no timeout), got -5.0"),
    (["data", "check", "{tmp}", "--timeout-s", "nan"], "--timeout-s must be a finite number >= 0"),
    (["train", "--preset", "tiny", "--set", "checkpoint.every", "--out", "x"], "key=value"),
    (["train", "--preset", "tiny"], "--out DIR is required"),
    (["train", "--config", "/does/not/exist.yaml", "--out", "x"], "does not exist"),
    (["train", "--preset", "tiny", "--set", "data.source=/no/such/folder", "--out", "{tmp}/r"], "does not exist"),
    (["train", "--preset", "tiny", "--set", "parallel.tp=3", "--out", "{tmp}/r"], "parallel.tp=3"),
    # A mistyped --checkpoint is said to be missing, naming the flag (it read "no complete checkpoint at", as a
    # damaged or empty run would); a folder without checkpoints names the flag too.
    (["eval", "knn", "--checkpoint", "/no/such/run"], "error: --checkpoint '/no/such/run' does not exist"),
    (["features", "--checkpoint", "/no/such/run", "--images", "{tmp}", "--out", "{tmp}/f.npy"],
     "error: --checkpoint '/no/such/run' does not exist (expected a run folder, a checkpoint folder or an "
     "exported .safetensors)"),
    (["attention-maps", "--checkpoint", "/no/such/run", "--images", "{tmp}", "--out", "{tmp}/maps"],
     "error: --checkpoint '/no/such/run' does not exist"),
    (["export", "--checkpoint", "/no/such/run", "--format", "timm", "--out", "{tmp}/v.safetensors"],
     "error: --checkpoint '/no/such/run' does not exist (expected a run folder or a checkpoint folder)"),
    (["eval", "knn", "--checkpoint", "{tmp}"], "error: --checkpoint: no complete checkpoint at '{tmp}'"),
    # --dataset named as given, before the backbone is read (it said eval.dataset, after loading it)
    (["eval", "knn", "--checkpoint", "/no/such/run", "--dataset", "/no/such/labelled"],
     "error: --dataset '/no/such/labelled' is neither 'digits' nor a folder"),
    (["train", "--preset", "tiny", "--set", "checkpoint.resume=/no/such/run", "--out", "{tmp}/r"],
     "checkpoint.resume: no complete checkpoint at '/no/such/run'"),
    (["eval", "knn", "--checkpoint", "{tmp}", "--set", "train.max_steps=2"], "only eval.* keys"),
    (["data"], "expected an action: check"),
    (["data", "check", "{tmp}", "--report", "{tmp}"], "--report '{tmp}' is a folder"),  # before the check
    (["data", "check", "{tmp}", "--report", "/no/such/dir/r.tsv"], "the folder '/no/such/dir' does not exist"),
    # data check's source is its positional SOURCE and its --format, not training's data.source/data.format
    (["data", "check", "/no/such/folder"], "error: SOURCE '/no/such/folder' does not exist"),
    (["data", "check", "synthetic"], "error: SOURCE 'synthetic' is generated on the fly"),
    (["train", "--preset", "tiny", "--set", "data.source=synthetic", "--set", "data.synthetic_size=256x", "--out",
      "x"],
     "config key 'data.synthetic_size': expected a side 'S' or 'HxW' in pixels (e.g. 256 or 240x320), got '256x'"),
    (["eval", "knn", "--checkpoint", "/no/such/run", "--json", "{tmp}"], "--json '{tmp}' is a folder"),
    (["train", "--preset", "tiny", "--out", "{tmp}/file"], "--out '{tmp}/file' is a file"),
    (["train", "--config", "{tmp}", "--out", "x"], "config file '{tmp}' is a folder"),
    (["train", "--preset", "tiny", "--set", "train.max_steps=[1", "--out", "x"],
     "cannot parse the value: expected ',' or ']', but got '<stream end>' (line 1, column 3)\n"),
    (["eval", "knn", "--checkpoint", "{tmp}/v.safetensors"], "{tmp}/v.safetensors: no such exported file"),
    (["eval", "knn", "--checkpoint", "{tmp}/v.onnx"], "'{tmp}/v.onnx' is an ONNX export, which seer cannot load"),
])
def test_bad_input_is_one_clear_line(argv, fragment, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "file").write_text("")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err


def test_a_backend_forced_that_cannot_run_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEER_KERNELS_BACKEND", "bogus")
    assert main(["train", "--preset", "tiny", "--set", "train.max_steps=1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "SEER_KERNELS_BACKEND='bogus' is not a backend" in err and "Traceback" not in err


def test_os_errors_on_the_users_paths_are_one_line(tmp_path, monkeypatch, capsys):
    import seer.data.check as check

    def denied(source, **kw):  # what a non-root user gets from a folder without read permission
        raise PermissionError(13, "Permission denied", source)

    monkeypatch.setattr(check, "check_dataset", denied)
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err

    def read_only(source, **kw):  # an output on a read-only mount (the run lock's file, say)
        raise OSError(30, "Read-only file system", source)

    monkeypatch.setattr(check, "check_dataset", read_only)
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "Traceback" not in err

    def disk_full(source, **kw):  # not the user's input: keeps its traceback (and not exit status 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(check, "check_dataset", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(["data", "check", str(tmp_path)])


def test_a_wrong_eval_dataset_stops_the_run_before_training(tmp_path, capsys):
    """It stopped the run only after the last step (hours of training, then one line and no eval.json)."""
    run = tmp_path / "run"
    empty = tmp_path / "labelled"
    empty.mkdir()
    for where, fragment in ((tmp_path / "missing", "is neither 'digits' nor a folder"),
                            (empty, "must hold one subfolder per class")):
        for when in ("eval.at_end=true", "eval.every=2"):
            argv = ["train", "--preset", "tiny", "--set", "train.max_steps=4", "--set", when, "--set",
                    f"eval.dataset={where}", "--out", str(run)]
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"eval.dataset '{where}'" in err and fragment in err and "Traceback" not in err
            assert not list((run / "checkpoints").glob("step_*")) and not (run / "metrics.jsonl").exists()


def test_a_missing_optional_package_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """scikit-learn (the digits) and torchvision (evaluation on image folders) are extras: without them the
    command printed a traceback (an ImportError, or torchvision's bare ModuleNotFoundError)."""
    from seer.data import digits
    labelled = tmp_path / "labelled"
    for c in ("a", "b"):
        write_good_images(labelled / c, 2, nested=False)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    digits._digits.cache_clear()
    try:
        assert main(["train", "--preset", "tiny", "--set", "train.max_steps=1", "--out", str(tmp_path / "r")]) == 1
    finally:
        digits._digits.cache_clear()
    err = capsys.readouterr().err
    assert "'digits' dataset needs scikit-learn" in err and "pip install scikit-learn" in err
    assert "Traceback" not in err
    monkeypatch.setitem(sys.modules, "torchvision.transforms.v2.functional", None)
    argv = ["train", "--preset", "tiny", "--set", "data.source=" + str(labelled), "--set", "eval.at_end=true",
            "--set", f"eval.dataset={labelled}", "--out", str(tmp_path / "r2")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "evaluation on an image folder needs torchvision" in err and "Traceback" not in err


def test_data_check_leaves_no_index_behind(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    write_good_images(tmp_path / "imgs", 3)
    assert main(["data", "check", str(tmp_path / "imgs"), "--workers", "0"]) == 0
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert list((tmp_path / "tmp").iterdir()) == []


def test_argparse_errors_exit_2(capsys):
    for argv in (["train"], ["export", "--checkpoint", "x", "--format", "tflite", "--out", "a.safetensors"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert main([]) == 2


def test_bench_outside_a_checkout_is_one_line(tmp_path, monkeypatch, capsys):
    """An installed package (site-packages/seer/cli.py) has no bench/ beside it."""
    import seer.cli
    monkeypatch.setattr(seer.cli, "__file__", str(tmp_path / "site-packages" / "seer" / "cli.py"))
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seer bench: error: the benchmark suites live in the source tree") and "Traceback" not in err


def test_print_config_and_plan(capsys):
    assert main(["train", "--preset", "demo", "--set", "train.max_steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "description: 'demo:" in out
    assert main(["train", "--preset", "demo", "--set", "data.timeout_s=45", "--print-config"]) == 0
    assert "  timeout_s: 45.0\n" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--gpus", "1", "--tp", "1", "--micro-batch", "2"]) == 0
    assert "GiB" in capsys.readouterr().out


def test_export_eval_and_data_check_commands(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1"]), run).fit()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(tmp_path / "v.safetensors")]) == 0
    assert (tmp_path / "v.json").is_file()
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "v.safetensors"), "--set", "eval.max_images=100",
                 "--json", str(tmp_path / "knn.json")]) == 0
    res = json.loads((tmp_path / "knn.json").read_text())
    assert res["protocol"] == "knn" and 0 <= res["knn_top1"] <= 100 and "linear_top1" not in res
    capsys.readouterr()
    assert main(["eval", "linear", "--checkpoint", str(run), "--random-init", "--set", "eval.max_images=100",
                 "--set", "eval.linear_weight_decays=[0.001]"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["random_init"] is True and 0 <= res["linear_top1"] <= 100
    data = tmp_path / "data"
    write_good_images(data, 5)
    bad = write_bad_images(data / "bad")
    assert main(["data", "check", str(data), "--workers", "0", "--report", str(tmp_path / "bad.tsv")]) == 0
    out = capsys.readouterr().out
    assert "9 images, 5 readable, 4 unreadable" in out
    assert {line.split("\t")[0] for line in (tmp_path / "bad.tsv").read_text().splitlines()} == \
        {str(p) for p in bad.values()}
    assert main(["data", "check", str(data), "--workers", "0", "--fail-on-bad"]) == 1


def test_file_names_that_are_not_utf8_never_stop_a_run_or_a_report(tmp_path, capsys):
    """The index keeps such names (surrogate escapes) so that the file can be opened; writing one into
    skipped_files.txt or the --report file raised UnicodeEncodeError and stopped the run. Files get the name's
    own bytes (as list files are read back), terminals and logs backslash escapes."""
    data = tmp_path / "data"
    write_good_images(data, 8, nested=False)
    good_odd = data / "caf\udce9.png"  # a Latin-1 name, readable
    good_odd.write_bytes((data / "img_0000.png").read_bytes())
    name = b"\xff\xfebad.jpg"
    with open(bytes(data) + b"/" + name, "wb") as f:
        f.write(b"not an image")
    bad_path = str(data / name.decode("utf-8", "surrogateescape"))
    report = tmp_path / "bad.tsv"
    assert main(["data", "check", str(data), "--workers", "0", "--report", str(report)]) == 0
    assert "10 images, 9 readable, 1 unreadable" in capsys.readouterr().out
    assert report.read_bytes().split(b"\t")[0] == bytes(data) + b"/" + name
    cfg = apply_overrides(preset("tiny"), [f"data.source={data}", "train.max_steps=2", "train.threads=1"])
    Trainer(cfg, tmp_path / "run").fit()  # 10 files, 8 per step: the bad one is met
    skipped = (tmp_path / "run" / "skipped_files.txt").read_bytes()
    assert skipped.split(b"\t")[0] == bytes(data) + b"/" + name
    assert "skipped unreadable image " + bad_path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
        in (tmp_path / "run" / "train.log").read_text()


def test_data_check_stopped_by_a_hung_read_is_one_line(tmp_path, monkeypatch, capsys):
    import time

    from seer.data import check
    write_good_images(tmp_path / "data", 3, nested=False)
    monkeypatch.setattr(check._CheckDataset, "__getitem__", lambda self, i: time.sleep(30))  # forked workers see it
    assert main(["data", "check", str(tmp_path / "data"), "--workers", "1", "--timeout-s", "1"]) == 1
    err = capsys.readouterr().err
    assert "no batch from the DataLoader workers within --timeout-s=1 s" in err and "Traceback" not in err


def test_data_check_takes_the_format_and_pixel_limit_of_training(tmp_path, capsys):
    data = tmp_path / "data"
    write_good_images(data / "photos", 3, nested=False)
    import tarfile
    with tarfile.open(data / "backup.tar", "w") as tf:
        tf.add(data / "photos" / "img_0000.png", arcname="a.png")
    assert main(["data", "check", str(data), "--workers", "0"]) == 2
    assert "set --format folder" in capsys.readouterr().err
    assert main(["data", "check", str(data), "--workers", "0", "--format", "folder"]) == 0
    assert "3 images, 3 readable" in capsys.readouterr().out
    assert main(["data", "check", str(data), "--workers", "0", "--format", "tar"]) == 0
    assert "1 images, 1 readable" in capsys.readouterr().out
    assert main(["data", "check", str(data), "--workers", "0", "--format", "folder", "--max-image-pixels",
                 "100"]) == 0  # every image is larger: unreadable, as training would skip it
    assert "3 images, 0 readable, 3 unreadable" in capsys.readouterr().out
    assert main(["data", "check", str(data), "--max-image-pixels", "0"]) == 2
    assert "--max-image-pixels must be an integer >= 1" in capsys.readouterr().err


def test_data_check_takes_the_byte_limit_of_training(tmp_path, capsys):
    """--max-image-bytes, as data.max_image_bytes: larger files are unreadable, not read; 0 = no limit."""
    data = tmp_path / "data"
    files = write_good_images(data, 3, nested=False)
    sizes = sorted(p.stat().st_size for p in files)
    assert sizes[1] < sizes[2]
    biggest = max(files, key=lambda p: p.stat().st_size)
    report = tmp_path / "bad.tsv"
    assert main(["data", "check", str(data), "--workers", "0", "--max-image-bytes", str(sizes[1]), "--report",
                 str(report)]) == 0
    out = capsys.readouterr().out
    reason = f"ValueError: {sizes[2]} bytes exceed data.max_image_bytes={sizes[1]} (not read)"
    assert "3 images, 2 readable, 1 unreadable" in out and f"BAD {biggest}\t{reason}" in out
    assert report.read_text() == f"{biggest}\t{reason}\n"
    assert main(["data", "check", str(data), "--workers", "0", "--max-image-bytes", "0"]) == 0
    assert "3 images, 3 readable" in capsys.readouterr().out
    assert main(["data", "check", str(data), "--workers", "0"]) == 0  # the default: 512 MiB
    assert "3 images, 3 readable" in capsys.readouterr().out
    assert main(["data", "check", str(data), "--max-image-bytes", "-1"]) == 2
    assert "--max-image-bytes must be an integer >= 0 (bytes; 0 = no limit), got -1" in capsys.readouterr().err


def test_data_check_report_never_replaces_a_file_it_reads(tmp_path, capsys):
    """--report was written in place after the check: naming the list file, a shard or --exclude replaced it
    with the report's lines (the list of a dataset lost); refused before the check, as seer data dedup does."""
    import tarfile
    data = tmp_path / "data"
    write_good_images(data, 3, nested=False)
    images = sorted(str(p) for p in data.iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(images) + "\n")
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(images[0] + "\n")
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        tf.add(images[0], arcname="a.png")
    before = {p: p.read_bytes() for p in (listing, exclude, tmp_path / "shard.tar")}
    for argv, what in (([str(listing), "--report", str(listing)], "is SOURCE"),
                       ([str(data), "--exclude", str(exclude), "--report", str(exclude)], "is the --exclude file"),
                       ([str(tmp_path / "shard.tar"), "--report", str(tmp_path / "shard.tar")], "is a shard of SOURCE")):
        assert main(["data", "check", *argv, "--workers", "0"]) == 2
        assert what in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert main(["data", "check", str(listing), "--workers", "0", "--report", str(tmp_path / "r.tsv")]) == 0


def _bf16_run_and_its_score(tmp_path, capsys, device, *overrides):
    """A 1-step bf16 run on ``device`` that evaluates itself at the end: (its folder, its eval.json)."""
    run = tmp_path / "run"
    Trainer(apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1", "train.precision=bf16",
                                             f"train.device={device}", "eval.at_end=true", "eval.max_images=100",
                                             "eval.random_init_baseline=false", *overrides]), run).fit()
    capsys.readouterr()
    return run, json.loads((run / "eval.json").read_text())


def test_eval_runs_with_the_runs_precision_on_the_chosen_device(tmp_path, capsys):
    """seer eval used the CPU in float32 whatever the run: its scores then differed from the run's own
    evaluations (bf16 autocast on a GPU), and a large model was evaluated on the CPU next to an idle GPU."""
    run, during = _bf16_run_and_its_score(tmp_path, capsys, "cpu")
    assert main(["eval", "knn", "--checkpoint", str(run), "--set", "eval.max_images=100", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["device"], res["precision"]) == ("cpu", "bf16")  # the run's train.precision
    assert res["knn_top1"] == during["knn_top1"]  # the same measurement as the run's own evaluation
    assert main(["eval", "knn", "--checkpoint", str(run), "--set", "eval.max_images=100", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"
    if not torch.cuda.is_available():
        assert main(["eval", "knn", "--checkpoint", str(run), "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA GPU is available" in capsys.readouterr().err


def test_eval_uses_the_runs_attention_backend(tmp_path, capsys, monkeypatch):
    """seer eval ran attention on the automatic backend (SDPA) whatever the run's train.attention_backend, which
    the run's own evaluations used: on the demo ('reference', bf16) its kNN and linear scores differed from the
    run's eval.json (tiny run: 28 / 50 against 26 / 40), at random initialisation too."""
    monkeypatch.delenv("SEER_KERNELS_BACKEND_ATTENTION", raising=False)
    run, during = _bf16_run_and_its_score(tmp_path, capsys, "cpu", "train.attention_backend=reference",
                                          "eval.random_init_baseline=true")
    for protocol in ("knn", "linear"):
        for extra, key in (([], f"{protocol}_top1"), (["--random-init"], f"{protocol}_top1_random_init")):
            assert main(["eval", protocol, "--checkpoint", str(run), "--set", "eval.max_images=100",
                         "--device", "cpu", *extra]) == 0
            assert json.loads(capsys.readouterr().out)[f"{protocol}_top1"] == during[key], (protocol, extra)
    import os
    assert "SEER_KERNELS_BACKEND_ATTENTION" not in os.environ  # forced while it evaluates, not afterwards


@pytest.mark.cuda
def test_eval_on_the_gpu_gives_the_runs_own_score(tmp_path, capsys):
    """seer eval --device auto picks the GPU and the run's precision: the score of the run's own evaluation
    at the end (same device, same autocast)."""
    run, during = _bf16_run_and_its_score(tmp_path, capsys, "cuda")
    assert main(["eval", "knn", "--checkpoint", str(run), "--set", "eval.max_images=100"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["device"], res["precision"]) == ("cuda", "bf16")
    # the same measurement; at most one test image's vote apart (GPU kernels may pick other algorithms per process)
    assert abs(res["knn_top1"] - during["knn_top1"]) <= 100 / res["n_test"] + 1e-9


def test_the_command_starts_without_importing_torch():
    """`seer --help` (and every process spawned to index tar shards under the `seer` console script, which
    re-imports it) paid ~2 s of torch imports through seer.config's subpackages; their names now resolve on
    first use, and the function `parallelize` stays the package's name once its module is imported."""
    code = ("import sys, seer.cli, seer.config; heavy = {'torch', 'seer_kernels'} & set(sys.modules); "
            "assert not heavy, heavy; import seer.parallel.apply; from seer.parallel import parallelize; "
            "assert callable(parallelize) and parallelize is seer.parallel.apply.parallelize")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_eval_falls_back_to_auto_where_the_runs_attention_backend_cannot_run(monkeypatch, caplog):
    """A Triton run evaluated on the CPU: a warning with the reason, then the automatic choice (not a refusal)."""
    import torch

    import seer_kernels
    from seer.cli import _run_attention
    monkeypatch.delenv("SEER_KERNELS_BACKEND_ATTENTION", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = apply_overrides(preset("tiny"), ["train.attention_backend=triton"])
    q = torch.randn(1, 2, 5, 16)
    with caplog.at_level("WARNING", logger="seer"), _run_attention(cfg, True, torch.device("cpu"), "fp32"):
        seer_kernels.attention(q, q, q)  # (a forced 'triton' would refuse CPU tensors here)
    assert "train.attention_backend='triton' cannot run this model on cpu" in caplog.text
    assert "evaluating with the automatic choice instead" in caplog.text and "Use 'auto'" not in caplog.text
