"""Checkpoints: sharded (torch.distributed.checkpoint), atomic, the last N kept, loaded without unpickling.

Layout of one checkpoint, OUT/checkpoints/step_00001000/:

    .metadata, __*_*.distcp    model and optimizer tensors (DCP: every rank writes its shards in parallel;
                               a different number of data-parallel ranks can read them back)
    rank_00000.pt, ...         per-rank state: RNG states, the SwAV queue (plain tensors and numbers)
    meta.json                  step, data position, counters, world layout, tensor layout, and the CRC32 of
                               every file above as written (``checksums``) and of itself (``meta_crc32``)
    config.yaml                the resolved run config

Checksums: each rank reads back what it wrote (still in the page cache: zlib's CRC32 runs at about 2 GB/s)
and loading checks every file of tensors and of per-rank state against them (the ranks split the tensor
files, each checks its own state file, and all stop with the same error) before any is used: a bit flip in
a shard, which loads without an error, would otherwise resume training with a wrong weight. Checkpoints
written before checksums load as they did. (config.yaml has none: a run's config.yaml
may be copied in to replace a lost one, and the architecture check reads it against the tensors.)

Atomicity: everything is written into ``.tmp-step_00001000``; only when every rank has finished does rank 0
write meta.json and rename the folder to ``step_00001000``. A rename is atomic on POSIX file systems, so a
folder named ``step_*`` is always complete; a process killed while writing leaves only a ``.tmp-*`` folder,
which is ignored (and removed by the next run). Old checkpoints are deleted only after a new one is complete,
and renamed to ``.del-step_*`` first (removed by the next run if a kill cuts the deletion short), so that no
``step_*`` folder is ever half there. A newest ``step_*`` folder without its ``meta.json`` or ``.metadata``
has lost them since (by hand, or a disk fault): finding the newest checkpoint then raises
:class:`CorruptCheckpointError` naming it rather than falling back to an older one without a word (a resume
would redo the steps since, and overwrite the folder).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import Tensor

from ..durable import sync_folder, write_atomic
from .safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError, load_rank_file

log = logging.getLogger("seer.checkpoint")

_NAME = re.compile(r"^step_(\d{8,})$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder's name (``step_XXXXXXXX``)."""
    return bool(_NAME.match(name))


def is_complete(path: Path) -> bool:
    return bool(_NAME.match(path.name)) and _complete_files(path)


def _complete_files(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / ".metadata").is_file()


def _step(folder: Path) -> int:
    return int(_NAME.match(folder.name).group(1))


