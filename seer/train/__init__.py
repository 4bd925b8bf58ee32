"""Training: the SwAV loop, metrics and collapse signals, checkpoints with exact resume.

The names below load on first use (PEP 562), so that ``seer.train.lock`` and other torch-free modules import
without torch: a process that only checks a run's lock started in 5 s, nearly all of it torch.
"""
import importlib

_WHERE = {"CheckpointManager": "checkpoint", "CorruptCheckpointError": "checkpoint",
          "latest_checkpoint": "checkpoint", "list_checkpoints": "checkpoint", "resolve_checkpoint": "checkpoint",
          "CollapseMonitor": "collapse", "collapse_signals": "collapse", "UnsafeCheckpointError": "safe_load",
          "NonFiniteLossError": "trainer", "Trainer": "trainer"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
