"""The training data stream end to end: images/s of :class:`seer.data.TrainData` (index -> sampler -> robust
dataset -> decode + SwAV multi-crop (2 x 224 + 6 x 96) -> collated batch) against a plain torch DataLoader over
the same files doing the same read + ``seer_kernels.multicrop`` per sample (shuffle, default collate), same
run, interleaved. The op alone on bytes read beforehand is timed alongside (``op_img_per_s``): the bound both
loaders approach.

    loader:cpu-<folder|tar>-w0-b<B>    in-process loading (num_workers=0) on one thread, JPEGs of mixed sizes
                                       300 x 200 .. 1600 x 1200; ratio = DataLoader time / ours, i.e. what our
                                       per-batch bookkeeping (sampler, bad-file handling, collation) costs.
    loader:cpu-tar-index               indexing 4 tar shards of ~2000 small members (the start-up cost of a tar
                                       source on rank 0): seer.data.tarscan against the same indexing reading
                                       the shards with tarfile; ratio = tarfile time / ours.
    loader:cpu-tar-index-parallel      indexing 16 tar shards of 30,000 small members in 2 spawned worker
                                       processes (data.index_workers=2, the pool's start included) against this
                                       process alone (1); ratio = serial time / parallel.

Worker processes are not compared here: two loaders timed interleaved would each keep their workers
prefetching in the background, timing each other's contention.
"""
from __future__ import annotations

import io
import os
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


@pytest.fixture(scope="module")
def tar_shards_for_index(tmp_path_factory):
    """4 shards x ~2000 members as webdataset writes them: samples of .jpg (300 B-4 kB; headers dominate
    indexing, so the bytes are zeros) + .json + .cls under 000123-style folders, a folder member per 500
    samples, a long name (GNU 'L' / pax path=) every 97th sample; GNU format and pax format alternately."""
    root = tmp_path_factory.mktemp("tar-index")
    rng = random.Random(0)
    shards = []
    for s in range(4):
        fmt = tarfile.PAX_FORMAT if s % 2 else tarfile.GNU_FORMAT
        shards.append(str(root / f"shard-{s:05d}.tar"))
        with tarfile.open(shards[-1], "w", format=fmt) as tf:
            for k in range(667):
                folder = f"{s:03d}{k // 500:03d}"
                if k % 500 == 0:
                    info = tarfile.TarInfo(folder)
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                key = f"{folder}/{rng.getrandbits(40):010x}" if k % 97 else f"{folder}/{'long_' * 25}{k}"
                for ext in (".jpg", ".json", ".cls"):
                    info = tarfile.TarInfo(key + ext)
                    info.size = rng.randint(300, 4000) if ext == ".jpg" else rng.randint(2, 200)
                    tf.addfile(info, io.BytesIO(bytes(info.size)))
    return shards


def bench_tar_index_cpu(bench_record, bench_device, tar_shards_for_index, tmp_path):
    """loader:cpu-tar-index: indexing tar shards (seer.data.sources.index_tar_shards, the start-up cost of a
    tar source on rank 0) with the header scanner (seer.data.tarscan) against the same code reading the
    shards with tarfile (its fallback and reference), same run, interleaved; members/s reported."""
    from seer.data import sources, tarscan
    if bench_device != "cpu":
        pytest.skip("CPU rows")
    shards = tar_shards_for_index
    members = sum(len(tarscan.scan(s)) for s in shards)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    real = tarscan.usable

    def with_tarfile():
        tarscan.usable = lambda: False
        try:
            sources.index_tar_shards(shards, tmp_path / "ref")
        finally:
            tarscan.usable = real

    fns = {"tarscan": lambda: sources.index_tar_shards(shards, tmp_path / "ours"), "tarfile": with_tarfile}

    def metrics(t):
        return {"members_per_s": members / t["tarscan"].median_s,
                "tarfile_members_per_s": members / t["tarfile"].median_s}

    bench_record("loader", "cpu-tar-index", fns, ours="tarscan", baseline="tarfile", metrics=metrics,
                 min_time=1.0, max_rounds=20)
    assert all((tmp_path / "ours" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()
               for f in ("members.txt", "offset.npy", "size.npy", "shard_id.npy"))


@pytest.fixture(scope="module")
def many_tar_shards(tmp_path_factory):
    """16 shards x 30,000 members (10,000 samples of .jpg + .json + .cls, 1-100 bytes each: headers dominate
    indexing): one shard written, the others hard links to it (the index does not care; 30 MB on disk)."""
    root = tmp_path_factory.mktemp("tar-index-parallel")
    rng = random.Random(0)
    first = root / "shard-00000.tar"
    with tarfile.open(first, "w", format=tarfile.GNU_FORMAT) as tf:
        for k in range(10_000):
            for ext in (".jpg", ".json", ".cls"):
                info = tarfile.TarInfo(f"{k // 1000:06d}/{k:08d}{ext}")
                info.size = rng.randint(1, 100)
                tf.addfile(info, io.BytesIO(bytes(info.size)))
    shards = [str(first)]
    for s in range(1, 16):
        shards.append(str(root / f"shard-{s:05d}.tar"))
        os.link(first, shards[-1])
    return shards


def bench_tar_index_parallel_cpu(bench_record, bench_device, many_tar_shards, tmp_path, monkeypatch):
    """loader:cpu-tar-index-parallel: index_tar_shards with 2 worker processes against 1 (this process only),
    same run, interleaved; each parallel call starts its own pool (spawn), as a run does."""
    from seer.data import sources
    if bench_device != "cpu":
        pytest.skip("CPU rows")
    if sources._usable_cpus() < 2:  # two workers on one CPU take turns: nothing to measure but the pool's start
        pytest.skip("needs 2 CPUs for its 2 index workers")
    # Every shard to the pool (a run reads shards here until the pool looks worth its start: 1 s assumed,
    # pytest's workers start in 0.2 s).
    monkeypatch.setattr(sources, "POOL_START_S", 0.0)
    shards = many_tar_shards
    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    members = sources.index_tar_shards(shards, tmp_path / "serial")
    fns = {"parallel": lambda: sources.index_tar_shards(shards, tmp_path / "parallel", workers=2),
           "serial": lambda: sources.index_tar_shards(shards, tmp_path / "serial", workers=1)}

    def metrics(t):
        return {"images_per_s": members / t["parallel"].median_s,
                "serial_images_per_s": members / t["serial"].median_s}

    # ~2 s a call on 2 cores: 1 warm-up and 3 rounds (the defaults would take a minute)
    bench_record("loader", "cpu-tar-index-parallel", fns, ours="parallel", baseline="serial", metrics=metrics,
                 min_time=0.0, min_rounds=3, max_rounds=3, warmup=1)
    assert all((tmp_path / "parallel" / f).read_bytes() == (tmp_path / "serial" / f).read_bytes()
               for f in ("members.txt", "members.offsets.npy", "offset.npy", "size.npy", "shard_id.npy"))
