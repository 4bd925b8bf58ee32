"""bench/attention_ncu.py (Nsight Compute's table of the attention kernels) and the GPU check's plumbing
around it: ncu's CSV in both of its layouts, the summary, and bench/gpu_check.sh's time budget, run here
with stand-ins for Python and ncu (the real ones only exist on the GPU machine)."""
from __future__ import annotations

import csv
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from bench import attention_ncu, summary

REPO = Path(__file__).resolve().parents[2]
IDS = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
       "Grid Size", "Device", "CC"]
# (kernel, {metric: value}) in launch order; the metrics' names are Nsight Compute's, values made up
STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
LAUNCHES = [
    ("spin_kernel(long)", {"gpu__time_duration.sum": "2,048"}),
    ("_fwd_kernel", {"gpu__time_duration.sum": "53,600", "launch__grid_size": "1,280",
                     "launch__registers_per_thread": "128", "launch__shared_mem_per_block_dynamic": "66,560",
                     "launch__waves_per_multiprocessor": "3.23", "sm__maximum_warps_per_active_cycle_pct": "18.75",
                     "sm__warps_active.avg.pct_of_peak_sustained_active": "17.2",
                     "sm__throughput.avg.pct_of_peak_sustained_elapsed": "41.5",
                     "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "22.0",
                     "smsp__issue_active.avg.pct_of_peak_sustained_active": "35.1",
                     "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "33.3",
                     "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active": "12.0",
                     "smsp__average_warp_latency_per_inst_issued.ratio": "11.4",
                     STALL.format("long_scoreboard"): "1.5", STALL.format("barrier"): "3.25",
                     STALL.format("selected"): "1.0", STALL.format("wait"): "2.0",
                     STALL.format("math_pipe_throttle"): "0.5", STALL.format("short_scoreboard"): "0.75"}),
    ("spin_kernel(long)", {"gpu__time_duration.sum": "2,048"}),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128",
     {"gpu__time_duration.sum": "42,000", "launch__registers_per_thread": "n/a"}),
]


def _raw_page(units_in_header: bool = False) -> str:
    """ncu --csv --page raw: a column per metric, a units row under the header (or ``name [unit]``)."""
    metrics = sorted({m for _, values in LAUNCHES for m in values})
    unit = {m: "nsecond" if m.startswith("gpu__time") else "" for m in metrics}
    buf = io.StringIO()
    buf.write("==PROF== Connected to process 123 (python)\n==PROF== Disconnected from process 123\n")
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(IDS + [f"{m} [{unit[m]}]" if units_in_header and unit[m] else m for m in metrics])
    if not units_in_header:
        w.writerow([""] * len(IDS) + [unit[m] for m in metrics])
    for i, (kernel, values) in enumerate(LAUNCHES):
        w.writerow([str(i), "123", "python", "host", kernel, "1", "7", "(128, 1, 1)", "(5, 8, 32)", "0", "9.0"]
                   + [values.get(m, "n/a") for m in metrics])
    return buf.getvalue()


