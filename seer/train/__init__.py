"""Training: the SwAV loop, metrics and collapse signals, checkpoints with exact resume."""
from .checkpoint import (CheckpointManager, CorruptCheckpointError, latest_checkpoint, list_checkpoints,
                         resolve_checkpoint)
from .collapse import CollapseMonitor, collapse_signals
from .safe_load import UnsafeCheckpointError
from .trainer import NonFiniteLossError, Trainer

__all__ = ["CheckpointManager", "CollapseMonitor", "CorruptCheckpointError", "NonFiniteLossError", "Trainer",
           "UnsafeCheckpointError", "collapse_signals", "latest_checkpoint", "list_checkpoints", "resolve_checkpoint"]
