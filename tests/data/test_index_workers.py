"""Tar shards indexed by worker processes (data.index_workers) give the index, warnings and errors of the
serial path: the same files byte for byte, each warning once (logged by this process, in shard order), the
same exception for a shard that cannot be read. Each pool costs ~0.3 s to start (spawn): three are started."""
import concurrent.futures
import logging
import os
import tarfile

import pytest

from seer.data import DataSourceError, build_index, sources
from tests.data.test_tar_scan import _data, _end, _handled, _header, _member, _write


def _shards(d):
    """Seven shards, in this order: links, a device and a fifo (a warning); non-ASCII and non-UTF-8 names;
    an empty archive; a damaged header after the first (tarfile's fallback, a warning); a number field only
    tarfile reads (its fallback, no warning); two images per sample (a warning); a plain pax shard."""
    d.mkdir()
    _write(d / "0-links.tar", _member("a/k1.jpg", _data(700)), _member("a/k1.json", b"{}"),
           _member("k2.png", type=tarfile.LNKTYPE, linkname="a/k1.jpg"),
           _member("k3.jpg", type=tarfile.SYMTYPE, linkname="a/k1.jpg"),
           _member("gone.jpg", type=tarfile.SYMTYPE, linkname="nowhere.jpg"),
           _member("dev.jpg", type=tarfile.CHRTYPE), _member("fifo.png", type=tarfile.FIFOTYPE), _end())
    raw_name = _header("x", 5, fields={0: b"caf\xe9-\xff.jpg\0"})  # Latin-1 bytes: kept as surrogate escapes
    _write(d / "1-names.tar", _member("ü/naïve.jpg", _data(64, 1), tarfile.PAX_FORMAT), bytes(raw_name), _data(5),
           bytes(507), _end())
    _write(d / "2-empty.tar", _end())
    bad = bytearray(_member("c.jpg", _data(10, 2)))
    bad[0] ^= 1  # its checksum no longer matches
    _write(d / "3-damaged.tar", _member("a.jpg", _data(600, 3)), bytes(bad), _member("d.jpg", _data(5)), _end())
    _write(d / "4-plus.tar", _member("p.jpg", _data(90, 4)),
           bytes(_header("w.jpg", 5, fields={100: b"+0644\0\0\0"})), _data(5), bytes(507), _end())
    _write(d / "5-dup.tar", _member("s1.jpg", _data(40, 5)), _member("s1.mask.png", _data(40, 6)),
           _member("s2.jpg", _data(40, 7)), _end())
    _write(d / "6-pax.tar", *[_member(f"{i:03d}/{'p' * 120}.webp", _data(30, i), tarfile.PAX_FORMAT)
                              for i in range(20)], _end())
    return d