def _details_page() -> str:
    """ncu --csv (details page): one row per metric."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(IDS + ["Section Name", "Metric Name", "Metric Unit", "Metric Value"])
    for i, (kernel, values) in enumerate(LAUNCHES):
        for m, v in values.items():
            w.writerow([str(i), "123", "python", "host", kernel, "1", "7", "(128, 1, 1)", "(5, 8, 32)", "0", "9.0",
                        "raw", m, "nsecond" if m.startswith("gpu__time") else "", v])
    return buf.getvalue()


@pytest.mark.parametrize("text", [_raw_page(), _raw_page(units_in_header=True), _details_page()],
                         ids=["raw", "raw-units-in-header", "details"])
def test_ncu_table_reads_every_layout(text):
    launches = attention_ncu.read(text)
    assert [launch["kernel"][:12] for launch in launches] == ["spin_kernel(", "_fwd_kernel", "spin_kernel(",
                                                              "cudnn_genera"]
    fwd = launches[1]
    assert attention_ncu._duration_us(fwd) == pytest.approx(53.6)  # nanoseconds with thousands separators
    assert attention_ncu._tensor_pct(fwd) == pytest.approx(33.3)  # the busiest tensor metric
    # largest first; 'selected' (the issue cycle itself) is not a stall
    assert attention_ncu.stalls(fwd) == [("barrier", 3.25, "cyc"), ("wait", 2.0, "cyc"),
                                         ("long_scoreboard", 1.5, "cyc"), ("short_scoreboard", 0.75, "cyc")]
    lines = attention_ncu.table(launches, ["vit10b: ours fwd", "vit10b: sdpa-cudnn fwd+bwd"]).splitlines()
    assert lines[1] == "-- vit10b: ours fwd" and lines[3] == "-- vit10b: sdpa-cudnn fwd+bwd"
    row = lines[2].split()
    assert row[:10] == ["_fwd_kernel", "53.6", "1280", "3.23", "128", "65.0", "19/17", "42", "22", "35"]
    assert row[10:14] == ["33", "11.4", "barrier", "3.2cyc"]
    assert lines[4].split()[1:4] == ["42.0", "-", "-"]  # metrics a launch lacks (or 'n/a') print as '-'


def test_ncu_stalls_from_pc_samples():
    """Versions that report stalls as PC-sample counts: shares of all samples ('selected' counts in the
    total, the '_not_issued' twins do not)."""
    names = {"barrier": 30.0, "barrier_not_issued": 99.0, "wait": 10.0, "selected": 10.0, "long_scoreboard": 50.0}
    launch = {"kernel": "k", "metrics": {f"smsp__pcsamp_warps_issue_stalled_{r}": (v, "") for r, v in names.items()}}
    assert attention_ncu.stalls(launch, top=2) == [("long_scoreboard", 50.0, "%"), ("barrier", 30.0, "%")]
    assert attention_ncu.stalls({"kernel": "k", "metrics": {}}) == []


def test_ncu_kernel_names_are_told_apart():
    assert attention_ncu.short_name("_fwd_kernel") == "_fwd_kernel"
    assert attention_ncu.short_name(
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1_kernel0_0"
    )[:44] == "cudnn_sm90_flash_bprop_wgmma_f16_knob_26_64x"
    assert attention_ncu.short_name("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, "
                                    "false, false, cutlass::bfloat16_t>>(Flash_fwd_params)") == "flash_fwd_kernel"
    assert attention_ncu.short_name("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*)") == \
        "compute_dot_do_o_specialized"


def test_ncu_table_without_labels_or_launches(tmp_path):
    assert "-- case 2" in attention_ncu.table(attention_ncu.read(_raw_page()))
    empty = tmp_path / "ncu.csv"
    empty.write_text("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\n")
    assert attention_ncu.read(empty.read_text()) == []
    assert attention_ncu.main(["table", str(empty)]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_ncu_workload_needs_a_gpu(capsys):
    assert attention_ncu.main(["run"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_ncu_bad_arguments_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"shape must be one of \[.*'vit10b-tp4-B32H8N257D128'.*got 'vit-xl'"):
        attention_ncu.run("vit-xl", None, 10.0)
    with pytest.raises(SystemExit) as exc:
        attention_ncu.main(["table", str(tmp_path / "missing.csv")])
    assert exc.value.code == 2 and "csv: cannot read" in capsys.readouterr().err
    assert attention_ncu.read_labels(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert attention_ncu.read_labels(tmp_path / "bad.json") is None


def test_summary_prints_the_ncu_table_or_its_errors(tmp_path, capsys):
    (tmp_path / "ncu.rc").write_text("0\n")
    (tmp_path / "ncu.csv").write_text(_raw_page())
    (tmp_path / "ncu_cases.json").write_text('["a: ours fwd", "a: sdpa-cudnn fwd+bwd"]')
    summary._ncu(tmp_path)
    out = capsys.readouterr().out
    assert "Nsight Compute" in out and "-- a: ours fwd" in out and "_fwd_kernel" in out
    (tmp_path / "ncu.csv").unlink()
    (tmp_path / "ncu.log").write_text("==PROF== x\n==ERROR== ERR_NVGPUCTRPERM - no permission\n")
    summary._ncu(tmp_path)
    assert "  ==ERROR== ERR_NVGPUCTRPERM - no permission" in capsys.readouterr().out


# ---- bench/gpu_check.sh with stand-ins --------------------------------------------------------------------

def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _gpu_check(tmp_path: Path, budget: int, with_ncu: bool, system_build_fails: bool = False,
               env_extra: Optional[dict] = None) -> tuple[str, list[str], Path]:
    """Run bench/gpu_check.sh with a stand-in Python that logs its arguments (builds: and CXX) and succeeds
    (the summary runs for real; a build with /usr/bin/g++ fails if asked) and, optionally, a stand-in ncu
    that writes a report and prints _raw_page() on --import."""
    log, out, bin_dir = tmp_path / "calls.log", tmp_path / "out", tmp_path / "bin"
    bin_dir.mkdir()
    csv_file = tmp_path / "fake.csv"
    csv_file.write_text(_raw_page())
    py = _script(tmp_path / "py", f"""#!/usr/bin/env bash
