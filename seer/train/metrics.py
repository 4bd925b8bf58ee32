"""Where metrics go: OUT/metrics.jsonl (one JSON object per logged step), TensorBoard, the progress bar.

A resumed run first drops the records of steps after its checkpoint (they were computed by the
interrupted run and are computed again), so metrics.jsonl reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..durable import sync_file, write_atomic

log = logging.getLogger("seer.train")

# bf16 dense peak FLOP/s by GPU name (for MFU); other GPUs report no MFU. The first key contained in the
# device name wins: the PCIe and NVL boards of the H100 / H800 run at lower clocks and power than the SXM ones
# (756 and 835 TFLOP/s against 989 on NVIDIA's data sheets), and their names also contain 'H100'.
PEAK_BF16_FLOPS = {"H100 PCIe": 756.5e12, "H800 PCIe": 756.5e12, "H100 NVL": 835.5e12,
                   "H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12, "GH200": 989.4e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
    return out


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


# A log record that the trainer also puts on the terminal with MetricsWriter.message (through the progress
# bar) carries this attribute: the CLI's console handler leaves it out (it showed twice), train.log keeps it.
ON_TERMINAL = {"seer_on_terminal": True}


def not_shown_yet(record: logging.LogRecord) -> bool:
    """A logging filter for console handlers: False for a record already shown by MetricsWriter.message."""
    return not getattr(record, "seer_on_terminal", False)


class MetricsWriter:
    """Rank 0's sink for logged steps (other ranks get an inactive writer)."""

    def __init__(self, out: str | Path, *, active: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int = 0):
        self.active = active
        self.path = Path(out) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not active:
            return
        # A resumed run redoes the steps after its checkpoint: drop what an earlier attempt logged for them
        # (written to a temporary file and renamed: a kill here must not lose the history before them).
        for path in (self.path, self.path.with_name("eval_history.jsonl")):
            if path.is_file():
                kept = "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= start_step)
                write_atomic(path, lambda p: p.write_text(kept))
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # TensorBoard hides the events an earlier attempt wrote for the steps after start_step, as
                # metrics.jsonl drops them: from step 1 on too (a run killed before its first checkpoint).
                self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # pragma: no cover - tensorboard is optional
                log.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        if show:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            except ImportError:  # tqdm is optional (the 'train' extra), as tensorboard and matplotlib are
                log.warning("tqdm is not installed: no progress bar (pip install tqdm)")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 refresh=False)

    def write_eval(self, step: int, result: dict) -> None:
        """An evaluation during training: OUT/eval_history.jsonl and TensorBoard ('eval/...')."""
        if not self.active:
            return
        with open(self.path.with_name("eval_history.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in result.items()}}) + "\n")
        if self.tb is not None:
            for k, v in result.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def sync(self) -> None:
        """metrics.jsonl and eval_history.jsonl fsynced, TensorBoard's queued events written out: called before
        a checkpoint is committed. A run resumed from it keeps these records and does not log their steps
        again, so a crash of the machine (or a kill while TensorBoard's writer thread lagged) that kept the
        checkpoint but not them left a gap in the history for good."""
        if not self.active:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        history = self.path.with_name("eval_history.jsonl")
        if history.is_file():
            sync_file(history)
        if self.tb is not None:
            self.tb.flush()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line for the terminal that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.active:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
