"""Print the one-table summary of a bench/gpu_check.sh run: environment, build, tests, benchmarks."""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _read(path: Path, default: str = "missing") -> str:
    return path.read_text().strip() if path.exists() else default


def main(out_dir: str) -> int:
    out = Path(out_dir)
    print("=" * 100)
    print(f"build: {_read(out / 'build.status')}")
    if (out / "tma.status").exists():
        print(_read(out / "tma.status"))
    # Each section on its own: a phase cut short by its time limit leaves a truncated or empty file, which
    # must not take the other sections (the benchmarks, above all) with it.
    for section in (_native_errors, _tests, _ncu, _benchmarks, _sweep, _profile):
        try:
            section(out)
        except Exception as exc:  # report it and go on
            print(f"{section.__name__.strip('_')}: unreadable ({type(exc).__name__}: {exc})")
    print("=" * 100)
    return 0


def _native_errors(out: Path) -> None:
    for name, what in (("native_errors.log", "the build used"),
                       ("native_errors-system.log", "/usr/bin/g++ rebuild (checks before 2026-11-26)")):
        errors = out / name
        if errors.exists():
            rc = f" (rc {_read(out / 'native_errors.rc')})" if name == "native_errors.log" else ""
            print(f"native error path (bench/native_errors.py), {what}{rc}:")
            lines = [line for line in errors.read_text().splitlines()
                     if line.startswith(("ok ", "WARNING", "CRASHED", "FAILED"))]
            print("\n".join("  " + line for line in lines) if lines else "  no result lines (see the log)")


def _tests(out: Path) -> None:
    for name in ("tests", "tests-matrix"):
        xml = out / f"{name}.xml"
        if not xml.exists() or xml.stat().st_size == 0:
            print(f"{name}: no report (rc {_read(out / f'{name}.rc')})")
            continue
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests, fails, errs, skips = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        print(f"{name}: {tests - fails - errs - skips} passed, {fails} failed, {errs} errors, {skips} skipped "
              f"(rc {_read(out / f'{name}.rc')})")
        for case, bad in _not_passed(suite):
            msg = (bad.get("message") or "").splitlines()[0][:150] if bad.get("message") else ""
            print(f"  FAIL {case.get('classname')}::{case.get('name')}: {msg}")


def _benchmarks(out: Path) -> None:
    bench = out / "bench.json"
    print(f"benchmarks: rc {_read(out / 'bench.rc')}")
    if bench.exists():
        data = json.loads(bench.read_text())
        if not data.get("complete", True):
            print("  (cut short: the rows below are what was measured before the time limit)")
        print(data["table"])
        _feature_twins(data["rows"])
    else:
        print("  no benchmark JSON")


def _sweep(out: Path) -> None:
    sweep = out / "sweep.json"
    if sweep.exists():
        print(f"attention tile sweep: rc {_read(out / 'sweep.rc')}")
        for row in json.loads(sweep.read_text())["rows"]:
            print(f"  {row['case']:36s} x{row['ratio']:.3f} vs {row['best_sdpa']:10s} {row['us']:8.1f} us "
                  f"tiles {row['tiles']}")


def _profile(out: Path) -> None:
    profile = out / "profile.log"
    if profile.exists() or (out / "profile.rc").exists():
        print(f"host and device time per call (bench/gpu_profile.py): rc {_read(out / 'profile.rc')}")
        if profile.exists():
            print("\n".join(line for line in profile.read_text().splitlines() if " host " in line))


def _ncu(out: Path) -> None:
    """Nsight Compute's table of the attention kernels (bench/attention_ncu.py), or why there is none."""
    from bench import attention_ncu
    if not (out / "ncu.rc").exists():
        return
    print(f"Nsight Compute, attention kernels (bench/attention_ncu.py; clocks not locked): rc {_read(out / 'ncu.rc')}")
    report = out / "ncu.csv"
    launches = attention_ncu.read(report.read_text(errors="replace")) if report.exists() else []
    if launches:
        print(attention_ncu.table(launches, attention_ncu.read_labels(out / "ncu_cases.json")))
        return
    errors = [line for line in _read(out / "ncu.log", "").splitlines() if "==ERROR==" in line][:5]
    print("\n".join("  " + line for line in errors) if errors else "  no profile (see ncu.log)")