def _step_folders(directory: str | os.PathLike) -> list[Path]:
    """Folders named ``step_*`` in ``directory``, complete or not, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name) and p.is_dir()), key=_step)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    return [p for p in _step_folders(directory) if _complete_files(p)]


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint in ``directory``, or None; CorruptCheckpointError if the newest ``step_*`` folder
    is not complete (module doc: its files were removed after it was written)."""
    folders = _step_folders(directory)
    if folders and not _complete_files(folders[-1]):
        newest, complete = folders[-1], [p for p in folders if _complete_files(p)]
        lacks = " and ".join(n for n in ("meta.json", ".metadata") if not (newest / n).is_file())
        then = f"resume from {complete[-1].name}" if complete else "start the run over (it has no other checkpoint)"
        raise CorruptCheckpointError(f"checkpoint {newest} lacks {lacks}: a step_* folder is complete when it is "
                                     f"named, so they were removed since. Restore them, or move the folder out of "
                                     f"{newest.parent} to {then}")
    return folders[-1] if folders else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint folder from a checkpoint folder, a checkpoints folder or a run folder."""
    p = Path(path)
    if is_complete(p):
        return p
    for candidate in (p, p / "checkpoints", *run_checkpoint_dir(p)):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    if p.name.startswith(".tmp-"):
        raise FileNotFoundError(f"{p} is an incomplete checkpoint (its writer was interrupted); use a complete one")
    raise FileNotFoundError(f"no complete checkpoint at {str(p)!r} (expected a step_* folder, or a run or "
                            f"checkpoints folder containing one)")


def run_checkpoint_dir(run: Path) -> list[Path]:
    """The checkpoint.dir recorded in a run folder's config.yaml, if the run set one (a relative one is taken
    from the current folder, as the run took it)."""
    import yaml
    try:
        where = yaml.safe_load((run / "config.yaml").read_text())["checkpoint"]["dir"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):  # not a run folder, or no such key
        return []
    return [Path(where).expanduser()] if isinstance(where, str) and where else []


# Free space below which a failed write of torch's stream writer (_WRITER_FAILED) is reported as a full disk:
# its errors do not say so ("unexpected pos 704 vs 598").
FULL_DISK_BYTES = 256 * 2**20
_WRITER_FAILED = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed")


class CorruptCheckpointError(RuntimeError):
    """A complete-looking checkpoint whose files cannot be read back (truncated, emptied, edited)."""


class ChecksumMismatch(ValueError):
    """A checkpoint file whose CRC32 differs from the one recorded when it was written."""


CHECKSUMS = "checksums"  # meta.json: file name -> CRC32 (8 hex digits) of the tensor and per-rank files
META_CRC = "meta_crc32"  # meta.json: CRC32 of meta.json's other keys (sorted JSON)
_CRC_CHUNK = 16 * 2**20


def file_crc32(path: Path) -> str:
    """CRC32 of a file's bytes as 8 hex digits (zlib's, in 16 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _meta_crc(meta: dict) -> str:
    """CRC32 of meta's keys but META_CRC, as sorted JSON of what meta.json reads back (a JSON round trip
    first: integer keys become strings, and would sort otherwise than after reading)."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_CRC}))
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def _mismatch(got: str, want: str) -> ChecksumMismatch:
    return ChecksumMismatch(f"its bytes changed after it was written: CRC32 {got}, written as {want}")


def _own_files(folder: Path, rank: int) -> list[str]:
    """The files of checkpoint folder ``folder`` that rank ``rank`` wrote: its DCP shards (``__<rank>_*``),
    its per-rank state, and, for rank 0 (DCP's coordinator), the tensor index."""
    names = sorted(p.name for p in folder.glob(f"__{rank}_*.distcp")) + [f"rank_{rank:05d}.pt"]
    return names + [".metadata"] if rank == 0 else names


def _corrupt(path, what: str, exc: Exception | str) -> CorruptCheckpointError:
    """The error for file ``path``'s damaged ``what``; ``exc``: the error met, or what is wrong, as text."""
    why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return CorruptCheckpointError(f"{path}: unreadable {what} ({why}); move this checkpoint away to resume from "
                                  f"the one before it")


def _with_change(refusal: UnsafeCheckpointError, changed: Optional[str]) -> UnsafeCheckpointError:
    """The safe unpickler's refusal of a file, saying also how the file changed since it was written (damaged
    or tampered with: the refusal alone cannot tell), where it did."""
    return UnsafeCheckpointError(f"{refusal} ({changed})") if changed else refusal


def read_meta(path: str | os.PathLike, required: tuple[str, ...] = ("step",)) -> dict:
    """meta.json of checkpoint ``path``, with at least the keys ``required``."""
    f = Path(path) / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise _corrupt(path, "meta.json", e) from None
    crc = meta.get(META_CRC) if isinstance(meta, dict) else None
    if crc is not None and crc != (got := _meta_crc(meta)):
        raise _corrupt(path, "meta.json", _mismatch(got, str(crc)))
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CorruptCheckpointError(f"{f} lacks {', '.join(missing)}: not a checkpoint this version of seer "
                                     f"wrote, or edited; move this checkpoint away to resume from the one before it")
    return meta


def read_saved_config(path: str | os.PathLike) -> dict:
    """The run config saved in checkpoint ``path`` (config.yaml), as a mapping of sections; every checkpoint
    is written with one, so a missing or unreadable one is a damaged checkpoint."""
    f = Path(path) / "config.yaml"
    if not f.is_file():
        raise CorruptCheckpointError(
            f"{f} is missing, so the checkpoint's architecture cannot be checked against the config; if the "
            f"run's {Path(path).parent.parent / 'config.yaml'} describes it, copy that file there, else move this "
            f"checkpoint away to resume from the one before it")
    import yaml
    try:
        saved = yaml.safe_load(f.read_text()) or {}
        if not isinstance(saved, dict) or not all(isinstance(saved.get(s, {}), dict) for s in ("model", "head",
                                                                                               "train")):
            raise ValueError("not a mapping of config sections")
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise _corrupt(f, "run config", e) from None
    return saved


def agreed_checkpoint(p: str | os.PathLike) -> Path:
    """:func:`resolve_checkpoint` of ``p`` as rank 0 finds it, on every process (collective under
    torch.distributed). Another run, still training, saves and prunes checkpoints: processes that each looked
    for its latest could take different ones, and their shards would then mix two checkpoints into one model
    (checkpoint.init_from, checkpoint.resume=PATH). Rank 0's error (none found, a damaged folder) is raised
    on every process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return resolve_checkpoint(p)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", str(resolve_checkpoint(p)))
        except Exception as e:
            dist.broadcast_object_list([("error", type(e).__name__, str(e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        from .distributed import MainRankError
        kind = {"FileNotFoundError": FileNotFoundError, "CorruptCheckpointError": CorruptCheckpointError}
        raise kind.get(box[0][1], MainRankError)(box[0][2])
    return Path(box[0][1])


def architecture_diffs(saved: dict, now: dict, sections: tuple[str, ...] = ("model", "head"), *,
                       ignore: tuple[str, ...] = (), source: str = "checkpoint") -> list[str]:
    """'section.key: checkpoint X, config Y' for every key of ``sections`` whose value in the saved run config
    ``saved`` (a mapping of sections) differs from the config ``now`` (``seer.config.to_dict``); ``ignore``:
    'section.key' names left out; a section the saved config lacks is not compared; ``source``: what the saved
    config belongs to, as the message calls it."""
    return [f"{sec}.{k}: {source} {saved[sec].get(k)!r}, config {v!r}" for sec in sections if sec in saved
            for k, v in now[sec].items() if f"{sec}.{k}" not in ignore and saved[sec].get(k) != v]


class CheckpointManager:
    """Writes and finds the checkpoints of one run.

    Args:
        directory: OUT/checkpoints.
        keep: complete checkpoints kept.
        rank: global rank (rank 0 commits and prunes).
        barrier: a collective barrier over every process (no-op in one process).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in self.dir.glob(".old-step_*"):
                # A re-save of one step moves the complete copy aside before renaming the new one into place:
                # killed in between, the aside copy is the checkpoint (the new one is removed below).
                final = old.with_name(old.name[len(".old-"):])
                if final.exists() or not _complete_files(old):
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    log.warning("restoring checkpoint %s (a re-save of it was interrupted)", final)
                    os.replace(old, final)
            for stale in self.dir.glob(".tmp-step_*"):
                log.warning("removing incomplete checkpoint %s (its writer was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)
            for pruned in self.dir.glob(".del-step_*"):  # a deletion of an old checkpoint cut short
                shutil.rmtree(pruned, ignore_errors=True)
            folders = _step_folders(self.dir)
            oldest = next((_step(p) for p in folders if _complete_files(p)), None)
            for remnant in folders:
                # Older than every complete checkpoint: what a version that deleted old checkpoints in place
                # left when killed while pruning. (A newer incomplete one is refused by latest_checkpoint.)
                if oldest is not None and _step(remnant) < oldest:
                    log.warning("removing %s: an old checkpoint whose deletion was cut short", remnant)
                    self._delete(remnant)
        barrier()

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.dir)

    def save(self, step: int, tensors: dict[str, Tensor], rank_state: dict, meta: dict, config_yaml: str) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it with its own shards and state)."""
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        try:
            with quiet_single_process():
                dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
                         no_dist=not _distributed())
            write_atomic(tmp / f"rank_{self.rank:05d}.pt", lambda p: torch.save(rank_state, p))
            sums = {name: file_crc32(tmp / name) for name in _own_files(tmp, self.rank)}
            write_atomic(tmp / f".crc-{self.rank:05d}.json", lambda p: p.write_text(json.dumps(sums)))
            self.barrier()
            if self.rank == 0:
                meta = dict(meta, **{CHECKSUMS: self._gather_checksums(tmp)})
                meta[META_CRC] = _meta_crc(meta)
                write_atomic(tmp / "config.yaml", lambda p: p.write_text(config_yaml))
                write_atomic(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
                self._commit(tmp, final)
                self._prune()
        except (Exception, CheckpointException) as e:
            full = self._full_disk(e, final)
            if full is None:
                raise
            raise full from e
        self.barrier()
        return final

    def _gather_checksums(self, tmp: Path) -> dict[str, str]:
        """Every rank's CRC32s (its ``.crc-*.json``, removed here), plus those of any tensor file no rank
        claimed (a DCP that names its shards otherwise): file name -> CRC32."""
        sums: dict[str, str] = {}
        for f in sorted(tmp.glob(".crc-*.json")):
            sums.update(json.loads(f.read_text()))
            f.unlink()
        for f in sorted(tmp.iterdir()):
            if f.is_file() and f.name not in sums and (f.name == ".metadata" or f.suffix in (".distcp", ".pt")):
                sums[f.name] = file_crc32(f)
        return sums

    def _full_disk(self, exc: BaseException, final: Path) -> Optional[OSError]:
        """The error to raise instead of ``exc`` when the disk ran full while writing ``final`` (torch's
        writers report it as 'unexpected pos 704 vs 598', nowhere 'No space'), else None."""
        seen, stack = set(), [exc]
        enospc = other_os_error = writer_failed = False
        while stack:  # the exception chain, and the ranks' failures that DCP collects
            e = stack.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, OSError) and e.errno is not None:
                enospc |= e.errno == errno.ENOSPC
                other_os_error |= e.errno != errno.ENOSPC
            writer_failed |= bool(_WRITER_FAILED.search(str(e)))
            stack += [e.__cause__, e.__context__, *_rank_failures(e)]
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            free = None
        # Only where the disk said so, or torch's writer failed with the disk nearly full: a permission error
        # or a failed collective stays what it is, however little space is left.
        if not enospc and (other_os_error or not writer_failed or free is None or free >= FULL_DISK_BYTES):
            return None
        try:
            latest = self.latest()
        except CorruptCheckpointError:
            latest = None
        where = f"{free / 2**20:.0f} MiB free there" if free is not None else "no space left"
        then = (f"The last complete checkpoint ({latest.name}) is intact: free some space and rerun the same "
                f"command to continue from it" if latest else "No checkpoint was complete yet: free some space "
                "and rerun the same command")
        return OSError(errno.ENOSPC, f"writing checkpoint {final.name} into {self.dir} failed ({where}: the disk is "
                                     f"full; {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                                     f"{then}")

    def _commit(self, tmp: Path, final: Path) -> None:
        # The files are fsynced as written, their names in tmp are not until the folder is: after a power loss
        # (not a kill) the renamed folder could otherwise lack some of them.
        sync_folder(tmp)
        if final.exists():  # the same step saved again (e.g. at the end right after a periodic save)
            old = final.with_name(f".old-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        sync_folder(self.dir)  # make the rename itself durable

    def _prune(self) -> None:
        for old in list_checkpoints(self.dir)[:-self.keep]:
            self._delete(old)

    @staticmethod
    def _delete(folder: Path) -> None:
        """Rename, then delete: a kill during the deletion leaves a ``.del-*`` folder (removed by the next
        run), never a ``step_*`` folder with some of its files. Never raises (rank 0 alone runs it while the
        others wait in a barrier): a folder that cannot be renamed (a busy file of an earlier deletion on NFS)
        stays, with a warning."""
        gone = folder.with_name(f".del-{folder.name}")
        shutil.rmtree(gone, ignore_errors=True)
        try:
            os.replace(folder, gone)
        except OSError as e:
            log.warning("cannot remove old checkpoint %s (%s: %s); it stays", folder, type(e).__name__, e)
            return
        shutil.rmtree(gone, ignore_errors=True)


def read_tensor_index(path: str | os.PathLike):
    """The DCP index (``.metadata``) of checkpoint ``path``: UnsafeCheckpointError for a tampered one,
    CorruptCheckpointError naming the file for a truncated or missing one."""
    try:
        return SafeFileSystemReader(Path(path)).read_metadata()
    except UnsafeCheckpointError as e:  # (a flipped bit can make the pickle name something refused)
        raise _with_change(e, _changed_since_written(Path(path), ".metadata")) from None
    except Exception as e:
        if _machine_fault(e):
            raise
        raise _corrupt(Path(path) / ".metadata", "tensor index", e) from None


def _machine_fault(e: BaseException) -> bool:
    """An error of the machine (an I/O error, memory), not of the checkpoint's files: raised as it is, not
    as a damaged checkpoint that the message would tell the user to move away. A missing file is the files'."""
    return isinstance(e, MemoryError) or isinstance(e, OSError) and not isinstance(e, FileNotFoundError)


