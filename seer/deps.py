"""Optional packages that some features need (``pip install --no-build-isolation ".[train]"`` adds them)."""
from __future__ import annotations

import importlib
import importlib.util


class MissingDependencyError(ImportError):
    """A package that the requested feature needs is not installed; the message names it and the command."""


def require(module: str, feature: str, package: str, *, extra: str = "train"):
    """``import module``, or MissingDependencyError saying that ``feature`` needs ``package`` (installed by
    itself or with the setup.py extra ``extra``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        parts = module.split(".")
        if e.name is not None and e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            # The package is there; something it imports is not (torchvision without pillow, say): name that.
            raise MissingDependencyError(f"{feature} needs {package}, which is installed but cannot be imported: "
                                         f"{type(e).__name__}: {e}") from e
        if e.name is not None and e.name != parts[0] and importlib.util.find_spec(parts[0]) is not None:
            # The package is there without the module (torchvision older than transforms.v2): too old.
            try:
                version = getattr(importlib.import_module(parts[0]), "__version__", "of unknown version")
            except Exception:  # (a package that fails as it imports: its version does not matter here)
                version = "of unknown version"
            raise MissingDependencyError(f"{feature} needs {package} with the module {e.name}, which the installed "
                                         f"{package} {version} does not have: upgrade it (pip install -U {package})"
                                         ) from e
        raise MissingDependencyError(f"{feature} needs {package}, which is not installed (pip install {package}, "
                                     f"or the '{extra}' extra: pip install --no-build-isolation \".[{extra}]\")") from e
