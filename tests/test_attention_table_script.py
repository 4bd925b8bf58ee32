"""bench/attention_table.py on synthetic GPU benchmark JSONs shaped like bench/bench_attention.py's rows: what
the selector table records and what the selector then picks."""
from __future__ import annotations

import json

import pytest

from bench import attention_table as script

H100, H200 = "nvidia-h100-80gb-hbm3", "nvidia-h200"
CASE, SHAPE = "vit10b-tp4-B32H8N257D128", [32, 8, 257, 257, 128]
TILES = {"fwd": [64, 32, 4, 3], "dkdv": [32, 64, 4, 2], "dq": [64, 32, 4, 3]}


def _rows(ratios: dict, case: str = CASE, shape=SHAPE, best_sdpa="cudnn") -> list:
    """Rows of one shape: ``ratios`` maps a mode (fwd, fwdbwd-det-graph, ...) to its ratio."""
    return [{"key": f"attention:{case}-{mode}", "op": "attention", "case": f"{case}-{mode}", "ours": "triton",
             "mode": mode, "ratio": ratio, "best_sdpa": best_sdpa, "shape": shape, "dtype": "bfloat16",
             "tiles": TILES} for mode, ratio in ratios.items()]


def _all_modes(fwd=1.1, atomic=1.2, det=1.3) -> dict:
    return {m + g: r for g in ("", "-graph") for m, r in (("fwd", fwd), ("fwdbwd", atomic), ("fwdbwd-det", det))}


def _env(device, **kw):
    return dict({"device": device, "gpu": device.upper(), "torch": "2.11.0+cu130", "triton": "3.6.0",
                 "cuda": "13.0", "git": "abc1234", "date": "2026-12-01 10:00:00", "settings": {}}, **kw)


def _write(path, env, rows, complete=True):
    path.write_text(json.dumps({"environment": env, "rows": rows, "complete": complete}))
    return str(path)


def _load(out) -> dict:
    ns: dict = {}
    exec(out.read_text(), ns)
    return ns


def test_each_gpu_and_row_keeps_the_run_it_came_from(tmp_path):
    """Writing one GPU's rows keeps the other GPU's machine, versions and revision (SOURCE named only the last
    run written: an H200 run erased the H100 rows' provenance), and each row records its own run."""
    out = tmp_path / "table.py"
    # a table written before SOURCES: its SOURCE is the H100's
    out.write_text("SOURCE = " + repr(dict(_env(H100, git="old1111"), json="h100.json")) + "\n"
                   "TABLE: dict = " + repr({H100: [{"case": "x", "head_dim": 64, "n_q": 37, "n_kv": 37, "fwd": 1.2,
                                                     "fwd_bwd": 1.3, "bwd_scheme": "atomic", "basis": "gpu_time",
                                                     "best_sdpa": "efficient"}]}) + "\n")
    assert script.main([_write(tmp_path / "h200.json", _env(H200, git="new2222"), _rows(_all_modes())),
                        "--out", str(out)]) == 0
    ns = _load(out)
    assert ns["SOURCE"]["device"] == H200 and ns["SOURCE"]["git"] == "new2222"
    assert ns["SOURCES"][H100]["git"] == "old1111" and ns["SOURCES"][H200]["git"] == "new2222"
    (row,) = ns["TABLE"][H200]
    assert row["source"] == {"git": "new2222", "date": "2026-12-01 10:00:00", "torch": "2.11.0+cu130",
                             "triton": "3.6.0", "cuda": "13.0"}
    # a later H100 run cut short at another shape: its row has its run, the H200's entry stays
    local = _rows(_all_modes(), case="local-B192H16N37D64", shape=[192, 16, 37, 37, 64], best_sdpa="efficient")
    assert script.main([_write(tmp_path / "h100.json", _env(H100, git="new3333"), local, complete=False),
                        "--out", str(out)]) == 0
    ns = _load(out)
    assert ns["SOURCES"][H200]["git"] == "new2222" and ns["SOURCES"][H100]["git"] == "new3333"
    rows = {r["case"]: r for r in ns["TABLE"][H100]}
    assert rows["local-B192H16N37D64"]["source"]["git"] == "new3333" and "source" not in rows["x"]


def test_the_table_is_the_same_for_the_same_runs(tmp_path):
    src = _write(tmp_path / "b.json", _env(H100), _rows(_all_modes()))
    first, second = tmp_path / "t1.py", tmp_path / "t2.py"
    assert script.main([src, "--out", str(first)]) == 0 and script.main([src, "--out", str(second)]) == 0
    assert first.read_text() == second.read_text()
    assert script.main([src, "--out", str(second)]) == 0  # rewriting over itself
    assert first.read_text() == second.read_text()


