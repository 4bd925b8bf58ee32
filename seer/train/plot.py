"""The end-of-run figure: loss (with ln K for reference) and throughput against the step."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

log = logging.getLogger("seer.train")


def plot_metrics(records: list[dict], path: str | Path, *, num_prototypes: Optional[int] = None,
                 title: str = "") -> Optional[Path]:
    """Write a PNG of loss and images/s from metrics.jsonl records; None if there is nothing to plot or
    matplotlib is missing."""
    records = [r for r in records if isinstance(r.get("loss"), (int, float))]
    if not records:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional (the 'train' extra), as tensorboard and tqdm are
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", Path(path).name)
        return None
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax1.plot(steps, [r["loss"] for r in records], lw=1.2, label="SwAV loss")
    if num_prototypes:
        ax1.axhline(math.log(num_prototypes), color="tab:red", ls="--", lw=1, label="ln K (collapse level)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r.get("images_per_s", float("nan")) for r in records], lw=1.2, color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("images / s")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
