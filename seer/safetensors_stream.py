"""A ``.safetensors`` file written a group of tensors at a time, so that the writer holds one group, not all.

``safetensors.torch.save_file`` takes every tensor at once and copies each into a bytes object before it
writes (2x the weights in memory: 80 GB for a 10B-parameter float32 backbone). The format needs only the
names, dtypes and shapes up front:

    [8 bytes: N, little-endian u64] [N bytes: JSON header, space-padded] [data]
    header = {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...], "data_offsets": [b, e]}, ...}

where ``[b, e)`` is the tensor's bytes (C order, little-endian) within the data, the tensors back to back
with no gaps. So :func:`write_safetensors` lays the file out from the specs first (in safetensors' own
order: wider dtypes first, then by name, so that every tensor starts aligned to its element size), writes the
header, and then each tensor's bytes at its offset as its group arrives, in any order.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Iterable, Mapping

import torch

# In the order of safetensors' own Dtype enum, by which its writer sorts (descending): within one element size
# the same order as its files, so that ours are byte for byte what save_file writes.
DTYPE_CODES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64"}
_RANK = {dtype: i for i, dtype in enumerate(DTYPE_CODES)}

Spec = tuple[torch.dtype, tuple[int, ...]]


def layout(specs: Mapping[str, Spec]) -> dict[str, tuple[int, int]]:
    """name -> (begin, end) of its bytes within the data: wider dtypes first (safetensors' order), then by name."""
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code (expected one of "
                             f"{', '.join(str(d) for d in DTYPE_CODES)})")
    offsets, end = {}, 0
    for name in sorted(specs, key=lambda n: (-_RANK[specs[n][0]], n)):
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        offsets[name] = (end, end + size)
        end += size
    return offsets


def write_safetensors(path: str | Path, specs: Mapping[str, Spec], groups: Iterable[Mapping[str, torch.Tensor]],
                      metadata: Mapping[str, str]) -> None:
    """Write ``path`` holding the tensors ``specs`` names (name -> (dtype, shape)), whose values ``groups``
    yields, each name once, in any grouping and order. A tensor that is not in ``specs``, comes twice or
    differs from its spec, or one that never comes, is a ValueError naming it (the file is then incomplete:
    the caller writes into a scratch file). Holds one group at a time where the caller's iterator does."""
    if sys.byteorder != "little":  # (the format is little-endian; the tensors' bytes are written as they are)
        raise NotImplementedError("write_safetensors: a big-endian machine")
    offsets = layout(specs)
    header = {"__metadata__": dict(metadata)}
    for name, (begin, end) in offsets.items():
        dtype, shape = specs[name]
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # (UTF-8, as safetensors')
    text += b" " * (-len(text) % 8)  # (the data starts 8-byte aligned, as safetensors' own writer pads it)
    base = 8 + len(text)
    pending = set(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for group in groups:
            for name, t in group.items():
                if name not in pending:
                    raise ValueError(f"tensor {name!r}: " + ("given twice" if name in specs else "not in the specs"))
                want = specs[name]
                if (t.dtype, tuple(t.shape)) != want:
                    raise ValueError(f"tensor {name!r}: {t.dtype} {tuple(t.shape)}, expected {want[0]} {want[1]}")
                f.seek(base + offsets[name][0])
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                pending.discard(name)
            group = t = None  # (let go before the next group is made: the caller's iterator holds one)
        if pending:
            missing = sorted(pending)
            raise ValueError(f"tensors never given: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                             f"({len(missing)})")
        f.truncate(base + max((e for _, e in offsets.values()), default=0))
