"""The training data stream: index -> sampler -> DataLoader -> crops on the training device.

``data.augment_on``:

* 'workers': DataLoader workers read, decode and multi-crop each image on the CPU (the C++ op, one
  thread per worker); the training process only moves finished crops to the device.
* 'device': workers only read and decode; the batch of uint8 images goes to the training device and the
  multi-crop op runs there (the GPU op on CUDA), one launch per stage for the whole batch.

:class:`TrainData` also measures how long each step waited for its batch (the data-wait fraction), and stops
with an error naming ``data.timeout_s`` when workers deliver no batch for that long (:mod:`seer.data.workers`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..config import DataConfig
from .augment import crop_spec, multicrop_images, split_crops
from .dataset import (Batch, DecodedDataset, MultiCropDataset, Skipped, collate_crops, collate_images,
                      worker_init)
from .sampler import ResumableSampler, _BatchSampler, mix_seed
from .sources import build_index, open_index
from .synthetic import parse_size
from .workers import DataTimeoutError, loader_timeout, next_batch


class TrainData:
    """Batches of crops for one data-parallel rank, with a checkpointable position.

    Args:
        cfg: the ``data`` section.
        seed: ``train.seed`` (data order and augmentations).
        cache: folder of the data index (OUT/data).
        rank, world: data-parallel rank and size.
        device: where the crops go.
        barrier: called between indexing on rank 0 and opening the index on every rank.
        is_index_writer: whether this process writes the index (global rank 0).
    """

    def __init__(self, cfg: DataConfig, *, seed: int, cache: str | Path, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu"), barrier: Callable[[], None] = lambda: None,
                 is_index_writer: bool = True):
        self.cfg, self.seed, self.device, self.rank = cfg, seed, device, rank
        cache = Path(cache)
        meta = None
        # What makes the built-in sets' images (the synthetic size as 'HxW', so that '256' and '256x256' agree)
        built_in = {"digits_size": cfg.digits_size, "digits_split": cfg.digits_split,
                    "synthetic_count": cfg.synthetic_count,
                    "synthetic_size": "x".join(map(str, parse_size(cfg.synthetic_size)))}
        if is_index_writer:
            meta = build_index(cfg.source, cfg.format, cache, workers=cfg.index_workers, built_in=built_in,
                               exclude=cfg.exclude)
        barrier()
        if meta is None:
            # reads the finished index.json; rank 0 checked the shards (one stat each, not one per rank)
            meta = build_index(cfg.source, cfg.format, cache, check_shards=False, built_in=built_in,
                               exclude=cfg.exclude)
        self.source = open_index(meta, cache, digits_size=cfg.digits_size, digits_split=cfg.digits_split,
                                 synthetic_count=cfg.synthetic_count, synthetic_size=parse_size(cfg.synthetic_size),
                                 seed=seed, max_bytes=cfg.max_image_bytes)
        self.spec = crop_spec(cfg.crops)
        self.sampler = ResumableSampler(len(self.source), cfg.batch_size, world, rank, seed)
        if cfg.augment_on == "workers":
            self.dataset = MultiCropDataset(self.source, self.spec, cfg.crops, seed,
                                            max_pixels=cfg.max_image_pixels)
            collate = collate_crops
        else:
            self.dataset = DecodedDataset(self.source, max_pixels=cfg.max_image_pixels)
            collate = collate_images
        self._collate = collate
        self._iter = None
        self.last_wait = 0.0

    def __len__(self) -> int:
        return len(self.source)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.sampler.current_epoch()

    def _loader(self) -> DataLoader:
        workers = self.cfg.num_workers
        # Its own generator: creating an iterator must not draw from the global torch RNG, or a resumed run
        # (which creates its iterator at the resume step) would see different drop-path masks afterwards.
        kw = dict(num_workers=workers, collate_fn=self._collate, pin_memory=self.device.type == "cuda",
                  generator=torch.Generator().manual_seed(self.seed),
                  timeout=loader_timeout(self.cfg.timeout_s, workers))
        if workers:
            kw.update(worker_init_fn=worker_init, prefetch_factor=self.cfg.prefetch_factor)
        return DataLoader(self.dataset, batch_sampler=_BatchSampler(self.sampler), **kw)

    def next(self) -> tuple[list[Tensor], list[Skipped]]:
        """The next batch's crops on the device (V tensors (B, 3, S, S)) and the files skipped for it.

        Raises :class:`~seer.data.workers.DataTimeoutError` when the workers deliver no batch within
        ``data.timeout_s``; the workers are gone then and the position is that of the missing batch (a later
        call, or a resume from a checkpoint, starts over with it)."""
        t0 = time.perf_counter()
        if self._iter is None:
            self._iter = iter(self._loader())
        epoch, offset = self.sampler.position()
        try:
            batch: Batch = next_batch(self._iter, self.cfg.timeout_s, setting="data.timeout_s",
                                      where=f"data-parallel rank {self.rank}, the batch at epoch {epoch}, "
                                            f"image offset {offset} (step {offset // self.sampler.global_batch + 1} "
                                            f"of {self.steps_per_epoch} of that epoch)")
        except DataTimeoutError:
            self._iter = None  # its workers were killed
            raise
        if batch.crops:
            crops = [c.to(self.device, non_blocking=True) for c in batch.crops]
        else:
            images = [im.to(self.device, non_blocking=True) for im in batch.images]
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, offset, self.rank))
            groups = multicrop_images(images, self.spec, self.cfg.crops, gen)
            crops = split_crops(groups, self.spec, len(images))
        self.sampler.advance()
        self.last_wait = time.perf_counter() - t0
        return crops, batch.skipped

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the workers (a new iterator starts from the sampler's position on the next call)."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

