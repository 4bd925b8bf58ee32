"""Package namespaces whose names import their submodule on first use (PEP 562).

``seer.config`` needs the config dataclasses of ``seer.model``, ``seer.optim``, ``seer.parallel`` and
``seer.swav``, which are plain Python; their packages' other modules import torch (about 2 s). With eager
package ``__init__`` files every ``seer`` command (``seer --help``, ``seer plan``) and every process spawned to
index tar shards paid that before doing anything.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for ``package``'s namespace: name -> the submodule that defines it.

    The first lookup of a name imports its submodule and stores the value in the package, so later lookups
    are plain attribute reads. A name must not also be the name of a submodule (importing that submodule
    would bind the module object to the package attribute instead)."""
    namespace = sys.modules[package].__dict__
    clash = sorted(set(exports) & set(exports.values()))
    if clash:
        raise ValueError(f"{package}: exported names {clash} are also submodule names")

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
