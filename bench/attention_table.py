"""Turn a GPU benchmark JSON into the attention selector table (seer_kernels/ops/attention_table.py).

    bash bench/gpu_check.sh OUT                       # writes OUT/bench.json (among others)
    python -m bench.attention_table OUT/bench.json    # rewrites the table for that GPU, keeps other GPUs

bench/bench_attention.py writes, per shape, rows with ours == "triton" and mode "fwd", "fwdbwd" (dq by
float32 atomics) and "fwdbwd-det" (dq by its own pass), each with ratio = best SDPA backend's median time /
ours (same run), the shape, the best SDPA backend and the tiles the benchmark found fastest. Each shape
becomes one table row:

    fwd       forward-only speed-up (the selector uses it when no gradient is needed)
    best_sdpa the fastest correct SDPA backend for forward+backward: the SDPA path puts it first
    fwd_bwd   the better of the two backward schemes' forward+backward speed-ups
    bwd_scheme which scheme that was ("atomic" or "deterministic"): the default for that shape
    tiles     fwd tile and the dkdv / dq tiles of that scheme
    basis     what the ratios above measure: "gpu_time" (the -graph rows: CUDA-graph replays, the GPU's work
              alone) where the run captured all three modes, else "eager" (calls from Python, which at these
              shapes time the host's launch path as much as the kernels)
    fwd_bwd_packed  attention_packed's forward+backward speed-up with that scheme, from the
              -fwdbwd-det-vit-graph row (the ViT's layout: SDPA on the slices pays for stacking their
              gradients), where the run has it and the row is in GPU time; the selector uses it for
              attention_packed (fwd_bwd_packed_det / _atomic: both schemes)

A CUDA-graph row that left out an SDPA backend (not_capturable: it could not be captured) compares ours with
the best of the others only: such rows do not decide (the eager rows do, and the -vit row gives no
fwd_bwd_packed), with a warning.

GPU time decides because a training step keeps the GPU busy: the host queues the attention's launches while
the GPU still runs the matmuls before it, so what the op adds to a step is its GPU time (the eager ratios of
an op timed alone are kept as evidence, ``*_eager``). The selector (seer_kernels/ops/attention.py) picks
Triton where the relevant ratio is >= TRITON_MARGIN.
"""
from __future__ import annotations

import argparse
import json
import math
import pprint
import sys
from pathlib import Path

from seer_kernels.ops.attention import TRITON_MARGIN

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "seer_kernels" / "ops" / "attention_table.py"
MODES = ("fwd", "fwdbwd", "fwdbwd-det")

HEADER = '''"""Selector evidence for seer_kernels.attention (written by bench/attention_table.py; do not edit by hand).

Regenerate after a GPU check:

    bash bench/gpu_check.sh OUT && python -m bench.attention_table OUT/bench.json

TABLE maps a GPU slug (e.g. "nvidia-h100-80gb-hbm3") to benchmark rows: head_dim, n_q, n_kv, batch, heads,
dtype, fwd and fwd_bwd (speed-up of the Triton kernel over the best SDPA backend, same run; None where only
the SDPA backends were timed), best_sdpa (put first by the SDPA path), bwd_scheme ("atomic" or
"deterministic", whichever was faster), the best tiles per kernel, basis (what fwd and fwd_bwd measure:
"gpu_time", CUDA-graph replays, where the run captured them, else "eager" calls), the ratios of both
kinds as evidence (*_graph: CUDA-graph replays; *_eager: eager calls), where measured fwd_bwd_packed
(attention_packed against SDPA on the slices of a fused projection, with bwd_scheme; the selector's ratio
for attention_packed), and source (the run that measured the row: git revision, date, torch, triton, CUDA).
SOURCES: per GPU slug, the run (machine, versions, revision, JSON) its rows were last written from; SOURCE:
the last run written, of any GPU.
"""
'''


def rows_from_benchmark(data: dict) -> list[dict]:
    """One selector row per benchmarked shape.

    A shape with all three Triton modes gets the full row. A shape with only the ``-auto`` row (and perhaps
    ``-fwd``) still tells which SDPA backend is fastest there: it gets an SDPA-only row, ``fwd_bwd`` None
    (no Triton evidence, so the selector keeps SDPA), ``best_sdpa`` from the ``-auto`` timing.
    """
    by_case: dict[str, dict] = {}
    graphs: dict[str, dict] = {}
    packed: dict[str, dict] = {}
    for row in data["rows"]:
        mode = row.get("mode", "")
        if row.get("op") != "attention" or "shape" not in row:
            continue
        base = row["case"][: -len(mode) - 1]
        if mode == "auto":
            by_case.setdefault(base, {})[mode] = row
        elif row.get("ours") == "triton" and mode.removesuffix("-graph") in MODES:
            (graphs if mode.endswith("-graph") else by_case).setdefault(base, {})[mode] = row
        elif row.get("ours") == "triton-packed" and mode == "fwdbwd-det-vit-graph":
            packed[base] = row
    out = []
    for base, modes in sorted(by_case.items()):
        graph = graphs.get(base, {})
        if set(MODES) <= set(modes):
            out.append(_triton_row(base, modes, graph))
        elif "auto" in modes:
            out.append(_sdpa_row(base, modes))
        else:
            print(f"skipping {base}: modes {sorted(modes)} (need {MODES} or auto)", file=sys.stderr)
            continue
        for mode, key in (("fwd", "fwd_graph"), ("fwdbwd", "fwd_bwd_atomic_graph"),
                          ("fwdbwd-det", "fwd_bwd_det_graph")):
            if f"{mode}-graph" in graph:
                out[-1][key] = _ratio(graph[f"{mode}-graph"]["ratio"])
        if base in packed:
            out[-1].update(_packed_ratios(out[-1], packed[base]))
    return out


