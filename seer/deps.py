"""Optional packages that some features need (``pip install --no-build-isolation ".[train]"`` adds them)."""
from __future__ import annotations

import importlib


class MissingDependencyError(ImportError):
    """A package that the requested feature needs is not installed; the message names it and the command."""


def require(module: str, feature: str, package: str):
    """``import module``, or MissingDependencyError saying that ``feature`` needs ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        parts = module.split(".")
        if e.name is not None and e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            # The package is there; something it imports is not (torchvision without pillow, say): name that.
            raise MissingDependencyError(f"{feature} needs {package}, which is installed but cannot be imported: "
                                         f"{type(e).__name__}: {e}") from e
        raise MissingDependencyError(f"{feature} needs {package}, which is not installed (pip install {package}, "
                                     f"or the 'train' extra: pip install --no-build-isolation \".[train]\")") from e
