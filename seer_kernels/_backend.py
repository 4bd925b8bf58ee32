"""The one dispatch point: which backend runs an op, for the device and dtype of its inputs.

Every op declares its backends once (:meth:`Dispatcher.register`) with what each can do: devices, dtypes,
an availability probe and an optional per-call check that returns reasons. :meth:`Dispatcher.select`
walks the priority list of the input's device and returns the first backend with no reason against it:

    cuda tensors:  cuda (CUDA C++ extension) -> triton -> reference      (ops may add e.g. "sdpa")
    cpu tensors:   cpp  (C++ CPU extension)  -> reference

A backend may also be *forced*, per op or for all ops, by ``SEER_KERNELS_BACKEND_<OP>=<name>``,
``SEER_KERNELS_BACKEND=<name>`` or the context manager :func:`use_backend` (the context manager wins over
the environment). A forced backend that cannot run raises :class:`BackendError` listing every backend of
the op and why it was refused; automatic selection falls through silently. Preferences (a backend that
works but is slower for these inputs, e.g. from a benchmark table) only steer the automatic choice.

The choice is logged once per (op, device, dtype, backend) on the ``seer_kernels`` logger.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger("seer_kernels")

BACKENDS = ("cuda", "triton", "cpp", "sdpa", "reference")
OPS = ("sinkhorn", "attention", "multicrop")  # what use_backend(op=...) and the environment may name
DEFAULT_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference"),
}

# (op or None for all ops) -> backend name; innermost use_backend() wins.
_forced: contextvars.ContextVar[tuple[tuple[Optional[str], str], ...]] = contextvars.ContextVar(
    "seer_kernels_forced", default=())
# What torch.compile reads instead: Dynamo in torch 2.11 cannot trace ContextVar.get (fullgraph fails), and it
# guards on a module global, so a compiled graph is re-traced when use_backend() changes it. Written by
# use_backend() next to the ContextVar: it holds the state of the thread that last entered or left a block,
# so with blocks open in several threads at once, code compiled or run compiled in one thread may see
# another thread's forcing (eager code never does).
_compile_view: tuple[tuple[Optional[str], str], ...] = ()


class BackendError(RuntimeError):
    """No backend can run an op for the given inputs (or the forced one cannot)."""


@contextlib.contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Force backend ``name`` for ``op`` (or for every op) inside the block.

    >>> with seer_kernels.use_backend("reference"):
    ...     codes = seer_kernels.sinkhorn(scores)
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if op is not None and op not in OPS:  # a misspelt op would leave everything unforced without a word
        raise ValueError(f"use_backend: unknown op {op!r}; expected None (every op) or one of {', '.join(OPS)}")
    global _compile_view
    token = _forced.set(_forced.get() + ((op, name),))
    _compile_view = _forced.get()
    try:
        yield
    finally:
        _forced.reset(token)
        _compile_view = _forced.get()  # this thread's state after the block, not a stale snapshot


def forced_backend(op: str) -> tuple[Optional[str], str]:
    """The backend forced for ``op`` and where the request came from (``(None, "")`` when none)."""
    for target, name in reversed(_compile_view if torch.compiler.is_compiling() else _forced.get()):
        if target is None or target == op:
            return name, "use_backend()"
    setting = _env_forcing(op)
    if setting:
        var, value = setting.split("=", 1)
        return value, var
    return None, ""


_ENV_PREFIX = "SEER_KERNELS_BACKEND_"
_env_names_checked = False


def _check_env_names() -> None:
    """BackendError for a set ``SEER_KERNELS_BACKEND_<X>`` whose X is no op: a misspelt op (MULTI_CROP,
    SINKORN) would leave every op unforced without a word, as use_backend(op=...) refuses to. Once per
    process once it passes (the scan of the environment costs ~20 us, more than a whole dispatch): the
    variables are set at launch; one set later under a wrong name is not seen."""
    global _env_names_checked
    for var, value in os.environ.items():
        if var.startswith(_ENV_PREFIX) and value.strip() and var[len(_ENV_PREFIX):].lower() not in OPS:
            raise BackendError(f"{var} names no op of seer_kernels; expected {_ENV_PREFIX}<OP> with OP one of "
                               f"{', '.join(o.upper() for o in OPS)}, or SEER_KERNELS_BACKEND for every op")
    _env_names_checked = True


@torch.compiler.assume_constant_result  # read once per trace: torch.compile need not trace os.environ
def _env_forcing(op: str) -> str:
    """'VAR=backend' for the environment variable that forces a backend for ``op`` ('' for none); raises
    on a value that is not a backend, or on a variable that names no op."""
    if not _env_names_checked:
        _check_env_names()
    for var in (f"SEER_KERNELS_BACKEND_{op.upper()}", "SEER_KERNELS_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value:
            if value not in BACKENDS:
                raise BackendError(f"{var}={value!r} is not a backend; expected one of {', '.join(BACKENDS)}")
            return f"{var}={value}"
    return ""


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None if Triton kernels can run on ``device`` (a GPU, or the CPU under TRITON_INTERPRET=1)."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"Triton does not run on {device.type} tensors"
    return _triton_import_reason()


_TRITON_REASON: list = []


def _triton_import_reason() -> Optional[str]:
    if not _TRITON_REASON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_REASON.append(None)
        except ImportError as exc:
            _TRITON_REASON.append(f"triton is not importable ({exc})")
    return _TRITON_REASON[0]


@dataclass
class Backend:
    """One implementation of an op and what it can do."""

    name: str
    impl: Any  # whatever the op calls: a module, a namespace of functions, a callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    available: Callable[[torch.device], Optional[str]] = lambda device: None
    check: Optional[Callable[..., list[str]]] = None  # (**info) -> reasons it cannot run
    prefer: Optional[Callable[..., Optional[str]]] = None  # (**info) -> reason to skip it when not forced

    def reasons(self, device: torch.device, dtype: torch.dtype, info: dict) -> list[str]:
        out = []
        if device.type not in self.devices:
            out.append(f"does not run on {device.type} tensors")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"does not support {str(dtype).replace('torch.', '')} (supports {names})")
        if not out:
            why = self.available(device)
            if why:
                out.append(why)
        if not out and self.check is not None:
            out.extend(self.check(**info))
        return out

    def preference(self, info: dict) -> Optional[str]:
        """Why the automatic choice should pass over this backend although it can run (None: no objection)."""
        return self.prefer(**info) if self.prefer is not None else None


@dataclass
class Dispatcher:
    """The backends of one op and the rule that picks one per call."""

    op: str
    priority: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PRIORITY))
    backends: dict[str, Backend] = field(default_factory=dict)
    _logged: set = field(default_factory=set)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"Dispatcher: op {self.op!r} is not in seer_kernels._backend.OPS")

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKENDS:
            raise ValueError(f"{self.op}: unknown backend name {backend.name!r}")
        self.backends[backend.name] = backend
        return backend

    def select(self, device: torch.device, dtype: torch.dtype, **info: Any) -> Backend:
        """The backend to run for inputs on ``device`` of ``dtype``; ``info`` feeds per-call checks."""
        forced, source = forced_backend(self.op)
        if forced is not None:
            how = f"forced by {source}"
            return self._log(self.require(forced, device, dtype, info, how), device, dtype, how)
        refused: dict[str, list[str]] = {}
        for name in self.priority.get(device.type, ()):
            backend = self.backends.get(name)
            if backend is None:
                continue
            why = backend.reasons(device, dtype, info)
            if not why:
                soft = backend.preference(info)
                if soft:
                    why = [soft]
            if not why:
                return self._log(backend, device, dtype, "automatic")
            refused[name] = why
        raise BackendError(self._refusal(device, dtype, info, "no backend can run these inputs", refused))

    def require(self, name: str, device: torch.device, dtype: torch.dtype, info: dict, how: str) -> Backend:
        """Backend ``name`` for these inputs, or a BackendError that says who asked for it (``how``)."""
        chosen = self.backends.get(name)
        why = ["this op has no such backend"] if chosen is None else chosen.reasons(device, dtype, info)
        if why:
            raise BackendError(self._refusal(device, dtype, info, f"backend {name!r} {how}", {name: why}))
        return chosen

    def explain(self, device: torch.device, dtype: torch.dtype, **info: Any) -> dict[str, list[str]]:
        """For every backend of the op, the reasons it cannot run these inputs (empty list: it can)."""
        return {name: b.reasons(device, dtype, info) for name, b in self.backends.items()}

    def _refusal(self, device, dtype, info, headline, first: dict[str, list[str]]) -> str:
        lines = [f"seer_kernels.{self.op}: {headline} (device {device.type}, dtype "
                 f"{str(dtype).replace('torch.', '')}). Backends:"]
        for name, b in self.backends.items():
            why = first.get(name) or b.reasons(device, dtype, info) or ["can run (not chosen)"]
            lines.append(f"  {name}: {'; '.join(why)}")
        for name, why in first.items():
            if name not in self.backends:
                lines.append(f"  {name}: {'; '.join(why)}")
        return "\n".join(lines)

    def _log(self, backend: Backend, device: torch.device, dtype: torch.dtype, how: str) -> Backend:
        key = (device.type, dtype, backend.name)
        if key not in self._logged:
            self._logged.add(key)
            log.info("seer_kernels.%s on %s/%s: using backend %s (%s)", self.op, device.type,
                     str(dtype).replace("torch.", ""), backend.name, how)
        return backend


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True when nothing traces or intercepts this call: plain tensors, no compile, no dispatch or function
    mode, no functorch transform (vmap, grad). Only then may an op's public function skip its custom op
    (torch.library's per-call wrapper) and run the selected backend directly."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or any(type(t) is not torch.Tensor for t in tensors):
        return False
    try:  # private probes; where a torch version lacks one, the op path is the safe answer
        from torch.utils._python_dispatch import _get_current_dispatch_mode
        return not (torch._C._are_functorch_transforms_active() or torch._C._is_torch_function_mode_enabled()
                    or _get_current_dispatch_mode() is not None)
    except (AttributeError, ImportError):  # pragma: no cover
        return False
