// The CUDA implementations of the private native ops: argument checks (csrc/include/seer/*.h), then the
// launchers of csrc/cuda/*.cu. Compiled by the host C++ compiler; see seer/cuda_launchers.h for why the checks
// live here and not in the .cu files.
#include <torch/library.h>

#include "seer/cuda_launchers.h"
#include "seer/multicrop.h"
#include "seer/sinkhorn.h"

namespace seer {
namespace {

at::Tensor multicrop_apply(const std::vector<at::Tensor>& images, const at::Tensor& params, int64_t size,
                           c10::ArrayRef<double> mean, c10::ArrayRef<double> std, at::ScalarType out_dtype) {
  check_multicrop_args(images, params, size, mean, std, out_dtype, at::kCUDA);
  return multicrop_apply_cuda_unchecked(images, params, size, mean, std, out_dtype);
}

at::Tensor sinkhorn_fused(const at::Tensor& scores, double eps, int64_t iterations) {
  check_sinkhorn_fused_args(scores, eps, iterations, at::kCUDA);
  return sinkhorn_fused_cuda_unchecked(scores, eps, iterations);
}

at::Tensor sinkhorn_max(const at::Tensor& scores, const std::optional<at::Tensor>& m,
                        const std::optional<at::Tensor>& f, const std::optional<at::Tensor>& g, double eps,
                        int64_t dim) {
  check_sinkhorn_step_args(scores, m, f, g, eps, dim, at::kCUDA);
  return sinkhorn_max_cuda_unchecked(scores, m, f, g, eps, dim);
}

at::Tensor sinkhorn_sumexp(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f, const at::Tensor& g,
                           double eps, int64_t dim, const at::Tensor& shift) {
  check_sinkhorn_step_args(scores, m, f, g, eps, dim, at::kCUDA);
  check_sinkhorn_shift(shift, scores, scores.size(1 - dim));
  return sinkhorn_sumexp_cuda_unchecked(scores, m, f, g, eps, dim, shift);
}

at::Tensor sinkhorn_finalize(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                             const at::Tensor& g, double eps, double log_scale) {
  check_sinkhorn_step_args(scores, m, f, g, eps, 0, at::kCUDA);
  return sinkhorn_finalize_cuda_unchecked(scores, m, f, g, eps, log_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(seer_C, CUDA, m) {
  m.impl("multicrop_apply", &multicrop_apply);
  m.impl("sinkhorn_fused", &sinkhorn_fused);
  m.impl("sinkhorn_max", &sinkhorn_max);
  m.impl("sinkhorn_sumexp", &sinkhorn_sumexp);
  m.impl("sinkhorn_finalize", &sinkhorn_finalize);
}

}  // namespace seer