def _rank_failures(e: BaseException) -> list[BaseException]:
    """The ranks' exceptions that DCP's CheckpointException (a BaseException) gathers as (exception,
    traceback) pairs; [] for any other exception."""
    return [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]


def load_tensors(path: str | os.PathLike, dest: dict[str, Tensor], *, single_process: bool = False,
                 index=None, verify: bool = True) -> None:
    """Fill ``dest`` (key -> tensor or DTensor of the right shape) in place from checkpoint ``path``
    (collective under torch.distributed unless ``single_process``; DCP reshards DTensors to the current
    layout). A damaged file raises CorruptCheckpointError. For a checkpoint read in several calls (a group
    of tensors each): ``index``, the checkpoint's index as :func:`read_tensor_index` returned it, which DCP
    then takes instead of reading the file again (at scale it lists every shard of every tensor: seconds to
    read); ``verify=False`` after the first call, which checked the files against their checksums
    (:func:`verify_checkpoint_files` reads every file whole)."""
    if index is None:
        # Read here so that a refused (tampered) file raises UnsafeCheckpointError itself, not wrapped in
        # DCP's collective error report.
        index = read_tensor_index(path)
    if verify:
        verify_checkpoint_files(path, collective=not single_process and _distributed())
    try:
        with quiet_single_process():
            dcp.load(dest, storage_reader=SafeFileSystemReader(Path(path), index), planner=SafeLoadPlanner(),
                     no_dist=single_process or not _distributed())
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # a truncated shard file, ... (DCP's report names no file)
        cause = (_rank_failures(e) or [e])[0]
        if _machine_fault(cause):
            raise cause from None
        raise _corrupt(path, "tensors", cause) from None