def _flag(key: str, index: int) -> int:
    """Element ``index`` of the first tile list in ``key`` (0 where the list is shorter)."""
    tile = [int(x) for x in re.search(r"\[([\d, ]+)\]", key).group(1).split(",")]
    return tile[index] if len(tile) > index else 0


def _with_flag(key: str, index: int, first_only: bool) -> str:
    """``key`` with element ``index`` of its tile lists set to 0 (of the first list only: a dkdv tile)."""
    parts, done = [], False
    for piece in re.split(r"(\[[\d, ]+\])", key):
        if piece.startswith("[") and not (first_only and done):
            tile = [int(x) for x in piece[1:-1].split(",")]
            if len(tile) > index:
                tile[index] = 0
            piece, done = str(tile), True
        parts.append(piece)
    return "".join(parts)


def _feature_twins(rows: list) -> None:
    """Each attention candidate against its twin without one feature, from the ``candidate_us`` of the
    ``-fwd`` and ``-fwdbwd`` rows (GPU time, same run): split tail tiles (tile element 4) against the unsplit
    tile, dq by TMA reductions (dkdv element 5) against the same dkdv tile with pointer atomics, loads
    through TMA descriptors (element 6) against pointer loads, the forward's query tail folded into the last
    full tile's program (element 8) against a tail program of its own, and dq from a stored dS (dkdv
    element 7) against the fastest dq pass on the same dkdv tile."""
    lines = []
    for row in rows:
        if row.get("op") != "attention" or row.get("mode") not in ("fwd", "fwdbwd"):
            continue
        cands = row.get("candidate_us") or {}
        case = row["case"][:-len(row["mode"]) - 1]
        if row["mode"] == "fwd":  # the same failures are in every row of the shape: print them once
            failures = row.get("candidate_failures", {})
            lines += [f"  {case:32s} {key:64s} FAILED: {why}" for key, why in failures.items()]
        for key, us in cands.items():
            # The atomic scheme's candidates share one dq tile (not launched): its twins differ in dkdv only.
            stored = _flag(key, 7)  # a stored-dS candidate: its dq_tma element is the dS store's
            tma_dq = ("tma dS store", 5, "pointer stores") if stored else ("tma dq", 5, "atomics")
            for what, index, label in (("split", 4, "unsplit"), tma_dq, ("tma load", 6, "pointers"),
                                       ("fold tail", 8, "tail program")):
                twins = [t for t in (_with_flag(key, index, False), _with_flag(key, index, True))
                         if t != key and t in cands]
                if twins:
                    lines.append(f"  {case:32s} {key:64s} {what} {us:8.1f} us, {label} {cands[twins[0]]:8.1f} us: "
                                 f"{cands[twins[0]] / us:.2f}x")
            # A stored-dS candidate (dkdv element 7) has its own dq tile: its twin is the fastest dq pass on
            # the same dkdv tile without the store (and without dq_tma, which the dq pass does not read).
            if key.startswith("det ") and stored:
                dkdv = _with_flag(_with_flag(key, 7, True), 5, True).split(" dq=")[0]
                passes = [t for k, t in cands.items() if k.startswith(dkdv + " dq=")]
                if passes:
                    lines.append(f"  {case:32s} {key:64s} stored dS {us:8.1f} us, dq pass {min(passes):8.1f} us: "
                                 f"{min(passes) / us:.2f}x")
    if lines:
        print("attention tile features (GPU time of each candidate against its twin; >1x: the feature is faster):")
        print("\n".join(lines))


def _not_passed(root) -> list:
    """(test case, its failure or error element) for each case under ``root`` of a junit XML that failed."""
    out = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out.append((case, bad))
    return out


def failed(xml: str, *words: str) -> list:
    """Names of the failed or errored test cases in a junit XML that contain one of ``words`` as a word of
    the name (between underscores, brackets or its ends: 'tma' matches test_dq_by_tma_reduction, not
    test_log_softmax)."""
    patterns = [re.compile(rf"(^|[_\[\]-]){re.escape(w.lower())}($|[_\[\]-])") for w in words]
    return [case.get("name", "") for case, _ in _not_passed(ET.parse(xml).getroot())
            if any(p.search(case.get("name", "").lower()) for p in patterns)]


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--failed":  # exit 0 (and print them) if any such test failed
        names = failed(sys.argv[2], *sys.argv[3:])
        print("\n".join(names))
        sys.exit(0 if names else 1)
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu-latest"))
