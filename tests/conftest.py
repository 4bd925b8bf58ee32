"""Test configuration shared by every suite.

Markers: ``cuda`` (needs an NVIDIA GPU; skipped otherwise), ``triton`` (Triton kernels: on a GPU, or on the
CPU under TRITON_INTERPRET=1, which this file turns on when no GPU is present), ``ext`` (needs the compiled
seer_kernels._C), ``dist`` (spawns torch.distributed processes), ``slow``.
"""
import os

# Must happen before anything imports a Triton kernel: @triton.jit reads it at decoration time.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

import pytest
import torch

from seer_kernels import _native
from seer_kernels.testing import fix_interpreter_index, triton_device

if triton_device() == "cpu":  # Triton 3.6's interpreter breaks on NumPy >= 2.4 without it (testing.py)
    fix_interpreter_index()


def pytest_configure(config):
    for name, doc in (("cuda", "needs an NVIDIA GPU"), ("triton", "runs Triton kernels"),
                      ("ext", "needs the compiled seer_kernels._C"), ("dist", "spawns distributed processes"),
                      ("slow", "takes more than a few seconds")):
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA GPU")
    skip_triton = pytest.mark.skip(reason="Triton cannot run here (no GPU and no TRITON_INTERPRET=1)")
    skip_ext = pytest.mark.skip(reason=f"seer_kernels._C not available: {_native.status()}")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and triton_device() is None:
            item.add_marker(skip_triton)
        if "ext" in item.keywords and not _native.loaded():
            item.add_marker(skip_ext)


@pytest.fixture
def poison_empty():
    """Uninitialised memory from torch.empty / at::empty is NaN while the test runs, so output elements
    a kernel never writes show up as NaN."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run (the seed is printed on failure), not a fixed seed. SEER_TEST_SEED=N
    replays a printed one."""
    replay = os.environ.get("SEER_TEST_SEED", "").strip()
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture
def gen(_fresh_seed) -> torch.Generator:
    """A generator seeded from the test's fresh random seed (printed on failure)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section("call", "seed", f"torch.manual_seed({value})")


@pytest.fixture
def sm90_compile():
    """Run one of bench/*_compile.py (Triton's full pipeline to an sm_90 cubin, ptxas included, no GPU
    needed) and return its report. A subprocess, because this process may run Triton interpreted."""
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas to compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(module: str, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", module, "--arch", "90", *args], capture_output=True, text=True,
                             env=env, cwd=root, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    return run
