"""Step options: global gradient clipping, fp16 with a checkpointed gradient scaler, precision 'auto'."""
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
