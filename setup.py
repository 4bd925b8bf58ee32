"""Build of seer_kernels._C (C++ CPU kernels always, CUDA kernels when possible) and the packages.

Install for development with ``pip install --no-build-isolation -e .`` (the extension must be compiled
against the torch that will import it, hence no build isolation).

Environment variables:
  SEER_KERNELS_SKIP_NATIVE=1   build no native code; seer_kernels then runs on Triton and the references.
  SEER_KERNELS_SKIP_CUDA=1     build only the C++ CPU kernels even if nvcc is available.
  CUDA_HOME                    CUDA toolkit to use (default: /usr/local/cuda if it has nvcc, else PATH).
  TORCH_CUDA_ARCH_LIST         GPU architectures (default "8.0;9.0+PTX": A100, H100, PTX for newer GPUs).
  MAX_JOBS                     parallel compile jobs (default: from free memory, about 3 GB per nvcc job).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = ROOT / "csrc" / "sources.txt"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_sources() -> dict[str, list[str]]:
    """Parse csrc/sources.txt into {kind: [relative paths]} (the list CMakeLists.txt reads too)."""
    kinds: dict[str, list[str]] = {"python": [], "cpu": [], "cuda": []}
    for lineno, raw in enumerate(SOURCES_FILE.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, path = line.partition(" ")
        path = path.strip()
        if kind not in kinds or not path:
            raise SystemExit(f"{SOURCES_FILE}:{lineno}: expected '<python|cpu|cuda> <path>', got {raw!r}")
        if not (ROOT / path).is_file():
            raise SystemExit(f"{SOURCES_FILE}:{lineno}: source file {path} does not exist")
        kinds[kind].append(path)
    return kinds


def _find_cuda_home() -> str | None:
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if (Path(env) / "bin" / "nvcc").exists() else None
    # torch's own guess can land on /usr/local when no GPU is present; prefer the canonical folder.
    if (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:
        avail_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        avail_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(avail_gb // 3))))


def _extra_cuda_includes() -> list[str]:
    """Headers of pip's CUDA runtime (cu13 wheels ship CUDAContext.h's dependencies there)."""
    out = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            p = Path(entry) / sub
            if p.is_dir():
                out.append(str(p))
    return out


def no_torch_message(exc: BaseException, path: list[str]) -> str:
    """Why the build cannot go on without torch. pip's default build isolation runs setup.py in a fresh
    environment (its folders on sys.path are named pip-build-env-*) that hides the torch the user installed;
    so "install torch" alone would send them in a circle."""
    isolated = any("pip-build-env-" in entry for entry in path)
    why = ("pip's build isolation hides any installed torch from this build" if isolated
           else "torch is not importable by this Python")
    return (f"seer: building the native kernels needs torch ({exc}): {why}. Install torch first, then build "
            f"against it with `pip install --no-build-isolation .` (or the sdist/wheel path in place of `.`; "
            f"`-e .` to develop), or set SEER_KERNELS_SKIP_NATIVE=1 to build no native code.")


def native_extensions():
    if _flag("SEER_KERNELS_SKIP_NATIVE"):
        print("seer: SEER_KERNELS_SKIP_NATIVE=1, building no native code", file=sys.stderr)
        return [], {}
    cuda_home = None if _flag("SEER_KERNELS_SKIP_CUDA") else _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - depends on the caller's environment
        raise SystemExit(no_torch_message(exc, sys.path)) from exc

    src = read_sources()
    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    if cuda_home and torch.version.cuda is None:
        print("seer: torch is a CPU-only build, building the C++ CPU kernels only", file=sys.stderr)
    elif not cuda_home and not _flag("SEER_KERNELS_SKIP_CUDA"):
        print("seer: nvcc not found, building the C++ CPU kernels only", file=sys.stderr)
    _max_jobs()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    # Threads: at::parallel_for, whose OpenMP implementation is inlined from ATen headers, so -fopenmp is
    # needed here; libgomp.so.1 resolves to the copy torch already loaded (one runtime, one thread pool).
    # The two math flags let GCC if-convert and vectorise the `omp simd` loops; NaN/inf semantics stay.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    define_macros: list = []  # Py_LIMITED_API comes from py_limited_api=True below
    include_dirs = [str(ROOT / "csrc" / "include")]
    sources = src["python"] + src["cpu"]
    kwargs: dict = dict(
        name="seer_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        kwargs["sources"] = sources + src["cuda"]
        kwargs["include_dirs"] = include_dirs + _extra_cuda_includes()
        kwargs["define_macros"] = define_macros + [("SEER_WITH_CUDA", "1")]
        kwargs["extra_compile_args"] = {
            "cxx": cxx + ["-DSEER_WITH_CUDA=1"],
            # No --use_fast_math: it turns IEEE division into approximations; kernels call the
            # fast intrinsics (__expf, ...) explicitly where they are accurate enough.
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-DSEER_WITH_CUDA=1"],
        }
        ext = CUDAExtension(**kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="seer",
    version="0.1.0",
    description="SEER-style SwAV pretraining of Vision Transformers with hand-written kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["seer", "seer.*", "seer_kernels", "seer_kernels.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "pillow",
        "safetensors",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        # torchvision: evaluation on image folders (seer/eval/datasets.py)
        "train": ["tensorboard", "matplotlib", "tqdm", "nvtx", "scikit-learn", "torchvision"],
        "timm": ["timm>=1.0"],
        # seer export --format onnx: torch.onnx's exporter (onnx, onnxscript) and the check in onnxruntime
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.17"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "scikit-learn", "torchvision"],
    },
    entry_points={"console_scripts": ["seer=seer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
