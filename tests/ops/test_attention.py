"""seer_kernels.attention: every backend that can run here against a float64 reference (FlashAttention's rule).

The rule: max |ours - ref64| <= 2 x max |PyTorch math in the same dtype - ref64| + atol, for the output and for
dq, dk, dv; atol is twice the rounding of the dtype at the reference's values (FlashAttention's choice), so
the bound follows what the dtype can do. Inputs are fresh random tensors every run (tests/conftest.py).

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 in float32 and float16 on small
shapes; the full shape matrix (N in {1, 37, 50, 113, 197, 257}, D in {64, 80, 128}, bfloat16 and float16,
Nq != Nkv, slices of a fused qkv) runs on a GPU through bench/gpu_check.sh.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re

import pytest
import torch

import seer_kernels
from seer_kernels import BackendError, use_backend
from seer_kernels.ops import attention as ops
from seer_kernels.ops.attention import DISPATCH
from seer_kernels.reference import attention as ref
from seer_kernels.testing import assert_close_to_ref, emulate_descriptor_reduce, max_abs_err, triton_device

TRITON_DEV = triton_device()
if TRITON_DEV == "cpu":  # the interpreter lacks the TMA reduction of Tile.dq_tma: emulate it (testing.py)
    emulate_descriptor_reduce()
HAS_CUDA = torch.cuda.is_available()
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64



# ---- inputs and oracles ---------------------------------------------------------------------------------

def make_qkv(b, h, nq, nkv, d, dtype, device, layout="contiguous", spread=1.0):
    """q, k, v with the given memory layout.

    contiguous: (B, H, N, D). fused: slices of one (B, N, 3, H, D) projection, as the ViT makes them (self-
    attention) or of a (B, Nkv, 2, H, D) key/value projection plus a (B, Nq, H, D) query (cross-attention).
    ``spread`` scales q so that the scores are large and peaked (the online softmax must rescale).
    """
    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32)

    if layout == "contiguous":
        q, k, v = rnd(b, h, nq, d), rnd(b, h, nkv, d), rnd(b, h, nkv, d)
    elif layout == "fused" and nq == nkv:
        qkv = rnd(b, nq, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    elif layout == "fused":
        q = rnd(b, nq, h, d).transpose(1, 2)
        kv = rnd(b, nkv, 2, h, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
    else:
        raise ValueError(layout)
    q = q * spread
    return tuple(t.to(dtype) for t in (q, k, v))


def math_attention(q, k, v, scale):
    """Plain PyTorch math in the inputs' dtype: the error baseline of the 2x rule."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def dtype_atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding error of ``dtype`` at the reference's values (FlashAttention's atol)."""
    x = ref64.to(dtype)
    return 2 * float(((x + 0.3) - 0.3 - x).abs().max()) + 1e-7


def cancellation_atol(dout64, out64, p64, other64, scale, dtype, wrt: str) -> float:
    """What rounding out to ``dtype`` costs dq (``wrt="q"``, other = k) or dk (``wrt="k"``, other = q) in
    every fused kernel.

    Fused backwards use delta_i = dout_i . out_i with out rounded to the dtype, where the math path
    differentiates the softmax directly. The two agree to e_i = eps * |dout_i| |out_i| in delta_i, so to
    P_ij e_i in ds_ij - which is all of dq and dk when they cancel to 0 (Nkv = 1: the softmax is constant), and
    the math path's own error there is exactly 0. Through dq_i = scale sum_j ds_ij k_j that is at most
    |scale| e_i sum_j P_ij |k_j| (the P_ij of a row sum to 1); through dk_j = scale sum_i ds_ij q_i, at most
    |scale| sum_i P_ij e_i |q_i|: a sum over every query row where P's columns carry the rows' weight (Nkv = 1:
    each is 1, 257 of them; a bound of max|q| max_i e_i failed a seed at 1.15e-5 against 1.1e-5). The larger of
    that and the per-row bound |scale| max|other| max_i e_i, x2.
    """
    eps = torch.finfo(dtype).eps
    rows = eps * dout64.norm(dim=-1) * out64.norm(dim=-1)  # (..., Nq)
    per_row = abs(scale) * float(other64.abs().max()) * float(rows.max())
    if wrt == "q":
        summed = rows[..., None] * torch.matmul(p64, other64.abs())
    else:
        summed = torch.matmul(p64.transpose(-1, -2), rows[..., None] * other64.abs())
    return 2 * max(per_row, abs(scale) * float(summed.max()))


def recompute_atol(ref64, score_max: float) -> float:
    """What recomputing P = exp(s - lse) in float32 costs, against a math path that keeps its softmax.

    Every kernel that saves only the log-sum-exp rows (ours, FlashAttention's, the reference's backward)
    rounds exp's argument at the scores' magnitude: relative error ~ eps_fp32 * (|s| + |lse|) in p, so in
    everything computed from p. Negligible next to bfloat16/float16 rounding; in float32 it is the floor.
    """
    return 4 * torch.finfo(torch.float32).eps * score_max * float(ref64.abs().max())


def run_backend(backend, q, k, v, dout, scale=None, deterministic=None):
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))  # detach keeps the strides
    with use_backend(backend, op="attention"):
        out = seer_kernels.attention(qg, kg, vg, scale=scale, deterministic=deterministic)
        grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    return (out, *grads)


def float64_expectation(q, k, v, dout, scale, sdpa=False):
    """The float64 oracle and the bounds of the 2x rule for out, dq, dk, dv given the output gradient ``dout``.

    Returns (want, same, atols, lse64): the float64 reference (out, dq, dk, dv); PyTorch's own result in the
    inputs' dtype (its math path, or torch's SDPA called directly with ``sdpa``); each one's atol (the dtype's
    rounding + the float32 recompute of P + for dq and dk the cancellation term); the reference log-sum-exp.
    """
    q64, k64, v64, do64 = (t.detach().cpu().double() for t in (q, k, v, dout))
    o64, lse64 = ref.attention_fwd(q64, k64, v64, scale)
    want = (o64, *ref.attention_bwd(do64, q64, k64, v64, o64, lse64, scale))
    qp, kp, vp = (t.detach().requires_grad_() for t in (q, k, v))
    if sdpa:
        op = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, scale=scale)
    else:
        op = math_attention(qp, kp, vp, scale)
    same = (op, *torch.autograd.grad(op, (qp, kp, vp), dout))
    score_max = max(float((torch.matmul(q64, k64.transpose(-1, -2)) * scale).abs().max()),
                    float(lse64.abs().max()))
    p64 = torch.exp(torch.matmul(q64, k64.transpose(-1, -2)) * scale - lse64[..., None])
    extra = [cancellation_atol(do64, o64, p64, k64, scale, q.dtype, "q"),
             cancellation_atol(do64, o64, p64, q64, scale, q.dtype, "k")]
    extra = [recompute_atol(w, score_max) + e for w, e in zip(want, [0.0, *extra, 0.0])]
    atols = [dtype_atol(w, q.dtype) + e for w, e in zip(want, extra)]
    return want, same, atols, lse64


def check_against_float64(backend, q, k, v, scale=None, deterministic=None):
    """Output and gradients within 2x PyTorch's own error in this dtype (+ atol).

    PyTorch's own error: its math path for our kernels; for the ``sdpa`` backend, torch's SDPA called
    directly (what is checked there is our plumbing: dispatch, scale, layouts, not torch's kernels).
    """
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=torch.float32).to(q.dtype)
    got = run_backend(backend, q, k, v, dout, scale, deterministic)
    want, torch_same, atols, _ = float64_expectation(q, k, v, dout, scale, sdpa=backend == "sdpa")
    for name, g, w, t, atol in zip(("out", "dq", "dk", "dv"), got, want, torch_same, atols):
        assert g.shape == w.shape and g.dtype == q.dtype, name
        assert_close_to_ref(g.cpu(), w, t.cpu(), atol=atol, name=f"{backend}: {name}")


# ---- the parameter matrix ---------------------------------------------------------------------------------

GPU_N = (1, 37, 50, 113, 197, 257)
GPU_D = (64, 80, 128)
# (B, H, Nq, Nkv, D) with Nq != Nkv: local-to-global crops and the degenerate one-token sides.
CROSS = ((2, 3, 197, 50, 64), (2, 3, 37, 257, 80), (1, 2, 257, 113, 128), (2, 2, 1, 257, 64), (2, 2, 257, 1, 64))
# The interpreter is slow: a few small shapes that still cover one- and multi-tile passes with partial tiles,
# the padded head dims (24 -> 32, 80 -> 128) and Nq != Nkv.
INTERP = ((2, 3, 1, 1, 16), (1, 2, 37, 37, 64), (2, 2, 70, 70, 24), (1, 2, 50, 37, 80), (1, 2, 17, 70, 32))


def _id(shape):
    b, h, nq, nkv, d = shape
    return f"B{b}H{h}-{nq}x{nkv}-D{d}"


# Shapes that also run as slices of a fused projection (the ViT's layout).
FUSED = {(2, 3, 50, 50, 128), (2, 3, 257, 257, 128), (2, 3, 197, 197, 80), CROSS[0], INTERP[2], INTERP[3]}


def matrix():
    """(backend, device, dtype, shape, layout, deterministic) cases that can run here."""
    full = [(2, 3, n, n, d) for n in GPU_N for d in GPU_D] + list(CROSS)
    some = full[:18:4] + list(CROSS)  # every N, rotating through the head dims
    out = []

    def add(backend, device, dtype, shapes, marks, det_values=(None,)):
        for shape in shapes:
            for layout in ("contiguous", "fused"):
                if layout == "fused" and shape not in FUSED:
                    continue
                for det in det_values:
                    name = f"{backend}-{device}-{str(dtype)[6:]}-{_id(shape)}-{layout}" + (
                        "" if det is None else ("-det" if det else "-atomic"))
                    out.append(pytest.param(backend, device, dtype, shape, layout, det, id=name, marks=marks))

    for dt in (F32, BF16, F16):
        add("sdpa", "cpu", dt, full, [])
        add("reference", "cpu", dt, some, [])
    if TRITON_DEV == "cpu":
        add("triton", "cpu", F32, INTERP, [pytest.mark.triton], (False, True))
        add("triton", "cpu", F16, INTERP[1:4], [pytest.mark.triton], (False,))
    # On a GPU every Triton case runs (both dtypes, both backward schemes in bf16); SDPA (the default GPU path)
    # runs the full matrix in bf16 and subsets elsewhere; the reference is the CPU-tested code on another device.
    cuda = [pytest.mark.cuda]
    for dt in (BF16, F16):
        add("triton", "cuda", dt, full, cuda + [pytest.mark.triton], (False,))
    add("triton", "cuda", BF16, full, cuda + [pytest.mark.triton], (True,))
    add("sdpa", "cuda", BF16, full, cuda)
    add("sdpa", "cuda", F16, some, cuda)
    add("sdpa", "cuda", F32, some, cuda)
    add("reference", "cuda", BF16, some, cuda)
    return out


@pytest.mark.parametrize("backend,device,dtype,shape,layout,det", matrix())
def test_matches_float64(backend, device, dtype, shape, layout, det, poison_empty):
    q, k, v = make_qkv(*shape, dtype, device, layout)
    check_against_float64(backend, q, k, v, deterministic=det)


def _triton_dtypes():
    return (F32, F16) if TRITON_DEV == "cpu" else (BF16, F16)


@pytest.mark.triton
@pytest.mark.parametrize("spread", [4.0, 12.0])
def test_triton_peaked_scores(spread, poison_empty):
    # Scores of std 4..12 (max ~40): exp overflows without the running-max shift.
    dtype = _triton_dtypes()[0]
    q, k, v = make_qkv(1, 2, 50, 70, 64, dtype, TRITON_DEV, spread=spread)
    check_against_float64("triton", q, k, v, deterministic=False)
    check_against_float64("triton", q, k, v, scale=-0.3, deterministic=True)  # any finite scale


@pytest.mark.triton
def test_triton_all_scores_very_negative(poison_empty):
    # Every score ~ -100, so lse ~ -96: a padded key (score 0 if unmasked) would get p = exp(96) = inf in
    # float32, and inf * 0 = NaN would reach dq through the atomics. Nkv = 45 leaves padded keys in a tile.
    dtype = _triton_dtypes()[1]
    d = 64
    c = (100 / math.sqrt(d)) ** 0.5  # scale * c^2 * d = 100
    q = torch.full((1, 2, 33, d), c) + 0.05 * torch.randn(1, 2, 33, d)
    k = torch.full((1, 2, 45, d), -c) + 0.05 * torch.randn(1, 2, 45, d)
    v = torch.randn(1, 2, 45, d)
    q, k, v = (t.to(device=TRITON_DEV, dtype=dtype) for t in (q, k, v))
    for det in (False, True):
        check_against_float64("triton", q, k, v, deterministic=det)


@pytest.mark.triton
@pytest.mark.parametrize("head_dim", [8, 32, 88, 96, 256] if TRITON_DEV == "cuda" else [8, 40, 136])
def test_triton_head_dims(head_dim, poison_empty):
    # On a GPU one dtype per head dim (each is a separate compile; float16 runs in the main matrix).
    n = 70 if TRITON_DEV == "cuda" else 20
    for dtype in _triton_dtypes()[:1] if TRITON_DEV == "cuda" else _triton_dtypes():
        q, k, v = make_qkv(2, 2, n, n + 3, head_dim, dtype, TRITON_DEV)
        check_against_float64("triton", q, k, v, deterministic=False)


@pytest.mark.triton
def test_triton_row_offsets_past_int32(poison_empty):
    """Rows 2^31 elements apart inside one (batch, head) slice, as a fused projection lays out ~100k tokens:
    int32 row offsets would wrap (a segfault under the interpreter, wrong addresses on a GPU)."""
    dtype = _triton_dtypes()[1]
    d, n, row = 16, 3, 2**30 + 64  # row 2 starts 2^31 + 128 elements in
    # q, k, v interleaved in one storage like a fused projection: 4 GiB, of which the CPU commits only the
    # pages touched (so no NaN poisoning of this buffer, which would write all of it).
    torch.utils.deterministic.fill_uninitialized_memory = False
    store = torch.empty((n - 1) * row + 3 * d, dtype=dtype, device=TRITON_DEV)
    torch.utils.deterministic.fill_uninitialized_memory = True
    q, k, v = (store[i * d:].as_strided((1, 1, n, d), (0, 0, row, 1)) for i in range(3))
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape))
    for det in (False, True):
        check_against_float64("triton", q, k, v, deterministic=det)


