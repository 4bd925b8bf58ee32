"""seer_kernels.attention_packed: the same bits as seer_kernels.attention on the slices of the fused projection,
forward and backward, on every backend; its gradient is one buffer written by the backward itself.

attention's own tests hold those bits against the float64 reference (test_attention.py); here every
output element is also checked to be written (uninitialised memory is NaN under ``poison_empty``).
"""
from __future__ import annotations

import pytest
import torch

import seer_kernels
from seer_kernels import use_backend
from seer_kernels.ops import attention_packed as packed
from seer_kernels.reference import attention as ref
from seer_kernels.testing import triton_device

TRITON_DEV = triton_device()
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _unpacked(qkv, heads, **kw):
    b, n = qkv.shape[:2]
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return seer_kernels.attention(q, k, v, **kw).transpose(1, 2).reshape(b, n, -1)


def _both(backend, qkv, heads, dout, **kw):
    """(out, dqkv) of attention_packed and of attention on the slices, with ``backend`` forced."""
    got = []
    with use_backend(backend, op="attention"):
        for fn in (packed.attention_packed, _unpacked):
            x = qkv.detach().requires_grad_()
            out = fn(x, heads, **kw)
            (g,) = torch.autograd.grad(out, x, dout)
            got.append((out, g))
    return got


def _cases():
    out = [pytest.param("reference", "cpu", dt, shape, id=f"reference-{str(dt)[6:]}-{shape}")
           for dt in (F32, F64, BF16) for shape in ((2, 37, 3, 16), (1, 1, 2, 8))]
    out += [pytest.param("sdpa", "cpu", F32, (2, 50, 3, 64), id="sdpa-cpu")]
    if TRITON_DEV == "cpu":
        out += [pytest.param("triton", "cpu", dt, shape, marks=pytest.mark.triton,
                             id=f"triton-cpu-{str(dt)[6:]}-{shape}")
                for dt, shape in ((F32, (2, 37, 3, 16)), (F32, (1, 70, 2, 24)), (F16, (2, 50, 2, 64)))]
    # On a GPU: the ViT shapes the table times (N 257 and 197, D 128, 88 and 64) in bfloat16, and a local
    # crop in float16 (few cases: the GPU check's test phase has a time cap).
    out += [pytest.param("triton", "cuda", dt, shape, marks=[pytest.mark.cuda, pytest.mark.triton],
                         id=f"triton-cuda-{str(dt)[6:]}-{shape}")
            for dt, shape in ((BF16, (2, 257, 4, 128)), (BF16, (2, 197, 4, 64)), (BF16, (2, 257, 3, 88)),
                              (F16, (4, 37, 4, 64)))]
    return out


@pytest.mark.parametrize("backend,device,dtype,shape", _cases())
@pytest.mark.parametrize("deterministic", [True, False])
def test_same_bits_as_attention_on_the_slices(backend, device, dtype, shape, deterministic, poison_empty):
    b, n, h, d = shape
    qkv = torch.randn(b, n, 3 * h * d, device=device, dtype=dtype)
    dout = torch.randn(b, n, h * d, device=device, dtype=dtype)
    if backend == "triton" and not deterministic:
        # dq by float32 atomics: the order of the adds, and so the bits, may differ between two runs on a GPU
        (out, g), (out2, g2) = _both(backend, qkv, h, dout, deterministic=False)
        assert torch.equal(out, out2)
        torch.testing.assert_close(g, g2, rtol=2e-2 if dtype != F32 else 1e-5, atol=1e-2 if dtype != F32 else 1e-6)
        assert not g.isnan().any()
        return
    (out, g), (out2, g2) = _both(backend, qkv, h, dout, deterministic=deterministic)
    assert out.shape == (b, n, h * d) and g.shape == qkv.shape and g.dtype == dtype and g.is_contiguous()
    assert torch.equal(out, out2) and torch.equal(g, g2)
    assert not g.isnan().any() and not out.isnan().any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_matches_float64_math_on_a_strided_projection(backend, poison_empty):
    """A qkv that is a slice of a wider tensor (any strides): out and dqkv against float64 math."""
    if backend == "triton" and TRITON_DEV is None:
        pytest.skip("no Triton here")
    dev = TRITON_DEV if backend == "triton" else "cpu"
    b, n, h, d = 2, 37, 2, 16
    wide = torch.randn(b, n, 3 * h * d + 8, device=dev, dtype=F32, requires_grad=True)
    qkv = wide[..., 8:]  # rows 3 H D + 8 elements apart
    dout = torch.randn(b, n, h * d, device=dev, dtype=F32)
    with use_backend(backend, op="attention"):
        out = packed.attention_packed(qkv, h, deterministic=True)
        (g,) = torch.autograd.grad(out, wide, dout)
    x = wide.detach().double().requires_grad_()
    q, k, v = packed.unpack(x[..., 8:], h)
    want = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v
    want = want.transpose(1, 2).reshape(b, n, -1)
    (g64,) = torch.autograd.grad(want, x, dout.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)
    assert (g[..., :8] == 0).all()  # the columns outside the slice get no gradient


