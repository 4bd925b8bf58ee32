"""A dry run of the GPU attention benchmark (bench/bench_attention.py) on the CPU: the Triton interpreter, a
CUDA graph that is the call itself, a pretend GPU name. The GPU check reaches this code on a lent GPU only (a
few times, minutes each): whatever would break its rows, or bench/attention_table.py's reading of them, has
to break here first.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import attention_table, harness
from bench import bench_attention as B
from seer_kernels.testing import triton_device

pytestmark = pytest.mark.skipif(triton_device() != "cpu", reason="the dry run fakes a GPU on the CPU "
                                "(Triton interpreter); on a GPU the benchmark itself runs")

SHAPE = ("tiny-B1H2N40D16", 1, 2, 40, 16)
MODES = ["auto", "fwd", "fwdbwd", "fwdbwd-det", "fwd-graph", "fwdbwd-graph", "fwdbwd-det-graph",
         "fwdbwd-det-vit-graph", "auto-graph"]


class _PretendCuda(str):
    """'cpu' for torch, a CUDA device for the benchmark's own checks (``device.startswith("cuda")``)."""

    def startswith(self, prefix, *args):
        return prefix == "cuda" or str.startswith(self, prefix, *args)


@pytest.fixture
def dry_run(monkeypatch):
    time_once, compare = harness._time_once, harness.compare
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(harness, "_time_once", lambda fn, device, inner: time_once(fn, "cpu", inner))
    monkeypatch.setattr(harness, "cuda_graphed", lambda fn: fn)
    monkeypatch.setattr(harness, "device_slug", lambda device: "fake-gpu")
    monkeypatch.setattr(harness, "bandwidth_ceiling", lambda device: 1000.0)
    monkeypatch.setattr(harness, "compare", lambda fns, device, **kw: compare(fns, "cpu", min_time=0.0,
                                                                               max_rounds=1, min_rounds=1))
    monkeypatch.setattr(B, "DTYPE", torch.float16)  # the interpreter computes bfloat16 wrongly
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def flash_takes_contiguous_inputs_only(q, k, v, **kw):  # as a GPU backend may refuse the -vit slices
        if torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled() \
                and not q.is_contiguous():
            raise RuntimeError("No available kernel")
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(B, "F", type("F", (), {"scaled_dot_product_attention":
                                               staticmethod(flash_takes_contiguous_inputs_only)}))
    rows, deferred = [], []

    def record(op, case, fns, *, ours, baseline, metrics=None, defer_gate=False, **kw):
        """bench/conftest.py's bench_record, with a floor that the -fwd-graph row misses."""
        t = harness.compare(fns, "cpu")
        base = min(baseline, key=lambda n: t[n].median_s)
        row = {"key": f"{op}:{case}", "op": op, "case": case, "ours": ours, "baseline": base,
               "ratio": t[base].median_s / t[ours].median_s, "times_ms": {n: x.median_s * 1e3 for n, x in t.items()}}
        row.update(metrics(t))
        rows.append(row)
        if case.endswith("-fwd-graph"):
            msg = f"{row['key']}: below its floor"
            if not defer_gate:
                pytest.fail(msg)
            deferred.append(msg)
        return row

    def fail_deferred():
        if deferred:
            pytest.fail("\n".join(deferred))
    record.fail_deferred = fail_deferred
    return record, rows


def test_gpu_benchmark_rows_and_the_table_written_from_them(dry_run, tmp_path):
    record, rows = dry_run
    with pytest.raises(pytest.fail.Exception, match="fwd-graph: below its floor"):
        B.bench_attention_gpu(record, _PretendCuda("cpu"), SHAPE)
    # every row of the shape, though its -fwd-graph row failed the gate
    assert [r["mode"] for r in rows] == MODES
    case, b, h, n, d = SHAPE
    for r in rows:
        assert r["case"] == f"{case}-{r['mode']}" and r["shape"] == [b, h, n, n, d]
        sdpa = {name for name in r["times_ms"] if name.startswith("sdpa-")}
        assert sdpa and r["best_sdpa"] == r["baseline"][5:] == min(sdpa, key=r["times_ms"].get)[5:]
        ours_s = r["times_ms"][r["ours"]] / 1e3
        flops = 4 * b * h * n * n * d * (3.5 if "bwd" in r["mode"] or "auto" in r["mode"] else 1)
        assert r["tflops"] == pytest.approx(flops / ours_s / 1e12)
    vit = rows[MODES.index("fwdbwd-det-vit-graph")]
    assert vit["ours"] == "triton-packed" and {"x_triton-packed-atomic", "x_triton"} <= set(vit)
    # flash does not take the slices: no contender there, unlike a backend that runs but cannot be captured
    assert vit["not_supported"] == ["sdpa-flash"] and vit["not_capturable"] == [] and "x_flash" not in vit
    assert all(r["not_supported"] == [] for r in rows if r["mode"].endswith("graph") and r is not vit)
    # bench/attention_table.py reads them: one row in GPU time, with attention_packed's ratio
    src, out = tmp_path / "bench.json", tmp_path / "table.py"
    src.write_text(json.dumps({"environment": {"device": "fake-gpu", "git": "abc", "settings": {}},
                               "rows": rows, "complete": True}))
    assert attention_table.main([str(src), "--out", str(out)]) == 0
    ns: dict = {}
    exec(out.read_text(), ns)
    (row,) = ns["TABLE"]["fake-gpu"]
    assert row["basis"] == "gpu_time" and (row["n_q"], row["head_dim"]) == (n, d)
    assert row["fwd_bwd"] == max(row["fwd_bwd_atomic"], row["fwd_bwd_det"]) and "fwd_bwd_packed" in row
    # a backend that runs but could not be captured: the -vit row gives no fwd_bwd_packed then
    rows[MODES.index("fwdbwd-det-vit-graph")]["not_capturable"] = ["sdpa-math"]
    src.write_text(json.dumps({"environment": {"device": "fake-gpu", "git": "abc", "settings": {}},
                               "rows": rows, "complete": True}))
    out.unlink()
    assert attention_table.main([str(src), "--out", str(out)]) == 0
    (row,) = _load_table(out)["TABLE"]["fake-gpu"]
    assert row["basis"] == "gpu_time" and "fwd_bwd_packed" not in row


def _load_table(path) -> dict:
    ns: dict = {}
    exec(path.read_text(), ns)
    return ns
