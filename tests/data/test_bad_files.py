"""Corrupt, truncated, empty and non-image files are skipped, counted and named; they never stop a run."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from seer.config import CropsConfig
from seer.data import DataError, DecodedDataset, MultiCropDataset, open_source
from seer.data.augment import crop_spec
from seer.data.check import check_dataset
from tests.images import write_bad_images, write_good_images

CROPS = CropsConfig(global_size=32, local_count=2, local_size=16)


@pytest.fixture
def mixed_folder(tmp_path):
    write_good_images(tmp_path / "data", 12)
    bad = write_bad_images(tmp_path / "data" / "junk")
    return tmp_path / "data", {str(p) for p in bad.values()}


def test_every_item_is_a_good_image_and_the_bad_ones_are_reported(mixed_folder):
    root, bad = mixed_folder
    src = open_source(str(root))
    ds = MultiCropDataset(src, crop_spec(CROPS), CROPS, seed=0, max_pixels=10**8)
    skipped = set()
    for i in range(len(ds)):
        crops, sk = ds[(0, i)]
        assert [tuple(c.shape) for c in crops] == [(2, 3, 32, 32), (2, 3, 16, 16)]
        assert all(torch.isfinite(c).all() for c in crops)
        skipped |= {s.name for s in sk}
        assert all(s.reason for s in sk)
        assert not any(" at 0x" in s.reason for s in sk)  # reasons repeat exactly: no object addresses
    assert skipped == bad
    # The same (epoch, index) gives the same crops (the generator is seeded from them).
    assert torch.equal(ds[(3, 5)][0][0], ds[(3, 5)][0][0])
    assert not torch.equal(ds[(3, 5)][0][0], ds[(4, 5)][0][0])


def test_decompression_bomb_guard_and_only_bad_files(mixed_folder, tmp_path):
    root, _ = mixed_folder
    ds = DecodedDataset(open_source(str(root)), max_pixels=100)  # every image is "too large"
    with pytest.raises(DataError, match="all 16 images of data.source are unreadable"):
        ds[(0, 0)]
    only_bad = write_bad_images(tmp_path / "only_bad")
    ds = DecodedDataset(open_source(str(tmp_path / "only_bad")), max_pixels=10**8, max_consecutive_bad=len(only_bad))
    with pytest.raises(DataError):
        ds[(0, 0)]


def test_data_check_reports_exactly_the_bad_files(mixed_folder):
    root, bad = mixed_folder
    report = check_dataset(str(root), workers=0)
    assert report.total == 16 and report.ok == 12
    assert {name for name, _ in report.bad} == bad
    text = report.format()
    assert "4 unreadable" in text and all(name in text for name in bad)
    assert set(report.formats) == {"PNG", "JPEG", "WEBP"}


def test_worker_outlives_its_first_sigterm_then_leaves_by_itself():
    """A DataLoader worker's first SIGTERM (SLURM signals every process of the job) does not end it, so the
    main process can save; after WORKER_STOP_GRACE_S it exits by itself with status 0 (no hang at exit)."""
    code = textwrap.dedent("""
        import os, signal, time
        from seer.data import dataset
        dataset.WORKER_STOP_GRACE_S = 1.0
        dataset.worker_init(0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        print("alive", flush=True)
        time.sleep(30)
        print("not reached", flush=True)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["alive"], proc.stderr
    assert time.monotonic() - t0 < 25


def test_worker_outlives_the_echo_of_its_first_sigterm_but_not_a_later_one():
    """Under `srun torchrun`, torchrun forwards the job's SIGTERM to each rank's process group: a worker gets
    two within milliseconds, and the second used to end it (the rank then failed before saving). A SIGTERM
    after the echo window ends the worker as torch's default would."""
    code = textwrap.dedent("""
        import os, signal, time
        from seer.data import dataset
        dataset.SIGTERM_ECHO_S = 1.0
        dataset.worker_init(0)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the echo
        time.sleep(0.2)
        print("alive", flush=True)
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not reached", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and proc.stdout.split() == ["alive"], (proc.returncode, proc.stderr)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header claims ``width`` x ``height`` (its IHDR rewritten, CRC fixed)."""
    import io
    import struct
    import zlib

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # (Pillow's, once per process)
def test_max_image_pixels_above_pillows_own_guard_decides(monkeypatch):
    """data.max_image_pixels, not Pillow's DecompressionBombError (2 x Image.MAX_IMAGE_PIXELS, the default's
    value), decides: raised for large photos, a 20000 x 10000 header passed the check; at the default it is
    refused naming the setting, not as 'not an image Pillow can read'."""
    from PIL import Image

    from seer.data.dataset import check_pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default, put back after the test
    big = _png_claiming(20_000, 10_000)
    with pytest.raises(ValueError, match="exceed data.max_image_pixels=178956970"):
        check_pixels(big, 178_956_970)
    assert check_pixels(big, 300_000_000) == (10_000, 20_000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_beyond_pillows_own_guard_names_the_setting_too(monkeypatch, tmp_path):
    """An image of more than twice the limit (where Pillow refuses the header itself, before the check of
    data.max_image_pixels sees its size: the real bombs) is refused naming the setting, in every path that
    reads files (training's two, seer data check), not as 'not an image Pillow can read'."""
    from PIL import Image

    from seer.data.dataset import check_pixels, decode_checked
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default, put back after the test
    bomb = _png_claiming(30_000, 20_000)  # 6e8 pixels: above Pillow's bound at the default setting, 357,913,940
    expected = "600000000 pixels exceed data.max_image_pixels=178956970"
    with pytest.raises(ValueError, match=expected):
        check_pixels(bomb, 178_956_970)
    with pytest.raises(ValueError, match=expected):
        decode_checked(bomb, 178_956_970)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bomb.png").write_bytes(bomb)
    write_good_images(tmp_path / "src", 1, nested=False)
    report = check_dataset(str(tmp_path / "src"), workers=0)
    assert [reason for _, reason in report.bad] == [f"ValueError: {expected} (decompression-bomb guard)"]
    _, skipped = DecodedDataset(open_source(str(tmp_path / "src")), max_pixels=178_956_970)[(0, 0)]
    assert [s.reason for s in skipped] == [f"ValueError: {expected} (decompression-bomb guard)"]


def test_a_source_of_fewer_bad_images_than_the_limit_is_named_whole(tmp_path):
    """A source smaller than max_consecutive_bad, none of its images readable, was tried round and round (each
    file reported once per lap) and called '50 unreadable images in a row' though it has 4 images."""
    bad = write_bad_images(tmp_path / "only_bad")
    ds = DecodedDataset(open_source(str(tmp_path / "only_bad")), max_pixels=10**8)
    with pytest.raises(DataError, match=rf"all {len(bad)} images of data\.source are unreadable: is data\.source "
                                        rf"right\? first error: '.*corrupt\.png': ValueError"):
        ds[(0, 0)]
    write_good_images(tmp_path / "only_bad", 1, nested=False)  # one readable image, reached round the end
    image, skipped = DecodedDataset(open_source(str(tmp_path / "only_bad")), max_pixels=10**8)[(0, 3)]
    assert image.shape[0] == 3 and len(skipped) == len({s.name for s in skipped}) == len(bad)
