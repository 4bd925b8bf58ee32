"""Shared pieces of the distributed parity tests: a tiny SwAV model, deterministic crops, step loops.

Every spawned body builds the same single-process reference on each rank (same seed), copies it, and
parallelises the copy; the parent test only compares numbers returned by the ranks.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist

from seer.model import VisionTransformer, vit_preset
from seer.optim import build_lars
from seer.parallel import ParallelConfig, ParallelDims, full_gradients, full_state_dict, parallelize
from seer.swav import PrototypeFreezer, SwAVHead, SwAVHeadConfig, SwAVModel, normalize_prototypes, swav_loss

FP32_TOL = 2e-5


def build_model(seed: int = 0, batch_norm: bool = False, **vit_kw) -> SwAVModel:
    torch.manual_seed(seed)
    head = SwAVHeadConfig(hidden_dims=[32], output_dim=16, num_prototypes=30, batch_norm=batch_norm)
    model = SwAVModel(VisionTransformer(vit_preset("tiny", **vit_kw)), SwAVHead(64, head))
    normalize_prototypes(model)
    return model


# Models that cannot split 4 ways (what is too small, the refusal naming it): parallelize and
# apply_tensor_parallel both refuse them before changing anything.
UNSPLITTABLE = [
    ({"num_heads": 2, "embed_dim": 64}, {}, "model.num_heads=2 is not divisible by parallel.tp=4"),
    ({"mlp_dim": 250}, {}, "model.mlp_dim=250 is not divisible by parallel.tp=4"),
    ({}, {"num_prototypes": 30}, "head.num_prototypes=30 is not divisible by parallel.tp=4"),
]


def unsplittable_model(vit_kw: dict, head_kw: dict, **head_defaults) -> SwAVModel:
    """A tiny SwAV model with one of UNSPLITTABLE's changes (32 prototypes otherwise)."""
    return SwAVModel(VisionTransformer(vit_preset("tiny", **vit_kw)),
                     SwAVHead(64, SwAVHeadConfig(**{"num_prototypes": 32, **head_defaults, **head_kw})))


def make_crops(step: int, batch: int) -> list[torch.Tensor]:
    """2 global (32 px) + 2 local (16 px) crops of ``batch`` images, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k] is not None)


def parity_run(cfg: ParallelConfig, *, steps: int = 3, batch: int = 4, freeze: int = 1,
               vit_kw: Optional[dict] = None, batch_norm: bool = False, lr: float = 0.5) -> dict:
    """Train the single-process reference on the global batch and the parallel copy on this rank's share
    for ``steps`` LARS steps (prototypes frozen for ``freeze``); return the worst differences (parameters
    and buffers: a head with ``batch_norm`` compares its running statistics too)."""
    vit_kw = vit_kw or {}
    cfg = dataclasses.replace(cfg, param_dtype="float32")  # parity in float32 (bf16 is the production default)
    ref = build_model(batch_norm=batch_norm, **vit_kw)
    par = copy.deepcopy(ref)
    dims = ParallelDims(cfg, "cpu")
    parallelize(par, dims)
    opt_ref, opt_par = build_lars(ref, lr=lr, weight_decay=1e-4), build_lars(par, lr=lr, weight_decay=1e-4)
    fr_ref, fr_par = PrototypeFreezer(ref, freeze), PrototypeFreezer(par, freeze)
    out = {"loss": [], "features": [], "grads": [], "grad_scale": [], "ref_loss": []}
    for step in range(steps):
        crops = make_crops(step, batch * dims.dp)
        local = [c[dims.dp_rank * batch:(dims.dp_rank + 1) * batch] for c in crops]
        a, b = ref(crops), par(local)
        la = swav_loss(a.scores)
        lb = swav_loss(b.scores, group=dims.dp_group, prototype_group=dims.tp_group)
        la.backward()
        lb.backward()
        mean = lb.detach().clone()
        if dims.dp_group is not None:
            dist.all_reduce(mean, group=dims.dp_group)
        out["loss"].append(abs(float(mean) / dims.dp - float(la.detach())))
        out["ref_loss"].append(float(la.detach()))
        feats = a.features.reshape(4, dims.dp, batch, -1)[:, dims.dp_rank].reshape(4 * batch, -1)
        out["features"].append(float((feats - b.features.float()).abs().max().detach()))
        fr_ref.after_backward()
        fr_par.after_backward()
        grads_ref = full_gradients(ref)
        out["grads"].append(max_diff(grads_ref, full_gradients(par)))
        out["grad_scale"].append(max(float(g.abs().max()) for g in grads_ref.values() if g is not None))
        for opt, model in ((opt_ref, ref), (opt_par, par)):
            opt.step()
            opt.zero_grad()
            normalize_prototypes(model)
    out["params"] = max_diff(full_state_dict(ref), full_state_dict(par))
    out["scale"] = max(float(p.abs().max()) for p in ref.parameters())
    return out


def assert_parity(r: dict, where) -> None:
    """What parity_run returned matches the single process (float32 tolerances) and the steps really trained."""
    assert max(r["loss"]) < 1e-5, (where, r["loss"])
    # Gradients relative to their size, as the parameters below: a sum over the batch and its tokens (the
    # cls token's, about 1.5-3) differs by about 1e-5 relative when the reduction order does (torch 2.11's
    # CPU kernels, SyncBatchNorm's two-rank statistics), past an absolute 2e-5.
    assert max(r["features"]) < FP32_TOL, (where, r)
    assert all(d < FP32_TOL * max(1.0, s) for d, s in zip(r["grads"], r["grad_scale"])), (where, r)
    assert r["params"] < FP32_TOL * r["scale"], (where, r["params"])
    assert r["ref_loss"][0] != r["ref_loss"][-1]


def saved_bytes_per_token(block: torch.nn.Module, make_input: Callable[[int], torch.Tensor], batches: tuple,
                          tokens_per_sample: int, amp: Optional[torch.dtype] = torch.bfloat16) -> float:
    """Bytes autograd saves per (global) token in ``block`` under ``amp`` autocast (None: none, fp32): the slope
    between two batch sizes, so per-layer constants (weights and their bf16 copies) cancel."""
    sizes = []
    for b in batches:
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t

        x = make_input(b)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
                block(x)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / ((batches[1] - batches[0]) * tokens_per_sample)