@pytest.mark.triton
def test_triton_int32_fallback_copies(monkeypatch, poison_empty):
    """The path the test above takes for inputs (copies), and for an output whose (B, N, H, D) rows pass 2^31
    (written as (B, H, N, D), then copied into the usual layout), on small shapes."""
    from seer_kernels.triton import attention as tri
    monkeypatch.setattr(tri, "_rows_fit_int32", lambda t: False)
    dtype = _triton_dtypes()[0]
    q, k, v = make_qkv(2, 3, 37, 50, 24, dtype, TRITON_DEV, layout="fused")
    out, _ = tri.attention_fwd(q, k, v, 0.2)
    assert out.transpose(1, 2).is_contiguous()  # the layout the fake kernel promises
    check_against_float64("triton", q, k, v, deterministic=False)


@pytest.mark.triton
def test_triton_copies_rows_that_do_not_start_16_byte_aligned(poison_empty):
    """The kernels tell the compiler that every row starts 16 bytes aligned (without it, 88-wide heads loaded
    and stored 2 bytes at a time): inputs whose rows do not (a row stride of 44 half-precision elements, a
    base 2 bytes off) are copied first and give right results; slices of a fused qkv projection at 88-wide
    heads (strides multiples of 8 elements, not of 16) and size-1 dims of any stride run as they are. So are
    inputs whose head dim is not contiguous although their rows start aligned (the kernels index it without
    a stride)."""
    from seer_kernels.triton import attention as tri

    def wide():  # rows 88 bytes apart
        return torch.randn(2, 3, 19, 44, device=TRITON_DEV).to(F16)[..., :40]

    def every_other():  # rows 160 bytes apart, head-dim stride 2
        return torch.randn(2, 3, 19, 80, device=TRITON_DEV).to(F16)[..., ::2]

    shifted = torch.randn(2 * 3 * 19 * 40 + 1, device=TRITON_DEV).to(F16)[1:].view(2, 3, 19, 40)
    for t in (wide(), shifted):
        assert not tri._rows_aligned(t) and tri._rows_aligned(tri._kernel_layout(t))
    fused = make_qkv(2, 3, 19, 19, 88, F16, TRITON_DEV, layout="fused")
    assert all(tri._kernel_layout(t) is t for t in fused) and fused[0].stride(1) == 88
    single = torch.randn(1, 3, 19, 40, device=TRITON_DEV).to(F16).as_strided((1, 3, 19, 40), (7, 760, 40, 1))
    assert tri._rows_aligned(single)
    assert tri._rows_aligned(every_other()) and tri._kernel_layout(every_other()).stride(3) == 1
    for det in (False, True):
        check_against_float64("triton", wide(), shifted, wide(), deterministic=det)
        check_against_float64("triton", *fused, deterministic=det)
        check_against_float64("triton", every_other(), every_other(), every_other(), deterministic=det)


def _tile_classes():
    return (32, 64, 128, 256) if TRITON_DEV == "cpu" else (128,)


# (Nq, Nkv) for the candidate-tile test. With the default tiles, (65, 81) and (81, 65) leave 1 or 17 rows
# after the full tiles: tail tiles of 16 and 32 rows on every axis that has one (test_tail_block checks it).
# On a GPU (compiled layouts, which the interpreter does not exercise): 16-row tails at 197 and 257, 32-row
# ones at 145, and a 64-row tail of the 128-row tiles at 161.
TILE_SHAPES = ((70, 45), (65, 81), (81, 65)) if TRITON_DEV == "cpu" else ((197, 257), (257, 197), (145, 161))


def test_tail_block():
    from seer_kernels.triton import attention as tri
    assert [tri.tail_block(n, 64) for n in (257, 197, 65, 81, 100, 40, 256, 1)] == [16, 16, 16, 32, 64, 64, 64, 16]
    assert [tri.tail_block(n, 32) for n in (257, 50, 37, 17, 32)] == [16, 32, 16, 32, 32]
    assert tri.tail_block(257, 64, split=False) == 64 and tri.tail_block(5, 16) == 16
    # The test shapes above reach a 16- and a 32-row tail on both axes of each kernel's default tile.
    for table in (tri.FWD_TILES, tri.DKDV_TILES, tri.DQ_TILES):
        for cls in (32, 64, 128):
            t = table[cls][0]
            for block in (t.block_m, t.block_n):
                got = {tri.tail_block(n, block) for n in (65, 81)}
                assert got & {16} and (block <= 32 or got & {32}), (t, block, got)
            assert not table[cls][-1].split_tail and tri.Tile(*table[cls][-1].as_list()) == table[cls][-1]


def _record_launches(monkeypatch, tri, names) -> list:
    """Replace the kernels ``names`` of the Triton module by recorders: (name, grid, keyword arguments) of
    each launch, nothing run."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, grid, kw))

    for name in names:
        monkeypatch.setattr(tri, name, Recorder(name))
    return launches


def _interpreter_calls(monkeypatch, method: str) -> list:
    """The arguments of every later call of the Triton interpreter's builder ``method`` (stays empty on a
    GPU, where nothing is interpreted)."""
    calls = []
    if TRITON_DEV == "cpu":
        from triton.runtime import interpreter
        wrapped = getattr(interpreter.InterpreterBuilder, method)
        monkeypatch.setattr(interpreter.InterpreterBuilder, method,
                            lambda self, *a: calls.append(a) or wrapped(self, *a))
    return calls


def _assert_same_as_pointer_path(a, b, dtype, name, exact):
    """A TMA path's result against the pointer path's: the same bits where ``exact``; else within one
    rounding of the dtype (compiled code around the loads may differ; dq's atomics add in any order)."""
    if exact:
        assert torch.equal(a, b), name
    else:
        top = float(b.abs().max())
        assert max_abs_err(a, b) <= 1e-5 * max(1.0, top) + 2 * torch.finfo(dtype).eps * top, name


def test_launchers_pass_the_tail_tiles(monkeypatch):
    """The launchers hand each kernel the tail sizes of its own axes (queries and keys), and the full block
    where a tile does not split: what the kernels then compute is checked by the tests around this one."""
    from seer_kernels.triton import attention as tri
    launches = _record_launches(monkeypatch, tri, ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                                                   "_bwd_delta_kernel"))
    q = torch.zeros(2, 3, 257, 64)
    k = v = torch.zeros(2, 3, 145, 64)
    lse = torch.zeros(2, 3, 257)
    for split in (True, False):
        launches.clear()
        fwd, dkdv, dq = tri.Tile(64, 32, 4, 3, split), tri.Tile(32, 64, 4, 2, split), tri.Tile(64, 16, 4, 3, split)
        tri.attention_fwd(q, k, v, 0.1, fwd)
        tri.attention_bwd(q, q, k, v, q, lse, 0.1, True, dkdv, dq)
        got = {name: (grid, kw["TAIL_M"], kw["TAIL_N"]) for name, grid, kw in launches if "TAIL_M" in kw}
        # 257 = 4 x 64 + 1 = 8 x 32 + 1; 145 = 2 x 64 + 17 = 4 x 32 + 17 = 9 x 16 + 1
        assert got["_fwd_kernel"] == ((5, 3, 2), 16 if split else 64, 32)
        assert got["_bwd_dkdv_kernel"] == ((3, 3, 2), 16 if split else 32, 32 if split else 64)
        assert got["_bwd_dq_kernel"] == ((5, 3, 2), 16 if split else 64, 16)


def test_the_query_tail_folds_into_the_last_full_tiles_program(monkeypatch):
    """Tile.fold_tail: where N_q > BLOCK_M leaves a split tail, the forward launches N_q // BLOCK_M query
    programs (the last also computing the tail) with FOLD_TAIL set; elsewhere (a short sequence, an even
    one, an unsplit tile) it launches as its twin without the flag; so does the dq-from-dS kernel with a
    folding dq tile. Their results: the candidate-tile test (every FWD_TILES entry and stored-dS pair, tails
    of 16 and 32 rows) and the check against the plain tiles below."""
    from seer_kernels.triton import attention as tri
    bwd = _record_launches(monkeypatch, tri, ("_bwd_dkdv_kernel", "_bwd_dq_ds_kernel", "_bwd_delta_kernel"))
    q = torch.zeros(1, 2, 257, 64)
    tri.attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 257), 0.1, True, tri.Tile(32, 64, 4, 2, store_ds=True),
                      tri.Tile(64, 64, 4, 3, fold_tail=True))
    assert [(grid[0], kw["FOLD_TAIL"]) for name, grid, kw in bwd if name == "_bwd_dq_ds_kernel"] == [(4, True)]
    launches = _record_launches(monkeypatch, tri, ("_fwd_kernel",))
    k = v = torch.zeros(1, 2, 40, 64)
    for nq, split, want in ((257, True, (4, True)), (197, True, (3, True)), (37, True, (1, False)),
                            (256, True, (4, False)), (257, False, (5, False)), (65, True, (1, True))):
        launches.clear()
        tile = tri.Tile(64, 32, 4, 3, split, fold_tail=True)
        tri.attention_fwd(torch.zeros(1, 2, nq, 64), k, v, 0.1, tile)
        (_, grid, kw), = launches
        assert (grid[0], kw["FOLD_TAIL"]) == want == (tri.query_programs(tile, nq), tri.fold_active(tile, nq)), nq
    assert tri.Tile(*tri.Tile(64, 64, 4, 3, fold_tail=True).as_list()).fold_tail  # (a table's 9-element list)


@pytest.mark.triton
@pytest.mark.parametrize("nq,nkv", [(81, 65), (257, 37)])
def test_a_folded_tail_gives_the_plain_tiles_results(nq, nkv):
    """The last program's two row blocks against each key tile compute what two programs computed: the same
    bits in the interpreter (the same operations per row), and on a GPU within one rounding (other code)."""
    from seer_kernels.triton import attention as tri
    dtype = _triton_dtypes()[0]
    q, k, v = make_qkv(2, 3, nq, nkv, 64, dtype, TRITON_DEV)
    plain = tri.attention_fwd(q, k, v, 0.125, tri.Tile(64, 32, 4, 3))
    folded = tri.attention_fwd(q, k, v, 0.125, tri.Tile(64, 32, 4, 3, fold_tail=True))
    for a, b, name in zip(folded, plain, ("out", "lse")):
        _assert_same_as_pointer_path(a.float(), b.float(), dtype, name, exact=TRITON_DEV == "cpu")
    # dq from a stored dS (the dq tile of a stored-dS pair): the same with its tail folded in
    out, lse = plain
    do = torch.randn_like(out)
    dkdv = tri.Tile(32, 64, 4, 2, store_ds=True)
    want = tri.attention_bwd(do, q, k, v, out, lse, 0.125, True, dkdv, tri.Tile(64, 64, 4, 3))
    got = tri.attention_bwd(do, q, k, v, out, lse, 0.125, True, dkdv, tri.Tile(64, 64, 4, 3, fold_tail=True))
    for a, b, name in zip(got, want, ("dq", "dk", "dv")):
        _assert_same_as_pointer_path(a.float(), b.float(), dtype, name, exact=TRITON_DEV == "cpu")


def test_tables_written_before_the_split_keep_their_tiles():
    """4-element tile lists (recorded before tail tiles existed) run as measured, without the split."""
    from seer_kernels.ops import attention as ops
    assert ops._tile({"tiles": {"fwd": [64, 32, 4, 3]}}, "fwd").split_tail is False
    assert ops._tile({"tiles": {"fwd": [64, 32, 4, 3, 1]}}, "fwd").split_tail is True
    assert ops._tile({"tiles": {"fwd": [64, 32, 4, 3, 0]}}, "fwd").split_tail is False
    assert ops._tile({"tiles": {}}, "fwd") is None and ops._tile(None, "fwd") is None


@pytest.mark.triton
# Six cases per shape (each part's candidates in two halves), so that the compiles spread over the GPU
# check's workers: one case per part compiled 9-13 variants in a row, 60-70 s each on the H100 (7fb6189),
# and the test phase outran its cap.
@pytest.mark.parametrize("half", [0, 1])
@pytest.mark.parametrize("part", ["fwd", "atomic", "det"])
@pytest.mark.parametrize("cls", _tile_classes())
@pytest.mark.parametrize("nq,nkv", TILE_SHAPES)
def test_triton_every_candidate_tile(cls, nq, nkv, part, half, poison_empty):
    """Each tile of the candidate sets (what the benchmark may record as best) gives the right answer, with
    and without the split tail tiles and the TMA features: the forward tiles, then the backward ones of
    each scheme (every other candidate per case: ``half`` picks which)."""
    from seer_kernels.triton import attention as tri
    dtype = _triton_dtypes()[0]
    d = {32: 24, 64: 48, 128: 80, 256: 256}[cls] if TRITON_DEV == "cpu" else 128
    q, k, v = make_qkv(1, 2, nq, nkv, d, dtype, TRITON_DEV)
    scale = d ** -0.5
    do = torch.randn(q.shape[:-1] + (v.shape[-1],)).to(device=q.device, dtype=dtype)
    want, same, atols, lse64 = float64_expectation(q, k, v, do, scale)

    def check(name, got, i):
        assert_close_to_ref(got.cpu(), want[i], same[i].cpu(), atol=atols[i], name=name)

    fwd_tiles = tri.FWD_TILES[cls][half::2]
    bwd_tiles = [c for c in tri.bwd_candidates(cls) if c[0] == (part == "det")][half::2]
    assert fwd_tiles and bwd_tiles, "every case has candidates to check"
    if part == "fwd":
        for tile in fwd_tiles:
            out, lse = tri.attention_fwd(q, k, v, scale, tile)
            check(f"out {tile}", out, 0)
            assert max_abs_err(lse.cpu(), lse64) <= 1e-3, tile
        return
    out, lse = tri.attention_fwd(q, k, v, scale)
    for det, dkdv, dq in bwd_tiles:
        got = tri.attention_bwd(do, q, k, v, out, lse, scale, det, dkdv, dq)
        for i, (name, g) in enumerate(zip(("dq", "dk", "dv"), got)):
            check(f"{name} dkdv={dkdv} dq={dq} det={det}", g, i + 1)


