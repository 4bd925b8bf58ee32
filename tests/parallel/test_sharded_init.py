"""init_weights_(seed=None) on sharded models: every tensor-parallel and FSDP shard draws its own values, replicated
tensors agree on every rank, and the result follows torch.manual_seed."""
from __future__ import annotations

import pytest
import torch

from seer.model import init_weights_
from seer.model.init import local_tensor
from seer.parallel import ParallelConfig, ParallelDims, parallelize, tensor_parallel_params
from tests.dist_utils import run_distributed
from tests.parallel.common import build_model


def _snapshot(model: torch.nn.Module) -> dict:
    split = {id(p) for p in tensor_parallel_params(model)}
    out = {"split": {}, "replicated": {}}
    for name, p in model.named_parameters():
        out["split" if id(p) in split else "replicated"][name] = local_tensor(p).detach().clone()
    return out


def _init_body(rank, world):
    model = build_model(depth=1)
    parallelize(model, ParallelDims(ParallelConfig(tp=2), "cpu"))
    res = {}
    for key, seed in (("same", 0), ("again", 0), ("skewed", 100 + rank)):  # "skewed": the ranks' RNGs differ
        torch.manual_seed(seed)
        init_weights_(model)
        res[key] = _snapshot(model)
    init_weights_(model)  # no reseed: the global generator moved on
    res["next"] = _snapshot(model)
    fsdp = build_model(depth=1)
    parallelize(fsdp, ParallelDims(ParallelConfig(param_dtype="float32"), "cpu"))
    torch.manual_seed(0)
    init_weights_(fsdp)
    res["fsdp_fc1"] = local_tensor(fsdp.backbone.blocks[0].mlp.fc1.weight).detach().clone()
    return res


@pytest.mark.dist
def test_unseeded_init_of_sharded_models_draws_per_shard():
    r0, r1 = run_distributed(_init_body, 2)
    weights = ["backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight",
               "backbone.blocks.0.mlp.fc2.weight", "head.prototypes.weight"]
    for key in ("same", "skewed"):
        a, b = r0[key], r1[key]
        assert set(weights) <= set(a["split"])
        for name in weights:  # the two shards of a split weight are different draws
            assert not torch.equal(a["split"][name], b["split"][name]), (key, name)
        for name, t in a["replicated"].items():  # replicated tensors are identical on both ranks
            assert torch.equal(t, b["replicated"][name]), (key, name)
    for r in (r0, r1):
        fc1 = r["same"]["split"]["backbone.blocks.0.mlp.fc1.weight"]
        assert abs(fc1.std().item() - 0.02) < 0.003 and fc1.abs().max() <= 0.04 + 1e-6  # trunc. N(0, 0.02^2)
        for part in ("split", "replicated"):  # reproducible under torch.manual_seed, fresh without it
            assert all(torch.equal(t, r["again"][part][n]) for n, t in r["same"][part].items())
        assert not torch.equal(r["same"]["split"]["head.prototypes.weight"], r["next"]["split"]["head.prototypes.weight"])
        assert not torch.equal(r["same"]["replicated"]["backbone.pos_embed"], r["next"]["replicated"]["backbone.pos_embed"])
    assert not torch.equal(r0["fsdp_fc1"], r1["fsdp_fc1"])  # FSDP shards of one weight: different rows


def test_unseeded_init_of_a_sharded_model_under_a_meta_default_device():
    """The seed is drawn from the CPU generator: under ``with torch.device("meta")`` (how models are built
    for sharding) a draw on the default device could not be read."""
    from seer.parallel import apply_tensor_parallel
    model = apply_tensor_parallel(build_model(depth=1), group=None, tp_rank=0, tp_size=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        init_weights_(model)
    again = apply_tensor_parallel(build_model(depth=1), group=None, tp_rank=0, tp_size=2)
    torch.manual_seed(0)
    init_weights_(again)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
