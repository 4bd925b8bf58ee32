"""The training extras (tensorboard, matplotlib, tqdm) are optional: `pip install .` without them still trains."""
from __future__ import annotations

import sys

from seer.train.metrics import MetricsWriter


def test_progress_bar_without_tqdm_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    w = MetricsWriter(tmp_path, active=True, tensorboard=False, progress="on", total_steps=3)
    assert w.bar is None
    w.close()
    assert any("tqdm" in r.getMessage() for r in caplog.records)