def test_tile_classes_by_head_dim():
    from seer_kernels.triton import attention as tri
    assert [tri.tile_class(d) for d in (8, 16, 24, 32, 40, 64, 80, 88, 128, 136, 256)] == \
        [32, 32, 32, 32, 64, 64, 128, 128, 128, 256, 256]
    for table in (tri.FWD_TILES, tri.DKDV_TILES, tri.DQ_TILES):
        assert set(table) == {32, 64, 128, 256}


def test_backward_candidates_cover_every_tile():
    from seer_kernels.triton import attention as tri
    for cls in (32, 64, 128, 256):
        got = tri.bwd_candidates(cls)
        ds = tri.DS_TILES[cls]
        assert {t for _, t, _ in got} == set(tri.DKDV_TILES[cls]) | {t for t, _ in ds}
        assert {t for det, _, t in got if det} == set(tri.DQ_TILES[cls]) | {t for _, t in ds}
        assert all(t.store_ds for t, _ in ds) and not any(t.store_ds for t in tri.DKDV_TILES[cls])
        assert all(det for det, t, _ in got if t.store_ds)
        assert any(t.store_ds and t.dq_tma for t, _ in ds) == (cls != 256)
        assert any(t.dq_tma for _, t, _ in got) == (cls != 256)  # no benchmark shape has 256-wide heads


def _assert_tma_on_hopper(t):
    """On a GPU with a TMA unit both features must really be on (not silently falling back)."""
    from seer_kernels.triton import attention as tri
    if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9:
        assert tri.tma_reduce_ok(t) and tri.tma_load_ok(t), "sm_90+: the TMA paths must run"


@pytest.mark.triton
@pytest.mark.parametrize("nq,nkv", ((70, 45), (65, 81), (60, 33)) if TRITON_DEV == "cpu" else
                         ((257, 257), (197, 145), (60, 33)))
def test_triton_dq_by_tma_reduction(nq, nkv, monkeypatch, poison_empty):
    """``Tile.dq_tma``: dq's shares added by TMA reductions give dq within float32 rounding of the pointer
    atomics (the same bits on the CPU, where the programs run one after another), and on the CPU (the
    interpreter, with the emulated reduction) the reduction really runs: once per full query tile per key
    tile, and for the partial last one too where its tail tile has the full 32 rows (60 = 32 + 28), through
    the pointer atomics where it is smaller (70 = 2 x 32 + 6, 65 = 2 x 32 + 1)."""
    from seer_kernels.triton import attention as tri
    dtype = _triton_dtypes()[0]
    q, k, v = make_qkv(2, 3, nq, nkv, 80, dtype, TRITON_DEV, layout="fused")
    _assert_tma_on_hopper(q)
    do = torch.randn(q.shape, device=q.device).to(dtype)
    out, lse = tri.attention_fwd(q, k, v, 0.1)
    tile, plain = tri.Tile(32, 64, 4, 2, dq_tma=True), tri.Tile(32, 64, 4, 2)
    calls = _interpreter_calls(monkeypatch, "create_descriptor_reduce")
    want = tri.attention_bwd(do, q, k, v, out, lse, 0.1, False, plain)
    got = tri.attention_bwd(do, q, k, v, out, lse, 0.1, False, tile)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _assert_same_as_pointer_path(a, b, dtype, name, exact=TRITON_DEV == "cpu")
    if TRITON_DEV == "cpu":
        assert tri.tma_reduce_ok(q)
        query_tiles = nq // 32 + (nq % 32 != 0 and tri.tail_block(nq, 32) == 32)
        assert len(calls) == 2 * 3 * math.ceil(nkv / 64) * query_tiles


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["fused", "contiguous", "nan-padded"])
def test_triton_loads_through_tma_descriptors(layout, monkeypatch, poison_empty):
    """``Tile.tma_load``: the loop loads of full tiles go through (B, H, N, D) descriptors, slices of a fused
    qkv projection included, and give the same results as the pointer loads; the columns past D = 80 in the
    128-wide boxes read as 0, not as the NaN stored next to each row ("nan-padded": slices [..., :80] of
    128-wide buffers). On the CPU (the interpreter loads through descriptors itself) they really run: K and
    V per full key tile of each forward and dq program, Q and dO per full query tile of each dkdv program."""
    from seer_kernels.triton import attention as tri
    dtype = _triton_dtypes()[0]
    nq, nkv = (70, 45) if TRITON_DEV == "cpu" else (257, 197)
    if layout == "nan-padded":
        q, k, v, do = (torch.full((2, 3, n, 128), float("nan"), device=TRITON_DEV, dtype=dtype)
                       for n in (nq, nkv, nkv, nq))
        for t in (q, k, v, do):
            t[..., :80] = torch.randn(t.shape[:-1] + (80,), device=t.device).to(dtype)
        q, k, v, do = (t[..., :80] for t in (q, k, v, do))
    else:
        q, k, v = make_qkv(2, 3, nq, nkv, 80, dtype, TRITON_DEV, layout=layout)
        do = torch.randn(q.shape, device=q.device).to(dtype)
    _assert_tma_on_hopper(q)
    assert tri._tma_loads(tri.Tile(64, 32, tma_load=True), 32, K_DESC=k, V_DESC=v)["TMA_LOAD"] == \
        tri.tma_load_ok(q)
    fwd, dkdv, dq = tri.Tile(64, 32, 4, 3), tri.Tile(32, 64, 4, 2), tri.Tile(64, 32, 4, 3)
    loads = _interpreter_calls(monkeypatch, "create_descriptor_load")
    want = tri.attention_fwd(q, k, v, 0.1, fwd)
    got = tri.attention_fwd(q, k, v, 0.1, tri.Tile(64, 32, 4, 3, tma_load=True))
    n_fwd = len(loads)

    def same(a, b, name):  # the same bits on the CPU, but for dq's atomics (added in another order)
        _assert_same_as_pointer_path(a, b, dtype, name, exact=TRITON_DEV == "cpu" and name != "dq atomic")

    for name, a, b in zip(("out", "lse"), got, want):
        same(a, b, name)
    assert torch.isfinite(got[0]).all()
    out, lse = want
    for det in (True, False):
        want = tri.attention_bwd(do, q, k, v, out, lse, 0.1, det, dkdv, dq)
        got = tri.attention_bwd(do, q, k, v, out, lse, 0.1, det, tri.Tile(32, 64, 4, 2, tma_load=True),
                                tri.Tile(64, 32, 4, 3, tma_load=True))
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            same(a, b, name if det else f"{name} atomic")
    if TRITON_DEV == "cpu":
        programs, heads = math.ceil(nq / 64), 2 * 3
        assert n_fwd == heads * programs * (nkv // 32) * 2  # K and V of each full 32-key tile
        per_dkdv = heads * math.ceil(nkv / 64) * (nq // 32) * 2  # Q and dO of each full 32-query tile
        assert len(loads) == n_fwd * 2 + per_dkdv * 2  # fwd, dq (det), dkdv x 2 (det, atomic)


@pytest.mark.skipif(TRITON_DEV is None, reason="the Triton backend needs triton importable")
def test_environment_turns_the_tma_features_off(monkeypatch):
    """SEER_KERNELS_TMA=0: every tile loads by pointers and adds dq with pointer atomics (the escape hatch
    for a Triton or driver whose TMA path misbehaves; bench/gpu_check.sh sets it when the TMA tests fail)."""
    from seer_kernels.triton import attention as tri
    if tri._TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    x = torch.zeros(2, 3, 40, 64, dtype=torch.float16, device=TRITON_DEV)
    tile = tri.Tile(32, 64, 4, 2, dq_tma=True, tma_load=True)
    monkeypatch.setenv("SEER_KERNELS_TMA", "0")
    assert not tri.tma_load_ok(x) and not tri.tma_reduce_ok(x)
    assert tri._tma_loads(tile, 32, Q_DESC=x, DO_DESC=x) == dict(Q_DESC=None, DO_DESC=None, TMA_LOAD=False)
    monkeypatch.delenv("SEER_KERNELS_TMA")
    if TRITON_DEV == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert tri.tma_load_ok(x) and tri.tma_reduce_ok(x)


def test_summary_finds_failed_tests_by_name(tmp_path):
    """bench/gpu_check.sh turns the TMA features off for the benchmarks when a TMA test failed."""
    from bench import summary
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite><testcase name="test_triton_dq_by_tma_reduction[60-33]">'
                   '<failure message="x"/></testcase><testcase name="test_triton_every_candidate_tile[a]"/>'
                   '<testcase name="test_other"><error message="y"/></testcase>'
                   '<testcase name="test_log_softmax_rows"><failure message="z"/></testcase>'
                   '</testsuite></testsuites>')
    assert summary.failed(str(xml), "tma", "candidate_tile") == ["test_triton_dq_by_tma_reduction[60-33]"]
    assert summary.failed(str(xml), "candidate_tile") == []


def test_row_descriptor_needs_16_byte_strides():
    """TMA addresses a tensor only with a 16-byte aligned base and batch/head/row strides: otherwise the
    launcher loads by pointers (``_row_descriptor`` says None)."""
    from seer_kernels.triton import attention as tri
    if tri._TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    x = torch.zeros(2, 3, 40, 64, dtype=torch.float16)
    d = tri._row_descriptor(x, 32)
    assert d.shape == [2, 3, 40, 64] and d.strides == [7680, 2560, 64, 1] and d.block_shape == [1, 1, 32, 64]
    qkv = torch.zeros(2, 40, 3, 3, 80, dtype=torch.float16).permute(2, 0, 3, 1, 4)
    assert tri._row_descriptor(qkv[1], 64).strides == [40 * 3 * 3 * 80, 80, 3 * 3 * 80, 1]
    assert tri._row_descriptor(qkv[1], 64).block_shape == [1, 1, 64, 128]
    assert tri._row_descriptor(torch.zeros(2 * 3 * 40 * 64 + 1, dtype=torch.float16)[1:].view(2, 3, 40, 64), 32) is None
    assert tri._row_descriptor(torch.zeros(2, 3, 40, 68, dtype=torch.float16)[..., :64], 32) is None  # 136-byte rows
    one = torch.zeros(1, 3, 40, 64, dtype=torch.float16).as_strided((1, 3, 40, 64), (5, 2560, 64, 1))
    assert tri._row_descriptor(one, 32).strides[0] == 8  # batch 1: its stride is never used


def test_dq_tma_falls_back_where_there_is_no_tma(monkeypatch):
    """A ``dq_tma`` tile (a selector table may hold one) runs with pointer atomics where the TMA reduction is
    not available: GPUs before sm_90, Triton without tensor descriptors, the interpreter without emulation;
    with ``store_ds`` it stores dS by pointers where TMA is not available."""
    from seer_kernels.triton import attention as tri
    launches = _record_launches(monkeypatch, tri, ("_bwd_dkdv_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel"))
    q = torch.zeros(2, 3, 40, 64)
    lse = torch.zeros(2, 3, 40)
    for ok in (False, True):
        launches.clear()
        monkeypatch.setattr(tri, "tma_reduce_ok", lambda t, ok=ok: ok)
        tri.attention_bwd(q, q, q, q, q, lse, 0.1, False, tri.Tile(32, 64, 4, 2, dq_tma=True))
        tri.attention_bwd(q, q, q, q, q, lse, 0.1, True, tri.Tile(32, 64, 4, 2, dq_tma=True))  # no atomics
        tri.attention_bwd(q, q, q, q, q, lse, 0.1, False, tri.Tile(32, 64, 4, 2))
        dkdv = [kw for name, _, kw in launches if name == "_bwd_dkdv_kernel"]
        assert [kw["DQ_TMA"] for kw in dkdv] == [ok, False, False]
        assert (dkdv[0]["DQ_DESC"] is not None) == ok and dkdv[1]["DQ_DESC"] is None
        if ok:
            assert dkdv[0]["DQ_DESC"].block_shape == [1, 32, 64] and dkdv[0]["DQ_DESC"].shape == [6, 40, 64]
    # The stored-dS scheme's TMA store (dq_tma on a store_ds tile): a (B * H, Nkv, ds_cols) descriptor of the
    # dS^T buffer with (1, 64 keys, 32 queries) boxes where the unit stores, pointer stores elsewhere.
    _record_launches(monkeypatch, tri, ("_bwd_dq_ds_kernel",))  # not run
    for ok in (False, True):
        launches.clear()
        monkeypatch.setattr(tri, "tma_load_ok", lambda t, ok=ok: ok)
        tri.attention_bwd(q, q, q, q, q, lse, 0.1, True, tri.Tile(32, 64, 4, 2, dq_tma=True, store_ds=True),
                          tri.Tile(64, 64, 4, 3))
        kw = next(kw for name, _, kw in launches if name == "_bwd_dkdv_kernel")
        assert kw["STORE_DS"] and kw["DS_TMA"] == ok and not kw["DQ_TMA"] and kw["DQ_DESC"] is None
        assert (kw["DS_DESC"].shape, kw["DS_DESC"].block_shape) == ([6, 40, 48], [1, 64, 32]) if ok else \
            kw["DS_DESC"] is None


@pytest.mark.triton
@pytest.mark.parametrize("nq,nkv", ((70, 45), (81, 65), (60, 33)) if TRITON_DEV == "cpu" else
                         ((257, 257), (197, 145), (60, 33)))
def test_triton_dq_from_stored_ds_by_pointers_and_tma(nq, nkv, monkeypatch, poison_empty):
    """``Tile.store_ds``: dq from the stored dS^T agrees with the dq pass within rounding (the sums run in
    another order), storing dS by TMA (``dq_tma`` too) gives what storing it by pointers gives, and the
    same bits run after run (no atomics: the scheme is deterministic). On the CPU the TMA stores really
    run: one per key tile with the full 64 rows (45 and 33 keys: the masked 64-row tile, whose rows past N
    the unit drops) and query tile with the full 32 (81 = 2 x 32 + 17 and 60 = 32 + 28 end in one); the
    smaller tail tiles store by pointers."""
    from seer_kernels.triton import attention as tri
    dtype = _triton_dtypes()[0]
    q, k, v = make_qkv(2, 3, nq, nkv, 80, dtype, TRITON_DEV, layout="fused")
    _assert_tma_on_hopper(q)
    do = torch.randn(q.shape, device=q.device).to(dtype)
    out, lse = tri.attention_fwd(q, k, v, 0.1)
    dq_tile = tri.Tile(64, 64, 4, 3)
    assert tri.ds_fits(nq, nkv, 80)
    dq_ds_launches = []
    kernel = tri._bwd_dq_ds_kernel
    monkeypatch.setattr(tri, "_bwd_dq_ds_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: dq_ds_launches.append(grid) or kernel[grid]})())
    stores = _interpreter_calls(monkeypatch, "create_descriptor_store")
    want = tri.attention_bwd(do, q, k, v, out, lse, 0.1, True, tri.Tile(32, 64, 4, 2), tri.Tile(64, 32, 4, 3))
    by_pointers = tri.attention_bwd(do, q, k, v, out, lse, 0.1, True, tri.Tile(32, 64, 4, 2, store_ds=True), dq_tile)
    assert not stores
    by_tma = tri.attention_bwd(do, q, k, v, out, lse, 0.1, True,
                               tri.Tile(32, 64, 4, 2, store_ds=True, dq_tma=True), dq_tile)
    n_stores = len(stores)
    assert len(dq_ds_launches) == 2  # both ran the stored-dS scheme (not the dq pass)
    again = tri.attention_bwd(do, q, k, v, out, lse, 0.1, True,
                              tri.Tile(32, 64, 4, 2, store_ds=True, dq_tma=True), dq_tile)
    for name, a, b, c, d in zip(("dq", "dk", "dv"), by_pointers, by_tma, want, again):
        assert torch.equal(b, d), name  # no atomics: the same bits run after run
        # the same values stored, the same dq kernel: the same bits on the CPU (compiled, the code around
        # the store differs: one rounding of the dtype)
        _assert_same_as_pointer_path(b, a, dtype, name, exact=TRITON_DEV == "cpu")
        _assert_same_as_pointer_path(a, c, dtype, name, exact=TRITON_DEV == "cpu" and name != "dq")
    if TRITON_DEV == "cpu":
        key_tiles = nkv // 64 + (nkv % 64 != 0 and tri.tail_block(nkv, 64) == 64)
        query_tiles = nq // 32 + (nq % 32 != 0 and tri.tail_block(nq, 32) == 32)
        assert n_stores == 2 * 3 * key_tiles * query_tiles > 0


def test_stored_ds_runs_where_asked_and_small(monkeypatch):
    """The stored-dS scheme runs for a ``store_ds`` dkdv tile in deterministic mode only (delta first, with
    no float32 buffer to zero; the dq-from-dS kernel last, no dq pass), and only while ``ds_fits``: a larger
    dS buffer (here: a zero ratio) runs the dq pass; the atomic scheme ignores the flag."""
    from seer_kernels.triton import attention as tri
    names = ("_bwd_dkdv_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_dq_ds_kernel")
    launches = _record_launches(monkeypatch, tri, names)
    q = torch.zeros(2, 3, 40, 64)
    lse = torch.zeros(2, 3, 40)
    tile = tri.Tile(32, 64, 4, 2, store_ds=True)

    def run(det):
        launches.clear()
        tri.attention_bwd(q, q, q, q, q, lse, 0.1, det, tile, tri.Tile(64, 64, 4, 3))
        return [(name, kw.get("STORE_DS", kw.get("ZERO_DQ"))) for name, _, kw in launches]

    assert run(True) == [("_bwd_delta_kernel", False), ("_bwd_dkdv_kernel", True), ("_bwd_dq_ds_kernel", None)]
    assert run(False) == [("_bwd_delta_kernel", True), ("_bwd_dkdv_kernel", False)]
    monkeypatch.setattr(tri, "DS_MAX_RATIO", 0)
    assert run(True) == [("_bwd_dq_kernel", None), ("_bwd_dkdv_kernel", False)]
    # the dq pass takes its own first candidate, not the stored-dS pair's dq tile (64 x 64)
    assert (launches[0][2]["BLOCK_M"], launches[0][2]["BLOCK_N"]) == (64, 32)
    monkeypatch.undo()
    # The buffer bound: ViT lengths fit, long sequences do not (self-attention: N = 1536 at D = 128, 768 at 64).
    assert tri.ds_fits(257, 257, 128) and tri.ds_fits(37, 37, 64) and tri.ds_fits(1, 1, 8)
    assert tri.ds_fits(1536, 1536, 128) and not tri.ds_fits(1537, 1537, 128) and not tri.ds_fits(4096, 4096, 256)
    assert tri.ds_fits(768, 768, 64) and not tri.ds_fits(769, 769, 64)
    assert not tri.ds_fits(16, 2**28, 256)  # a ratio that holds, rows past int32 offsets
    assert tri.ds_cols(257) == 272 and tri.ds_cols(16) == 16


@pytest.mark.triton
def test_triton_deterministic_mode_launches_no_atomics(monkeypatch):
    """deterministic=True (or torch's deterministic mode) reaches the kernels: the backward launches no dq
    atomics. (The interpreter runs atomics in order, so on the CPU the bits repeat either way: an op that
    dropped the flag passed the test below here.)"""
    from seer_kernels.triton import attention as tri
    monkeypatch.delenv("SEER_KERNELS_DETERMINISTIC", raising=False)
    atomic = []
    kernel = tri._bwd_dkdv_kernel
    monkeypatch.setattr(tri, "_bwd_dkdv_kernel", type("Seen", (), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: atomic.append(kw["ATOMIC_DQ"]) or kernel[grid](*a, **kw))})())
    q, k, v = make_qkv(1, 2, 20, 20, 16, _triton_dtypes()[0], TRITON_DEV)
    dout = torch.randn(q.shape, device=q.device).to(q.dtype)
    for det, want in ((True, False), (False, True), (None, True)):
        atomic.clear()
        run_backend("triton", q, k, v, dout, deterministic=det)
        assert atomic == [want], det
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        atomic.clear()
        run_backend("triton", q, k, v, dout)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert atomic == [False]


