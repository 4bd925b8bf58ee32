"""Everything the trainer checkpoints round-trips: 4 steps straight == 2 steps, save, rebuild, load, 2 steps,
bit for bit on CPU (model, LARS, schedule, prototype freezing, queue, RNG with drop-path active)."""
from __future__ import annotations

import copy

import torch

from seer.model import vit_preset
from seer.optim import OptimConfig, build_optimizer
from seer.parallel import get_rng_tracker
from seer.swav import PrototypeFreezer, SwAVHeadConfig, SwAVQueue, build_swav_model, normalize_prototypes, swav_loss
from tests.parallel.common import make_crops


def _build():
    torch.manual_seed(0)
    model = build_swav_model(vit_preset("tiny", drop_path_rate=0.2),
                             SwAVHeadConfig(hidden_dims=[32], output_dim=16, num_prototypes=30))
    normalize_prototypes(model)
    opt, sched = build_optimizer(model, OptimConfig(lr=0.5, warmup_steps=2, final_weight_decay=1e-3), 6)
    return {"model": model, "opt": opt, "sched": sched, "freezer": PrototypeFreezer(model, 1),
            "queue": SwAVQueue(8, 16, batch_size=4, start_epoch=0)}


def _step(parts, step):
    out = parts["model"](make_crops(step, 4), parts["queue"].embeddings())
    loss = swav_loss(out.scores, queue_scores=out.queue_scores)
    loss.backward()
    parts["freezer"].after_backward()
    parts["opt"].step()
    parts["opt"].zero_grad(set_to_none=True)
    parts["sched"].step()
    normalize_prototypes(parts["model"])
    parts["queue"].push(out.embeddings, epoch=0)
    return float(loss.detach())


def _state(parts):
    state = {k: copy.deepcopy(v.state_dict()) for k, v in parts.items()}
    state["rng"] = torch.get_rng_state()
    state["tracker"] = get_rng_tracker().state_dict()
    return state


def test_resume_is_bit_exact():
    straight = _build()
    losses = [_step(straight, s) for s in range(4)]
    first = _build()
    resumed_losses = [_step(first, s) for s in range(2)]
    saved = _state(first)
    torch.manual_seed(123)  # a fresh process would start elsewhere
    second = _build()
    for key in ("model", "opt", "sched", "freezer", "queue"):
        second[key].load_state_dict(saved[key])
    torch.set_rng_state(saved["rng"])
    get_rng_tracker().load_state_dict(saved["tracker"])
    resumed_losses += [_step(second, s) for s in range(2, 4)]
    assert resumed_losses == losses
    for (name, a), b in zip(straight["model"].named_parameters(), second["model"].parameters()):
        assert torch.equal(a, b), name
    assert second["queue"].full and torch.equal(straight["queue"].embeddings(), second["queue"].embeddings())
