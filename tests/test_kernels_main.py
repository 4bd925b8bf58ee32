"""`python -m seer_kernels` (the README's first look at the ops) runs and names each op's backend."""
from __future__ import annotations

import subprocess
import sys

from tests.train.common import ROOT, env


def test_kernels_main_without_benchmarks():
    proc = subprocess.run([sys.executable, "-m", "seer_kernels", "--no-bench"], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("sinkhorn   cpu/float32", "attention  cpu/bfloat16", "multicrop  cpu/uint8", "codes finite: True",
                 "attention (2, 4, 197, 64): max |ours - sdpa|"):
        assert line in proc.stdout, proc.stdout
