"""Features of a large image set written to FEATS.npy / FEATS.txt as they come, by one process or several.

Memory: one batch of features at a time, whatever the number of images. Each batch's rows go to
FEATS.npy.part as they arrive (:mod:`seer.eval.feature_files`: row i of image i, the rows of unreadable
images removed in place at the end), then both files are renamed into place; the bytes are those of
:func:`~seer.eval.feature_files.write_outputs` after :func:`~seer.eval.extract.extract_image_features`.

Several processes (torchrun; any launch with a process group of world size > 1, every process calling
:func:`save_image_features` with the same arguments): rank r takes :func:`batch_share`, a contiguous run of
whole batches of the full list, so each forward pass sees the batch a single process would give it and the
file is the same bytes as a single process's (on CPUs; on GPUs of one kind as far as their kernels are
deterministic). Rank 0 creates the ``.part`` file (a shared filesystem is checked for,
:func:`seer.train.distributed.check_shared_folders`), every rank writes its own rows into it, then every
rank hands its outcome (its unreadable images, or its error) to all others, and rank 0 removes the
unreadable rows and renames the files (the others have returned by then: a failure there, a full disk, is
rank 0's alone to report).

Resume (:mod:`seer.eval.feature_progress`): each rank records, in its own JSON file beside the ``.part``,
which batches it wrote and their unreadable images, every :data:`~seer.eval.feature_progress.RECORD_EVERY_S`
(30 s; after fsyncing its rows), at the end of its share and on an error. Rank 0, when a run starts, reuses
the ``.part`` whose records carry the same fingerprint (the paths, the weights, layers, tokens, image size,
normalisation, precision, device kind, batch size, width, software versions, kernel settings): it logs
"resuming: X of Y batches already written" and the ranks run only the other batches. Done-ness is per batch
of the full list, not per rank, so another number of processes still reuses them, and the batches left are
split between the ranks afresh (:func:`resumed_share`). Anything else (another
fingerprint, a record that is unreadable or malformed, a ``.part`` missing or of the wrong size,
``resume=False``) starts afresh with a warning naming the reason. The records are removed before the
unreadable rows are moved out, and with the ``.part`` on success.

Errors: a rank that fails creates FEATS.npy.part.failed, hands its error on instead of its rows and raises
it; the others look for that file after each batch, stop, and raise :class:`OtherRankError` naming it. The
``.part`` and the records are kept (rank 0 warns how many batches they hold): a failure is often transient
(a full disk, a GPU out of memory, Ctrl-C to free the machine), and the same command then resumes; nothing
is renamed into place, so no output is half-written. They are removed where nothing is worth keeping: no
batch recorded, no readable image, or a failure once the rows are being moved. A rank that dies (killed,
out of memory) hands nothing on, but closes its connections, which ends the others' wait for the outcomes at
once (gloo's "Connection closed by peer"); that wait (for the slowest rank) otherwise has a limit of
:data:`STATUS_WAIT_S`, 7 days, far beyond any imbalance of equal shares. A SIGKILL loses at most the batches
since each rank's last record; SIGTERM (torchrun stopping the others after a process died) is turned into an
exception by the CLI (``seer.cli.Terminated``), so each rank records first, as on any error.

--out's folder removed during the run: a FileNotFoundError naming it (CLI: one line, status 2).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch.distributed as dist
from torch import nn

from ..config import DataConfig
from ..data.sources import check_max_bytes
from ..part_lock import unlock_part
from . import feature_progress
from .extract import check_batching, check_feature_args, check_image_args, feature_dim, stream_image_features
from .feature_files import (RowWriter, check_outputs, check_path_lines, commit_outputs, create_rows_file, drop_rows,
                            lock_rows_file, part_paths)
from .feature_progress import (Progress, Resumed, fingerprint, keep_progress, load_progress, rank_record,
                               remove_records)

log = logging.getLogger(__name__)

# How long a rank that is done waits for the others' outcome (module doc).
STATUS_WAIT_S = 7 * 24 * 3600


class OtherRankError(RuntimeError):
    """Another process of the launch failed; raised on the others with its rank and message."""


class NoReadableImagesError(ValueError):
    """None of the images could be read: nothing is written."""


@dataclass
class SavedFeatures:
    """What :func:`save_image_features` wrote: ``rows`` x ``width`` float32 in ``npy``, their paths in ``txt``,
    (path, reason) of each unreadable image in path order (every rank gets all of them), and the number of
    batches reused from an interrupted run."""
    npy: Path
    txt: Path
    rows: int
    width: int
    skipped: list[tuple[str, str]]
    resumed: int = 0  # batches an interrupted run had written (module doc)


def batch_share(n: int, batch_size: int, rank: int, world: int) -> range:
    """The path indices of rank ``rank`` of ``world``: batches ``[r * B // world, (r + 1) * B // world)`` of
    the B = ceil(n / batch_size) batches of the full list (contiguous, whole batches, as even as whole batches
    allow; empty for a rank beyond the number of batches)."""
    batches = -(-n // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return range(min(first * batch_size, n), min(last * batch_size, n))


def resumed_share(n: int, batch_size: int, rank: int, world: int, done) -> tuple[range, set[int]]:
    """(the path indices rank ``rank`` of ``world`` runs, the first path index of each batch in them to skip):
    the batches not in ``done`` split as :func:`batch_share` splits all of them (a contiguous run of the
    batches left, as even as whole batches allow), so that a resumed run spreads what is left over every
    rank, whatever each wrote before (another number of processes, a rank that was slower); with nothing done
    it is :func:`batch_share`'s range, nothing skipped. Each batch is the same paths whichever rank runs it,
    so the rows are the same."""
    batches = -(-n // batch_size)
    if not done:
        return batch_share(n, batch_size, rank, world), set()
    todo = np.setdiff1d(np.arange(batches), np.fromiter(done, np.int64, len(done)))
    lo, hi = rank * len(todo) // world, (rank + 1) * len(todo) // world
    if lo == hi:
        return range(0), set()
    first, last = int(todo[lo]), int(todo[hi - 1])
    return (range(first * batch_size, min((last + 1) * batch_size, n)),
            {k * batch_size for k in range(first, last + 1) if k in done})


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_image_features(backbone: nn.Module, paths: Sequence[str], out: str | os.PathLike, *, image_size: int,
                        mean, std, layers: int = 1, tokens: str = "cls", batch_size: int = 64,
                        overwrite: bool = False, resume: bool = True, backbone_id: Optional[str] = None,
                        **options) -> SavedFeatures:
    """Write the features of ``paths`` (:func:`seer.eval.extract.extract_image_features`' rows, same
    arguments; ``options``: its ``workers``, ``device``, ``autocast_dtype``, ``max_pixels``, ``timeout_s``,
    ``max_bytes``) to
    ``out`` (FEATS.npy) and FEATS.txt (module doc; :func:`seer.eval.feature_files.check_outputs` for
    ``overwrite``). A collective when a process group of several processes is set up: every rank calls it.

    ``resume``: reuse the batches that an interrupted run with the same fingerprint wrote (module doc);
    ``backbone_id``: what identifies the backbone's weights in that fingerprint (the CLI: the checkpoint's
    path and meta.json); None: a hash of its state dict.

    Raises :class:`NoReadableImagesError` (nothing written) when no image is readable.
    """
    check_feature_args(backbone, layers, tokens)
    check_batching(batch_size, options.get("workers", 0), options.get("timeout_s", DataConfig.timeout_s))
    check_max_bytes(options.get("max_bytes", DataConfig.max_image_bytes))
    check_image_args(backbone, image_size, mean, std)  # (before the .part is made, not at the first batch)
    if not paths:
        raise ValueError("paths is empty: expected at least one image path")
    check_path_lines(paths)  # (before the work, not at the end of it)
    rank, world = _rank_world()
    npy = check_outputs(out, overwrite=overwrite)
    parts = part_paths(npy)
    width = feature_dim(backbone, layers, tokens)
    failed = _failed_flag(npy)
    batches = -(-len(paths) // batch_size)

    lock: list = []  # rank 0: the lock on the .part file, once held (feature_files' module doc)
    state: list = [None]  # (fingerprint, what earlier runs wrote): rank 0's, sent to the others
    wrote_all = committed = False

    def setup() -> None:  # rank 0, before any rank writes
        check_outputs(out, overwrite=overwrite)
        fp = fingerprint(backbone, paths, backbone_id=backbone_id, image_size=image_size, mean=mean, std=std,
                         layers=layers, tokens=tokens, batch_size=batch_size, width=width,
                         device=options.get("device"), autocast_dtype=options.get("autocast_dtype"),
                         max_pixels=options.get("max_pixels", DataConfig.max_image_pixels),
                         max_bytes=options.get("max_bytes", DataConfig.max_image_bytes))
        lock.append(lock_rows_file(parts[0], out))  # (OutputBusyError while another run writes --out)
        failed.unlink(missing_ok=True)  # (left by a run that was killed)
        resumed, why = load_progress(npy, fp, len(paths), batch_size, width)
        if not resume and (resumed or why):
            resumed, why = None, "resume is off (--no-resume)"
        state[0] = (fp, resumed or Resumed())
        if resumed is None:
            if why:
                log.warning("%s: starting afresh: %s", parts[0], why)
            remove_records(npy)  # (first: feature_progress' module doc)
            create_rows_file(parts[0], len(paths), width)
        else:
            keep_progress(npy, fp, resumed)
            log.info("resuming: %d of %d batches already written (%s)", len(resumed.done), batches, parts[0])

    group = None
    try:
        if world > 1:
            # Its own gloo group: the outcome exchange waits for the slowest rank, longer than the default timeout.
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=STATUS_WAIT_S))
            from ..train.distributed import check_shared_folders
            check_shared_folders({"--out's folder": npy.parent}, main_setup=setup if rank == 0 else None,
                                 why="Every process writes its rows into --out's .part file, which rank 0 then "
                                     "renames: put --out on a filesystem that every node mounts")
            dist.broadcast_object_list(state, src=0, group=group)
        else:
            setup()
        fp, resumed = state[0]
        share, skip = resumed_share(len(paths), batch_size, rank, world, resumed.done)
        progress = Progress(rank_record(npy, rank), fp, batch_size)
        skipped = resumed.skipped + _write_share(backbone, paths, parts[0], share, progress, group, failed,
                                                 skip=skip, image_size=image_size,
                                                 mean=mean, std=std, layers=layers, tokens=tokens,
                                                 batch_size=batch_size, **options)
        skipped.sort()
        left = len(paths) - len(skipped)
        if left == 0:
            wrote_all = True  # (nothing worth keeping)
            raise NoReadableImagesError(f"none of the {len(paths)} images is readable")
        if rank == 0:
            # Outputs refused now (a FEATS.npy, or a FEATS.txt not seer's, that appeared during the run) are
            # found while the rows are still resumable: once the file is moved, the same command only renames.
            # (commit_outputs checks again, after the rows are moved.)
            check_outputs(out, overwrite=overwrite)
            wrote_all = True
            remove_records(npy)  # (before the rows move: feature_progress' module doc)
            drop_rows(parts[0], [i for i, _ in skipped])
            dropped = {i for i, _ in skipped}
            commit_outputs(npy, [p for i, p in enumerate(paths) if i not in dropped], overwrite=overwrite)
            committed = True
    except FileNotFoundError as e:
        if not npy.parent.is_dir():  # (rather than the name of whichever file was opened next)
            raise FileNotFoundError(f"--out {str(out)!r}: its folder {str(npy.parent)!r} was removed while the "
                                    f"features were being written; nothing was written") from e
        raise
    finally:
        # Only the run that holds the lock removes the .part files: a run refused because another one writes
        # --out must leave that one's files alone, and after the renames a new .part is another run's.
        if rank == 0 and lock:
            try:
                if not committed:
                    _leave_part_files(npy, failed, state[0] if not wrote_all else None, len(paths), batch_size,
                                      width)
            finally:
                unlock_part(lock[0])
        if group is not None:
            dist.destroy_process_group(group)
    return SavedFeatures(npy, npy.with_suffix(".txt"), left, width, [(paths[i], why) for i, why in skipped],
                         len(resumed.done))


def _leave_part_files(npy: Path, failed: Path, kept, n: int, batch_size: int, width: int) -> None:
    """After a failure (rank 0): keep the ``.part`` and its record where ``kept`` (fingerprint, _) is given and
    the record names written batches (module doc: a rerun resumes), else remove them."""
    failed.unlink(missing_ok=True)
    if kept is not None:
        written, _ = load_progress(npy, kept[0], n, batch_size, width)
        if written is not None and written.done:
            log.warning("%s keeps %d of %d batches: the same command resumes them (--no-resume starts afresh)",
                        part_paths(npy)[0], len(written.done), -(-n // batch_size))
            return
    remove_records(npy)
    for part in part_paths(npy):
        part.unlink(missing_ok=True)


def _failed_flag(npy: Path) -> Path:
    """FEATS.npy.part.failed: created by a rank that failed, so that the others stop (module doc)."""
    return npy.with_name(npy.name + ".part.failed")


class _Stopped(Exception):
    """This rank stopped because another one failed."""


def _write_share(backbone, paths, part_file: Path, share: range, progress: Progress, group, failed: Path,
                 **kwargs) -> list[tuple[int, str]]:
    """This rank's rows into ``part_file``, recorded in ``progress`` (module doc); then every rank's outcome
    exchanged (``failed``: the flag file). Returns (index, reason) of every rank's unreadable images of this
    run, in path order."""
    writer = RowWriter(part_file)
    error: Optional[BaseException] = None
    last_record, sync_failed = time.monotonic(), False

    def record() -> None:
        nonlocal sync_failed, last_record
        if sync_failed:  # (a second fsync may not report the same lost rows again: never record them)
            return
        try:
            writer.sync()  # the rows first: a record names only rows that are on disk
        except OSError:
            sync_failed = True
            raise
        progress.save()
        last_record = time.monotonic()

    def after_batch(batch: range, unreadable) -> None:
        progress.add(batch, unreadable)
        if time.monotonic() - last_record >= feature_progress.RECORD_EVERY_S:
            record()
        if group is not None and failed.exists():  # (a stat per batch: cheap beside a forward pass)
            raise _Stopped()

    try:
        skipped = stream_image_features(backbone, paths, writer, part=share, after_batch=after_batch, **kwargs)
        record()  # (this rank's rows are on disk before rank 0 is told they are there)
    except BaseException as e:  # (also Ctrl-C: the others must hear of it, not wait for this rank)
        try:
            record()  # what was written before the error is resumed by the next run
        except OSError as e2:
            log.warning("could not record the last batches written (%s): a rerun computes them again", e2)
        if group is None:
            raise
        error, skipped = e, []
        if not isinstance(e, _Stopped):
            with contextlib.suppress(OSError):  # (the outcome exchange still tells the others)
                failed.write_text(f"rank {dist.get_rank()}: {type(e).__name__}: {e}\n")
    finally:
        if writer.fd >= 0:
            os.close(writer.fd)
    if group is None:
        return skipped
    if error is None:
        outcome = ("ok", skipped)
    elif isinstance(error, _Stopped):
        outcome = ("stopped", "")
    else:
        outcome = ("error", f"{type(error).__name__}: {error}")
    outcomes: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(outcomes, outcome, group=group)
    except Exception as e:
        if error is not None and not isinstance(error, _Stopped):
            raise error from e
        raise OtherRankError(f"waiting for the other processes' features failed ({type(e).__name__}: {e}); a "
                             f"process of the launch probably died: see its output") from e
    if error is not None and not isinstance(error, _Stopped):
        raise error
    errors = [(r, what) for r, (kind, what) in enumerate(outcomes) if kind == "error"]
    if errors:
        r, what = errors[0]
        raise OtherRankError(f"rank {r} of {len(outcomes)} failed ({what}); nothing was written")
    if error is not None:  # (not seen: the flag is removed before any rank starts)
        raise OtherRankError(f"stopped by {failed}, but no rank reports an error; nothing was written")
    return sorted(item for kind, items in outcomes for item in items)
