"""What a source distribution carries: `pip install seer-*.tar.gz` compiles seer_kernels._C from it, so it must hold
every native source and header setup.py builds from (csrc/sources.txt, which setup.py itself reads, included), and
never a kernel library built in place against another torch. Checked through setuptools' own file list (egg_info's
SOURCES.txt, the list sdist archives) with the native build off: nothing is compiled and torch is not imported."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("egg")
    env = dict(os.environ, SEER_KERNELS_SKIP_NATIVE="1")
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return set((base / "seer.egg-info" / "SOURCES.txt").read_text().split("\n"))


def _native_sources() -> list[str]:
    """The paths csrc/sources.txt lists (its format: '<kind> <path>' per line, '#' comments)."""
    lines = (raw.split("#", 1)[0].split() for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines())
    return [parts[1] for parts in lines if len(parts) == 2]


def test_the_sdist_holds_what_building_the_extension_reads(sdist_files):
    needed = ["setup.py", "README.md", "csrc/sources.txt", *_native_sources()]
    needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc" / "include").rglob("*.h")]
    assert len(needed) > 6
    missing = [p for p in needed if p not in sdist_files]
    assert not missing, f"left out of the sdist (add them to MANIFEST.in): {missing}"


def test_the_sdist_holds_every_module_and_no_built_library(sdist_files):
    modules = [p.relative_to(ROOT).as_posix() for pkg in ("seer", "seer_kernels") for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts]
    assert "seer_kernels/ops/attention_table.py" in modules
    assert not [m for m in modules if m not in sdist_files]
    assert not [f for f in sdist_files if f.endswith((".so", ".pyd", ".pyc"))]
    assert not [f for f in sdist_files if f.startswith(("tests/", "build/"))]


@pytest.mark.parametrize("isolated", [True, False])
def test_a_build_that_cannot_import_torch_says_why_and_what_to_run(isolated):
    """pip's default build isolation is the usual cause: torch is installed, but not in pip's build environment."""
    extra = "sys.path.append('/tmp/pip-build-env-x/overlay'); " if isolated else ""
    code = (f"import runpy, sys; sys.modules['torch'] = None; {extra}sys.argv = ['setup.py', '--version']; "
            f"runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "SEER_KERNELS_SKIP_NATIVE"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    why = "pip's build isolation hides any installed torch" if isolated else "torch is not importable by this Python"
    assert why in res.stderr and "`pip install --no-build-isolation .`" in res.stderr, res.stderr