def _ratio(x: float) -> float:
    """A measured ratio to 3 decimals, rounded down: a stored ratio must not clear TRITON_MARGIN where the
    measured one did not (1.0496 rounded to nearest is 1.05, and the selector would pick Triton on it)."""
    return math.floor(x * 1000 + 1e-6) / 1000  # (the 1e-6: 1.001 * 1000 is 1000.9999999999999)


def _packed_ratios(row: dict, vit: dict) -> dict:
    """attention_packed's forward+backward ratios from the shape's -fwdbwd-det-vit-graph row (ratio: best SDPA
    on the slices / attention_packed with the deterministic scheme; x_triton-packed-atomic: the atomic
    scheme's time over that), and fwd_bwd_packed for the row's bwd_scheme. Only beside GPU-time ratios
    (the -vit row is GPU time: the selector compares like with like)."""
    if row.get("basis") != "gpu_time" or row.get("fwd_bwd") is None:
        return {}
    if _sdpa_left_out(vit):
        print(f"{row['case']}: the -vit row left out {_sdpa_left_out(vit)}: no fwd_bwd_packed from it",
              file=sys.stderr)
        return {}
    out = {"fwd_bwd_packed_det": _ratio(vit["ratio"])}
    atomic_x = vit.get("x_triton-packed-atomic")
    if atomic_x:
        out["fwd_bwd_packed_atomic"] = _ratio(vit["ratio"] / atomic_x)
    key = "fwd_bwd_packed_det" if row["bwd_scheme"] == "deterministic" else "fwd_bwd_packed_atomic"
    if key in out:
        out["fwd_bwd_packed"] = out[key]
    return out


def _shape(base: str, row: dict) -> dict:
    b, h, nq, nkv, d = row["shape"]
    return {"case": base, "head_dim": d, "n_q": nq, "n_kv": nkv, "batch": b, "heads": h, "dtype": row["dtype"]}


def _sdpa_left_out(row: dict) -> list:
    """The SDPA backends a CUDA-graph row left out because they could not be captured, though they run on its
    inputs: the row's ratio is then against the best of the others, which need not be the best SDPA a model
    gets. (Backends that do not take the inputs at all, not_supported, are no contenders.)"""
    return [name for name in row.get("not_capturable", ()) if name.startswith("sdpa-")]


def _triton_row(base: str, modes: dict, graph: dict) -> dict:
    """The row of a shape with all three Triton modes; its ratios in GPU time where ``graph`` has all three,
    each against every SDPA backend."""
    gpu_time = all(f"{m}-graph" in graph for m in MODES)
    left_out = sorted({n for m in MODES if f"{m}-graph" in graph for n in _sdpa_left_out(graph[f"{m}-graph"])})
    if gpu_time and left_out:
        print(f"{base}: the CUDA-graph rows left out {left_out}, so their ratios are not against the best SDPA; "
              f"the eager rows decide", file=sys.stderr)
        gpu_time = False
    basis = {m: graph[f"{m}-graph"] if gpu_time else modes[m] for m in MODES}  # rows the ratios come from
    ratio = {m: basis[m]["ratio"] for m in MODES}
    det_wins = ratio["fwdbwd-det"] > ratio["fwdbwd"]
    scheme = "fwdbwd-det" if det_wins else "fwdbwd"
    best, fwd = modes[scheme], modes["fwd"]
    return dict(_shape(base, fwd), **{
        "basis": "gpu_time" if gpu_time else "eager",
        "fwd": _ratio(ratio["fwd"]), "fwd_bwd": _ratio(max(ratio["fwdbwd"], ratio["fwdbwd-det"])),
        "fwd_bwd_atomic": _ratio(ratio["fwdbwd"]), "fwd_bwd_det": _ratio(ratio["fwdbwd-det"]),
        "fwd_eager": _ratio(fwd["ratio"]), "fwd_bwd_eager": _ratio(best["ratio"]),
        "best_sdpa": basis[scheme].get("best_sdpa"), "best_sdpa_fwd": basis["fwd"].get("best_sdpa"),
        "bwd_scheme": "deterministic" if det_wins else "atomic",
        "tiles": {"fwd": fwd["tiles"]["fwd"], "dkdv": best["tiles"]["dkdv"], "dq": best["tiles"]["dq"]}})


