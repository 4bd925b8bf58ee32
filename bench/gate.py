"""The regression gate: a benchmark fails when our speed-up over its baseline (measured in the same run)
falls below the floor stored in bench/floors/<device>.json.

Floors are ratios, not times, so they hold across noisy machines of one kind; one file per device type
(``cpu``, ``nvidia-h100-80gb-hbm3``, ...). A key is ``<op>:<case>``; a case without a floor is reported but
not gated. Floors change only by editing the file in a commit that says why.

    python -m bench.gate results.json            # check a JSON written by `pytest bench --bench-json`
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

FLOORS_DIR = Path(__file__).resolve().parent / "floors"


def load_floors(device_slug: str) -> dict[str, float]:
    path = FLOORS_DIR / f"{device_slug}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: float(v) for k, v in data.get("floors", {}).items()}


def check(key: str, ratio: float, floors: dict[str, float]) -> Optional[str]:
    """None if ``ratio`` meets the floor of ``key`` (or there is none), else the failure message."""
    floor = floors.get(key)
    if floor is None or ratio >= floor:
        return None
    return f"{key}: speed-up {ratio:.2f}x over the baseline is below the floor {floor:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="JSON written by `pytest bench --bench-json FILE`")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    floors = load_floors(data["environment"]["device"])
    failures = [msg for row in data["rows"] if (msg := check(row["key"], row["ratio"], floors))]
    # A floor of an op the file covers without its row: a benchmark that did not run passes no gate. Only
    # in a complete run (one cut short by a time limit lacks rows by design) and only for the file's ops
    # (results are often written one op per file).
    ops = {row["key"].split(":", 1)[0] for row in data["rows"]}
    keys = {row["key"] for row in data["rows"]}
    missing = sorted(k for k in floors if k.split(":", 1)[0] in ops and k not in keys)
    if data.get("complete", False):
        failures += [f"{k}: no row (the benchmark did not run)" for k in missing]
    elif missing:
        print(f"(cut short: {len(missing)} floors without a row not checked)")
    for msg in failures:
        print("FAIL", msg)
    print(f"{len(data['rows'])} rows, {len(failures)} below their floor or missing ({len(floors)} floors for "
          f"{data['environment']['device']})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
