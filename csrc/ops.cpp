// Schemas of every private native op (torch.ops.seer_C.*). Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; the public ops (torch.ops.seer.*) live in seer_kernels/ops/.
#include <torch/library.h>

TORCH_LIBRARY(seer_C, m) {
  // Sinkhorn-Knopp (seer_kernels/reference/sinkhorn.py is the specification).
  m.def("sinkhorn_fused(Tensor scores, float epsilon, int iterations) -> Tensor");
  m.def("sinkhorn_max(Tensor scores, Tensor? m, Tensor? f, Tensor? g, float epsilon, int dim) -> Tensor");
  m.def("sinkhorn_sumexp(Tensor scores, Tensor m, Tensor f, Tensor g, float epsilon, int dim, Tensor shift)"
        " -> Tensor");
  m.def("sinkhorn_finalize(Tensor scores, Tensor m, Tensor f, Tensor g, float epsilon, float log_scale) -> Tensor");
  // Multi-crop augmentation (seer_kernels/reference/multicrop.py is the specification; the layout of
  // `params`, a float32 CPU matrix of one row per crop, is in csrc/include/seer/multicrop.h).
  m.def("multicrop_apply(Tensor[] images, Tensor params, int size, float[] mean, float[] std, ScalarType out_dtype)"
        " -> Tensor");
  // The CUDA stages run serially on the CPU: a test harness for the GPU code, not a fast path.
  m.def("multicrop_apply_emulated(Tensor[] images, Tensor params, int size, float[] mean, float[] std,"
        " ScalarType out_dtype) -> Tensor");
}
