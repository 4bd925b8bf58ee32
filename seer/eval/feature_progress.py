"""The resume record of ``seer features``: which batches of FEATS.npy.part are written, and what made them.

Batch k is paths ``[k * batch_size, (k + 1) * batch_size)`` of the full list, whatever the number of processes
(:func:`seer.eval.save_features.batch_share` gives each rank whole batches), so done-ness is kept per batch:
a rerun under another world size still reuses every batch written, and each batch is recomputed exactly as
an uninterrupted run would compute it. The record is JSON files beside the ``.part``:

* ``FEATS.npy.part.progress``: what earlier runs wrote, merged by rank 0 when a run starts;
* ``FEATS.npy.part.progress.rankR``: what rank R wrote in this run (ranks write concurrently, each its own).

Each holds the :func:`fingerprint` of everything that makes the rows, the batches written (as ranges) and the
(index, reason) of their unreadable images. A record is written to a temporary name, fsynced and renamed, and
only after the rows it names were fsynced (:class:`Progress`), so at any moment (a kill, a power cut) every
record names rows that are on disk. Before the ``.part`` is created afresh, or its rows moved at the end
(:func:`~seer.eval.feature_files.drop_rows`), the records are removed and the removal synced, so that none can
outlive the rows it describes.

A record is trusted only whole: an unreadable or malformed one, one from another fingerprint, or a ``.part``
that is missing or not the size the rows need, starts the run afresh, with the reason
(:func:`load_progress`). Torch is needed only by :func:`fingerprint`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..durable import sync_folder, write_atomic
from .feature_files import _read_header, part_paths

FORMAT = 1  # of the JSON records; another one is not read

# How often a rank fsyncs its rows and records them (and at the end of its share, and on an error): a kill
# redoes at most this much work; an fsync per batch would cost a network filesystem's round trip each.
RECORD_EVERY_S = 30.0


@dataclass
class Resumed:
    """What earlier runs wrote: the batch indices done and the (index, reason) of their unreadable images."""
    done: set[int] = field(default_factory=set)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def fingerprint(backbone, paths: Sequence[str], *, backbone_id: Optional[str], image_size: int, mean, std,
                layers: int, tokens: str, batch_size: int, width: int, device, autocast_dtype, max_pixels: int,
                max_bytes: int) -> dict:
    """Everything that makes the rows of FEATS.npy.part, as JSON values (module doc). ``backbone_id``: what
    identifies the weights (the CLI: the checkpoint's path and meta.json); None: a hash of the backbone's
    state dict (every weight read once)."""
    import PIL
    import torch

    import seer
    listed = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    # A relative path names the file under the current folder: from another folder, the same list is other images.
    if not all(os.path.isabs(p) for p in paths):
        listed += f", relative to {os.getcwd()}"
    param = next(backbone.parameters())
    device = torch.device(device) if device is not None else param.device
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        torch.backends.cpu.get_cpu_capability()
    fp = {"image list": f"{len(paths)} paths, sha256 {listed}",
          "backbone": backbone_id if backbone_id is not None else f"weights sha256 {_weights_digest(backbone)}",
          "layers": layers, "tokens": tokens, "image_size": image_size, "mean": [float(m) for m in mean],
          "std": [float(s) for s in std], "max_pixels": max_pixels, "max_bytes": max_bytes,
          "autocast": str(autocast_dtype),
          "weights dtype": str(param.dtype), "device": f"{device.type} ({kind})", "batch_size": batch_size,
          "width": width, "output": "npy float32 rows",
          "software": f"seer {seer.__version__}, torch {torch.__version__}, Pillow {PIL.__version__}",
          # (which kernels run: the attention backend the CLI forces is one of these)
          "kernel settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SEER_KERNELS_")}}
    return json.loads(json.dumps(fp, default=str))  # (as it reads back from a record; default: a numpy int)


def _weights_digest(backbone) -> str:
    import torch
    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def base_record(npy: Path) -> Path:
    return npy.with_name(npy.name + ".part.progress")


def rank_record(npy: Path, rank: int) -> Path:
    return npy.with_name(f"{npy.name}.part.progress.rank{rank}")


def _record_files(npy: Path, *, temporary: bool = False) -> list[Path]:
    """The records beside ``npy`` (and their temporary files, with ``temporary``), sorted."""
    prefix = base_record(npy).name
    try:
        names = [e.name for e in os.scandir(npy.parent) if e.name.startswith(prefix)]
    except FileNotFoundError:  # (--out's folder removed during the run: the error says so, not this)
        return []
    return sorted(npy.parent / n for n in names if temporary or not n.endswith(".tmp"))


def remove_records(npy: Path) -> None:
    """Remove every record (module doc: before the rows are replaced or moved), durably."""
    for p in _record_files(npy, temporary=True):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # (--out's folder removed meanwhile: the writer's error says so)
        sync_folder(npy.parent)


def _write_record(path: Path, fp: dict, done: set[int], skipped: list[tuple[int, str]]) -> None:
    runs: list[list[int]] = []  # batch indices as [first, end) runs: 10^6 images are ~16000 batches, a few runs
    for k in sorted(done):
        if runs and runs[-1][1] == k:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    text = json.dumps({"format": FORMAT, "fingerprint": fp, "batches": runs,
                       "skipped": [[i, why] for i, why in sorted(skipped)]})
    # (json.dumps escapes every non-ASCII character; '.tmp': the name _record_files passes over)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="ascii"), suffix=".tmp")


class Progress:
    """One rank's record of the batches it writes in this run (``path``: :func:`rank_record`). ``add`` each
    batch once its rows are handed to the writer; ``save`` only after they are fsynced (module doc)."""

    def __init__(self, path: Path, fp: dict, batch_size: int):
        self.path, self.fp, self.batch_size = path, fp, batch_size
        self.done: set[int] = set()
        self.skipped: list[tuple[int, str]] = []
        self.unsaved = False

    def add(self, batch: range, unreadable: list[tuple[int, str]]) -> None:
        self.done.add(batch.start // self.batch_size)
        self.skipped += unreadable
        self.unsaved = True

    def save(self) -> None:
        if self.unsaved:
            _write_record(self.path, self.fp, self.done, self.skipped)
            self.unsaved = False


def keep_progress(npy: Path, fp: dict, resumed: Resumed) -> None:
    """Merge the records into :func:`base_record` (rank 0, when a run resumes, before any rank writes its
    own): written first, then the others removed, so a crash in between leaves the same union."""
    _write_record(base_record(npy), fp, resumed.done, resumed.skipped)
    for p in _record_files(npy, temporary=True):
        if p != base_record(npy):
            p.unlink(missing_ok=True)


class _Distrust(Exception):
    """Why the record or the ``.part`` cannot be reused."""


def load_progress(npy: Path, fp: dict, n: int, batch_size: int, width: int) -> tuple[Optional[Resumed], str]:
    """(what the records say is written, "") where they and FEATS.npy.part can be reused for rows of
    ``fp`` (``n`` paths, rows of ``width``); else (None, why not: "" when there is nothing to reuse). Never
    raises for what it reads."""
    part = part_paths(npy)[0]
    try:
        files = _record_files(npy)
        if not files:
            if part.exists() and part.stat().st_size > 0:
                return None, f"{part.name} has no progress record (written by a seer features without resume?)"
            return None, ""
        resumed = Resumed()
        for file in files:
            _read_record(file, fp, n, batch_size, resumed)
        _check_part(part, n, width)
    except _Distrust as e:
        return None, str(e)
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {e}"
    resumed.skipped = sorted(set(resumed.skipped))
    return resumed, ""


def _read_record(file: Path, fp: dict, n: int, batch_size: int, into: Resumed) -> None:
    try:
        rec = json.loads(file.read_text(encoding="ascii"))
    # (a truncated or binary file: ValueError, UnicodeDecodeError included; brackets nested deeper than the
    # recursion limit, garbage that json cannot descend into: RecursionError)
    except (OSError, ValueError, RecursionError) as e:
        raise _Distrust(f"{file.name} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("fingerprint"), dict):
        raise _Distrust(f"{file.name} is not a progress record of this seer features (format {FORMAT})")
    if rec["fingerprint"] != fp:
        raise _Distrust(f"{file.name} was written {_differences(rec['fingerprint'], fp)}")
    batches = -(-n // batch_size)
    runs, skipped = rec.get("batches"), rec.get("skipped")
    done: set[int] = set()
    if not isinstance(runs, list) or not isinstance(skipped, list):
        raise _Distrust(f"{file.name} is malformed (no list of batches or of unreadable images)")
    for run in runs:
        if not (_ints(run, 2) and 0 <= run[0] < run[1] <= batches):
            raise _Distrust(f"{file.name} is malformed (batches {run!r}: expected [first, end) within 0..{batches})")
        done.update(range(run[0], run[1]))
    for item in skipped:
        if not (isinstance(item, list) and len(item) == 2 and _ints(item[:1], 1) and isinstance(item[1], str)
                and 0 <= item[0] < n and item[0] // batch_size in done):
            raise _Distrust(f"{file.name} is malformed (unreadable image {item!r} is not in a batch it lists)")
    # Each index once, and a batch that two records list (after a crash in keep_progress) with the same
    # unreadable images: else the rows dropped at the end would be ambiguous (drop_rows refuses a repeated index,
    # once every batch is computed, and the run's rows are then lost).
    indices = [i for i, _ in skipped]
    if len(set(indices)) != len(indices):
        raise _Distrust(f"{file.name} is malformed (it lists an unreadable image twice)")
    both = done & into.done
    if {(i, why) for i, why in skipped if i // batch_size in both} != \
            {(i, why) for i, why in into.skipped if i // batch_size in both}:
        raise _Distrust(f"{file.name} and another record list other unreadable images in the batches both list")
    into.done |= done
    into.skipped += [(i, why) for i, why in skipped]


def _ints(values, count: int) -> bool:
    return isinstance(values, list) and len(values) == count and all(type(v) is int for v in values)


def _check_part(part: Path, n: int, width: int) -> None:
    """_Distrust unless ``part`` is the (n, width) rows file create_rows_file makes, whole."""
    try:
        with open(part, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # (the lock creates it: a missing one is empty here)
                raise FileNotFoundError
            shape, offset = _read_header(f)
    except FileNotFoundError:
        raise _Distrust(f"{part.name} is missing") from None
    except (OSError, ValueError, EOFError) as e:
        raise _Distrust(f"{part.name} is unreadable ({type(e).__name__}: {e})") from None
    if tuple(shape) != (n, width) or size != offset + 4 * n * width:
        raise _Distrust(f"{part.name} holds {size} bytes of {tuple(shape)} rows, not the {offset + 4 * n * width} "
                        f"of ({n}, {width}) that its record describes")


def _differences(old: dict, new: dict) -> str:
    """'with another batch_size (3, now 4)': what differs between two fingerprints, in one line."""
    said = []
    for key in [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]:
        was, now = json.dumps(old.get(key)), json.dumps(new.get(key))
        said.append(f"{key} ({was}, now {now})" if len(was) + len(now) <= 120 else key)
    return "with another " + "; another ".join(said)