@pytest.mark.triton
def test_triton_deterministic_mode_repeats_bits():
    dtype = _triton_dtypes()[0]
    q, k, v = make_qkv(2, 3, 113 if TRITON_DEV == "cuda" else 37, 70, 64, dtype, TRITON_DEV, layout="fused")
    dout = torch.randn(q.shape, device=q.device).to(dtype)
    first = run_backend("triton", q, k, v, dout, deterministic=True)
    for _ in range(3):
        again = run_backend("triton", q, k, v, dout, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.slow
def test_default_kernels_compile_for_hopper_within_the_spill_budget(sm90_compile):
    """Without a GPU: the default tiles and the first with each Hopper feature (tma_load; dq_tma: TMA
    reductions at 257, and in the tail tile too at 145, whose 17 leftover rows take a full 32-row tile; and
    the first forward tile that folds the query tail into its last program)
    compiled for sm_90. Catches what only a GPU run would otherwise show: compile errors, shared memory
    beyond the H100's 227 KB, register spills beyond the budget of bench.attention_compile (64 bytes: the
    fastest dkdv tile measured spills 12-36 with atomic dq, depending on the Triton, the head dim and the tail
    tile; real register pressure spills hundreds), the slower exp lowering. python -m bench.attention_compile
    checks every candidate tile."""
    # N = 257 leaves 16-row tail tiles, N = 145 32-row ones (the largest split tails of the 64-row tiles).
    # D = 88: strides that Triton does not know to be multiples of 16 (the kernels' own hint must keep every
    # main loop's loads 16 bytes wide: NARROW fails a variant otherwise).
    from tests.together import together

    def compile_at(n):
        return lambda: sm90_compile("bench.attention_compile", "--head-dims", "88", "128", "--dtypes", "bf16",
                                    "--defaults-only", "--seq-len", n)

    # two processes at once: 40 s one after the other on a 2-core CI machine
    outs = dict(zip(("257", "145"), together(compile_at("257"), compile_at("145"))))
    for n, out in outs.items():
        assert "26 variants, 0 failures" in out and "dkdv+tma" in out and "dkdv+ds" in out, (n, out)
        tiles = [json.loads(line[line.index("["):line.index("]") + 1]) for line in out.splitlines() if "[" in line]
        assert sum(t[6] for t in tiles) == 8, out  # tma_load: fwd, dkdv x 2, dq
        assert sum(t[8] for t in tiles) == 2, out  # fold_tail: the first forward candidate at D = 88 and 128
        assert sum(t[7] for t in tiles) == 2, out  # store_ds: the first candidate (dS by TMA) at D = 88 and 128
        # The "loop" column (SASS per main-loop iteration) was read from each cubin: every kernel but delta
        # has a main loop of at least its matmuls.
        rows = [line.split() for line in out.splitlines()
                if line.split()[:1] in (["fwd"], ["dkdv"], ["dq"], ["dkdv+ds"], ["dq-ds"])]
        assert rows and all(int(r[-2]) > 50 for r in rows), out


def test_compile_report_counts_the_main_loop(tmp_path, monkeypatch):
    """The ``loop`` column counts the largest wgmma loop, even where a smaller one also issues mma (the dq
    share of the atomic dkdv) or a larger mma-only one exists (a tail tile's copy), and skips the
    unconditional branches back from out-of-line wait loops."""
    pytest.importorskip("triton")
    from bench import triton_compile

    def op(i, text):
        return f"        /*{i:04x}*/                   {text} ;"

    sass = "\n".join([
        ".L_x_1:", *(op(i, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24") if i == 0 else op(i, "FFMA R1, R2, R3, R4")
                     for i in range(6)), "        /*0060*/               @P0 BRA `(.L_x_1) ;",
        ".L_x_2:", op(7, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"), op(8, "HMMA.16816.F32.BF16 R4, R8, R12, R4"),
        "        /*0090*/               @P0 BRA `(.L_x_2) ;",
        ".L_x_3:", *(op(10 + i, "HMMA.16816.F32.BF16 R4, R8, R12, R4") for i in range(20)),
        "        /*0200*/               @P1 BRA `(.L_x_3) ;",
        "        /*0210*/                   BRA `(.L_x_1) ;"])
    fake = tmp_path / "nvdisasm"
    fake.write_text("#!/bin/sh\ncat " + str(tmp_path / "sass.txt") + "\n")
    fake.chmod(0o755)
    (tmp_path / "sass.txt").write_text(sass + "\n")
    monkeypatch.setattr(triton_compile, "_bundled", lambda tool: str(fake))
    assert triton_compile.largest_loop(b"cubin") == 7  # .L_x_1: 6 instructions and its branch


def test_compile_report_fails_a_variant_with_narrow_loads_in_its_main_loop(tmp_path, monkeypatch, capsys):
    """bench.attention_compile fails a kernel whose main loop loads or stores global memory 2 bytes at a time
    (what 88-wide heads compiled to before the kernels told the compiler their rows' alignment); such
    accesses outside the main loop (a masked tail) do not count."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from bench import triton_compile

    def sass(loop_load):
        return "\n".join([
            "        /*0000*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;",
            ".L_x_1:", "        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;",
            f"        /*0020*/                   {loop_load} R8, desc[UR4][R2.64] ;",
            "        /*0030*/                   STG.E.128 desc[UR4][R6.64], R12 ;",
            "        /*0040*/               @P0 BRA `(.L_x_1) ;"]) + "\n"

    tools = {}
    for tool, text in (("ptxas", "#!/bin/sh\necho 'ptxas info    : Used 128 registers, 0 bytes spill stores' >&2\n"),
                       ("nvdisasm", "#!/bin/sh\ncat \"$2\"\n")):
        tools[tool] = tmp_path / tool
        tools[tool].write_text(text)
        tools[tool].chmod(0o755)
    monkeypatch.setattr(triton_compile, "_bundled", lambda tool: str(tools[tool]))

    def compiled(loop_load):
        return lambda: SimpleNamespace(metadata=SimpleNamespace(shared=1024),
                                       asm={"ptx": "", "cubin": sass(loop_load).encode()})

    rows = [("narrow ", compiled("LDG.E.U16")), ("vector ", compiled("LDG.E.128"))]
    assert triton_compile.report(rows, 90, "kernel", narrow_access=True) == 1
    out = capsys.readouterr().out
    assert "NARROW:1" in out.split("vector")[0] and "NARROW" not in out.split("vector")[1], out
    assert triton_compile.narrow_accesses(["LDG.E.U16", "STG.E.U8", "LDG.E.64", "LDGSTS.E.BYPASS.128"]) == 2


def test_compile_report_fails_a_variant_with_a_forbidden_instruction(capsys):
    """bench.attention_compile fails a kernel whose PTX has the non-flush-to-zero ex2 of tl.exp (the softmax
    must stay exp2 of one fma; with tl.exp the forward's and dq's sm_90 main loops had a third more SASS
    instructions per iteration)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from bench import attention_compile, triton_compile

    def compiled(ptx):
        return lambda: SimpleNamespace(metadata=SimpleNamespace(shared=1024), asm={"ptx": ptx})

    rows = [("exp  ", compiled("\tex2.approx.f32 \t%r1, %r0;\n")),
            ("exp2 ", compiled("\tex2.approx.ftz.f32 \t%r1, %r0;\n"))]
    assert triton_compile.report(rows, 90, "kernel", forbidden_ptx=attention_compile.FORBIDDEN_PTX) == 1
    out = capsys.readouterr().out
    assert "exp " in out and "PTX:ex2.approx.f32" in out.split("exp2")[0], out
    assert "PTX:" not in out.split("exp2")[1] and "2 variants, 1 failures" in out, out


def test_compile_report_fails_a_variant_whose_wgmma_ptxas_serialises(tmp_path, monkeypatch, capsys):
    """ptxas serialises a kernel's wgmma (a wait after each: no matmul overlaps anything) and says so only as
    a 'Potential Performance Loss' note of -v; the compile check reads it and fails the variant."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from bench import triton_compile
    note = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
            "due to non wgmma instructions defining accumulator registers of a wgmma between start and end of "
            "the pipeline stage in the function 'k'")
    fake = tmp_path / "ptxas"
    fake.write_text("#!/bin/sh\ngrep -q SERIAL \"$3\" && echo \"" + note + "\" >&2\n"
                    "echo 'ptxas info    : Used 168 registers, 0 bytes spill stores' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(triton_compile, "_bundled", lambda tool: str(fake))
    assert triton_compile.ptxas_usage("// SERIAL", 90) == (168, 0, "C7515")
    assert triton_compile.ptxas_usage("// fine", 90) == (168, 0, "")

    def compiled(ptx):
        return lambda: SimpleNamespace(metadata=SimpleNamespace(shared=1024), asm={"ptx": ptx})

    assert triton_compile.report([("serial", compiled("// SERIAL")), ("fine  ", compiled("// ok"))], 90, "k") == 1
    out = capsys.readouterr().out
    assert "WGMMA-SERIAL:C7515" in out.split("fine")[0] and "SERIAL" not in out.split("fine")[1], out


@pytest.mark.cuda
def test_long_sequence_4096():
    q, k, v = make_qkv(1, 2, 4096, 4096, 64, BF16, "cuda")
    check_against_float64("triton", q, k, v, deterministic=False)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [None, "triton"])
def test_cuda_inputs_from_a_vit_block_under_autocast(backend):
    # The ViT's call: non-contiguous bf16 slices of a fused projection, float32 weights under autocast.
    x = torch.randn(4, 257, 256, device="cuda")
    w = (torch.randn(3 * 256, 256, device="cuda") / 16).requires_grad_()  # a leaf: its .grad must fill
    with torch.autocast("cuda", dtype=BF16), \
            use_backend(backend, op="attention") if backend else contextlib.nullcontext():
        qkv = torch.nn.functional.linear(x, w).view(4, 257, 3, 2, 128).permute(2, 0, 3, 1, 4)
        out = seer_kernels.attention(qkv[0], qkv[1], qkv[2])
        want = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    assert out.dtype == BF16
    out.float().sum().backward()
    assert torch.isfinite(w.grad).all()
    assert max_abs_err(out, want) <= 2e-2


# ---- float64 gradcheck, opcheck, compile ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_gradcheck_float64(backend):
    q, k, v = (torch.randn(1, 2, n, 5, dtype=F64, requires_grad=True) for n in (3, 4, 4))
    with use_backend(backend, op="attention"):
        assert torch.autograd.gradcheck(lambda a, b, c: seer_kernels.attention(a, b, c, scale=0.7), (q, k, v))


def _opcheck_cases():
    out = [pytest.param("reference", "cpu", F32, id="reference-cpu")]
    if TRITON_DEV is not None:
        out.append(pytest.param("triton", TRITON_DEV, _triton_dtypes()[1], id=f"triton-{TRITON_DEV}",
                                marks=pytest.mark.triton))
    out.append(pytest.param("reference", "cuda", BF16, id="reference-cuda", marks=pytest.mark.cuda))
    return out


@pytest.mark.parametrize("backend,device,dtype", _opcheck_cases())
def test_opcheck(backend, device, dtype):
    d = 16 if device == "cpu" else 64  # on a GPU, a head dim the matrix has compiled already
    q, k, v = make_qkv(2, 2, 19, 23, d, dtype, device, layout="fused")
    out, lse = torch.ops.seer.attention_fwd(q, k, v, 0.25, False, backend)
    dout = torch.randn_like(out)
    for det in (False, True):
        torch.library.opcheck(torch.ops.seer.attention_fwd.default, (q, k, v, 0.25, det, backend))
        torch.library.opcheck(torch.ops.seer.attention_bwd.default, (dout, q, k, v, out, lse, 0.25, det, backend))
    # With every argument defaulted the ops choose their backend themselves.
    torch.library.opcheck(torch.ops.seer.attention_fwd.default, (q, k, v, 0.25))


def _op_backends():
    return ["reference"] + ([pytest.param("triton", marks=pytest.mark.triton)] if TRITON_DEV == "cpu" else [])


def _odd_layouts(b, h, nq, nkv, d):
    """q, k, v of odd shapes in layouts a caller may hand over: contiguous, (B, N, H, D) memory, a batch and
    head broadcast by expand (stride 0), a head dim with stride 2."""
    yield "contiguous", (_t(b, h, nq, d), _t(b, h, nkv, d), _t(b, h, nkv, d))
    yield "bnhd", tuple(_t(b, n, h, d).transpose(1, 2) for n in (nq, nkv, nkv))
    yield "expanded", (_t(1, 1, nq, d).expand(b, h, nq, d), _t(1, h, nkv, d).expand(b, h, nkv, d), _t(b, h, nkv, d))
    yield "d-strided", (_t(b, h, nq, 2 * d)[..., ::2], _t(b, h, nkv, d), _t(b, h, nkv, d + 3)[..., 1:d + 1])


@pytest.mark.parametrize("backend", _op_backends())
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8), (2, 1, 3, 2, 8)], ids=["all-ones", "odd"])
def test_ops_fake_kernels_match_on_odd_shapes_and_layouts(backend, shape):
    """The fake kernels give exactly the real outputs' shape, dtype, device and strides (every dim, size-1
    ones included) and storage offset, for N = 1, Nq != Nkv and non-contiguous inputs; no output aliases an
    input and no input changes; opcheck passes with one of q, k, v requiring grad (each in turn)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def meta(t):
        return tuple(t.shape), t.dtype, t.device, t.stride(), t.storage_offset()

    for i, (name, (q, k, v)) in enumerate(_odd_layouts(*shape)):
        before = [t.clone() for t in (q, k, v)]
        out, lse = torch.ops.seer.attention_fwd(q, k, v, 0.3, False, backend)
        dout = _t(*out.shape)
        grads = torch.ops.seer.attention_bwd(dout, q, k, v, out, lse, 0.3, False, backend)
        with FakeTensorMode() as mode:
            fq, fk, fv, fd, fo, fl = (mode.from_tensor(t) for t in (q, k, v, dout, out, lse))
            fake = torch.ops.seer.attention_fwd(fq, fk, fv, 0.3, False, backend)
            fake_grads = torch.ops.seer.attention_bwd(fd, fq, fk, fv, fo, fl, 0.3, False, backend)
        for real_t, fake_t in zip((out, lse, *grads), (*fake, *fake_grads)):
            assert meta(real_t) == meta(fake_t), name
        inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, dout, out, lse)}
        assert not any(g.untyped_storage().data_ptr() in inputs for g in grads), name
        assert all(torch.equal(a, b) for a, b in zip((q, k, v), before)), name
        args = tuple(t.detach().requires_grad_(j == i % 3) for j, t in enumerate((q, k, v)))  # one of them
        torch.library.opcheck(torch.ops.seer.attention_fwd.default, (*args, 0.3, False, backend))
        torch.library.opcheck(torch.ops.seer.attention_bwd.default, (dout, q, k, v, out, lse, 0.3, False, backend))

