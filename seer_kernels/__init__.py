"""seer_kernels: hand-written kernels for SEER-style pretraining, exposed as torch ops.

Public ops (each a ``torch.library.custom_op`` in the ``seer`` namespace, with a fake kernel, usable under
``torch.compile(fullgraph=True)``):

* :func:`sinkhorn`: SwAV codes by Sinkhorn-Knopp, optionally distributed over process groups.
* :func:`attention`: fused softmax attention for ViT shapes, differentiable (Triton where the GPU benchmark
  table shows it ahead of torch SDPA, SDPA elsewhere; ``deterministic=True`` for reproducible gradients).
  :func:`attention_packed` takes the fused qkv projection as it is and returns its gradient in one buffer.
* :func:`augment_crops` / :func:`augment_crops_batch` / :func:`multicrop`: SwAV's multi-crop augmentation
  (resized crop, flip, colour jitter, grayscale, blur, solarize, normalise) fused, with its parameters as
  data (:class:`CropParams`, drawn by :func:`sample_crop_params`; recipes: :class:`MultiCropSpec`);
  :mod:`seer_kernels.decode` decodes JPEG bytes for it, in draft mode when the crops allow.

Backends are chosen per call by one dispatcher (:mod:`seer_kernels._backend`): CUDA C++, Triton or the
pure-torch reference on GPUs; C++ CPU or the reference on CPUs. Force one with ``SEER_KERNELS_BACKEND`` /
``SEER_KERNELS_BACKEND_<OP>`` or :func:`use_backend`.
"""
from . import _native, decode
from ._backend import BackendError, use_backend
from .multicrop_params import CropGroup, CropParams, MultiCropSpec, sample_crop_params
from .ops.attention import attention
from .ops.attention_packed import attention_packed
from .ops.multicrop import augment_crops, augment_crops_batch, multicrop
from .ops.sinkhorn import sinkhorn

__all__ = ["BackendError", "CropGroup", "CropParams", "MultiCropSpec", "attention", "attention_packed", "augment_crops",
           "augment_crops_batch", "multicrop", "sample_crop_params", "sinkhorn", "use_backend", "native_status"]


def native_status() -> str:
    """'' when the compiled extension seer_kernels._C is loaded, otherwise the reason it is not."""
    return _native.status()