def test_gradcheck_float64():
    x = torch.randn(1, 5, 3 * 2 * 8, dtype=F64, requires_grad=True)
    with use_backend("reference", op="attention"):
        assert torch.autograd.gradcheck(lambda t: packed.attention_packed(t, 2, scale=0.3), (x,))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    dev = "cpu" if backend == "reference" else TRITON_DEV
    if dev is None:
        pytest.skip("no Triton here")
    dt = F32 if dev == "cpu" else BF16
    b, n, h, d = 2, 17, 2, 16
    qkv = torch.randn(b, n, 3 * h * d, device=dev, dtype=dt, requires_grad=True)
    torch.library.opcheck(torch.ops.seer.attention_packed_fwd.default, (qkv, h, 0.25, True, backend))
    out, lse = torch.ops.seer.attention_packed_fwd(qkv.detach(), h, 0.25, True, backend)
    dout = torch.randn(b, n, h * d, device=dev, dtype=dt)
    torch.library.opcheck(torch.ops.seer.attention_packed_bwd.default,
                          (dout, qkv.detach(), out, lse, h, 0.25, True, backend))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 2, 8)], ids=["all-ones", "odd"])
def test_ops_fake_kernels_match_on_odd_shapes_and_layouts(backend, shape):
    """The fake kernels give exactly the real outputs' shape, dtype, device, strides (size-1 dims included)
    and storage offset for N = 1 and qkv of any strides (a slice of a wider tensor, (N, B) memory, a batch
    broadcast by expand), also for a transposed dout; no output aliases an input, no input changes;
    opcheck passes (qkv requiring grad or not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if backend == "triton" and TRITON_DEV != "cpu":
        pytest.skip("the interpreter's float32 case")
    b, n, h, d = shape
    width = 3 * h * d
    layouts = {"contiguous": torch.randn(b, n, width), "wide": torch.randn(b, n, width + 8)[..., 8:],
               "nb": torch.randn(n, b, width).transpose(0, 1), "expanded": torch.randn(1, n, width).expand(b, n, width)}

    def meta(t):
        return tuple(t.shape), t.dtype, t.device, t.stride(), t.storage_offset()

    for name, qkv in layouts.items():
        before = qkv.clone()
        out, lse = torch.ops.seer.attention_packed_fwd(qkv, h, 0.3, False, backend)
        dout = torch.randn(n, b, h * d).transpose(0, 1)
        dqkv = torch.ops.seer.attention_packed_bwd(dout, qkv, out, lse, h, 0.3, False, backend)
        with FakeTensorMode() as mode:
            fx, fd, fo, fl = (mode.from_tensor(t) for t in (qkv, dout, out, lse))
            fake = (*torch.ops.seer.attention_packed_fwd(fx, h, 0.3, False, backend),
                    torch.ops.seer.attention_packed_bwd(fd, fx, fo, fl, h, 0.3, False, backend))
        assert [meta(t) for t in (out, lse, dqkv)] == [meta(t) for t in fake], name
        inputs = {t.untyped_storage().data_ptr() for t in (qkv, dout, out, lse)}
        assert dqkv.untyped_storage().data_ptr() not in inputs and torch.equal(qkv, before), name
        for x in (qkv, qkv.detach().clone().requires_grad_()):
            torch.library.opcheck(torch.ops.seer.attention_packed_fwd.default, (x, h, 0.3, False, backend))
        torch.library.opcheck(torch.ops.seer.attention_packed_bwd.default, (dout, qkv, out, lse, h, 0.3, False, backend))

@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_ops_refuse_mismatched_arguments(backend, fake):
    """Direct calls of seer::attention_packed_fwd / _bwd, and their fake kernels, check their arguments,
    naming them: the Triton backward read a dout, out or lse shorter than qkv's out of bounds, and a float64
    lse as float32, and returned a gradient without a word."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    if backend == "triton" and TRITON_DEV != "cpu":
        pytest.skip("the interpreter's float32 case")
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    out, lse = torch.ops.seer.attention_packed_fwd(qkv, 2, 0.3, False, backend)
    dout = torch.randn_like(out)
    cases = [((dout, qkv, out, lse.double()), r"'lse' must be torch.float32 of shape \(2, 2, 5\)"),
             ((dout, qkv, out, lse[:, :, :3]), r"'lse' must be torch.float32 of shape \(2, 2, 5\)"),
             ((dout[:, :3], qkv, out, lse), r"'dout' must be torch.float32 of shape \(2, 5, 16\)"),
             ((dout, qkv, torch.randn(2, 5, 32), lse), r"'out' must be torch.float32 of shape \(2, 5, 16\)")]
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext() as mode:
        def conv(args):
            return tuple(mode.from_tensor(a) for a in args) if fake else args
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                torch.ops.seer.attention_packed_bwd(*conv(args), 2, 0.3, False, backend)
        with pytest.raises(ValueError, match="'qkv' has 50 features"):
            torch.ops.seer.attention_packed_fwd(*conv((torch.randn(2, 5, 50),)), 2, 0.3, False, backend)


