"""The training data stream end to end: images/s of :class:`seer.data.TrainData` (index -> sampler -> robust
dataset -> decode + SwAV multi-crop (2 x 224 + 6 x 96) -> collated batch) against a plain torch DataLoader over
the same files doing the same read + ``seer_kernels.multicrop`` per sample (shuffle, default collate), same
run, interleaved. The op alone on bytes read beforehand is timed alongside (``op_img_per_s``): the bound both
loaders approach.

    loader:cpu-<folder|tar>-w0-b<B>    in-process loading (num_workers=0) on one thread, JPEGs of mixed sizes
                                       300 x 200 .. 1600 x 1200; ratio = DataLoader time / ours, i.e. what our
                                       per-batch bookkeeping (sampler, bad-file handling, collation) costs.

Worker processes are not compared here: two loaders timed interleaved would each keep their workers
prefetching in the background, timing each other's contention.
"""
from __future__ import annotations

import io
import random
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import seer_kernels
from seer.config import CropsConfig, DataConfig
from seer.data import TrainData
from seer.data.augment import crop_spec

N_IMAGES, BATCH = 32, 8


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory):
    """N_IMAGES photo-like JPEGs (quality 90) as a folder and as two tar shards."""
    from PIL import Image
    from tests.ops.multicrop_oracle import synthetic_photo

    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    blobs = []
    for i in range(N_IMAGES):
        w = rng.randint(300, 1600)
        h = max(200, min(1200, int(w * rng.uniform(0.6, 0.9))))
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(h, w, i).permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
        (root / "folder").mkdir(exist_ok=True)
        (root / "folder" / f"{i:04d}.jpg").write_bytes(blobs[-1])
    (root / "tar").mkdir()
    for s in range(2):
        with tarfile.open(root / "tar" / f"shard-{s}.tar", "w") as tf:
            for i in range(s, N_IMAGES, 2):
                info = tarfile.TarInfo(f"{i:04d}.jpg")
                info.size = len(blobs[i])
                tf.addfile(info, io.BytesIO(blobs[i]))
    return root, blobs


class _PlainDataset(Dataset):
    """What one writes without seer: read the file, crop it with the op, one generator per sample."""

    def __init__(self, files, spec):
        self.files, self.spec = files, spec

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            data = f.read()
        return seer_kernels.multicrop([data], self.spec, torch.Generator().manual_seed(i))


def _endless(loader):
    while True:
        yield from loader


@pytest.mark.parametrize("fmt", ["folder", "tar"])
def bench_loader_cpu(bench_record, bench_device, jpeg_dataset, tmp_path, fmt):
    if bench_device != "cpu":
        pytest.skip("CPU rows")
    root, blobs = jpeg_dataset
    crops = CropsConfig()  # SwAV / SEER: 2 x 224 + 6 x 96
    spec = crop_spec(crops)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        ours = TrainData(DataConfig(source=str(root / fmt), batch_size=BATCH, num_workers=0, crops=crops), seed=0,
                         cache=tmp_path / "index")
        files = sorted(str(p) for p in (root / "folder").glob("*.jpg"))
        plain = _endless(DataLoader(_PlainDataset(files, spec), batch_size=BATCH, shuffle=True, drop_last=True,
                                    generator=torch.Generator().manual_seed(0)))
        gen = torch.Generator().manual_seed(0)
        fns = {"seer": ours.next, "dataloader": lambda: next(plain),
               "op": lambda: [seer_kernels.multicrop([b], spec, gen) for b in blobs[:BATCH]]}

        def metrics(t):
            return {"img_per_s": BATCH / t["seer"].median_s, "dataloader_img_per_s": BATCH / t["dataloader"].median_s,
                    "op_img_per_s": BATCH / t["op"].median_s}

        bench_record("loader", f"cpu-{fmt}-w0-b{BATCH}", fns, ours="seer", baseline="dataloader", metrics=metrics,
                     min_time=1.0, max_rounds=20)
        ours.close()
    finally:
        torch.set_num_threads(prev)