@pytest.mark.parametrize("missing", ["cudnn", "flash"])
def test_rows_without_an_sdpa_backend_and_a_partial_run(tmp_path, missing):
    """A GPU where a backend is unavailable (cuDNN) names the fastest one that ran; a run cut after the eager
    rows of a shape gives an eager row, and one cut after its -auto row an SDPA-only row."""
    best = "efficient" if missing == "cudnn" else "cudnn"
    rows = _rows(_all_modes(), best_sdpa=best)
    eager_only = _rows({"fwd": 1.2, "fwdbwd": 0.5, "fwdbwd-det": 0.6, "fwd-graph": 1.3},
                       case="vitl-B64H16N197D64", shape=[64, 16, 197, 197, 64], best_sdpa=best)
    auto = dict(_rows({"auto": 0.7}, case="vitg-B32H16N257D88", shape=[32, 16, 257, 257, 88], best_sdpa=best)[0],
                ours="seer")
    out = tmp_path / "t.py"
    assert script.main([_write(tmp_path / "b.json", _env(H200), rows + eager_only + [auto], complete=False),
                        "--out", str(out)]) == 0
    got = {r["case"]: r for r in _load(out)["TABLE"][H200]}
    assert got[CASE]["best_sdpa"] == best and got[CASE]["basis"] == "gpu_time"
    assert got["vitl-B64H16N197D64"]["basis"] == "eager" and got["vitl-B64H16N197D64"]["fwd_graph"] == 1.3
    sdpa_only = got["vitg-B32H16N257D88"]
    assert sdpa_only["fwd_bwd"] is None and sdpa_only["best_sdpa"] == best


@pytest.mark.parametrize("measured", [1.0496, 1.0499, 1.05, 1.0504, 0.9, 1.3])
def test_the_selector_picks_triton_exactly_where_the_measured_ratio_clears_the_margin(tmp_path, monkeypatch,
                                                                                       measured):
    """Through the written table and the selector's own preference: fwd (no gradient), fwd_bwd (gradient)
    and fwd_bwd_packed (attention_packed with a gradient) each decide by the measured ratio against
    TRITON_MARGIN, the stored one rounded so that it never clears the margin the measured one missed."""
    import torch

    from seer_kernels.ops import attention as ops
    vit = {"key": "x", "op": "attention", "case": f"{CASE}-fwdbwd-det-vit-graph", "ours": "triton-packed",
           "mode": "fwdbwd-det-vit-graph", "ratio": measured, "shape": SHAPE, "dtype": "bfloat16",
           "x_triton-packed-atomic": 1.0}
    out = tmp_path / "t.py"
    src = _write(tmp_path / "b.json", _env(H100), _rows(_all_modes(measured, 0.5, measured)) + [vit])
    assert script.main([src, "--out", str(out)]) == 0
    monkeypatch.setattr(ops.attention_table, "TABLE", _load(out)["TABLE"])
    monkeypatch.setattr(ops, "_gpu_slug", lambda index: H100)
    ops._EVIDENCE.clear()
    want = measured >= ops.TRITON_MARGIN
    for grad, packed in ((False, False), (True, False), (True, True)):
        why = ops._triton_prefer(where=torch.device("cuda", 0), head_dim=128, n_q=257, n_kv=257, grad=grad,
                                 deterministic=False, packed=packed)
        assert (why is None) == want, (grad, packed, why)


def test_a_cuda_graph_row_that_left_out_an_sdpa_backend_does_not_decide(tmp_path, capsys):
    """Where cuDNN (say) could not be captured, the -graph rows compare ours with the other backends only: the
    table must not pick Triton on them (a model's SDPA runs cuDNN), nor take attention_packed's ratio from such
    a -vit row."""
    rows = _rows({"fwd": 0.3, "fwdbwd": 0.4, "fwdbwd-det": 0.45}, best_sdpa="cudnn")
    graph = _rows({"fwd-graph": 1.3, "fwdbwd-graph": 1.2, "fwdbwd-det-graph": 1.4}, best_sdpa="efficient")
    vit = dict(graph[0], case=f"{CASE}-fwdbwd-det-vit-graph", mode="fwdbwd-det-vit-graph", ours="triton-packed",
               ratio=1.5, not_capturable=[])
    out = tmp_path / "t.py"
    for left_out_at in (None, 1, "vit"):
        g = [dict(r, not_capturable=["sdpa-cudnn"] if i == left_out_at else []) for i, r in enumerate(graph)]
        v = dict(vit, not_capturable=["sdpa-cudnn", "triton"] if left_out_at == "vit" else ["triton"])
        out.unlink(missing_ok=True)
        assert script.main([_write(tmp_path / "b.json", _env(H100), rows + g + [v]), "--out", str(out)]) == 0
        (row,) = _load(out)["TABLE"][H100]
        if left_out_at == 1:
            assert row["basis"] == "eager" and row["fwd_bwd"] == 0.45 and row["best_sdpa"] == "cudnn"
            assert "left out ['sdpa-cudnn']" in capsys.readouterr().err
        else:
            assert row["basis"] == "gpu_time" and row["fwd_bwd"] == 1.4
            assert ("fwd_bwd_packed" in row) == (left_out_at is None)


def test_the_printed_choice_is_the_selectors_for_attention_and_for_the_vits_attention_packed(tmp_path, capsys):
    """The ViT trains through attention_packed, which decides on fwd_bwd_packed where the run measured it: the
    script's report must say so (it printed the fwd_bwd choice as 'training uses sdpa' where the ViT used
    Triton)."""
    vit = {"key": "x", "op": "attention", "case": f"{CASE}-fwdbwd-det-vit-graph", "ours": "triton-packed",
           "mode": "fwdbwd-det-vit-graph", "ratio": 1.2, "shape": SHAPE, "dtype": "bfloat16"}
    src = _write(tmp_path / "b.json", _env(H100), _rows(_all_modes(0.9, 0.8, 1.0)) + [vit])
    assert script.main([src, "--out", str(tmp_path / "t.py")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if CASE in x)
    assert "attention() uses sdpa, the ViT's attention_packed triton (x1.200 on a fused qkv)" in line, line