def _compile_cases():
    out = [pytest.param(None, "cpu", id="auto-cpu"), pytest.param("reference", "cpu", id="reference-cpu")]
    if TRITON_DEV is not None:
        out.append(pytest.param("triton", TRITON_DEV, id=f"triton-{TRITON_DEV}", marks=pytest.mark.triton))
    out.append(pytest.param(None, "cuda", id="auto-cuda", marks=pytest.mark.cuda))
    return out


@pytest.mark.parametrize("backend,device", _compile_cases())
def test_compiles_fullgraph(backend, device):
    """A ViT-style block (fused qkv slices, transpose-reshape back) compiles without graph breaks, any N."""
    torch._dynamo.reset()
    dtype = F32 if device == "cpu" else BF16
    heads, d = 2, 16 if device == "cpu" else 64

    def block(x, w):
        b, n, _ = x.shape
        qkv = (x @ w).view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        return seer_kernels.attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, heads * d)

    compiled = torch.compile(block, fullgraph=True)
    w = torch.randn(heads * d, 3 * heads * d, device=device, dtype=dtype) / math.sqrt(heads * d)
    for n in (17, 50):  # a second length exercises the dynamic-shape recompile
        x = torch.randn(2, n, heads * d, device=device, dtype=dtype, requires_grad=True)
        with use_backend(backend, op="attention") if backend else contextlib.nullcontext():
            y = compiled(x, w)
            (gx,) = torch.autograd.grad(y.float().sum(), x)
            y_eager = block(x, w)
            (gx_eager,) = torch.autograd.grad(y_eager.float().sum(), x)
        tol = 1e-4 if dtype == F32 else 3e-2
        assert max_abs_err(y, y_eager) <= tol and max_abs_err(gx, gx_eager) <= tol * 10


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
def test_compiled_once_for_every_batch_and_length(backend, how):
    """torch.compile(dynamic=True), or mark_dynamic on the batch and sequence dims, traces attention and
    attention_packed (forward and backward) once for all sizes: no recompile per batch or length."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()

    def block(x):
        q, k, v = x.unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return seer_kernels.attention(q, k, v).transpose(1, 2).flatten(2) + seer_kernels.attention_packed(x, 2)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True if how == "dynamic" else None)
    with use_backend(backend, op="attention") if backend else contextlib.nullcontext():
        for b, n in ((2, 5), (3, 7), (5, 12)):
            x = torch.randn(b, n, 48, requires_grad=True)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(x, 1)
            (g,) = torch.autograd.grad(compiled(x).sum(), x)
            (g_eager,) = torch.autograd.grad(block(x).sum(), x)
            assert max_abs_err(g, g_eager) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1

def _eager_calls(monkeypatch) -> list:
    calls: list = []
    apply = ops._EagerAttention.apply
    monkeypatch.setattr(ops._EagerAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_DEV == "cpu" else []))
def test_eager_path_matches_the_ops(backend, monkeypatch):
    """Plain eager calls skip torch.library's wrapper (_EagerAttention) and must give the ops' bits exactly."""
    calls = _eager_calls(monkeypatch)
    q, k, v = make_qkv(2, 3, 37, 50, 64, F32, "cpu", "fused" if backend == "reference" else "contiguous")
    dout = torch.randn(2, 37, 3, 64).transpose(1, 2)  # a non-contiguous output gradient
    with use_backend(backend, op="attention"):
        got = run_backend(backend, q, k, v, dout, 0.3, False)
    assert calls == [1]
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = torch.ops.seer.attention_fwd(qg, kg, vg, 0.3, False, backend)
    want = (out, *torch.autograd.grad(out, (qg, kg, vg), dout))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_eager_path_only_for_plain_eager_calls(monkeypatch):
    """Under a dispatch mode (FLOP counting), FakeTensor, vmap or jit.trace the op runs (torch.compile: see
    test_compiled_code_follows_use_backend); a plain call takes the eager path and refuses double backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    calls = _eager_calls(monkeypatch)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 9, 9, 16, F32, "cpu"))
    with use_backend("reference", op="attention"):
        with FlopCounterMode(display=False):
            out = seer_kernels.attention(q, k, v)
        out.sum().backward()
        assert calls == [] and q.grad is not None
        with FakeTensorMode() as mode:
            fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
            assert seer_kernels.attention(fq, fk, fv).shape == q.shape
        qb = torch.randn(3, 1, 2, 9, 16)
        batched = torch.vmap(lambda x: seer_kernels.attention(x, k.detach(), v.detach()))(qb)
        for i in range(3):
            assert torch.allclose(batched[i], seer_kernels.attention(qb[i], k.detach(), v.detach()), atol=1e-6)
        calls.clear()
        traced = torch.jit.trace(lambda a, b, c: seer_kernels.attention(a, b, c),
                                 tuple(t.detach() for t in (q, k, v)), check_trace=False)
        assert calls == [] and "seer::attention_fwd" in str(traced.graph)
        # No double backward, as through the op: differentiating the first gradients again raises instead of
        # silently giving a wrong second derivative, also where dout does not require grad (a gradient
        # penalty: the task's gradient taken with create_graph, then task + penalty backward together).
        o = seer_kernels.attention(q, k, v)
        (g,) = torch.autograd.grad(o.sum(), q, create_graph=True)
        assert calls == [1] and g.requires_grad
        # ... and says what to do instead (torch's own message asked the user to "use register_autograd")
        with pytest.raises(RuntimeError, match=r"no double backward(.|\n)*sdpa_kernel\(SDPBackend.MATH\)"):
            g.sum().backward()
        o = seer_kernels.attention(q, k, v)
        task = (o * torch.randn_like(o)).sum()
        (g,) = torch.autograd.grad(task, q, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            (task + g.pow(2).sum()).backward()


@pytest.mark.parametrize("backend", ["sdpa", "reference"])  # SDPA in the graph; the custom op in the graph
def test_torch_export_keeps_a_dynamic_batch_dynamic(backend):
    """The dispatcher read the sizes with int(), which pins a symbolic dim to the traced value: torch.export
    with a dynamic batch failed ("specialized it to be a constant (2)"), and the ONNX export of the ViT
    (seer export --format onnx) then refused every batch but the traced one."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return seer_kernels.attention(q, k, v)

    q, k, v = make_qkv(2, 3, 9, 9, 16, F32, "cpu")
    batch = torch.export.Dim("batch")
    with use_backend(backend, op="attention"):
        program = torch.export.export(Attend(), (q, k, v), dynamic_shapes=({0: batch},) * 3, strict=False)
    for n in (1, 3):
        q, k, v = make_qkv(n, 3, 9, 9, 16, F32, "cpu")
        with use_backend(backend, op="attention"):
            got = program.module()(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,dtype", [("reference", F32), ("reference", F64), ("sdpa", F64)]
                         + ([("triton", F32)] if TRITON_DEV == "cpu" else []))
def test_torch_func_grad_vjp_and_vmap_of_grad(backend, dtype):
    """torch.func.grad, vjp and vmap(grad) give torch.autograd.grad's bits. (torch.func refuses the
    autograd.Function that register_autograd generates - no setup_context - so these raised through the op.)"""
    q, k, v = make_qkv(2, 2, 9, 13, 16, dtype, "cpu", "fused" if backend == "reference" else "contiguous")
    w = torch.randn(2, 2, 9, 16, dtype=dtype)

    def loss(q_, k_, v_):
        return (seer_kernels.attention(q_, k_, v_, scale=0.3) * w).sum()

    def autograd_grads(q_, k_, v_):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q_, k_, v_))
        return torch.autograd.grad(loss(qg, kg, vg), (qg, kg, vg))

    with use_backend(backend, op="attention"):
        want = autograd_grads(q, k, v)
        got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
        for g, r in zip(got, want):
            assert torch.equal(g, r)
        out, vjp = torch.func.vjp(lambda *t: seer_kernels.attention(*t, scale=0.3), q, k, v)
        assert torch.equal(out, seer_kernels.attention(q, k, v, scale=0.3))
        for g, r in zip(vjp(w), want):
            assert torch.equal(g, r)
        # per-example gradients: q batched in dim 0, k in dim 2, v shared (the ops' vmap rules fold the dim
        # into the batch, so every example gets the bits of its own call)
        qs, ks = torch.randn(3, *q.shape, dtype=dtype), torch.randn(2, 2, 3, 13, 16, dtype=dtype)
        gq, gk = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, 2, None))(qs, ks, v)
        for i in range(3):
            want_q, want_k, _ = autograd_grads(qs[i], ks[:, :, i], v)
            assert torch.allclose(gq[i], want_q, rtol=1e-6, atol=1e-6)
            assert torch.allclose(gk[i], want_k, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_DEV == "cpu" else []))
def test_torch_func_has_no_second_derivative_of_the_ops(backend):
    """A second reverse derivative through the ops raises, under torch.func as under torch.autograd."""
    q, k, v = make_qkv(1, 2, 9, 9, 16, F32, "cpu")
    with use_backend(backend, op="attention"):
        # The hint names the SDPA backend that has second derivatives on every device (torch's CPU flash
        # kernel, its default on CPU, has none).
        with pytest.raises(RuntimeError, match=r"no autograd formula(.|\n)*sdpa_kernel\(SDPBackend.MATH\)"):
            torch.func.jacrev(torch.func.grad(lambda x: seer_kernels.attention(x, k, v).pow(2).sum()))(q)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON_DEV == "cpu" else []))
@pytest.mark.parametrize("grad", [False, True])
def test_forward_mode_ad_is_refused_not_dropped(backend, grad):
    """A forward_ad dual input raised nothing: the kernels returned the primal with no tangent (read as zero)."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = make_qkv(1, 2, 5, 6, 16, F32, "cpu")
    with use_backend(backend, op="attention"), fwAD.dual_level():
        dual = fwAD.make_dual(q.requires_grad_(grad), torch.randn_like(q))
        with pytest.raises(RuntimeError, match=f"forward-mode AD .* no rule on the {backend} backend"):
            seer_kernels.attention(dual, k, v)
        qkv = fwAD.make_dual(torch.randn(1, 5, 3 * 2 * 16).requires_grad_(grad), torch.randn(1, 5, 96))
        with pytest.raises(RuntimeError, match="attention_packed: forward-mode AD"):
            seer_kernels.attention_packed(qkv, 2)
        assert seer_kernels.attention(q, k, v).shape == q.shape  # no tangent: runs as ever
    with use_backend(backend, op="attention"), pytest.raises(RuntimeError, match="forward-mode AD .*SDPBackend.MATH"):
        torch.func.jvp(lambda x: seer_kernels.attention(x, k, v), (q.detach(),), (torch.randn_like(q),))


