"""Step options: global gradient clipping, fp16 with a checkpointed gradient scaler, precision 'auto'."""
import pytest
import torch

from seer.config import apply_overrides, preset
from seer.train import Trainer
from seer.train.build import clip_grad_norm, resolve_precision
from seer.train.checkpoint import read_meta


def test_clip_grad_norm_matches_torch_on_one_process():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 7), torch.nn.Linear(5, 7)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5)
    for m in (a, b):
        (m(x) ** 2).sum().backward()
    ours = clip_grad_norm(a, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert abs(ours - float(ref)) < 1e-5 * float(ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["train.precision=fp16", "train.max_steps=3", "checkpoint.every=2",
                                           "train.grad_clip=1.0", "train.threads=1"])
    t = Trainer(cfg, tmp_path)
    assert t.scaler is not None
    t.fit()
    scale = t.scaler.get_scale()
    assert read_meta(tmp_path / "checkpoints" / "step_00000003")["scaler"]["scale"] == scale
    again = Trainer(cfg, tmp_path)
    assert again.step == 3 and again.scaler.get_scale() == scale


def test_precision_auto_resolves_to_a_concrete_choice():
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_attention_backend_is_forced_during_the_run_only(tmp_path, monkeypatch):
    # The run's choice reaches the backward's threads through the environment, and is undone afterwards:
    # another run in this process (here one with 'auto') must not inherit it.
    from seer_kernels import _backend
    from seer_kernels.ops import attention as op
    monkeypatch.delenv("SEER_KERNELS_BACKEND_ATTENTION", raising=False)
    monkeypatch.delenv("SEER_KERNELS_BACKEND", raising=False)
    seen = []
    real = op._sdpa

    def spy(*args):
        seen.append(_backend.forced_backend("attention")[0])
        return real(*args)
    monkeypatch.setattr(op.DISPATCH.backends["sdpa"].impl, "attention", spy)
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=1", "train.threads=1", "train.attention_backend=sdpa",
                                           "eval.at_end=false"])
    Trainer(cfg, tmp_path / "a").fit()
    assert seen and set(seen) == {"sdpa"}
    assert _backend.forced_backend("attention") == (None, "")


def test_attention_backend_that_cannot_run_is_refused_by_its_key(tmp_path, monkeypatch):
    import pytest
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' CPU Triton interpreter off: Triton needs a GPU
    cfg = apply_overrides(preset("tiny"), ["train.attention_backend=triton", "train.device=cpu"])
    with pytest.raises(ValueError, match="train.attention_backend='triton' cannot run this model on cpu"):
        Trainer(cfg, tmp_path)


def _fp16_overflow_in_one_tensor_parallel_slice(rank, world, out, optimizer):
    from seer.model.init import local_tensor
    from seer.parallel import tensor_parallel_params
    cfg = apply_overrides(preset("tiny"), ["parallel.tp=2", "train.precision=fp16", "train.max_steps=4",
                                           "checkpoint.every=0", "loss.freeze_prototypes_iters=0",
                                           f"train.optimizer={optimizer}", "train.threads=1", "eval.at_end=false"])
    t = Trainer(cfg, out)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # no overflow of its own in the first steps
    split = {id(p) for p in tensor_parallel_params(t.model)}
    weight = dict(t.model.named_parameters())["backbone.blocks.0.mlp.fc1.weight"]
    assert id(weight) in split
    unscale, scales = t.scaler.unscale_, []

    def overflow_on_rank_0(opt):
        if t.step == 2 and rank == 0:  # one overflowed element of this rank's slice, as fp16 overflow makes
            local_tensor(weight.grad).view(-1)[0] = float("inf")
        return unscale(opt)
    t.scaler.unscale_ = overflow_on_rank_0
    update = t.scaler.update
    t.scaler.update = lambda *a, **k: (update(*a, **k), scales.append(t.scaler.get_scale()))
    t.fit()
    replicated = {n: local_tensor(p.detach()).clone() for n, p in t.model.named_parameters() if id(p) not in split}
    return scales, replicated


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_fp16_overflow_on_one_tensor_parallel_rank_is_skipped_by_every_rank(tmp_path, optimizer):
    """GradScaler checks this rank's gradients only: with the inf in rank 0's slice of a split weight, rank 0
    alone skipped the step; LARS's norm all-reduce then mismatched on the other rank ("Received data size
    doesn't match"), and with AdamW the replicated weights and the loss scales of the two ranks drifted apart.
    Now every rank skips, and halves its scale, together."""
    from tests.dist_utils import run_distributed
    (s0, r0), (s1, r1) = run_distributed(_fp16_overflow_in_one_tensor_parallel_slice, 2, str(tmp_path / "run"),
                                         optimizer)
    assert s0 == s1 == [1.0, 1.0, 0.5, 0.5]  # the step with the inf skipped by both, its scale halved
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)


