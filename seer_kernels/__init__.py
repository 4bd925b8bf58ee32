"""seer_kernels: hand-written kernels for SEER-style pretraining, exposed as torch ops.

Public ops (each a ``torch.library.custom_op`` in the ``seer`` namespace, with a fake kernel, usable under
``torch.compile(fullgraph=True)``):

* :func:`sinkhorn`: SwAV codes by Sinkhorn-Knopp, optionally distributed over process groups.
* :func:`attention`: fused softmax attention for ViT shapes, differentiable.

Backends are chosen per call by one dispatcher (:mod:`seer_kernels._backend`): CUDA C++, Triton or the
pure-torch reference on GPUs; C++ CPU or the reference on CPUs. Force one with ``SEER_KERNELS_BACKEND`` /
``SEER_KERNELS_BACKEND_<OP>`` or :func:`use_backend`.
"""
from . import _native
from ._backend import BackendError, use_backend
from .ops.attention import attention
from .ops.sinkhorn import sinkhorn

__all__ = ["BackendError", "attention", "sinkhorn", "use_backend", "native_status"]


def native_status() -> str:
    """'' when the compiled extension seer_kernels._C is loaded, otherwise the reason it is not."""
    return _native.status()