def test_use_backend_refuses_an_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'atention'"):
        with use_backend("reference", op="atention"):  # would otherwise force nothing, silently
            pass
    with use_backend("reference", op="attention"):
        pass


def test_use_backend_in_overlapping_threads_leaves_nothing_forced():
    """Blocks in two threads that overlap without nesting: afterwards neither eager nor compiled code is
    forced (the global that torch.compile reads is rewritten from the exiting thread's own state)."""
    import threading
    from seer_kernels import _backend
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with use_backend("reference", op="attention"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with use_backend("sdpa", op="attention"):
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert _backend._compile_view == () and _backend.forced_backend("attention") == (None, "")


def test_compiled_code_follows_use_backend(monkeypatch):
    """A compiled caller re-traces when use_backend() changes: the forced backend is read from a module global
    that torch.compile guards on (not traced from the ContextVar, which torch 2.11's Dynamo refuses)."""
    torch._dynamo.reset()
    ref_backend = ops.DISPATCH.backends["reference"]
    calls = []
    fwd = ref_backend.impl.fwd
    monkeypatch.setattr(ref_backend.impl, "fwd", lambda *a: calls.append(1) or fwd(*a))
    compiled = torch.compile(lambda q, k, v: seer_kernels.attention(q, k, v), fullgraph=True)
    q, k, v = make_qkv(1, 2, 9, 9, 16, F32, "cpu")
    want = compiled(q, k, v)
    assert calls == []  # automatic choice on CPU: SDPA
    with use_backend("reference", op="attention"):
        got = compiled(q, k, v)
    assert calls == [1] and max_abs_err(got, want) <= 1e-5
    compiled(q, k, v)
    assert calls == [1]  # back to SDPA outside the block


def test_autocast_casts_float32_like_sdpa():
    q, k, v = make_qkv(2, 2, 37, 37, 32, F32, "cpu")
    with torch.autocast("cpu", dtype=BF16):
        got = seer_kernels.attention(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with use_backend("reference", op="attention"):
            got_ref = seer_kernels.attention(q, k, v)
    assert got.dtype == want.dtype == got_ref.dtype == BF16
    assert max_abs_err(got, want) == 0.0
    # The reference is held to the house rule against float64 on the bf16-cast inputs (a fixed tolerance
    # against SDPA's bf16 output fails now and then: both round to bf16, up to 0.05 apart at |out| ~ 2).
    qb, kb, vb = (t.to(BF16) for t in (q, k, v))
    ref64 = math_attention(qb.double(), kb.double(), vb.double(), 32 ** -0.5)
    assert_close_to_ref(got_ref, ref64, math_attention(qb, kb, vb, 32 ** -0.5), atol=dtype_atol(ref64, BF16))
    with use_backend("reference", op="attention"):
        assert torch.equal(got_ref, seer_kernels.attention(qb, kb, vb))  # autocast stays out of the reference


def test_autocast_takes_mixed_and_half_inputs_like_sdpa():
    """Autocast casts every floating input but float64 to its dtype first, as SDPA: float32 q, k with a bf16 v
    (a float32 rotary embedding before it) run, and float16 inputs under bf16 autocast come out bf16 on every
    backend."""
    q, k, v = make_qkv(1, 2, 9, 9, 16, F32, "cpu")
    for inputs in ((q, k, v.to(BF16)), (q.half(), k.half(), v.half())):
        with torch.autocast("cpu", dtype=BF16):
            want = torch.nn.functional.scaled_dot_product_attention(*inputs)
            for backend in ("sdpa", "reference"):
                with use_backend(backend, op="attention"):
                    got = seer_kernels.attention(*inputs)
                assert got.dtype == want.dtype == BF16, backend
                assert max_abs_err(got, want) <= 2e-2, backend


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_compiled_with_a_scale_that_varies_between_calls(backend):
    """torch.compile passes a scale that changes between calls as a SymFloat: no graph break, right values."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 5, 7, 16, F32, "cpu")
    f = torch.compile(lambda q, k, v, s: seer_kernels.attention(q, k, v, scale=s), fullgraph=True)
    with use_backend(backend, op="attention"):
        for s in (0.1, 0.2, -0.3):
            want = math_attention(q.double(), k.double(), v.double(), s)
            assert max_abs_err(f(q, k, v, s), want) <= 1e-5, s


def test_meta_tensors_give_shapes():
    # Shape tracing / FLOP counting / meta-device init run the model on 'meta' tensors.
    q, k, v = (torch.empty(2, 3, n, 16, device="meta", requires_grad=True) for n in (7, 9, 9))
    out = seer_kernels.attention(q, k, v)
    assert out.device.type == "meta" and out.shape == (2, 3, 7, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


def test_float64_inputs():
    q, k, v = make_qkv(2, 2, 13, 9, 8, F64, "cpu")
    for backend in ("sdpa", "reference"):
        with use_backend(backend, op="attention"):
            out = seer_kernels.attention(q, k, v)
        assert out.dtype == F64
        assert max_abs_err(out, ref.attention_fwd(q, k, v, 8 ** -0.5)[0]) <= 1e-12


def test_output_layout_and_saved_tensors():
    """out lives on (B, N, H, D) memory (the ViT's transpose-reshape is free); backward keeps no N x N."""
    q, k, v = make_qkv(2, 3, 40, 40, 16, F32, "cpu", layout="fused")
    q.requires_grad_()
    saved = []
    with use_backend("reference", op="attention"), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = seer_kernels.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    assert out.transpose(1, 2).reshape(2, 40, 48).data_ptr() == out.data_ptr()
    assert all(s[-1] != 40 or len(s) != 4 or s[-2] != 40 for s in saved), saved  # no (.., N, N) tensor saved
    assert (2, 3, 40) in saved  # the log-sum-exp rows


# ---- bad input -----------------------------------------------------------------------------------------

def _t(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("args,kw,exc,match", [
    ((_t(2, 3, 5), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), {}, ValueError, "'q' must be 4-D"),
    ((_t(2, 3, 5, 8), _t(3, 5, 8), _t(2, 3, 5, 8)), {}, ValueError, "'k' must be 4-D"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(1, 2, 3, 5, 8)), {}, ValueError, "'v' must be 4-D"),
    ((_t(2, 3, 5, 8), _t(4, 3, 5, 8), _t(4, 3, 5, 8)), {}, ValueError, "'k' has batch size 4 .* 'q' has 2"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 1, 5, 8)), {}, ValueError, "'v' has heads 1 .* 'q' has 3"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 16), _t(2, 3, 5, 16)), {}, ValueError, "'k' has head dim 16 .* 'q' has 8"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 4)), {}, ValueError, "'v' has head dim 4"),
    ((_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 7, 8)), {}, ValueError, "'v' has 7 keys .* 'k' has 6"),
    ((_t(2, 3, 0, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), {}, ValueError, "'q' must be non-empty"),
    ((_t(0, 3, 5, 8), _t(0, 3, 5, 8), _t(0, 3, 5, 8)), {}, ValueError, "'q' must be non-empty"),
    ((_t(2, 3, 5, 8), _t(2, 3, 0, 8), _t(2, 3, 0, 8)), {}, ValueError, "'k' must be non-empty"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8).to("meta"), _t(2, 3, 5, 8)), {}, ValueError, "'k' is on meta but 'q' is on cpu"),
    ((_t(2, 3, 5, 8, dtype=torch.int64), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), {}, TypeError,
     "'q' must be float32, bfloat16, float16 or float64, got torch.int64"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8, dtype=torch.int32), _t(2, 3, 5, 8)), {}, TypeError, "'k' must be float32"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8, dtype=torch.bool)), {}, TypeError, "'v' must be float32"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8, dtype=F16), _t(2, 3, 5, 8)), {}, TypeError,
     "'k' has dtype torch.float16 but 'q' has torch.float32"),
    (([[1.0]], _t(2, 3, 5, 8), _t(2, 3, 5, 8)), {}, TypeError, "'q' must be a torch.Tensor, got list"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), dict(scale=float("nan")), ValueError, "'scale' must be"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), dict(scale=True), ValueError, "'scale' must be"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), dict(scale="0.1"), ValueError, "'scale' must be"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), dict(scale=10**400), ValueError, "'scale' must be"),
    ((_t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), dict(deterministic=1), TypeError, "'deterministic' must"),
])
def test_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        seer_kernels.attention(*args, **kw)


@pytest.mark.cuda
def test_inputs_on_different_devices():
    q = _t(2, 3, 5, 8)
    with pytest.raises(ValueError, match="'k' is on cuda:0 but 'q' is on cpu"):
        seer_kernels.attention(q, q.cuda(), q)
    with pytest.raises(ValueError, match="'v' is on cpu but 'q' is on cuda:0"):
        seer_kernels.attention(q.cuda(), q.cuda(), q)


def test_inputs_on_different_devices_meta():
    # The same check without a GPU: 'meta' is a second device on every machine.
    q = _t(2, 3, 5, 8)
    with pytest.raises(ValueError, match="'v' is on meta but 'q' is on cpu"):
        seer_kernels.attention(q, q, q.to("meta"))


@pytest.mark.parametrize("head_dim,match", [(12, "head dim 12 is not supported"), (264, "head dim 264"),
                                            (4, "head dim 4")])
def test_forced_triton_refuses_unsupported_head_dim(head_dim, match):
    q = _t(1, 2, 5, head_dim)
    with use_backend("triton", op="attention"), pytest.raises(BackendError, match=match) as info:
        seer_kernels.attention(q, q, q)
    msg = str(info.value)
    assert "backend 'triton' forced by use_backend()" in msg
    for name in ("triton", "sdpa", "reference"):
        assert f"  {name}: " in msg


def test_triton_refuses_rows_past_int32():
    # Contiguous rows N * D elements long: past 2^31 even the kernels' copies overflow int32 row offsets.
    info = dict(where=torch.device("cuda", 0), dt=BF16, head_dim=128, batch=1, heads=1)
    assert ops._triton_check(n_q=257, n_kv=257, **info) == []
    assert "int32 row offsets" in " ".join(ops._triton_check(n_q=50, n_kv=2**24, **info))


def test_forced_triton_refuses_float64_and_cpu_bfloat16():
    with use_backend("triton", op="attention"), pytest.raises(BackendError, match="does not support float64"):
        seer_kernels.attention(*(_t(1, 1, 4, 16, dtype=F64),) * 3)
    if TRITON_DEV == "cpu":
        with use_backend("triton", op="attention"), pytest.raises(BackendError, match="computes bfloat16 wrongly"):
            seer_kernels.attention(*(_t(1, 1, 4, 16, dtype=BF16),) * 3)