def _changed_since_written(path: Path, name: str) -> Optional[str]:
    """How file ``name`` of checkpoint ``path`` differs from its CRC32 in meta.json, or None (it does not, or
    no CRC32 was recorded)."""
    try:
        want = (read_meta(path).get(CHECKSUMS) or {}).get(name)
        got = file_crc32(path / name) if want is not None else None
    except (OSError, CorruptCheckpointError):
        return None
    return None if got == want else str(_mismatch(got, want))


def verify_checkpoint_files(path: str | os.PathLike, *, collective: bool = False) -> None:
    """Check checkpoint ``path``'s tensor files (the index and the DCP shards) and this process's per-rank
    file against the CRC32s in its meta.json: CorruptCheckpointError naming the first that differs or is
    missing; for one that cannot be read, the OSError (the machine's fault, not the file's). ``collective``:
    every rank of the default group calls it, each reads every world-th tensor file and its own rank file,
    and all raise the same error (a damaged file that one rank read never leaves another rank going on).
    Nothing to check in a checkpoint written before checksums."""
    path = Path(path)
    sums = read_meta(path).get(CHECKSUMS) or {}
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    names = sorted(n for n in sums if n == ".metadata" or n.endswith(".distcp"))[rank::world]
    names += [n for n in (f"rank_{rank:05d}.pt",) if n in sums]
    found = []  # (file name, what is wrong, "damaged" / "unsafe" / the errno of an OSError reading it)
    for name in names:
        try:
            got = file_crc32(path / name)
        except FileNotFoundError:
            found.append((name, "FileNotFoundError: missing", "damaged"))
        except OSError as e:
            found.append((name, f"{type(e).__name__}: {e.strerror or e}", e.errno or 0))
        else:
            if got != sums[name]:
                found.append((name, *_changed_rank_file(path / name, _mismatch(got, sums[name]))))
    if collective:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, found)
        found = sorted((f for part in everyone for f in part), key=lambda f: f[0])
    if found:
        name, why, kind = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        if kind == "unsafe":
            raise UnsafeCheckpointError(f"{why}{more}")
        if kind != "damaged":  # OSError(errno, ...) is the errno's own subclass again (PermissionError, ...)
            raise OSError(kind, f"{path / name}: cannot be read ({why}){more}")
        raise _corrupt(path / name, "per-rank state" if name.startswith("rank_") else "tensors", why + more)