@pytest.mark.parametrize("backend", ["reference", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_compiles_fullgraph_with_the_same_bits(backend):
    dev = TRITON_DEV if backend == "triton" else "cpu"
    if dev is None:
        pytest.skip("no Triton here")
    dt = F32 if dev == "cpu" else BF16
    qkv = torch.randn(2, 37, 3 * 3 * 16, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(2, 37, 3 * 16, device=dev, dtype=dt)
    with use_backend(backend, op="attention"):
        compiled = torch.compile(lambda x: packed.attention_packed(x, 3, deterministic=True), fullgraph=True)
        out = compiled(qkv)
        (g,) = torch.autograd.grad(out, qkv, dout)
        out2 = packed.attention_packed(qkv, 3, deterministic=True)
        (g2,) = torch.autograd.grad(out2, qkv, dout)
    assert torch.equal(out, out2) and torch.equal(g, g2)


def test_no_grad_and_functorch_paths():
    qkv = torch.randn(2, 9, 3 * 2 * 8, dtype=F64)
    with use_backend("reference", op="attention"):
        with torch.no_grad():
            out = packed.attention_packed(qkv, 2)
        assert torch.equal(out, _unpacked(qkv, 2))
        g = torch.func.grad(lambda x: packed.attention_packed(x, 2).square().sum())(qkv)
        x = qkv.clone().requires_grad_()
        (g2,) = torch.autograd.grad(_unpacked(x, 2).square().sum(), x)
        torch.testing.assert_close(g, g2, rtol=0, atol=1e-12)
        batched = torch.func.vmap(lambda x: packed.attention_packed(x, 2))(qkv.unsqueeze(0).expand(3, -1, -1, -1))
        # Close, not equal: vmap folds its dim into the batch, and a CPU matmul of a larger batch may round
        # otherwise (it did on one Xeon, by 1 ulp)
        for b in batched:
            torch.testing.assert_close(b, out, rtol=0, atol=1e-12)


def test_meta_tensors_give_shapes():
    out = packed.attention_packed(torch.empty(2, 257, 3 * 4 * 32, device="meta"), 4)
    assert out.shape == (2, 257, 128) and out.device.type == "meta"


def test_second_backward_is_refused():
    qkv = torch.randn(1, 5, 3 * 2 * 8, dtype=F64, requires_grad=True)
    with use_backend("reference", op="attention"):
        (g,) = torch.autograd.grad(packed.attention_packed(qkv, 2).sum(), qkv, create_graph=True)
        with pytest.raises(RuntimeError, match=r"attention_packed_bwd(.|\n)*sdpa_kernel\(SDPBackend.MATH\)"):
            torch.autograd.grad(g.sum(), qkv)


@pytest.mark.parametrize("args,err,match", [
    ((torch.randn(2, 5, 48).numpy(), 2), TypeError, "argument 'qkv' must be a torch.Tensor"),
    ((torch.randn(2, 5, 48), 2.0), TypeError, "argument 'heads' must be an int"),
    ((torch.randn(2, 5, 48), True), TypeError, "argument 'heads' must be an int"),
    ((torch.randn(2, 5, 48), 0), ValueError, "argument 'heads' must be at least 1"),
    ((torch.randn(2, 3, 5, 48), 2), ValueError, r"must be 3-D \(B, N, 3 \* heads \* D\)"),
    ((torch.randn(2, 5, 48), 5), ValueError, "48 features .* not a multiple of 3 \\* heads = 15"),
    ((torch.ones(2, 5, 48, dtype=torch.int32), 2), TypeError, "must be float32, bfloat16, float16 or float64"),
    ((torch.randn(2, 0, 48), 2), ValueError, "must be non-empty"),
])
def test_bad_input_is_named(args, err, match):
    with pytest.raises(err, match=match):
        packed.attention_packed(*args)


@pytest.mark.parametrize("kw,err,match", [
    ({"scale": float("nan")}, ValueError, "attention_packed: argument 'scale' must be a finite number"),
    ({"deterministic": 1}, TypeError, "attention_packed: argument 'deterministic' must be True, False or None"),
])
def test_bad_options_are_named_as_this_ops(kw, err, match):
    with pytest.raises(err, match=match):
        packed.attention_packed(torch.randn(2, 5, 48), 2, **kw)


def test_head_dim_the_triton_kernel_refuses_is_named():
    with pytest.raises(seer_kernels.BackendError, match="head dim 12 is not supported"):
        with use_backend("triton", op="attention"):
            packed.attention_packed(torch.randn(1, 5, 3 * 2 * 12), 2)


def test_model_attention_runs_the_packed_op_and_keeps_its_bits(monkeypatch):
    """seer.model.layers.Attention without QK-norm calls attention_packed (with it, attention on the normed
    slices); either way its output and gradients are those of the unpacked computation."""
    from seer.model.layers import Attention
    calls = []
    real = seer_kernels.attention_packed
    monkeypatch.setattr(seer_kernels, "attention_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    for qk_norm in (False, True):
        layer = Attention(48, 3, qk_norm=qk_norm).double()
        x = torch.randn(2, 7, 48, dtype=F64, requires_grad=True)
        n = len(calls)
        with use_backend("reference", op="attention"):
            y = layer(x)
            (gx,) = torch.autograd.grad(y.sum(), x)
        assert len(calls) == n + (0 if qk_norm else 1)
        qkv = layer.qkv(x)
        q, k, v = qkv.unflatten(-1, (3, 3, 16)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = layer.q_norm(q), layer.k_norm(k)
        with use_backend("reference", op="attention"):
            want = layer.proj(seer_kernels.attention(q, k, v).transpose(1, 2).reshape(2, 7, 48))
            (gx2,) = torch.autograd.grad(want.sum(), x)
        assert torch.equal(y, want) and torch.equal(gx, gx2)


def test_lse_dtype_of_the_fake_kernel_follows_the_reference():
    qkv = torch.empty(1, 3, 3 * 2 * 8, device="meta", dtype=F64)
    _, lse = torch.ops.seer.attention_packed_fwd(qkv, 2, 0.5)
    assert lse.dtype == ref.new_lse(packed.unpack(qkv, 2)[0]).dtype and lse.shape == (1, 2, 3)


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["kernel", "d-strided"])
def test_triton_backward_fills_given_gradient_buffers(layout, poison_empty):
    """attention_bwd(grads=...) writes dq, dk, dv into the given tensors: through their strides where the
    kernels take them, else computed apart and copied in (a head dim that is not unit-stride)."""
    if TRITON_DEV is None:
        pytest.skip("no Triton here")
    from seer_kernels.triton import attention as tri
    dt = F32 if TRITON_DEV == "cpu" else BF16
    b, h, n, d = 1, 2, 37, 16
    q, k, v, dout = (torch.randn(b, h, n, d, device=TRITON_DEV, dtype=dt) for _ in range(4))
    out, lse = tri.attention_fwd(q, k, v, 0.25)
    want = tri.attention_bwd(dout, q, k, v, out, lse, 0.25, True)
    if layout == "kernel":
        grads = packed.unpack(torch.empty(b, n, 3 * h * d, device=TRITON_DEV, dtype=dt), h)
    else:
        grads = tuple(torch.empty(b, h, d, n, device=TRITON_DEV, dtype=dt).transpose(2, 3) for _ in range(3))
    got = tri.attention_bwd(dout, q, k, v, out, lse, 0.25, True, grads=grads)
    assert all(g is x for g, x in zip(got, grads))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_the_selector_is_told_the_call_is_packed(monkeypatch):
    """attention_packed asks the dispatcher with packed=True (the table's fwd_bwd_packed decides for it:
    test_attention.py::test_selector_takes_the_packed_ratio_for_attention_packed); attention does not."""
    from seer_kernels.ops import attention as ops
    seen = []
    real = ops.DISPATCH.select
    monkeypatch.setattr(ops.DISPATCH, "select", lambda *a, **info: seen.append(info["packed"]) or real(*a, **info))
    qkv = torch.randn(1, 5, 3 * 2 * 8, requires_grad=True)
    packed.attention_packed(qkv, 2)
    _unpacked(qkv, 2)
    assert seen == [True, False]


@pytest.mark.triton
def test_triton_backward_refuses_gradient_buffers_of_another_shape_or_dtype():
    if TRITON_DEV is None:
        pytest.skip("no Triton here")
    from seer_kernels.triton import attention as tri
    dt = F32 if TRITON_DEV == "cpu" else BF16
    q, k, v, dout = (torch.randn(1, 2, 17, 16, device=TRITON_DEV, dtype=dt) for _ in range(4))
    out, lse = tri.attention_fwd(q, k, v, 0.25)
    good = torch.empty(1, 2, 17, 16, device=TRITON_DEV, dtype=dt)
    for bad in (torch.empty(1, 2, 16, 16, device=TRITON_DEV, dtype=dt),
                torch.empty(1, 2, 17, 16, device=TRITON_DEV, dtype=F64)):
        with pytest.raises(ValueError, match="argument 'grads' must hold dq, dk, dv shaped as q, k, v; its dk"):
            tri.attention_bwd(dout, q, k, v, out, lse, 0.25, True, grads=(good, bad, good.clone()))