def test_attention_backend_check_takes_the_dtype_fsdp_computes_in(monkeypatch):
    """Without autocast, FSDP (dp > 1) runs the blocks in parallel.param_dtype: the check took float32 there, so a
    backend that cannot take bfloat16 (Triton's CPU interpreter) passed it and failed at the first step instead,
    and one that takes only half precision (Triton on a GPU) was refused for a run it could serve."""
    import pytest

    import seer.train.trainer as T
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = apply_overrides(preset("tiny"), ["train.attention_backend=triton", "train.device=cpu",
                                           "train.precision=fp32", "parallel.param_dtype=bfloat16"])
    T._check_attention_backend(cfg, torch.device("cpu"), None)  # one process: float32, which the interpreter takes
    with pytest.raises(ValueError, match="cannot run this model on cpu in bfloat16"):
        T._check_attention_backend(cfg, torch.device("cpu"), None, params=torch.bfloat16)


def _trainer_refusal(rank, world, out):
    cfg = apply_overrides(preset("tiny"), ["train.attention_backend=triton", "train.device=cpu",
                                           "train.precision=fp32", "parallel.param_dtype=bfloat16", "train.threads=1"])
    try:
        Trainer(cfg, out)
    except ValueError as e:
        return str(e)
    return "accepted"


def test_fsdp_run_checks_the_attention_backend_in_its_param_dtype(tmp_path, monkeypatch):
    from tests.dist_utils import run_distributed
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (the spawned ranks inherit it)
    for got in run_distributed(_trainer_refusal, 2, str(tmp_path / "run")):
        assert "train.attention_backend='triton' cannot run this model on cpu in bfloat16" in got, got


def test_precision_auto_is_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    # torch.cuda.is_bf16_supported() is True on a V100 or T4 (emulation included by default): 'auto' must
    # look at the compute capability of the run's device (8.0, Ampere, is the first with native bf16).
    from seer.train import build
    capability = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability[torch.device(d).index])
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert not build.native_bf16(torch.device("cuda", 0))


def test_fp16_steps_skipped_by_the_gradient_scaler_are_counted_and_logged(tmp_path):
    """GradScaler skips the update of a step whose gradients overflowed, silently: metrics.jsonl showed the
    loss of such steps and nothing else, so a run whose updates the scaler kept skipping looked healthy. Now
    each skip is counted (`overflow_skipped`, checkpointed) and the loss scale logged."""
    import json
    cfg = apply_overrides(preset("tiny"), ["train.precision=fp16", "train.max_steps=3", "checkpoint.every=2",
                                           "train.threads=1", "eval.at_end=false"])
    t = Trainer(cfg, tmp_path)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # no overflow of its own
    unscale = t.scaler.unscale_

    def overflow_at_step_1(opt):
        if t.step == 1:
            next(p for p in t.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return unscale(opt)
    t.scaler.unscale_ = overflow_at_step_1
    t.fit()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["overflow_skipped"] for r in recs] == [0, 1, 1]
    assert [r["loss_scale"] for r in recs] == [1.0, 0.5, 0.5]
    assert [r["nonfinite_skipped"] for r in recs] == [0, 0, 0]  # the loss was finite
    assert read_meta(tmp_path / "checkpoints" / "step_00000002")["counters"]["overflow_total"] == 1
    again = Trainer(apply_overrides(cfg, ["train.max_steps=4"]), tmp_path)
    try:
        assert again.step == 3 and again.counters["overflow_total"] == 1
    finally:
        again.release()  # (its lock and train.log handler)
