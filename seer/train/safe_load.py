"""Loading checkpoints without executing anything a file says.

``torch.distributed.checkpoint`` stores its index (``.metadata``) as a pickle and would unpickle it with
``pickle.load``, and its default planner loads non-tensor items with ``torch.load(weights_only=False)``:
a tampered checkpoint could run arbitrary code. Here the index goes through an unpickler that only
constructs the handful of plain classes DCP's metadata is made of, and anything else is refused with
:class:`UnsafeCheckpointError`; per-rank files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than plain data (tampered or foreign)."""


# (module, name) pairs that DCP's metadata pickles reference: dataclasses, enums and value types.
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension"}
_ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "tuple"),
            ("builtins", "list"), ("builtins", "dict"), ("builtins", "int"), ("builtins", "float"),
            ("builtins", "bool"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "complex")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        # A dotted name is an attribute path that pickle (protocol >= 4) walks from the module: through the
        # modules it imports it reaches anything (torch.inspect.attrgetter, then eval), so only a plain name of
        # a dataclass or enum defined in the module itself may be built, never a function, an imported class
        # or one with behaviour (readers, writers, planners).
        if module in _ALLOWED_MODULES and name.isidentifier() and not name.startswith("__"):
            obj = super().find_class(module, name)
            if (isinstance(obj, type) and obj.__module__ == module
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                return obj
        raise UnsafeCheckpointError(f"{self.source}: refusing to load {module}.{name}: the checkpoint index may "
                                    f"only hold plain checkpoint metadata (tampered or foreign file?)")


def safe_unpickle(data: bytes, source: str = "checkpoint") -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise UnsafeCheckpointError(f"{source}: unreadable checkpoint index ({type(e).__name__}: {e})") from None


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read by the restricted unpickler. ``index``: the checkpoint's index
    as this class read it before, given to DCP instead of unpickling the file again."""

    def __init__(self, path, index=None):
        super().__init__(path)
        self.index = index

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        if self.index is not None and rank is None:
            return self.index
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = safe_unpickle(f.read(), str(path))
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not a checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor items with weights_only=True (seer stores none)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_rank_file(path: str | os.PathLike) -> dict:
    """A per-rank state file (plain tensors, numbers, strings, lists, dicts), refusing anything else."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refusing to load: {str(e).splitlines()[0]}") from None
