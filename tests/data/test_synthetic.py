"""The built-in 'synthetic' source: deterministic random images made on the fly, in the decoded-image data path."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from seer.cli import main
from seer.data import DataSourceError, build_index, detect_format, open_index
from seer.data.check import check_dataset
from seer.data.dataset import DecodedDataset, collate_images
from seer.data.synthetic import SyntheticSource, parse_size, synthetic_image

from tests.train.common import ROOT, env


def _digest(images) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(im.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("text, hw", [("256", (256, 256)), (256, (256, 256)), ("240x320", (240, 320)),
                                      ("7 X 9", (7, 9)), ("1", (1, 1))])
def test_size_is_a_side_or_height_by_width(text, hw):
    assert parse_size(text) == hw


@pytest.mark.parametrize("text", ["", "abc", "256x", "x256", "0", "10x0", "-5", "2.5", "256x256x3", "256,256"])
def test_a_bad_size_is_refused(text):
    with pytest.raises(ValueError, match="'S' or 'HxW'|sides >= 1"):
        parse_size(text)


def test_images_are_a_pure_function_of_seed_and_index():
    img = synthetic_image(31, 5, (24, 40))
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 40)
    assert torch.equal(img, synthetic_image(31, 5, (24, 40)))
    assert not torch.equal(img, synthetic_image(31, 6, (24, 40)))  # another image
    assert not torch.equal(img, synthetic_image(32, 5, (24, 40)))  # another run's set
    assert not torch.equal(synthetic_image(-1, 5, (24, 40)), synthetic_image(1, 5, (24, 40)))  # train.seed < 0
    assert 100 < img.float().mean() < 155 and len(img.unique()) > 200  # uniform bytes, not a constant
    # Pinned: the bytes a run resumed by a later seer (or NumPy) reads must be those its first part read.
    assert synthetic_image(31, 0, (3, 5))[0, 0].tolist() == [216, 74, 76, 213, 182]


def test_an_image_is_the_same_in_another_process():
    code = ("import hashlib; from seer.data.synthetic import synthetic_image as f; h = hashlib.sha256()\n"
            "for i in (0, 7, 10**9): h.update(f(123, i, (17, 33)).numpy().tobytes())\nprint(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT,
                         check=True, timeout=120).stdout.strip()
    assert out == _digest(synthetic_image(123, i, (17, 33)) for i in (0, 7, 10**9))


def test_the_source_through_dataloader_workers_gives_the_same_images():
    src = SyntheticSource(50, (20, 12), seed=7)
    keys = [(0, i) for i in (3, 49, 0, 17)]  # (epoch, index), as the sampler hands them out
    loader = DataLoader(DecodedDataset(src, max_pixels=10**6), batch_sampler=[keys[:2], keys[2:]],
                        num_workers=2, collate_fn=collate_images)
    got = [im for batch in loader for im in batch.images]
    assert _digest(got) == _digest(synthetic_image(7, i, (20, 12)) for _, i in keys)


def test_nothing_is_held_in_memory():
    src = SyntheticSource(10**15, (8, 8), seed=0)  # a petabyte-sized set costs nothing until read
    assert len(src) == 10**15 and src.read(10**15 - 1).shape == (3, 8, 8) and src.name(3) == "synthetic[3]"
    with pytest.raises(IndexError):
        src.read(10**15)


def test_index_and_open(tmp_path):
    assert detect_format("synthetic") == "synthetic"
    (tmp_path / "synthetic").mkdir()  # a folder of that name is reached by its path
    assert detect_format(str(tmp_path / "synthetic")) == "folder"
    meta = build_index("synthetic", "auto", tmp_path / "idx")
    assert meta["format"] == "synthetic" and not list((tmp_path / "idx").glob("*.npy"))
    src = open_index(meta, tmp_path / "idx", synthetic_count=30, synthetic_size=(9, 11), seed=4)
    assert isinstance(src, SyntheticSource) and len(src) == 30
    assert torch.equal(src.read(29), synthetic_image(4, 29, (9, 11)))
    assert build_index("synthetic", "auto", tmp_path / "idx") == meta  # a resumed run reuses it


def test_the_index_records_what_makes_the_images(tmp_path):
    """A resumed run with another data.synthetic_size or _count would train on other images (the data position
    checks only the count): its index says which it was made with, and another value is refused, named."""
    made = {"synthetic_size": "40x48", "synthetic_count": 24, "digits_size": 32, "digits_split": "train"}
    meta = build_index("synthetic", "auto", tmp_path / "idx", built_in=made)
    assert meta["params"] == {"synthetic_size": "40x48", "synthetic_count": 24}  # (the digits' are not its own)
    assert build_index("synthetic", "auto", tmp_path / "idx", built_in=dict(made, digits_size=8)) == meta
    with pytest.raises(DataSourceError, match=r"data.synthetic_size: index '40x48', config '40x40'.*delete"):
        build_index("synthetic", "auto", tmp_path / "idx", built_in=dict(made, synthetic_size="40x40"))
    with pytest.raises(DataSourceError, match=r"data.synthetic_count: index 24, config 25"):
        build_index("synthetic", "auto", tmp_path / "idx", built_in=dict(made, synthetic_count=25))
    digits = build_index("digits", "auto", tmp_path / "d", built_in=made)
    assert digits["params"] == {"digits_size": 32, "digits_split": "train"}
    with pytest.raises(DataSourceError, match=r"data.digits_size: index 32, config 8"):
        build_index("digits", "auto", tmp_path / "d", built_in=dict(made, digits_size=8))
    # An index written before the keys were recorded is used as it is
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"source": "synthetic", "format": "synthetic",
                                                             "count": 0, "files": {}}))
    assert build_index("synthetic", "auto", tmp_path / "old", built_in=made)["format"] == "synthetic"


def test_data_check_refuses_it(capsys):
    with pytest.raises(DataSourceError, match="generated on the fly.*nothing to check"):
        check_dataset("synthetic", workers=0)
    assert main(["data", "check", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "SOURCE 'synthetic' is generated on the fly" in err and "./synthetic" in err and "Traceback" not in err
