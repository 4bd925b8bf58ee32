"""Data parallelism with FSDP2 against one process on the same global batch, and the 2 x 2 (dp x tp) mesh."""
from __future__ import annotations

import pytest
import torch

from seer.model.init import DTensor
from seer.optim import build_lars
from seer.parallel import ParallelConfig, ParallelDims, parallelize
from seer.swav import swav_loss
from tests.dist_utils import run_distributed
from tests.parallel.common import assert_parity, build_model, make_crops, parity_run


def _fsdp_details() -> dict:
    """FSDP2 shards the parameters and the LARS momentum; bf16 mixed precision keeps float32 prototype scores."""
    model = build_model()
    dims = ParallelDims(ParallelConfig(param_dtype="bfloat16"), "cpu")
    parallelize(model, dims)
    opt = build_lars(model, lr=0.5)
    out = model(make_crops(0, 4))
    loss = swav_loss(out.scores, group=dims.dp_group)
    loss.backward()
    opt.step()
    w = model.backbone.blocks[0].mlp.fc1.weight
    return {"sharded": isinstance(w, DTensor) and w.to_local().shape[0] * 2 == w.shape[0],
            "momentum_dtensor": isinstance(opt.state[w]["momentum_buffer"], DTensor),
            "features_dtype": out.features.dtype, "scores_dtype": out.scores[0].dtype,
            "loss": float(loss.detach()), "finite": bool(torch.isfinite(loss))}


def _dp_body(rank, world):
    return {"fsdp": parity_run(ParallelConfig()),
            "no_reshard": parity_run(ParallelConfig(fsdp_reshard_after_forward=False), steps=2),
            # SwAV's head BatchNorm, synchronised over the dp ranks on CPU (SyncBatchNorm1d): the statistics of
            # the global batch, so outputs, gradients and running statistics are the single process's. At lr 0.5
            # this tiny BN head is chaotic in float32: one process given the same batch with its halves swapped
            # differs from itself by 1e-3 in the head's gradients after one step; at 0.005 by 1e-6.
            "batch_norm": parity_run(ParallelConfig(), batch_norm=True, lr=0.005),
            "details": _fsdp_details()}


def _mesh_body(rank, world):
    cfg = ParallelConfig(tp=2, sequence_parallel=True, activation_checkpointing="every-2")
    # The head's BatchNorm is synchronised over its dp group only (tensor-parallel ranks see the same rows).
    return {"mesh": parity_run(cfg, vit_kw={"qk_norm": True}),
            "batch_norm": parity_run(cfg, steps=2, batch_norm=True, lr=0.005)}


@pytest.mark.dist
def test_fsdp_data_parallel_matches_one_process():
    for rank, res in enumerate(run_distributed(_dp_body, 2)):
        assert_parity(res["fsdp"], ("fsdp", rank))
        assert_parity(res["no_reshard"], ("no_reshard", rank))
        assert_parity(res["batch_norm"], ("batch_norm", rank))
        d = res["details"]
        assert d["sharded"] and d["momentum_dtensor"] and d["finite"], d
        assert d["features_dtype"] == torch.bfloat16 and d["scores_dtype"] == torch.float32


@pytest.mark.dist
@pytest.mark.slow
def test_2x2_mesh_data_and_tensor_parallel_matches_one_process():
    for rank, res in enumerate(run_distributed(_mesh_body, 4)):
        assert_parity(res["mesh"], ("2x2", rank))
        assert_parity(res["batch_norm"], ("2x2 batch_norm", rank))
