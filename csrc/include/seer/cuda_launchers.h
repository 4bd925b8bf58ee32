// The CUDA launchers (csrc/cuda/*.cu), behind the argument checks of csrc/cuda/register.cpp.
//
// Every argument check of a CUDA op runs in register.cpp, a file of the host C++ compiler, and the .cu files
// receive checked arguments only. On the GPU test machine a c10 error thrown from host code compiled by nvcc
// crashed the process (SIGSEGV) instead of reaching Python as a ValueError; raised from here, it does not
// leave an nvcc-compiled frame. What the launchers can still raise is a CUDA launch failure.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

namespace seer {

at::Tensor multicrop_apply_cuda_unchecked(const std::vector<at::Tensor>& images, const at::Tensor& params,
                                          int64_t size, c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                                          at::ScalarType out_dtype);

at::Tensor sinkhorn_fused_cuda_unchecked(const at::Tensor& scores, double eps, int64_t iterations);
at::Tensor sinkhorn_max_cuda_unchecked(const at::Tensor& scores, const std::optional<at::Tensor>& m,
                                       const std::optional<at::Tensor>& f, const std::optional<at::Tensor>& g,
                                       double eps, int64_t dim);
at::Tensor sinkhorn_sumexp_cuda_unchecked(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                                          const at::Tensor& g, double eps, int64_t dim, const at::Tensor& shift);
at::Tensor sinkhorn_finalize_cuda_unchecked(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                                            const at::Tensor& g, double eps, double log_scale);

}  // namespace seer