def _index(source, cache, workers, caplog):
    """(every file of the index by name, the warnings, the records of seer.data) of build_index."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seer.data"):
        build_index(str(source), "tar", cache, workers=workers)
    records = [r for r in caplog.records if r.name == "seer.data"]
    files = {p.name: p.read_bytes() for p in sorted(cache.iterdir())}
    return files, [r.getMessage() for r in records if r.levelno >= logging.WARNING], records


def test_worker_processes_write_the_same_index_and_warnings(tmp_path, caplog, monkeypatch):
    src = _shards(tmp_path / "src")
    monkeypatch.setattr(sources, "POOL_START_S", 0.0)  # a pool from the first shard, small as they are
    monkeypatch.setattr(sources, "_usable_cpus", lambda: 2)  # workers=0: 2 processes on any machine
    monkeypatch.setattr(sources, "POOL_AHEAD", 1)  # 2 shards in flight: the other 5 are submitted as they merge
    assert [_handled(p) for p in sorted(src.iterdir())] == [True, True, True, False, False, True, True]  # tarfile's
    serial, warned, _ = _index(src, tmp_path / "idx-1", 1, caplog)
    # every file of the index (index.json holds no time of its own, only the shards' modification times)
    assert set(serial) == {"index.json", "members.txt", "members.offsets.npy", "shard_id.npy", "offset.npy",
                           "size.npy"}
    assert serial["members.txt"].count(b"\n") == 30 and b"caf\xe9-\xff.jpg\n" in serial["members.txt"]
    damaged = [w for w in warned if "damaged header" in w]
    assert len(damaged) == 1 and str(src / "3-damaged.tar") in damaged[0]
    assert len(warned) == 3  # the links shard's members left out, the damaged header, the second image
    for workers in (2, 0):
        files, warnings, records = _index(src, tmp_path / f"idx-{workers}", workers, caplog)
        assert files == serial, workers
        assert warnings == warned, workers  # each once, in shard order
        assert "indexing 7 tar shards in 2 processes" in records[0].getMessage()  # the pool did, whose logs
        assert os.getpid() not in {r.process for r in records if r.levelno >= logging.WARNING}  # these are


def test_a_shard_that_cannot_be_read_raises_the_serial_error(tmp_path, monkeypatch):
    src = _shards(tmp_path / "src")
    (src / "3-damaged.tar").write_bytes(b"not a tar")
    monkeypatch.setattr(sources, "POOL_START_S", 0.0)
    errors = []
    for workers in (1, 2):
        with pytest.raises(DataSourceError) as e:
            build_index(str(src), "tar", tmp_path / f"idx-{workers}", workers=workers)
        errors.append(e.value)
        assert not list((tmp_path / f"idx-{workers}").iterdir())  # no partial index left behind
    assert str(errors[1]) == str(errors[0])
    assert str(errors[0]).startswith(f"data.source: cannot read tar shard {str(src / '3-damaged.tar')!r}: ")
    assert errors[1].__cause__ is None and errors[1].__suppress_context__  # no worker traceback chained


class _DeadPool:
    """A ProcessPoolExecutor whose workers were killed (the out-of-memory killer): no process is started."""

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, *args):
        future = concurrent.futures.Future()
        future.set_exception(concurrent.futures.process.BrokenProcessPool("terminated abruptly"))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_a_killed_worker_is_a_clear_error_naming_the_shard_and_the_key(tmp_path, monkeypatch):
    src = _shards(tmp_path / "src")
    monkeypatch.setattr(sources, "POOL_START_S", 0.0)
    monkeypatch.setattr(sources, "ProcessPoolExecutor", _DeadPool)
    with pytest.raises(RuntimeError, match=r"a process indexing tar shards ended abruptly before shard "
                                           r"'.*0-links.tar' was indexed: .* set data.index_workers=1") as e:
        build_index(str(src), "tar", tmp_path / "idx", workers=2)
    assert not isinstance(e.value, concurrent.futures.process.BrokenProcessPool)


def test_a_small_source_is_indexed_in_this_process_with_progress(tmp_path, caplog, monkeypatch):
    src = _shards(tmp_path / "src")
    monkeypatch.setattr(sources, "ProcessPoolExecutor", None)  # starting one would fail
    monkeypatch.setattr(sources, "PROGRESS_EVERY_S", 0.0)
    files, _, records = _index(src, tmp_path / "idx", 2, caplog)
    progress = [r.getMessage() for r in records if r.getMessage().startswith("data.source: indexed ")]
    assert len(progress) == 7 and progress[-1].startswith("data.source: indexed 7 of 7 tar shards (30 images) in ")
    assert files["members.txt"].count(b"\n") == 30


def test_workers_resolve_and_bad_values_name_the_argument(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_usable_cpus", lambda: 64)
    assert [sources.index_workers(0, n) for n in (1, 5, 1000)] == [1, 5, sources.POOL_MAX_WORKERS]
    monkeypatch.setattr(sources, "_usable_cpus", lambda: 3)  # a cpuset of 3 CPUs on a larger machine
    assert [sources.index_workers(0, 1000), sources.index_workers(1, 1000), sources.index_workers(8, 5)] == [3, 1, 5]
    for bad in (-1, 1.5, "2", True, None):
        with pytest.raises(ValueError, match=r"^workers must be an integer >= 0 .*, got "):
            build_index("digits", "auto", tmp_path / "idx", workers=bad)


def test_train_data_passes_data_index_workers(tmp_path, monkeypatch):
    from seer.config import DataConfig
    from seer.data import loader
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("workers"))
        return build_index(*args, **kwargs)
    monkeypatch.setattr(loader, "build_index", recording)
    loader.TrainData(DataConfig(source="digits", num_workers=0, index_workers=3), seed=0, cache=tmp_path / "idx")
    assert seen == [3]


@pytest.mark.parametrize("seconds, shards, workers, starts", [
    (0.1, 100, 2, 1),     # 9.9 s of shards left, 5 s saved by 2 workers: a pool from the second shard
    (0.1, 50, 2, None),   # 4.9 s left, 2.45 s saved: not worth a start taken to cost POOL_START_S = 4 s
    (0.1, 50, 8, 1),      # 4.9 s left, 4.3 s saved by 8 workers
    (1.0, 6, 2, None),    # 5 s left saves 2.5 s; later, less
    (1.0, 6, 8, 1),       # 5 shards left: 5 workers save 4 s
    (10.0, 2, 2, None),   # one shard left: nothing to share
    (60.0, 100, 1, None),  # workers=1: never
])
def test_the_pool_starts_once_it_saves_more_than_its_start(monkeypatch, seconds, shards, workers, starts):
    clock = [0.0]
    monkeypatch.setattr(sources, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(sources, "POOL_START_S", 4.0)

    def index_here(shard, want_stat):
        clock[0] += seconds
        return shard
    monkeypatch.setattr(sources, "_index_shard", index_here)
    monkeypatch.setattr(sources, "_pooled", lambda rest, n, want_stat, pool: [(n, rest)])
    got = list(sources._shard_results(list(range(shards)), workers, False, None))
    if starts is None:
        assert got == list(range(shards))
    else:
        assert got[:starts] == list(range(starts)) and got[starts] == (min(workers, shards - starts),
                                                                       list(range(starts, shards)))


def test_indexing_runs_without_the_cyclic_garbage_collector(tmp_path, monkeypatch):
    """Its collections walk a training process's whole heap while indexing allocates millions of objects
    (1.5x slower); the collector's state is restored after, also after an error."""
    import gc
    src = _shards(tmp_path / "src")
    seen = []
    real = sources._read_shard
    monkeypatch.setattr(sources, "_read_shard", lambda shard: seen.append(gc.isenabled()) or real(shard))
    assert gc.isenabled()
    build_index(str(src), "tar", tmp_path / "idx", workers=1)
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        build_index(str(src), "tar", tmp_path / "idx2", workers=1)
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
    with pytest.raises(DataSourceError):
        build_index(str(tmp_path / "nowhere"), "folder", tmp_path / "idx3")
    assert gc.isenabled()


