"""The benchmark plumbing (bench/conftest.py): the ratio's baseline is the fastest candidate in the same
timings, and a run stopped by a time limit says so in its JSON."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE = '''
import time


def bench_a(bench_record):
    # "slow" is what a short pre-timing might have picked; in these timings "fast" is the faster baseline
    fns = {{"ours": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.004),
            "fast": lambda: time.sleep(0.002)}}
    bench_record("fake", "a", fns, ours="ours", baseline=("slow", "fast"), min_time=0.05, min_rounds=3)


def bench_b(bench_record):
    if {sleep}:
        open("sleeping", "w").close()  # the test stops the run now, as a phase's time limit would
        time.sleep({sleep})
    bench_record("fake", "b", {{"ours": lambda: None, "base": lambda: None}}, ours="ours", baseline="base",
                 min_time=0.01)
'''


def _project(tmp_path: Path, sleep: float) -> Path:
    proj = tmp_path / "proj"
    (proj / "bench").mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "gate.py", "harness.py"):
        shutil.copy(ROOT / "bench" / name, proj / "bench" / name)
    (proj / "bench" / "bench_fake.py").write_text(FAKE.format(sleep=sleep))
    (proj / "pytest.ini").write_text("[pytest]\npython_files = bench_*.py\npython_functions = bench_*\n")
    return proj


def _start(proj: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--bench-device", "cpu",
           "--bench-json", "out.json", "--no-gate", *extra]
    return subprocess.Popen(cmd, cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, proj: Path, interrupt: bool = False) -> dict:
    if interrupt:  # once bench_b sleeps: what `timeout -s INT` sends at a phase's limit
        deadline = time.monotonic() + 120
        while not (proj / "sleeping").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(2)
    out, _ = proc.communicate(timeout=120)
    return json.loads((proj / "out.json").read_text())


@pytest.mark.slow
def test_baseline_is_the_fastest_candidate_in_the_same_timings_and_runs_say_if_complete(tmp_path):
    # three pytest processes at once (one after the other they took 17 s)
    projects = {"full": _project(tmp_path, 0), "cut": _project(tmp_path / "cut", 60),
                "subset": _project(tmp_path / "subset", 0)}
    procs = {"full": _start(projects["full"]), "cut": _start(projects["cut"]),
             "subset": _start(projects["subset"], "-k", "bench_a")}  # a selection is not the suite
    data, cut, subset = (_finish(procs[k], projects[k], interrupt=k == "cut") for k in ("full", "cut", "subset"))
    row = next(r for r in data["rows"] if r["case"] == "a")
    assert row["baseline"] == "fast" and row["ratio"] == pytest.approx(
        row["times_ms"]["fast"] / row["times_ms"]["ours"])
    assert set(row["spread_pct"]) == {"ours", "slow", "fast"} and all(v >= 0 for v in row["spread_pct"].values())
    assert data["complete"] is True and len(data["rows"]) == 2
    assert cut["complete"] is False and [r["case"] for r in cut["rows"]] == ["a"]  # stopped while bench_b sleeps
    assert subset["complete"] is False and [r["case"] for r in subset["rows"]] == ["a"]


STOPPED = '''
def bench_a(bench_record):
    bench_record("fake", "a", {"ours": lambda: None, "base": lambda: None}, ours="ours", baseline="base",
                 min_time=0.01)
    assert False, "a failure that -x stops the run at"


def bench_b(bench_record):
    bench_record("fake", "b", {"ours": lambda: None, "base": lambda: None}, ours="ours", baseline="base",
                 min_time=0.01)
'''


def test_a_run_stopped_by_maxfail_is_not_complete(tmp_path):
    """-x (or --maxfail) ends the session with exit status 1 like a finished run with failures, but the
    benchmarks after the failure never ran: the JSON must not claim the whole suite."""
    proj = _project(tmp_path, 0)
    (proj / "bench" / "bench_fake.py").write_text(STOPPED)
    data = _finish(_start(proj, "-x"), proj)
    assert [r["case"] for r in data["rows"]] == ["a"] and data["complete"] is False


RETRIED = '''
import time

from bench import harness

_real, _calls = harness.compare, []


def _counted(*args, **kwargs):
    _calls.append(1)
    return _real(*args, **kwargs)


harness.compare = _counted


def bench_noisy(bench_record):
    # 4x slower than the floor asks in this test's first two measurements, then 2x faster than it needs
    n = len(_calls)
    bench_record("fake", "noisy", {"ours": lambda: time.sleep(0.004 if len(_calls) - n < 3 else 0.001),
                                   "base": lambda: time.sleep(0.002)}, ours="ours", baseline="base",
                 min_time=0.02, min_rounds=3)
    assert len(_calls) - n == 3


def bench_regressed(bench_record):
    bench_record("fake", "regressed", {"ours": lambda: time.sleep(0.004), "base": lambda: time.sleep(0.002)},
                 ours="ours", baseline="base", min_time=0.02, min_rounds=3)
'''


def test_gate_measures_a_failing_ratio_twice_more_before_it_fails(tmp_path):
    """A noisy machine's low ratio passes when a re-measurement meets the floor; a regression fails after three
    measurements, naming each."""
    proj = _project(tmp_path, 0)
    (proj / "bench" / "bench_fake.py").write_text(RETRIED)
    (proj / "bench" / "floors").mkdir()
    (proj / "bench" / "floors" / "cpu.json").write_text(json.dumps({"floors": {"fake:noisy": 1.5,
                                                                              "fake:regressed": 1.5}}))
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--bench-device", "cpu"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, timeout=120).stdout
    assert "1 failed, 1 passed" in out, out
    assert re.search(r"fake:regressed: speed-up 0\.\d+x .* \(measured 3 times: 0\.\d+x, 0\.\d+x, 0\.\d+x\)", out), out


DEFERRED = '''
import time


def bench_shape(bench_record):
    # the first row is below its floor; the rows after it are still measured, then the test fails
    for case in ("slow", "later"):
        bench_record("fake", case, {"ours": lambda: time.sleep(0.004 if case == "slow" else 0.001),
                                    "base": lambda: time.sleep(0.002)}, ours="ours", baseline="base",
                     min_time=0.02, min_rounds=3, defer_gate=True)
    bench_record.fail_deferred()
'''


def test_a_deferred_gate_failure_keeps_the_tests_later_rows(tmp_path):
    """A test that records several rows (an attention shape: eager rows, then the CUDA-graph rows the selector
    table is written from) measures them all before a row below its floor fails it."""
    proj = _project(tmp_path, 0)
    (proj / "bench" / "bench_fake.py").write_text(DEFERRED)
    (proj / "bench" / "floors").mkdir()
    (proj / "bench" / "floors" / "cpu.json").write_text(json.dumps({"floors": {"fake:slow": 1.5}}))
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--bench-device", "cpu",
           "--bench-json", "out.json"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, timeout=120).stdout
    assert "1 failed" in out and "fake:slow: speed-up" in out, out
    rows = json.loads((proj / "out.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["slow", "later"]


def test_gate_fails_a_complete_run_that_lacks_a_floors_row(tmp_path, capsys):
    from bench import gate
    floors = gate.load_floors("cpu")
    key = next(k for k in floors if k.startswith("sinkhorn:"))
    rows = [{"key": k, "ratio": 99.0} for k in floors if k.startswith("sinkhorn:") and k != key]
    for complete, status in ((True, 1), (False, 0)):
        path = tmp_path / f"r{complete}.json"
        path.write_text(json.dumps({"environment": {"device": "cpu"}, "rows": rows, "complete": complete}))
        assert gate.main([str(path)]) == status
        assert (f"{key}: no row" in capsys.readouterr().out) == complete


def test_side_table_timing_waits_for_the_gpu(monkeypatch):
    # pytest-benchmark times on the host: a CUDA call must include the wait for its kernels to finish.
    from bench.conftest import _synced
    import torch
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))

    def fn():
        calls.append("fn")
        return 7
    assert _synced(fn, "cpu") is fn
    assert _synced(fn, "cuda:0")() == 7 and calls == ["fn", "sync"]


def test_attention_host_tool_runs_and_counts_the_launches():
    """bench/attention_host.py (host time of the eager attention path, launches stubbed) runs on the CPU and
    counts the launches; in its own process, as it replaces the Triton kernels of the module it imports."""
    out = subprocess.run([sys.executable, "-m", "bench.attention_host", "--calls", "2", "--repeats", "1"],
                         check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert "vit10b-tp4-B32H8N257D128" in out  # the H100 table's row for N 257, D 128
    fwd_bwd = next(line for line in out.splitlines() if "op fwd+bwd" in line)
    assert "_fwd_kernel + " in fwd_bwd and "_bwd_dkdv_kernel" in fwd_bwd  # (the other launches: the table's scheme)


def test_a_given_git_revision_is_recorded(monkeypatch):
    """The device machine's copy of the tree may carry a stale HEAD: SEER_GIT_REVISION names the commit."""
    from bench import harness

    monkeypatch.setenv("SEER_GIT_REVISION", "abc1234")
    assert harness._git_revision() == "abc1234"
    monkeypatch.delenv("SEER_GIT_REVISION")
    assert harness._git_revision() != "abc1234"
