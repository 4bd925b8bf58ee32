"""Print the one-table summary of a bench/gpu_check.sh run: environment, build, tests, benchmarks."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _read(path: Path, default: str = "missing") -> str:
    return path.read_text().strip() if path.exists() else default


def main(out_dir: str) -> int:
    out = Path(out_dir)
    print("=" * 100)
    print(f"build: {_read(out / 'build.status')}")
    for name, what in (("native_errors.log", "first build"), ("native_errors-system.log", "/usr/bin/g++ build")):
        errors = out / name
        if errors.exists():
            print(f"native error path (bench/native_errors.py), {what}:")
            print("\n".join("  " + line for line in errors.read_text().splitlines()
                            if line.startswith(("ok ", "WARNING", "CRASHED", "FAILED"))))
    for name in ("tests", "tests-matrix"):
        xml = out / f"{name}.xml"
        if not xml.exists():
            print(f"{name}: no report (rc {_read(out / f'{name}.rc')})")
            continue
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests, fails, errs, skips = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        print(f"{name}: {tests - fails - errs - skips} passed, {fails} failed, {errs} errors, {skips} skipped "
              f"(rc {_read(out / f'{name}.rc')})")
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").splitlines()[0][:150] if bad.get("message") else ""
                print(f"  FAIL {case.get('classname')}::{case.get('name')}: {msg}")
    bench = out / "bench.json"
    print(f"benchmarks: rc {_read(out / 'bench.rc')}")
    if bench.exists():
        data = json.loads(bench.read_text())
        print(data["table"])
        _tail_tiles(data["rows"])
    else:
        print("  no benchmark JSON")
    sweep = out / "sweep.json"
    if sweep.exists():
        print(f"attention tile sweep: rc {_read(out / 'sweep.rc')}")
        for row in json.loads(sweep.read_text())["rows"]:
            print(f"  {row['case']:36s} x{row['ratio']:.3f} vs {row['best_sdpa']:10s} {row['us']:8.1f} us "
                  f"tiles {row['tiles']}")
    profile = out / "profile.log"
    if profile.exists():
        print("host and device time per call (bench/gpu_profile.py):")
        print("\n".join(line for line in profile.read_text().splitlines() if " host " in line))
    print("=" * 100)
    return 0


def _tail_tiles(rows: list) -> None:
    """Each attention candidate with split tail tiles against its unsplit twin (``candidate_us`` of the
    ``-fwd`` and ``-fwdbwd`` rows: GPU time, same run)."""
    lines = []
    for row in rows:
        if row.get("op") != "attention" or row.get("mode") not in ("fwd", "fwdbwd"):
            continue
        cands = row.get("candidate_us") or {}
        for key, us in cands.items():
            twin = key.replace(", 1]", ", 0]")
            if twin != key and twin in cands:
                lines.append(f"  {row['case'][:-len(row['mode']) - 1]:32s} {key:52s} split {us:8.1f} us, unsplit "
                             f"{cands[twin]:8.1f} us: {cands[twin] / us:.2f}x")
    if lines:
        print("attention tail tiles (GPU time of each candidate; >1x: the split is faster):")
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu-latest"))
