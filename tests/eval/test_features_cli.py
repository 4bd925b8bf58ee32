"""``seer features`` and :func:`seer.eval.extract.extract_image_features`: the rows are ``seer eval``'s
features of the images in file order, unreadable files skipped and named, the outputs never clobber a
user's file."""
import logging

import numpy as np
import pytest
import torch

import seer
from seer.cli import main
from seer.eval.datasets import load_image, preprocess
from seer.eval.extract import extract_image_features, image_paths
from seer.pretrained import checkpoint_config
from tests.eval.runs import tiny_run_with_images
from tests.images import write_good_images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step tiny run and 7 images + 1 corrupt (:func:`tests.eval.runs.tiny_run_with_images`)."""
    return tiny_run_with_images(tmp_path_factory.mktemp("features"), 7)


def preprocessed(run, paths, size=32):
    """The images as seer eval feeds them to the backbone (the run's normalisation)."""
    crops = checkpoint_config(run / "run").data.crops
    mean, std = torch.tensor(crops.mean).view(3, 1, 1), torch.tensor(crops.std).view(3, 1, 1)
    return torch.stack([preprocess(load_image(p), size, mean, std) for p in paths])


def features(run, *extra, out="f.npy"):
    argv = ["features", "--checkpoint", str(run / "run"), "--images", str(run / "images"), "--out",
            str(run / out), "--workers", "0", "--overwrite", *extra]
    assert main(argv) == 0
    return np.load(run / out), (run / out).with_suffix(".txt").read_text().splitlines()


def test_default_rows_are_the_backbones_class_tokens_in_file_order(run, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        feats, names = features(run)
    broken = str(run / "images" / "part1" / "broken.jpg")
    assert names == [p for p in image_paths(run / "images") if p != broken]  # sorted, recursive, bad one left out
    assert len(names) == 7 and feats.shape == (7, 64) and feats.dtype == np.float32
    assert f"skipping unreadable image {broken} (ValueError" in caplog.text
    assert "7 images x 64 (cls, last 1 block(s), 32 px, cpu, fp32), 1 unreadable skipped (listed above)" in \
        capsys.readouterr().out
    with torch.no_grad():
        want = seer.load_pretrained(run / "run")(preprocessed(run, names))
    assert np.array_equal(feats, want.numpy())  # exactly seer eval's features (its preprocess, the class token)


def test_last_blocks_class_tokens_then_patch_means(run):
    feats, names = features(run, "--layers", "2", "--tokens", "cls+patch-mean", out="l2.npy")
    assert feats.shape == (7, 2 * 2 * 64)
    with torch.no_grad():
        blocks = seer.load_pretrained(run / "run").get_intermediate_layers(preprocessed(run, names), 2,
                                                                            return_class_token=True)
    want = torch.cat([c for _, c in blocks] + [p.mean(1) for p, _ in blocks], 1)
    assert np.array_equal(feats, want.numpy())
    patch, _ = features(run, "--tokens", "patch-mean", "--image-size", "40", out="pm.npy")
    assert patch.shape == (7, 64)


def test_workers_and_batches_give_the_same_bytes(run):
    features(run, "--batch-size", "3", out="w0.npy")  # a batch with the broken file, a short last batch
    assert main(["features", "--checkpoint", str(run / "run"), "--images", str(run / "images"), "--out",
                 str(run / "w2.npy"), "--workers", "2", "--batch-size", "3"]) == 0
    assert (run / "w0.npy").read_bytes() == (run / "w2.npy").read_bytes()
    assert (run / "w0.txt").read_bytes() == (run / "w2.txt").read_bytes()


def test_an_export_and_a_list_file(run):
    export = run / "vit.safetensors"
    assert main(["export", "--checkpoint", str(run / "run"), "--format", "timm", "--out", str(export)]) == 0
    want, names = features(run)
    lst = run / "list.txt"
    lst.write_text("# photos\n" + "".join(f"{p}\n" for p in reversed(names)) + "\nimages/img_0000.png\n")
    assert main(["features", "--checkpoint", str(export), "--images", str(lst), "--out", str(run / "x.npy"),
                 "--workers", "0"]) == 0
    got = np.load(run / "x.npy")
    assert (run / "x.txt").read_text().splitlines() == names[::-1] + [str(run / "images" / "img_0000.png")]
    assert np.array_equal(got[:7], want[::-1]) and np.array_equal(got[7], want[0])


def test_the_python_function(run):
    backbone = seer.load_pretrained(run / "run")
    paths = image_paths(run / "images")
    res = extract_image_features(backbone, paths, image_size=32, mean=[0.5] * 3, std=[0.25] * 3, batch_size=4)
    assert res.features.shape == (7, 64) and len(res.paths) == 7 and not backbone.training
    assert [p for p, _ in res.skipped] == [str(run / "images" / "part1" / "broken.jpg")]
    assert image_paths(paths[2]) == [paths[2]]  # one image
    with pytest.raises(ValueError, match="layers must be an integer between 1 and the backbone's depth 2"):
        extract_image_features(backbone, paths, image_size=32, mean=[0.5] * 3, std=[0.25] * 3, layers=3)
    for bad in (-1, float("inf"), "5"):
        with pytest.raises(ValueError, match="timeout_s must be a finite number >= 0"):
            extract_image_features(backbone, paths, image_size=32, mean=[0.5] * 3, std=[0.25] * 3, timeout_s=bad)



def test_rows_with_nan_or_inf_are_named_in_a_warning(run, caplog):
    """They were written without a word (seer eval drops such images, with a warning)."""
    import copy
    backbone = copy.deepcopy(seer.load_pretrained(run / "run"))
    with torch.no_grad():
        backbone.norm.bias[3] = float("inf")  # every class token: one inf entry
    paths = image_paths(run / "images")
    with caplog.at_level(logging.WARNING):
        res = extract_image_features(backbone, paths, image_size=32, mean=[0.5] * 3, std=[0.25] * 3, batch_size=4)
    assert not torch.isfinite(res.features).all(1).any()  # (kept as computed)
    assert "7 images (of the 7 read here) gave features with NaN or inf" in caplog.text
    assert res.paths[0] in caplog.text and " ..." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        extract_image_features(seer.load_pretrained(run / "run"), paths, image_size=32, mean=[0.5] * 3,
                               std=[0.25] * 3)
    assert "NaN or inf" not in caplog.text

@pytest.mark.parametrize("extra, fragment", [
    (["--layers", "3"], "--layers must be between 1 and the backbone's depth 2, got 3"),
    (["--layers", "0"], "--layers must be between 1"),
    (["--image-size", "36"], "--image-size must be a positive multiple of the patch size 8, got 36"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--workers", "-1"], "--workers must be an integer >= 0"),
    (["--timeout-s", "nan"], "--timeout-s must be a finite number >= 0"),
    (["--out", "{tmp}/f.npz"], "--out must end with .npy"),
    (["--out", "{tmp}/no/such/f.npy"], "the folder '{tmp}/no/such' does not exist"),
    (["--out", "{tmp}/taken.npy"], "--out '{tmp}/taken.npy' exists: pass --overwrite"),
    (["--out", "{tmp}/notes.npy", "--overwrite"], "'{tmp}/notes.txt' exists and was not written by seer features"),
    (["--out", "{tmp}/taken.npy", "--overwrite"], "'{tmp}/taken.txt' exists and was not written"),  # empty .npy
    (["--images", "{tmp}/nothing"], "--images: '{tmp}/nothing' does not exist"),
    (["--images", "{tmp}/empty"], "--images '{tmp}/empty' holds no images"),
    (["--images", "{tmp}/bad"], "none of its 1 images is readable"),
    (["--checkpoint", "{tmp}/nothing"], "--checkpoint '{tmp}/nothing' does not exist"),
    (["--checkpoint", "{tmp}/empty"], "--checkpoint: no complete checkpoint at '{tmp}/empty'"),
])
def test_bad_flags_are_one_line(run, tmp_path, capsys, extra, fragment):
    (tmp_path / "taken.npy").write_bytes(b"")
    (tmp_path / "taken.txt").write_text("")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"no")
    argv = ["features", "--checkpoint", str(run / "run"), "--images", str(run / "images"), "--out",
            str(tmp_path / "f.npy"), "--workers", "0"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert not (tmp_path / "f.npy").exists() and (tmp_path / "notes.txt").read_text() == "my notes\n"
    assert (tmp_path / "taken.npy").read_bytes() == b""


def test_overwrite_replaces_only_its_own_pair(run, capsys):
    features(run, out="o.npy")
    first = (run / "o.npy").read_bytes()
    features(run, "--layers", "2", out="o.npy")  # its own pair: replaced
    assert (run / "o.npy").read_bytes() != first and not list(run.glob("*.part"))
    (run / "o.txt").write_text("edited by hand\n")  # no longer the list of o.npy's 7 rows
    assert main(["features", "--checkpoint", str(run / "run"), "--images", str(run / "images"), "--out",
                 str(run / "o.npy"), "--workers", "0", "--overwrite"]) == 2
    assert "was not written by seer features" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["features", "--checkpoint", str(run / "run"), "--images", str(run / "images"), "--out",
                     str(run / "c.npy"), "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA GPU is available" in capsys.readouterr().err


@pytest.mark.cuda
def test_features_on_the_gpu_match_the_cpus(run):
    """--device cuda (float32): the same rows as on the CPU, up to the GPU's matmul rounding (TF32 off)."""
    cpu, names_cpu = features(run, "--device", "cpu", "--precision", "fp32", out="cpu.npy")
    gpu, names_gpu = features(run, "--device", "cuda", "--precision", "fp32", out="gpu.npy")
    assert names_gpu == names_cpu
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)


def test_a_folders_messages_name_the_images_flag(run, tmp_path, capsys, caplog, monkeypatch):
    """They named training's data.source: '--images' is what the user gave the folder by."""
    images = tmp_path / "imgs"
    write_good_images(images, 2)
    (images / "bad\nname.png").write_bytes((images / "img_0000.png").read_bytes())
    out = tmp_path / "f.npy"
    argv = ["features", "--checkpoint", str(run / "run"), "--images", str(images), "--out", str(out), "--workers", "0"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "--images: leaving out 'bad\\nname.png' (a newline in its name)" in caplog.text
    assert "data.source" not in caplog.text
    import os

    def unlistable(path):  # what a folder without read permission gives a non-root user
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "scandir", unlistable)
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"seer features: error: --images: cannot list folder '{images}/' (PermissionError: Permission denied)" \
        in err and "--images: --images" not in err