if [ "$1" = setup.py ]; then
  echo "py $* CXX=${{CXX:-}}" >>"{log}"
  if [ "{int(system_build_fails)}" = 1 ] && [ "${{CXX:-}}" = /usr/bin/g++ ]; then exit 1; fi
  exit 0
fi
echo "py $*" >>"{log}"
if [ "$1 $2" = "-m bench.summary" ] && [ "${{3:-}}" != "--failed" ]; then exec "{sys.executable}" "$@"; fi
exit 0
""")
    if with_ncu:
        _script(bin_dir / "ncu", f"""#!/usr/bin/env bash
echo "ncu $*" >>"{log}"
case " $* " in *" --import "*) cat "{csv_file}"; exit 0;; esac
while [ $# -gt 0 ]; do
  case "$1" in -o) touch "$2.ncu-rep"; shift 2;; --profile-from-start|--clock-control|--section) shift 2;;
  -f) shift;; *) break;; esac
done
exec "$@"
""")
    env = dict(os.environ, PYTHON=str(py), GPU_CHECK_BUDGET=str(budget), CUDA_HOME=str(tmp_path / "no-cuda"),
               PATH=f"{bin_dir}:/usr/bin:/bin", CXX="/opt/gcc/bin/g++", **(env_extra or {}))
    if "GPU_CHECK_CXX" not in (env_extra or {}):
        env.pop("GPU_CHECK_CXX", None)
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout, log.read_text().splitlines(), out


def test_gpu_check_runs_ncu_before_the_benchmarks(tmp_path):
    stdout, calls, out = _gpu_check(tmp_path, budget=1000, with_ncu=True)
    ncu = [i for i, c in enumerate(calls) if c.startswith("ncu ") and "--import" not in c]
    bench = [i for i, c in enumerate(calls) if c.startswith("py -m pytest bench")]
    assert len(ncu) == 1 and len(bench) == 1 and ncu[0] < bench[0]
    assert "--clock-control none" in calls[ncu[0]]  # never lock the card's clocks
    assert f"-m bench.attention_ncu run --labels {out}/ncu_cases.json --budget-s 50" in calls[ncu[0] + 1]
    assert any("--import" in c and "--page raw" in c for c in calls)
    assert "_fwd_kernel" in stdout and "Nsight Compute" in stdout
    assert (out / "bench.rc").read_text().strip() == "0" and (out / "profile.rc").read_text().strip() == "0"
    # every file of the run in one archive, for a caller that can bring back only a few files
    import tarfile
    with tarfile.open(out / "bundle.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"./summary.txt", "./bench.rc", "./ncu.csv", "./build.log"} <= names and "./bundle.tar.gz" not in names


def test_summary_survives_files_cut_short(tmp_path, capsys):
    """A phase stopped by its time limit leaves an empty junit XML or a truncated JSON: the summary names
    that section unreadable and goes on with the others."""
    (tmp_path / "tests.xml").write_text("")
    (tmp_path / "tests-matrix.xml").write_text("<testsuites><testsuite tests='3'")
    (tmp_path / "bench.rc").write_text("124\n")
    (tmp_path / "bench.json").write_text('{"environment": {}, "rows": [{"key": "a"')
    (tmp_path / "profile.rc").write_text("124\n")
    (tmp_path / "profile.log").write_text("attention x fwd host 10.0 us  gpu 5.0 us\n")
    assert summary.main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "tests: no report" in out and "tests: unreadable (ParseError" in out
    assert "benchmarks: rc 124" in out and "benchmarks: unreadable (JSONDecodeError" in out
    assert "bench/gpu_profile.py): rc 124" in out and "fwd host 10.0 us" in out


@pytest.mark.skipif(not (os.access("/usr/bin/g++", os.X_OK) and os.access("/usr/bin/gcc", os.X_OK)),
                    reason="needs a system compiler at /usr/bin/g++")
@pytest.mark.parametrize("case", ["system", "system-fails", "env"])
def test_gpu_check_builds_with_the_system_compiler_first(tmp_path, case):
    """The GPU images' CXX (/opt/gcc) builds an extension with its own copy of libstdc++'s stream code: the
    check builds with /usr/bin/g++ first, falls back to CXX when that build fails, and keeps CXX when told."""
    stdout, calls, out = _gpu_check(tmp_path, budget=20, with_ncu=False, system_build_fails=case == "system-fails",
                                    env_extra={"GPU_CHECK_CXX": "env"} if case == "env" else None)
    builds = [c for c in calls if c.startswith("py setup.py build_ext")]
    status = (out / "build.status").read_text().strip()
    if case == "system":
        assert builds == ["py setup.py build_ext --inplace CXX=/usr/bin/g++"]
        assert status == "ok (/usr/bin/g++; CXX was /opt/gcc/bin/g++)"
    elif case == "system-fails":
        assert builds == ["py setup.py build_ext --inplace CXX=/usr/bin/g++",
                          "py setup.py build_ext --inplace --force CXX=/opt/gcc/bin/g++"]
        assert status == "ok (CXX=/opt/gcc/bin/g++: the /usr/bin/g++ build failed)"
    else:
        assert builds == ["py setup.py build_ext --inplace CXX=/opt/gcc/bin/g++"] and status == "ok"
    assert f"build: {status}" in stdout
    assert any(c == "py -m bench.native_errors" for c in calls)  # the error path of the build used


@pytest.mark.parametrize("with_ncu", [False, True], ids=["no-ncu", "ncu"])
def test_gpu_check_skips_phases_past_its_budget_and_still_summarises(tmp_path, with_ncu):
    stdout, calls, out = _gpu_check(tmp_path, budget=20, with_ncu=with_ncu)
    for phase in ("tests", "tests-matrix", "bench", "profile"):
        assert (out / f"{phase}.rc").read_text().strip() == "skipped: out of time"
    assert not any(c.startswith(("py -m pytest", "py -m bench.gpu_profile", "ncu ")) for c in calls)
    ncu_rc = (out / "ncu.rc").read_text().strip()
    assert ncu_rc == "skipped: out of time" if with_ncu else "no ncu" in ncu_rc
    assert "benchmarks: rc skipped: out of time" in stdout and "=" * 100 in stdout


def test_gpu_check_ops_without_a_profile_say_not_run_not_out_of_time(tmp_path):
    """GPU_CHECK_OPS naming no op bench/gpu_profile.py times: the profile is not run, and the summary says so
    (it read 'skipped: out of time' with the whole budget left)."""
    stdout, calls, out = _gpu_check(tmp_path, budget=1000, with_ncu=False, env_extra={"GPU_CHECK_OPS": "multicrop"})
    assert not any(c.startswith("py -m bench.gpu_profile") for c in calls)
    assert (out / "profile.rc").read_text().strip() == "not run (GPU_CHECK_OPS=multicrop)"
    assert "out of time" not in stdout and "gpu_profile.py): rc not run (GPU_CHECK_OPS=multicrop)" in stdout


def test_gpu_check_clears_an_earlier_runs_files(tmp_path):
    """A folder that held an earlier check: its tests.xml (here with a failed TMA test) is neither this run's
    report nor a reason to turn the TMA features off, and it does not travel in the bundle; other files stay."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tests.xml").write_text('<testsuite tests="1" failures="1"><testcase name="test_triton_tma_x">'
                                   '<failure message="x"/></testcase></testsuite>')
    (out / "tests.rc").write_text("1\n")
    (out / "tma.status").write_text("TMA or candidate-tile tests failed\n")
    (out / "notes.txt").write_text("mine\n")
    stdout, calls, out = _gpu_check(tmp_path, budget=20, with_ncu=False)
    assert not (out / "tests.xml").exists() and not (out / "tma.status").exists()
    assert (out / "notes.txt").read_text() == "mine\n"
    assert "tests: no report (rc skipped: out of time)" in stdout and "SEER_KERNELS_TMA" not in stdout
    import tarfile
    with tarfile.open(out / "bundle.tar.gz") as tf:
        assert "./tests.xml" not in tf.getnames()