def test_ops_refuse_sdpa_and_unknown_backends():
    q = _t(1, 2, 5, 8)
    with pytest.raises(BackendError, match="SDPA runs with torch's own autograd"):
        torch.ops.seer.attention_fwd(q, q, q, 0.3, False, "sdpa")
    with pytest.raises(BackendError, match="this op has no such backend"):
        torch.ops.seer.attention_fwd(q, q, q, 0.3, False, "cuda")
    # Inside the ops, automatic selection skips SDPA (it has no log-sum-exp output).
    with use_backend("sdpa", op="attention"), pytest.raises(BackendError, match="SDPA runs with torch's own"):
        torch.ops.seer.attention_fwd(q, q, q, 0.3)



@pytest.mark.parametrize("backend", _op_backends())
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_ops_refuse_mismatched_arguments(backend, fake):
    """Direct calls of seer::attention_fwd / attention_bwd, and their fake kernels, refuse what
    seer_kernels.attention refuses, naming the argument. Without the checks the Triton kernels read k and v
    of another batch or length out of bounds (garbage out; an illegal address on a GPU), the reference
    broadcast a k of batch 1 or returned v's head dim, and a float64 lse was read as float32."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = _t(2, 2, 5, 8), _t(2, 2, 7, 8), _t(2, 2, 7, 8)
    out, lse = torch.ops.seer.attention_fwd(q, k, v, 0.3, False, backend)
    dout = torch.randn_like(out)
    fwd_cases = [((q, _t(1, 2, 7, 8), _t(1, 2, 7, 8)), "'k' has batch size 1"),
                 ((q, k, _t(2, 2, 3, 8)), "'v' has 3 keys"),
                 ((q, k, _t(2, 2, 7, 16)), "'v' has head dim 16"),
                 ((q, _t(2, 2, 0, 8), _t(2, 2, 0, 8)), "'k' must be non-empty")]
    bwd_cases = [((dout, q, k, v, out, lse.double()), r"'lse' must be torch.float32 of shape \(2, 2, 5\)"),
                 ((dout[:, :, :4], q, k, v, out, lse), r"'dout' must be torch.float32 of shape \(2, 2, 5, 8\)"),
                 ((dout, q, k, v, out.double(), lse), "'out' must be torch.float32")]
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext() as mode:
        def conv(args):
            return tuple(mode.from_tensor(a) for a in args) if fake else args
        for args, match in fwd_cases:
            with pytest.raises(ValueError, match=match):
                torch.ops.seer.attention_fwd(*conv(args), 0.3, False, backend)
        for args, match in bwd_cases:
            with pytest.raises(ValueError, match=match):
                torch.ops.seer.attention_bwd(*conv(args), 0.3, False, backend)
        with pytest.raises(ValueError, match="'scale' must be a finite number"):
            torch.ops.seer.attention_fwd(*conv((q, k, v)), math.nan, False, backend)

# ---- dispatch and the selector table --------------------------------------------------------------------

def test_cpu_chooses_sdpa_and_logs_once(caplog):
    q = _t(2, 3, 5, 8, dtype=F16)
    assert ops.explain(q, q, q)["sdpa"] == []
    DISPATCH._logged.clear()
    with caplog.at_level(logging.INFO, logger="seer_kernels"):
        for _ in range(3):
            seer_kernels.attention(q, q, q)
    lines = [r.message for r in caplog.records if "seer_kernels.attention on cpu/float16" in r.message]
    assert len(lines) == 1 and "using backend sdpa (automatic)" in lines[0]


def test_environment_forces_the_backend(monkeypatch):
    q = _t(2, 3, 5, 8)
    monkeypatch.setenv("SEER_KERNELS_BACKEND_ATTENTION", "reference")
    DISPATCH._logged.clear()
    assert DISPATCH.select(q.device, q.dtype, **ops._info(q, q, grad=True, deterministic=False,
                                                          in_op=False)).name == "reference"
    with use_backend("sdpa", op="attention"):  # the context manager wins
        assert DISPATCH.select(q.device, q.dtype, **ops._info(q, q, grad=True, deterministic=False,
                                                              in_op=False)).name == "sdpa"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Run the selector for a pretend GPU 'fake-gpu' with a table the test fills in."""
    monkeypatch.setattr(ops, "_gpu_slug", lambda index: "fake-gpu")
    table: dict = {}
    monkeypatch.setattr(ops.attention_table, "TABLE", table)

    def select(n_q=257, n_kv=None, d=128, grad=True, det=False, dtype=BF16):
        n_kv = n_q if n_kv is None else n_kv
        info = dict(where=torch.device("cuda", 0), dt=dtype, head_dim=d, n_q=n_q, n_kv=n_kv, batch=32, heads=8,
                    grad=grad, deterministic=det, in_op=False)
        return DISPATCH.select(torch.device("cuda", 0), dtype, **info).name
    return table, select


def _row(n=257, d=128, fwd=1.1, fwd_bwd=1.3, **kw):
    row = dict(head_dim=d, n_q=n, n_kv=n, batch=32, heads=8, dtype="bfloat16", fwd=fwd, fwd_bwd=fwd_bwd,
               best_sdpa="flash", bwd_scheme="atomic", tiles={})
    row.update(kw)
    return row


@pytest.mark.skipif(TRITON_DEV is None, reason="the Triton backend needs triton importable")
def test_selector_uses_sdpa_without_evidence(fake_gpu):
    table, select = fake_gpu
    assert select() == "sdpa"
    assert select(det=True) == "triton"  # deterministic: Triton's backward repeats its bits
    assert select(dtype=F32, det=True) == "reference"
    assert select(dtype=F32) == "sdpa"


@pytest.mark.skipif(TRITON_DEV is None, reason="the Triton backend needs triton importable")
def test_selector_follows_the_table(fake_gpu):
    table, select = fake_gpu
    table["fake-gpu"] = [_row(257, fwd=0.95, fwd_bwd=1.3), _row(197, fwd=1.2, fwd_bwd=0.8),
                         _row(37, d=64, fwd_bwd=0.7), _row(50, d=64, fwd_bwd=1.2)]
    assert select(257) == "triton"
    assert select(257, grad=False) == "sdpa"  # inference uses the forward-only ratio
    assert select(300) == "triton" and select(320) == "triton"  # same number of 64-token tiles as 257
    assert select(321) == "sdpa" and select(256) == "sdpa"
    assert select(197) == "sdpa" and select(197, grad=False) == "triton"
    assert select(257, d=80) == "sdpa"  # another head dim is not evidence
    assert select(40, d=64) == "sdpa" and select(48, d=64) == "triton"  # nearest measured N in the bucket
    assert select(257, 197) == "sdpa"  # cross shapes need their own row
    table["fake-gpu"] = [_row(257, fwd_bwd=ops.TRITON_MARGIN - 0.01)]
    assert select(257) == "sdpa"  # within noise of SDPA is not a win
    info = dict(where=torch.device("cuda", 0), head_dim=128, n_q=257, n_kv=257, grad=True, deterministic=False)
    prefer = ops.DISPATCH.backends["triton"].preference
    assert "in eager calls" in prefer(info)  # a row without a basis is from eager calls (tables before it)
    table["fake-gpu"][0]["basis"] = "gpu_time"
    assert "x1.04 forward+backward in GPU time (needs x1.05)" in prefer(info)
    table["fake-gpu"] = [_row(257, fwd=None, fwd_bwd=None, best_sdpa="cudnn")]  # only SDPA was timed
    assert select(257) == "sdpa" and select(257, grad=False) == "sdpa"
    assert "no Triton forward+backward timing" in prefer(info)


@pytest.mark.skipif(TRITON_DEV is None, reason="the Triton backend needs triton importable")
def test_selector_takes_the_packed_ratio_for_attention_packed(fake_gpu):
    """attention_packed (packed=True) with a gradient decides on fwd_bwd_packed where the row has it: its
    -vit benchmark row times the ViT's layout, where SDPA on the slices pays for stacking their gradients."""
    table, _ = fake_gpu
    table["fake-gpu"] = [_row(257, fwd_bwd=0.98, fwd_bwd_packed=1.25, basis="gpu_time"), _row(197, fwd_bwd=1.2)]

    def select(n, packed, grad=True):
        info = dict(where=torch.device("cuda", 0), dt=BF16, head_dim=128, n_q=n, n_kv=n, batch=32, heads=8,
                    grad=grad, deterministic=False, in_op=False, packed=packed)
        return DISPATCH.select(torch.device("cuda", 0), BF16, **info).name
    assert select(257, packed=False) == "sdpa" and select(257, packed=True) == "triton"
    assert select(257, packed=True, grad=False) == "triton"  # forward only: the fwd ratio (1.1), as attention
    assert select(197, packed=True) == "triton" == select(197, packed=False)  # no packed ratio: fwd_bwd
    table["fake-gpu"][0]["fwd_bwd_packed"] = 1.0
    info = dict(where=torch.device("cuda", 0), head_dim=128, n_q=257, n_kv=257, grad=True, deterministic=False,
                packed=True)
    assert "x1.00 forward+backward on a fused qkv projection in GPU time" in \
        DISPATCH.backends["triton"].preference(info)


@pytest.mark.skipif(TRITON_DEV is None, reason="the Triton backend needs triton importable")
def test_selector_rows_pass_their_tiles_and_scheme(monkeypatch):
    from seer_kernels.triton import attention as tri
    row = _row(257, bwd_scheme="deterministic",
               tiles=dict(fwd=[64, 32, 4, 3, 1], dkdv=[32, 128, 8, 2, 0], dq=[128, 32, 8, 2]))
    monkeypatch.setattr(ops, "evidence", lambda where, d, nq, nkv: row if (d, nq, nkv) == (128, 257, 257) else None)
    calls = {}
    monkeypatch.setattr(tri, "attention_fwd", lambda *a, **kw: calls.setdefault("fwd", kw))
    monkeypatch.setattr(tri, "attention_bwd", lambda *a, **kw: calls.setdefault("bwd", (a, kw)))
    q = torch.empty(1, 1, 257, 128)
    ops._triton_fwd(q, q, q, 0.1)
    ops._triton_bwd(q, q, q, q, q, q, 0.1, False)
    assert calls["fwd"]["tile"] == tri.Tile(64, 32, 4, 3)
    args, kw = calls["bwd"]
    assert args[7] is True  # the row measured the deterministic scheme faster: it is the default there
    assert kw["dkdv_tile"] == tri.Tile(32, 128, 8, 2, split_tail=False)
    assert kw["dq_tile"] == tri.Tile(128, 32, 8, 2, split_tail=False)  # a 4-element list: as measured
    calls.clear()
    q = torch.empty(1, 1, 50, 128)  # no row: default tiles, atomic dq unless asked
    ops._triton_fwd(q, q, q, 0.1)
    ops._triton_bwd(q, q, q, q, q, q, 0.1, False)
    assert calls["fwd"]["tile"] is None and calls["bwd"][0][7] is False


def test_sdpa_path_puts_the_measured_best_backend_first(monkeypatch):
    from torch.nn.attention import SDPBackend
    assert ops.sdpa_order(None) is None and ops.sdpa_order(_row(best_sdpa="nonsense")) is None
    order = ops.sdpa_order(_row(best_sdpa="cudnn"))
    assert order[0] == SDPBackend.CUDNN_ATTENTION and len(order) == 4  # the others stay enabled after it
    # On the CPU, with a row that prefers math: same result as torch's own choice (flash on CPU).
    monkeypatch.setattr(ops, "evidence", lambda where, d, nq, nkv: _row(best_sdpa="math"))
    q, k, v = make_qkv(2, 2, 37, 37, 32, F32, "cpu")
    got = ops._sdpa(q, k, v, 0.2)
    assert max_abs_err(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2)) <= 1e-5


def test_explain_reports_preferences():
    q = _t(1, 2, 5, 16)
    why = ops.explain(q, q, q)
    assert why["sdpa"] == [] and why["reference"] == []
    if TRITON_DEV == "cpu":
        assert "interpreter is for tests" in why["triton"][0]


def test_deterministic_follows_torch_and_environment(monkeypatch):
    assert ops._deterministic(None) is False
    monkeypatch.setenv("SEER_KERNELS_DETERMINISTIC", "1")
    assert ops._deterministic(None) is True
    assert ops._deterministic(False) is False
    monkeypatch.setenv("SEER_KERNELS_DETERMINISTIC", "0")
    assert ops._deterministic(None) is False
    for wrong in ("true", "yes", "on"):  # were read as 'off' without a word
        monkeypatch.setenv("SEER_KERNELS_DETERMINISTIC", wrong)
        with pytest.raises(ValueError, match=f"SEER_KERNELS_DETERMINISTIC='{wrong}' is neither '1'"):
            seer_kernels.attention(*make_qkv(1, 1, 2, 2, 8, F32, "cpu"))
    monkeypatch.delenv("SEER_KERNELS_DETERMINISTIC")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert ops._deterministic(None) is True
    finally:
        torch.use_deterministic_algorithms(prev)


def test_benchmark_takes_a_tma_tile_only_when_it_wins_by_more_than_its_host_cost():
    from bench.bench_attention import HOST_TIE, _bwd_descriptors, fastest
    from seer_kernels.triton.attention import Tile
    plain, tma, other = Tile(64, 32, 4, 3), Tile(64, 32, 4, 3, tma_load=True), Tile(64, 64, 4, 3)
    uses = lambda t: t.tma_load  # noqa: E731
    assert fastest({plain: 1.0, tma: 0.99, other: 1.2}, uses) == plain  # 1 % is within HOST_TIE
    assert fastest({plain: 1.0, tma: 1.0 / (HOST_TIE + 0.01), other: 1.2}, uses) == tma
    assert fastest({plain: 1.0, tma: 1.1, other: 0.9}, uses) == other
    assert fastest({tma: 1.0}, uses) == tma
    det = (True, Tile(32, 64, 4, 2), Tile(64, 32, 4, 3))
    det_tma = (True, Tile(32, 64, 4, 2, tma_load=True), Tile(64, 32, 4, 3, tma_load=True))
    assert fastest({det: 144.9, det_tma: 144.1}, _bwd_descriptors) == det  # the H100's ViT-10B/TP4 pair
    assert _bwd_descriptors((False, Tile(16, 64, 4, 2, dq_tma=True), Tile(64, 32, 4, 3)))