_DIES_WHILE_INDEXING = """
import contextlib, os, signal, sys
from seer.data import sources
if __name__ == "__main__":
    shards = sorted(os.path.join(sys.argv[1], n) for n in os.listdir(sys.argv[1]))
    sources.POOL_START_S = 0.0
    pool = contextlib.ExitStack()
    results = sources._shard_results(shards, 2, False, pool)
    next(results)  # the pool is up and its two workers have taken shards
    import multiprocessing
    print(" ".join(str(p.pid) for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")),
          flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # SIGTERM without a handler, the out-of-memory killer: no clean-up
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # (a zombie has ended)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_end_when_the_indexing_process_is_killed(tmp_path):
    """The training process killed while it indexes (torchrun forwards SIGTERM to it, not to its children; the
    out-of-memory killer): its index workers end too instead of waiting forever for shards."""
    import subprocess
    import sys
    import time
    src = _shards(tmp_path / "src")
    script = tmp_path / "dies.py"
    script.write_text(_DIES_WHILE_INDEXING)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:  # (files, not pipes: workers left behind would hold a pipe open)
        subprocess.run([sys.executable, str(script), str(src)], stdout=o, stderr=e, timeout=120,
                       env={**os.environ, "PYTHONPATH": root}, cwd=root)
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2, err.read_text()
    deadline = time.monotonic() + 60  # a bound on a hang, not a timing: they end within a second
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _running(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, "index workers outlived the process that started them"
