"""Unlabelled training data: sources (folder, list file, tar shards, built-in digits and synthetic), bad-file-tolerant
datasets, multi-crop in workers or on the device, the checkpointable sampler, ``seer data check`` and
``seer data dedup``.

The names below are imported on first use: a process that needs only :mod:`.sources` (a worker that indexes
tar shards) then starts without torch and seer_kernels, ~2 s of imports per process (0.15 s without)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "Batch": "dataset", "DataError": "dataset", "DecodedDataset": "dataset", "MultiCropDataset": "dataset",
    "Skipped": "dataset", "TrainData": "loader", "ResumableSampler": "sampler",
    "feistel_permutation": "sampler", "mix_seed": "sampler", "IMAGE_EXTENSIONS": "sources",
    "DataSourceError": "sources", "FileSource": "sources", "ImageSource": "sources", "TarSource": "sources",
    "TensorSource": "sources", "build_index": "sources", "detect_format": "sources", "open_index": "sources",
    "open_source": "sources", "scan_folder": "sources", "SyntheticSource": "synthetic", "DataTimeoutError": "workers",
    "dedup_source": "dedup", "dedup_features": "near_dedup",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static tools see
    from .dataset import Batch, DataError, DecodedDataset, MultiCropDataset, Skipped
    from .dedup import dedup_source
    from .loader import TrainData
    from .near_dedup import dedup_features
    from .sampler import ResumableSampler, feistel_permutation, mix_seed
    from .sources import (IMAGE_EXTENSIONS, DataSourceError, FileSource, ImageSource, TarSource, TensorSource,
                          build_index, detect_format, open_index, open_source, scan_folder)
    from .synthetic import SyntheticSource
    from .workers import DataTimeoutError