def _sdpa_row(base: str, modes: dict) -> dict:
    auto, fwd = modes["auto"], modes.get("fwd")
    return dict(_shape(base, auto), **{
        "fwd": _ratio(fwd["ratio"]) if fwd else None, "fwd_bwd": None,
        "best_sdpa": auto.get("best_sdpa"), "best_sdpa_fwd": (fwd or auto).get("best_sdpa"),
        "bwd_scheme": "atomic", "tiles": {"fwd": fwd["tiles"]["fwd"]} if fwd and "tiles" in fwd else {}})


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    """The GPU's rows: ``new`` replaces the old row of each of its shapes, shapes it lacks keep their old row
    (a run cut short reaches only some shapes), and an old row measured in GPU time is kept where the new one
    only has eager calls (its -graph rows were cut), with a warning."""
    by_case = {r["case"]: r for r in old}
    for r in new:
        prev = by_case.get(r["case"])
        if prev is not None and prev.get("basis") == "gpu_time" and r.get("basis") != "gpu_time":
            print(f"keeping the GPU-time row of {r['case']}: this run has no CUDA-graph rows for it",
                  file=sys.stderr)
            continue
        by_case[r["case"]] = r
    return [by_case[c] for c in sorted(by_case)]


def _existing(path: Path) -> tuple[dict, dict]:
    """The table module's TABLE and SOURCES (from its SOURCE alone where it was written before SOURCES)."""
    if not path.exists():
        return {}, {}
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    sources = dict(ns.get("SOURCES", {}))
    last = ns.get("SOURCE") or {}
    if not sources and last.get("device"):
        sources[last["device"]] = last
    return dict(ns.get("TABLE", {})), sources


ROW_SOURCE = ("git", "date", "torch", "triton", "cuda")  # what each row records of the run that measured it


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", nargs="+", help="JSON written by `pytest bench --bench-device cuda --bench-json "
                    "FILE`; with several (of one GPU type), a later file's shape replaces an earlier one's")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="table module to (re)write")
    args = ap.parse_args(argv)
    merged: dict[str, dict] = {}
    sources = []
    for path in args.bench_json:
        data = json.loads(Path(path).read_text())
        env = data["environment"]
        settings = env.get("settings") or {}
        if settings:  # e.g. SEER_KERNELS_TMA=0 after a failed TMA test: not the kernels users run
            print(f"{path}: the benchmarks ran with {settings}; the table is written only from runs without "
                  f"SEER_KERNELS_* settings", file=sys.stderr)
            return 1
        if not data.get("complete", False):
            print(f"{path}: the run was cut short (complete: false); its shapes replace only their own rows",
                  file=sys.stderr)
        run = {k: env.get(k) for k in ROW_SOURCE}
        merged.update((r["case"], dict(r, source=run)) for r in rows_from_benchmark(data))
        sources.append(dict({k: env.get(k) for k in ("device", "gpu", "torch", "triton", "cuda", "git", "date")},
                            json=str(path)))
    if len({s["device"] for s in sources}) != 1:
        print(f"the files come from different GPUs: {sorted({s['device'] for s in sources})}", file=sys.stderr)
        return 1
    rows = [merged[c] for c in sorted(merged)]
    device = sources[0]["device"]
    if not rows:
        print(f"no attention rows with all of {MODES} or an auto row in {args.bench_json}", file=sys.stderr)
        return 1
    out = Path(args.out)
    table, by_device = _existing(out)
    table[device] = _merge(table.get(device, []), rows)
    rows = table[device]
    source = sources[-1] if len(sources) == 1 else {"device": device, "runs": sources}
    by_device[device] = source  # the other GPUs' keep theirs (SOURCE alone named only the last one written)
    text = (HEADER + "\n# Last written from: " + json.dumps(source) + "\n"
            + "SOURCE = " + pprint.pformat(source, width=110, sort_dicts=True) + "\n"
            + "SOURCES: dict = " + pprint.pformat(by_device, width=110, sort_dicts=True) + "\n"
            + "TABLE: dict = " + pprint.pformat(table, width=110, sort_dicts=True) + "\n")
    out.write_text(text)
    def pick(ratio) -> str:  # the selector's choice with a gradient (seer_kernels/ops/attention.py)
        return "triton" if ratio is not None and ratio >= TRITON_MARGIN else "sdpa"

    for r in rows:
        fb, packed = r["fwd_bwd"], r.get("fwd_bwd_packed")
        ratios = (f"fwd+bwd x{fb:.3f} ({r['bwd_scheme']}, {r['basis']})" if fb is not None
                  else "fwd+bwd not measured")
        # the ViT (seer.model.layers.Attention) trains through attention_packed: its own ratio where measured
        vit = pick(packed if packed is not None else fb) + (f" (x{packed:.3f} on a fused qkv)" if packed else "")
        print(f"{device} {r['case']:32s} {ratios}  vs {r['best_sdpa']}  -> training: attention() uses {pick(fb)}, "
              f"the ViT's attention_packed {vit}")
    print(f"wrote {len(rows)} rows for {device} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