def _changed_rank_file(f: Path, mismatch: ChecksumMismatch) -> tuple[str, str]:
    """(what is wrong, kind) for a file whose CRC32 changed: a per-rank file that the safe unpickler refuses
    is reported as that refusal (tampered or foreign, as an unchanged one would be), anything else as
    damage."""
    if f.name.startswith("rank_"):
        try:
            load_rank_file(f)
        except UnsafeCheckpointError as e:
            return str(_with_change(e, str(mismatch))), "unsafe"
        except Exception:  # unreadable as well as changed: the change is the finding
            pass
    return f"ChecksumMismatch: {mismatch}", "damaged"


def load_rank_state(path: str | os.PathLike, rank: int, *, required: bool = False) -> Optional[dict]:
    """This rank's state file, or None if the checkpoint was written by fewer ranks (``required``: it was
    written by as many ranks as now run, so the file must be there)."""
    f = Path(path) / f"rank_{rank:05d}.pt"
    if not f.is_file():
        if required:
            raise CorruptCheckpointError(f"{f} is missing although the checkpoint was written by as many processes "
                                         f"as now run; move this checkpoint away to resume from the one before it")
        return None
    changed = _changed_since_written(Path(path), f.name)  # (load_tensors checked it already, across ranks)
    try:
        state = load_rank_file(f)
    except UnsafeCheckpointError as e:
        raise _with_change(e, changed) from None
    except Exception as e:
        raise _corrupt(f, "per-rank state", e) from None
    if changed:
        raise _corrupt(f, "per-rank state", ChecksumMismatch(changed))
    return state
