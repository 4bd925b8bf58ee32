"""Named RNG streams for dropout and drop-path under tensor parallelism (Megatron's RNG tracker).

Where an activation is replicated on the tensor-parallel ranks (the output of a row-parallel layer without
sequence parallelism), dropout and drop-path must draw the *same* mask on every rank, or the copies drift
apart: they use the default torch generator, seeded identically inside a tensor-parallel group. Where each
rank holds different data (its own MLP columns, or its own token sequences under sequence parallelism),
the masks must be *independent*: those modules run inside ``tracker.fork()``, a stream seeded per rank.

    default stream:          seed + 100003 * dp_rank                (same on the TP ranks of a DP rank)
    "tensor-parallel" stream: seed + 100003 * dp_rank + 2718 + tp_rank

The tracker's states are part of the checkpoint (``state_dict``). Activation checkpointing restores them
for the recomputation (:func:`checkpoint_context_fn`), so recomputed masks equal the forward's.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

TP_STREAM = "tensor-parallel"


def _get_rng() -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():  # the current device's generator (set the device before seeding)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStatesTracker:
    """Named generator states (CPU and current CUDA device) that can be swapped in around a region."""

    def __init__(self):
        self._states: dict[str, dict[str, Tensor]] = {}

    def reset(self) -> None:
        self._states = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (the default generator is left untouched)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        orig = _get_rng()
        torch.manual_seed(seed)
        self._states[name] = _get_rng()
        _set_rng(orig)

    def has(self, name: str) -> bool:
        return name in self._states

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM) -> Iterator[None]:
        """Run the body on stream ``name``; the default generator is restored afterwards."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; call seer.parallel.seed_parallel_rng first")
        orig = _get_rng()
        _set_rng(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_rng()
            _set_rng(orig)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {name: {k: v.clone() for k, v in s.items()} for name, s in self._states.items()}

    def load_state_dict(self, states: dict[str, dict[str, Tensor]]) -> None:
        """The saved streams; a generator a stream's saved state lacks keeps its current state (a checkpoint
        written on a CPU-only machine has no CUDA states: resumed on a GPU, the tensor-parallel stream would
        otherwise leave the CUDA generator as it was, the same on every tensor-parallel rank, and draw the
        same masks there; the current state is the one seed_parallel_rng seeded per rank)."""
        self._states = {name: {**{k: v.clone() for k, v in self._states.get(name, {}).items()},
                               **{k: v.clone() for k, v in s.items()}} for name, s in states.items()}


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker used by :func:`seer.parallel.parallelize` unless another one is passed."""
    return _TRACKER


def seed_parallel_rng(seed: int, dims=None, tracker: Optional[RNGStatesTracker] = None) -> None:
    """Seed the default generator and the tensor-parallel stream for this rank (module doc for the rule)."""
    tracker = tracker if tracker is not None else _TRACKER
    dp_rank = dims.dp_rank if dims is not None else 0
    tp_rank = dims.tp_rank if dims is not None else 0
    base = seed + 100003 * dp_rank
    torch.manual_seed(base)
    tracker.reset()
    tracker.add(TP_STREAM, base + 2718 + tp_rank)


class ForkedRNG(nn.Module):
    """Runs a parameter-free random module (Dropout, DropPath) on a named stream of ``tracker``."""

    def __init__(self, module: nn.Module, tracker: RNGStatesTracker, stream: str = TP_STREAM):
        super().__init__()
        self.module = module
        self.tracker = tracker
        self.stream = stream

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.module(x)
        with self.tracker.fork(self.stream):
            return self.module(x)


def checkpoint_context_fn(tracker: RNGStatesTracker) -> Callable[[], tuple]:
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation sees the tracker's streams as they were
    when the forward ran (the default generator is already restored by checkpoint itself)."""

    def context_fn():
        snapshot: dict = {}

        @contextlib.contextmanager
        def forward_ctx():
            snapshot.update(tracker.state_dict())
            yield

        @contextlib.contextmanager
        def recompute_ctx():
            current = tracker.state_dict()
            tracker.load_state_dict(snapshot)
            try:
                yield
            finally:
                tracker.load_state_dict(current)

        return forward_ctx(), recompute_ctx()

    return context_fn
