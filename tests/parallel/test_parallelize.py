"""parallelize's checks of the model and the ParallelConfig against the ParallelDims: each mismatch is refused
with a ValueError / TypeError naming the setting, before the model changes."""
from __future__ import annotations

import pytest
import torch

from seer.model import VisionTransformer, vit_preset
from seer.parallel import ParallelConfig, ParallelDims, apply_tensor_parallel, parallelize, validate_parallel_config
from seer.swav import SwAVHead, SwAVHeadConfig, SwAVModel
from tests.dist_utils import run_distributed
from tests.parallel.common import UNSPLITTABLE, build_model, unsplittable_model


def layout(cfg: ParallelConfig, world: int, device_type: str = "cpu") -> ParallelDims:
    """A validated ParallelDims for ``world`` processes without its mesh: enough for the checks, which run
    before any collective (building the real mesh needs ``world`` processes)."""
    dims = object.__new__(ParallelDims)
    dims.cfg, dims.world_size, dims.device_type, dims.mesh = cfg, world, device_type, None
    dims.tp, dims.dp = cfg.tp, validate_parallel_config(cfg, world)
    return dims


def state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_refused(model, dims, cfg, exc, match):
    before, modules = state(model), [type(m) for m in model.modules()]
    with pytest.raises(exc, match=match):
        parallelize(model, dims, cfg)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules  # no layer replaced


TP2 = ParallelConfig(tp=2)


@pytest.mark.parametrize("dims_cfg, world, cfg, match", [
    # an explicit cfg with another layout than the mesh's (it passes validate_parallel_config on its own)
    (TP2, 2, ParallelConfig(tp=1), r"cfg has parallel.tp=1, parallel.dp=2 but dims was built with tp=2, dp=1"),
    (ParallelConfig(), 2, ParallelConfig(tp=2, sequence_parallel=True), r"parallel.tp=2.*built with tp=1, dp=2"),
    (ParallelConfig(tp=2, dp=2), 4, ParallelConfig(tp=4), r"parallel.tp=4, parallel.dp=1 but .* tp=2, dp=2"),
    # an explicit cfg that is invalid for the world size, or asks for sequence parallelism without TP
    (TP2, 2, ParallelConfig(tp=3), "world size 2 is not divisible by parallel.tp=3"),
    (ParallelConfig(), 1, ParallelConfig(sequence_parallel=True), "sequence_parallel=true needs parallel.tp > 1"),
])
def test_cfg_must_match_the_layout_of_dims(dims_cfg, world, cfg, match):
    assert_refused(build_model(), layout(dims_cfg, world), cfg, ValueError, match)


def test_dims_cfg_changed_after_the_mesh_was_built():
    dims = layout(ParallelConfig(tp=2), 2)
    dims.cfg = ParallelConfig(tp=1)  # dims.tp / dims.dp (and the mesh) stay those of tp=2
    assert_refused(build_model(), dims, None, ValueError, "parallel.tp=1, parallel.dp=2 but dims was built with tp=2")


def test_other_fields_of_an_explicit_cfg_are_the_models():
    """Checkpointing, compile, dtypes and sequence parallelism may differ from dims.cfg's (one mesh, several
    models): not an error."""
    model = build_model()
    parallelize(model, layout(TP2, 2), ParallelConfig(tp=2, dp=-1, sequence_parallel=True,
                                                      activation_checkpointing="full"))
    assert model.backbone.blocks[0].attn.qkv.sequence_parallel and "forward" in vars(model.backbone.blocks[0])


def test_wrong_argument_types():
    model = build_model()
    assert_refused(model, TP2, None, TypeError, "dims must be a ParallelDims .* got ParallelConfig")
    assert_refused(model, layout(TP2, 2), {"tp": 2}, TypeError, "cfg must be a ParallelConfig or None .* got dict")


@pytest.mark.parametrize("vit_kw, head_kw, match", UNSPLITTABLE)
def test_model_must_split_tp_ways(vit_kw, head_kw, match):
    model = unsplittable_model(vit_kw, head_kw, hidden_dims=[30], output_dim=18)
    assert_refused(model, layout(ParallelConfig(tp=4), 4), None, ValueError, match)


def test_replicated_head_widths_need_not_divide_tp():
    """The projection MLP is replicated under TP: its widths (30, 18 here) are not split."""
    model = SwAVModel(VisionTransformer(vit_preset("tiny")),
                      SwAVHead(64, SwAVHeadConfig(hidden_dims=[30], output_dim=18, num_prototypes=32)))
    parallelize(model, layout(ParallelConfig(tp=4), 4))
    assert model.head.prototypes.weight.shape == (8, 18)


def test_already_parallelised_models_are_refused():
    split = apply_tensor_parallel(build_model(), group=None, tp_rank=0, tp_size=2)
    assert_refused(split, layout(TP2, 2), None, ValueError,
                   r"already parallelised \(backbone.blocks.0.attn.qkv \(ColumnParallelLinear\)\)")
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(split, group=None, tp_rank=0, tp_size=2)
    checkpointed = build_model()
    parallelize(checkpointed, layout(ParallelConfig(activation_checkpointing="full"), 1))
    assert_refused(checkpointed, layout(TP2, 2), None, ValueError,
                   r"already parallelised \(backbone.blocks.0 \(activation checkpointing\)\)")


def test_device_type_of_the_model_without_fsdp():
    """tp > 1 without FSDP leaves the tensors where they are: they must be on dims.device_type (or meta).
    FSDP2 (dp > 1) and a single process accept any device."""
    cuda_tp = layout(TP2, 2, device_type="cuda")
    assert_refused(build_model(), cuda_tp, None, ValueError,
                   r"backbone.cls_token is on cpu but dims.device_type is 'cuda'")
    with torch.device("meta"):
        meta = build_model()
    parallelize(meta, cuda_tp)  # materialised later, on the right device
    parallelize(build_model(), layout(ParallelConfig(), 1, device_type="cuda"))


def _fsdp_twice(rank, world):
    model = build_model()
    dims = ParallelDims(ParallelConfig(param_dtype="float32"), "cpu")
    parallelize(model, dims)
    try:
        parallelize(model, dims)
    except ValueError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.dist
def test_fsdp_sharded_model_is_refused():
    for msg in run_distributed(_fsdp_twice, 2):
        assert "already parallelised (the model (FSDP2))" in msg, msg
