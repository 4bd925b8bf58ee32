// Argument checks shared by the CPU and CUDA Sinkhorn kernels (schemas: csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "seer/checks.h"

namespace seer {

// Largest row or column count of the scores (seer_kernels._native.SINKHORN_DIM_MAX). The CUDA kernels index
// rows and columns with 32-bit ints (element offsets are 64-bit), and their index arithmetic runs past the
// last row or column: block counts rounded up (K + 255), a thread index up to a block (256) beyond it, a
// loop index up to its stride (256) beyond it, the cooperative kernel's columns per SM rounded up. Up to
// 2^31 - 1 itself (the former bound) such a value wrapped to a negative one, which passed the bound checks
// (k >= K is false): reads and writes out of bounds. 2^16 of headroom covers every such overshoot.
constexpr int64_t kSinkhornDimMax = (int64_t{1} << 31) - (int64_t{1} << 16);

inline void check_sinkhorn_scores(const at::Tensor& scores, c10::DeviceType dev) {
  SEER_CHECK_DIM(scores, "scores", 2);
  SEER_CHECK_DEVICE(scores, "scores", dev);
  SEER_CHECK_ARG(scores.numel() > 0, "scores", "expected a non-empty matrix, got ", scores.sizes());
  SEER_CHECK_ARG(scores.size(0) <= kSinkhornDimMax && scores.size(1) <= kSinkhornDimMax, "scores",
                 "each dimension must be at most ", kSinkhornDimMax,
                 " (2^31 - 2^16: the kernels index rows and columns with 32-bit ints), got ", scores.sizes());
  const auto dt = scores.scalar_type();
  SEER_CHECK_ARG(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "scores",
                 "expected float32, bfloat16 or float16, got ", dt);
}

// The kernels divide by eps rounded to float32: below the smallest normal float32 it is 0 or subnormal,
// and (S - m) / eps is NaN (0 / 0) or -inf for whole rows, which makes every code NaN.
inline void check_sinkhorn_eps(double eps) {
  SEER_CHECK_ARG(std::isfinite(eps) && eps >= std::numeric_limits<float>::min(), "epsilon",
                 "expected a finite value >= ", std::numeric_limits<float>::min(),
                 " (the smallest normal float32), got ", eps);
}

inline void check_sinkhorn_vec(const std::optional<at::Tensor>& t, const char* name, int64_t n,
                               const at::Tensor& scores) {
  if (!t.has_value()) return;
  SEER_CHECK_DIM(*t, name, 1);
  SEER_CHECK_SAME_DEVICE(*t, name, scores, "scores");
  SEER_CHECK_ARG(t->size(0) == n, name, "expected ", n, " values, got ", t->size(0));
  SEER_CHECK_ARG(t->scalar_type() == at::kFloat, name, "expected float32, got ", t->scalar_type());
}

inline void check_sinkhorn_step_args(const at::Tensor& scores, const std::optional<at::Tensor>& m,
                                     const std::optional<at::Tensor>& f, const std::optional<at::Tensor>& g,
                                     double eps, int64_t dim, c10::DeviceType dev) {
  check_sinkhorn_scores(scores, dev);
  check_sinkhorn_eps(eps);
  SEER_CHECK_ARG(dim == 0 || dim == 1, "dim", "expected 0 or 1, got ", dim);
  check_sinkhorn_vec(m, "m", scores.size(1), scores);
  check_sinkhorn_vec(f, "f", scores.size(1), scores);
  check_sinkhorn_vec(g, "g", scores.size(0), scores);
}

inline void check_sinkhorn_shift(const at::Tensor& shift, const at::Tensor& scores, int64_t lines) {
  SEER_CHECK_ARG(shift.dim() == 0 || (shift.dim() == 1 && shift.size(0) == lines), "shift",
                 "expected a scalar tensor or ", lines, " values, got shape ", shift.sizes());
  SEER_CHECK_SAME_DEVICE(shift, "shift", scores, "scores");
}

inline void check_sinkhorn_fused_args(const at::Tensor& scores, double eps, int64_t iterations,
                                      c10::DeviceType dev) {
  check_sinkhorn_scores(scores, dev);
  check_sinkhorn_eps(eps);
  SEER_CHECK_ARG(iterations >= 1 && iterations <= INT32_MAX, "iterations", "expected an integer in [1, ", INT32_MAX,
                 "], got ", iterations);
}

}  // namespace seer
