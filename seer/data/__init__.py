"""Unlabelled training data: sources (folder, list file, tar shards, built-in digits), bad-file-tolerant
datasets, multi-crop in workers or on the device, the checkpointable sampler, and ``seer data check``."""
from .dataset import Batch, DataError, DecodedDataset, MultiCropDataset, Skipped
from .loader import TrainData
from .sampler import ResumableSampler, feistel_permutation, mix_seed
from .sources import (IMAGE_EXTENSIONS, DataSourceError, FileSource, ImageSource, TarSource, TensorSource,
                      build_index, detect_format, open_index, open_source, scan_folder)
from .workers import DataTimeoutError

__all__ = ["Batch", "DataError", "DataSourceError", "DataTimeoutError", "DecodedDataset", "FileSource",
           "IMAGE_EXTENSIONS", "ImageSource", "MultiCropDataset", "ResumableSampler", "Skipped", "TarSource",
           "TensorSource", "TrainData", "build_index", "detect_format", "feistel_permutation", "mix_seed",
           "open_index", "open_source", "scan_folder"]