def test_benchmark_vit_layout_row_runs_attention_as_the_model_does():
    """The -fwdbwd-det-vit rows time the ViT's own layout: the model's Attention is its qkv projection,
    bench_attention._vit_attention and its output projection, forward and backward, bit for bit."""
    from bench.bench_attention import _vit_attention, _vit_segment
    from seer.model.layers import Attention
    torch.manual_seed(0)
    layer = Attention(48, 3).double()
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    want = layer(x)
    qkv = layer.qkv(x)
    got = layer.proj(_vit_attention(seer_kernels.attention, qkv, 3))
    assert torch.equal(got, want)
    dout = torch.randn_like(want)
    (dx_want,) = torch.autograd.grad(want, x, dout)
    (dqkv,) = _vit_segment(seer_kernels.attention, qkv, dout @ layer.proj.weight, 3)
    (dx_got,) = torch.autograd.grad(qkv, x, dqkv)
    torch.testing.assert_close(dx_got, dx_want, rtol=1e-12, atol=1e-12)


def test_table_script_turns_benchmark_rows_into_the_selector_table(tmp_path):
    import json

    from bench import attention_table as script
    rows = []
    for case, fwd_ratio, fb_ratio, det_ratio in (("vit10b-tp4-B32H8N257D128", 1.1, 1.3, 1.35),
                                                 ("local-B192H16N37D64", 0.8, 0.9, 0.7)):
        for mode, ratio in (("fwd", fwd_ratio), ("fwdbwd", fb_ratio), ("fwdbwd-det", det_ratio)):
            shape = [32, 8, 257, 257, 128] if "vit" in case else [192, 16, 37, 37, 64]
            rows.append({"key": f"attention:{case}-{mode}", "op": "attention", "case": f"{case}-{mode}",
                         "ours": "triton", "mode": mode, "ratio": ratio, "best_sdpa": "cudnn", "shape": shape,
                         "dtype": "bfloat16",
                         "tiles": {"fwd": [64, 32, 4, 3], "dkdv": [32, 64, 8, 3], "dq": [64, 32, 4, 3]}})
    rows.append({"key": "attention:cpu-dispatch-fwd", "op": "attention", "case": "cpu-dispatch-fwd", "ours": "seer",
                 "mode": "fwd", "ratio": 0.9})
    # GPU time (CUDA-graph replays) for the small shape: it decides there, not the host-bound eager calls,
    # and it has the atomic scheme ahead where the eager calls had the deterministic one (and another SDPA)
    for i, (mode, ratio) in enumerate((("fwd", 1.4), ("fwdbwd", 1.3), ("fwdbwd-det", 1.2))):
        rows.append(dict(rows[3 + i], case=f"local-B192H16N37D64-{mode}-graph", mode=f"{mode}-graph", ratio=ratio,
                         best_sdpa="efficient"))
    rows[5].update(ratio=0.95, tiles={"fwd": [64, 32, 4, 3], "dkdv": [16, 64, 4, 2], "dq": [64, 16, 4, 3]})
    # (eager: deterministic ahead of atomic, 0.9, with its own tiles)
    # A second run with only the SDPA backends timed (the -auto row) at another shape, and a stale row for
    # the big shape that the first file (given later) replaces.
    auto = {"op": "attention", "case": "vitl-B64H16N197D64-auto", "ours": "seer", "mode": "auto", "ratio": 0.8,
            "best_sdpa": "cudnn", "shape": [64, 16, 197, 197, 64], "dtype": "bfloat16"}
    stale = dict(rows[0], ratio=0.5)
    env = {"device": "nvidia-h100-80gb-hbm3", "git": "abc", "date": "today", "gpu": "NVIDIA H100 80GB HBM3"}
    src, older = tmp_path / "bench.json", tmp_path / "older.json"
    src.write_text(json.dumps({"environment": env, "rows": rows}))
    older.write_text(json.dumps({"environment": dict(env, git="old"), "rows": [auto, stale]}))
    out = tmp_path / "table.py"
    assert script.main([str(older), str(src), "--out", str(out)]) == 0
    ns: dict = {}
    exec(out.read_text(), ns)
    got = ns["TABLE"]["nvidia-h100-80gb-hbm3"]
    assert len(got) == 3
    sdpa_only = next(r for r in got if r["n_q"] == 197)
    assert sdpa_only["fwd_bwd"] is None and sdpa_only["best_sdpa"] == "cudnn" and sdpa_only["head_dim"] == 64
    got = [r for r in got if r["n_q"] != 197]
    big = next(r for r in got if r["head_dim"] == 128)
    assert (big["n_q"], big["n_kv"], big["batch"], big["heads"]) == (257, 257, 32, 8)
    assert big["fwd"] == 1.1 and big["fwd_bwd"] == 1.35 and big["bwd_scheme"] == "deterministic"
    assert big["basis"] == "eager" and "fwd_graph" not in big  # no CUDA-graph rows: the eager ratios decide
    small = next(r for r in got if r["head_dim"] == 64)
    assert small["basis"] == "gpu_time" and small["fwd"] == 1.4 and small["fwd_bwd"] == 1.3
    assert small["bwd_scheme"] == "atomic" and small["fwd_bwd_atomic"] == 1.3 and small["fwd_bwd_det"] == 1.2
    assert small["fwd_eager"] == 0.8 and small["fwd_bwd_eager"] == 0.9  # the chosen (atomic) scheme's
    assert small["fwd_graph"] == 1.4 and small["fwd_bwd_det_graph"] == 1.2
    assert small["best_sdpa"] == small["best_sdpa_fwd"] == "efficient"  # the GPU-time rows' fastest SDPA
    assert small["tiles"] == {"fwd": [64, 32, 4, 3], "dkdv": [32, 64, 8, 3], "dq": [64, 32, 4, 3]}
    assert [r["git"] for r in ns["SOURCE"]["runs"]] == ["old", "abc"]
    # A later run cut short after the big shape, without its CUDA-graph rows: the other shapes keep their rows,
    # and the big shape's eager row replaces only an eager one (here it was eager too)
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({"environment": env, "rows": [dict(r, ratio=1.5) for r in rows[:3]],
                               "complete": False}))
    assert script.main([str(cut), "--out", str(out)]) == 0
    ns = {}
    exec(out.read_text(), ns)
    got = {r["case"]: r for r in ns["TABLE"]["nvidia-h100-80gb-hbm3"]}
    assert len(got) == 3 and got["vit10b-tp4-B32H8N257D128"]["fwd"] == 1.5
    small_only_eager = tmp_path / "small.json"
    small_only_eager.write_text(json.dumps({"environment": env, "rows": rows[3:6]}))
    assert script.main([str(small_only_eager), "--out", str(out)]) == 0
    ns = {}
    exec(out.read_text(), ns)
    kept = next(r for r in ns["TABLE"]["nvidia-h100-80gb-hbm3"] if r["case"] == "local-B192H16N37D64")
    assert kept["basis"] == "gpu_time" and kept["fwd"] == 1.4  # not replaced by eager-only evidence
    tma_off = tmp_path / "tma_off.json"
    tma_off.write_text(json.dumps({"environment": dict(env, settings={"SEER_KERNELS_TMA": "0"}), "rows": rows}))
    assert script.main([str(tma_off), "--out", str(out)]) == 1


def test_table_script_keeps_attention_packed_ratios_for_the_chosen_scheme(tmp_path):
    """The -fwdbwd-det-vit-graph row (attention_packed, deterministic, against SDPA on the slices) gives
    fwd_bwd_packed for the scheme the row chose; only beside GPU-time ratios."""
    import json

    from bench import attention_table as script
    base = {"op": "attention", "ours": "triton", "best_sdpa": "cudnn", "shape": [32, 8, 257, 257, 128],
            "dtype": "bfloat16", "tiles": {"fwd": [64, 32, 4, 3], "dkdv": [32, 64, 4, 2], "dq": [64, 32, 4, 3]}}
    case = "vit10b-tp4-B32H8N257D128"
    rows = []
    for graph in (False, True):
        for mode, ratio in (("fwd", 0.95), ("fwdbwd", 0.9), ("fwdbwd-det", 1.05)):
            m = f"{mode}-graph" if graph else mode
            rows.append(dict(base, case=f"{case}-{m}", mode=m, ratio=ratio))
    vit = dict(base, case=f"{case}-fwdbwd-det-vit-graph", mode="fwdbwd-det-vit-graph", ours="triton-packed",
               ratio=1.32, **{"x_triton-packed-atomic": 1.1, "x_triton": 1.25})
    env = {"device": "nvidia-h100-80gb-hbm3", "git": "abc", "date": "today"}
    src, out = tmp_path / "bench.json", tmp_path / "table.py"
    src.write_text(json.dumps({"environment": env, "rows": rows + [vit]}))
    assert script.main([str(src), "--out", str(out)]) == 0
    ns: dict = {}
    exec(out.read_text(), ns)
    (row,) = ns["TABLE"]["nvidia-h100-80gb-hbm3"]
    assert row["bwd_scheme"] == "deterministic" and row["fwd_bwd"] == 1.05
    assert row["fwd_bwd_packed_det"] == 1.32 and row["fwd_bwd_packed_atomic"] == 1.2
    assert row["fwd_bwd_packed"] == 1.32
    # the atomic scheme chosen: its packed ratio
    for r in rows:
        if r["mode"].startswith("fwdbwd") and not r["mode"].startswith("fwdbwd-det"):
            r["ratio"] = 1.1
    src.write_text(json.dumps({"environment": env, "rows": rows + [vit]}))
    out.unlink()
    assert script.main([str(src), "--out", str(out)]) == 0
    ns = {}
    exec(out.read_text(), ns)
    (row,) = ns["TABLE"]["nvidia-h100-80gb-hbm3"]
    assert row["bwd_scheme"] == "atomic" and row["fwd_bwd_packed"] == 1.2
    # eager ratios only (no -graph rows for the three modes): no packed ratio beside them
    src.write_text(json.dumps({"environment": env, "rows": [r for r in rows if "graph" not in r["mode"]] + [vit]}))
    out.unlink()
    assert script.main([str(src), "--out", str(out)]) == 0
    ns = {}
    exec(out.read_text(), ns)
    (row,) = ns["TABLE"]["nvidia-h100-80gb-hbm3"]
    assert row["basis"] == "eager" and "fwd_bwd_packed" not in row


def test_summary_pairs_each_candidate_with_its_twin(capsys):
    """bench/summary.py prints each tile feature (split tails, dq by TMA) against the same tile without it."""
    from bench import summary
    fwdbwd = {"atomic dkdv=[32, 64, 4, 2, 1, 1, 0] dq=[64, 32, 4, 3, 1, 0, 0]": 90.0,
              "atomic dkdv=[32, 64, 4, 2, 1, 0, 0] dq=[64, 32, 4, 3, 1, 0, 0]": 120.0,
              "atomic dkdv=[32, 64, 4, 2, 0, 0, 0] dq=[64, 32, 4, 3, 1, 0, 0]": 150.0,
              "det dkdv=[32, 64, 4, 2, 1, 0, 1] dq=[64, 32, 4, 3, 1, 0, 1]": 80.0,
              "det dkdv=[32, 64, 4, 2, 1, 0, 0] dq=[64, 32, 4, 3, 1, 0, 0]": 100.0,
              "det dkdv=[32, 64, 4, 2, 1, 0, 0, 0] dq=[64, 16, 4, 3, 1, 0, 0, 0]": 110.0,
              "det dkdv=[32, 64, 4, 2, 1, 1, 0, 1] dq=[64, 64, 4, 3, 1, 0, 0, 0]": 80.0,
              "det dkdv=[32, 64, 4, 2, 1, 0, 0, 1] dq=[64, 64, 4, 3, 1, 0, 0, 0]": 96.0}
    summary._feature_twins([{"op": "attention", "mode": "fwdbwd", "case": "c-fwdbwd", "candidate_us": fwdbwd},
                             {"op": "attention", "mode": "fwd", "case": "c-fwd",
                              "candidate_us": {"[64, 32, 4, 3, 1, 0]": 40.0, "[64, 32, 4, 3, 0, 0]": 50.0,
                                               "[64, 64, 4, 3, 1, 0, 0, 0, 1]": 36.0,
                                               "[64, 64, 4, 3, 1, 0, 0, 0, 0]": 45.0},
                              "candidate_failures": {"[64, 64, 4, 3, 1, 0, 1]": "no TMA here"}}])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[-1] for line in lines] == ["1.33x", "1.25x", "1.25x", "1.20x", "1.38x", "1.15x", "here",
                                                    "1.25x", "1.25x"], lines
    assert "tma dq" in lines[0] and "split" in lines[1] and "tma load" in lines[2] and "FAILED" in lines[6]
    assert "fold tail" in lines[8] and "tail program     45.0 us" in lines[8], lines
    # the stored-dS candidates: the TMA store against its pointer twin (not "tma dq ... atomics"), each
    # against the faster dq pass on its dkdv tile (110 us, not 100: the 7-element key is another tile list)
    assert "tma dS store" in lines[3] and "pointer stores" in lines[3] and "atomics" not in lines[3], lines
    assert all("stored dS" in line and "dq pass    110.0 us" in line for line in lines[4:6]), lines


@pytest.mark.parametrize("argv,match", [(["--kernels", "dkdv", "bwd"], "unknown \\['bwd'\\]"),
                                        (["--maxnreg", "300"], "expected registers per thread in \\[24, 255\\]")])
def test_attention_compile_refuses_unknown_kernels_and_register_caps(argv, match, capsys):
    from bench import attention_compile
    with pytest.raises(SystemExit) as exc:
        attention_compile.main(argv)
    assert exc.value.code == 2 and re.search(match, capsys.readouterr().err)