def test_ncu_workload_profiles_what_runs_within_its_budget(tmp_path, monkeypatch, capsys):
    """``run``'s bookkeeping with the CUDA calls stubbed: a case that raises in its warm-up is reported and
    left out, a case past the time budget is not started, and the labels list what was profiled, in order."""
    calls = []

    def failing():
        raise RuntimeError("no kernel for this shape\nsecond line")

    def slow():  # the profiled call of the first case uses up the budget
        calls.append("slow")
        if calls.count("slow") == 3:
            monkeypatch.setattr(attention_ncu, "T0", attention_ncu.time.monotonic() - 100)

    fake = {"ours fwd": slow, "sdpa-cudnn fwd+bwd": failing, "ours bwd deterministic": lambda: calls.append("det")}
    monkeypatch.setattr(attention_ncu, "cases", lambda *shape: fake)
    # the budget counts from the module's import (the process's start under ncu): start it now
    monkeypatch.setattr(attention_ncu, "T0", attention_ncu.time.monotonic())
    for name in ("synchronize", "_sleep"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: calls.append(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    labels = tmp_path / "cases.json"
    assert attention_ncu.main(["run", "--labels", str(labels), "--budget-s", "50"]) == 0
    out = capsys.readouterr().out
    assert "sdpa-cudnn fwd+bwd: skipped (no kernel for this shape)" in out
    assert "not profiled: ours bwd deterministic" in out
    assert calls == ["slow", "slow", "det", "det", "synchronize", "start", "_sleep", "slow", "synchronize", "stop"]
    assert labels.read_text() == '["vit10b-tp4-B32H8N257D128: ours fwd"]'


@pytest.mark.triton
def test_ncu_cases_run():
    """Every case the ncu phase profiles runs (a small shape: the phase itself runs the target); on the CPU
    our kernels under the interpreter in float32 (SDPA's GPU backends do not run there)."""
    from seer_kernels.testing import triton_device
    device = triton_device()
    fns = attention_ncu.cases(1, 2, 19, 32, device, torch.bfloat16 if device == "cuda" else torch.float32)
    assert list(fns)[0] == "ours fwd"
    assert {"ours bwd deterministic", "ours bwd atomic", "ours bwd stored dS"} <= set(fns)
    # the Hopper features' twins come last (D = 32: the 32 class's (16, 64) dkdv tile)
    assert list(fns)[-3:] == ["ours fwd [64, 64, 4, 3, 1, 0, 1, 0, 0] tma_load",
                              "ours bwd atomic [16, 64, 4, 2] dq_tma", "ours bwd atomic [16, 64, 4, 2] pointer atomics"]
    # the forward with its query tail folded in, and its twin, right after our default forward
    assert list(fns)[1:3] == ["ours fwd [64, 64, 4, 3] fold_tail", "ours fwd [64, 64, 4, 3] own tail program"]
    for label, fn in fns.items():
        if device == "cuda" or label.startswith("ours"):
            fn()
