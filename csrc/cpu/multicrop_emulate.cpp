// The CUDA multi-crop stages (seer/multicrop_stages.h) run serially on the CPU: the same bodies, the
// same scratch layout, the same order of stages. Not a production path (it is slow): it exists so that
// the CPU test suite checks the indexing of the GPU code on machines that have no GPU. The only part of
// csrc/cuda/multicrop.cu it does not cover is the launch plumbing and the block reduction of stage 2.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "seer/checks.h"
#include "seer/multicrop.h"
#include "seer/multicrop_stages.h"

namespace seer {
namespace {

at::Tensor multicrop_apply_emulated_cpu(const std::vector<at::Tensor>& images, const at::Tensor& params,
                                        int64_t size, c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                                        at::ScalarType out_dtype) {
  check_multicrop_args(images, params, size, mean, std, out_dtype, at::kCPU);
  const int64_t n = params.size(0), plane = size * size;
  at::Tensor out = at::empty({n, 3, size, size}, images[0].options().dtype(out_dtype));
  if (n == 0) return out;
  const at::Tensor p = params.contiguous();
  const std::vector<ImageDesc> table = image_table(images);
  // Scratch like the CUDA op's: uninitialised (NaN under torch's fill_uninitialized_memory in tests).
  const auto fopts = images[0].options().dtype(at::kFloat);
  at::Tensor a = at::empty({n, 3, size, size}, fopts), b = at::empty({n, 3, size, size}, fopts);
  at::Tensor means = at::empty({n}, fopts);
  const StageArgs args = stage_args(table.data(), p.data_ptr<float>(), n, size, a.data_ptr<float>(),
                                    b.data_ptr<float>(), means.data_ptr<float>(), out, mean, std);
  for (int64_t i = 0; i < n * plane; ++i) stage_resample(args, i / plane, i % plane);
  for (int64_t c = 0; c < n; ++c) {
    if (!load_crop(args.params + c * kCols).needs_mean) continue;
    double total = 0.0;
    for (int64_t q = 0; q < plane; ++q) total += stage_gray(args, c, q);
    args.means[c] = static_cast<float>(total / static_cast<double>(plane));
  }
  for (int64_t i = 0; i < n * plane; ++i) stage_color(args, i / plane, i % plane);
  for (int64_t i = 0; i < n * plane; ++i) stage_blur_h(args, i / plane, i % plane);
  for (int64_t i = 0; i < n * plane; ++i) stage_blur_v(args, i / plane, i % plane);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seer_C, CPU, m) { m.impl("multicrop_apply_emulated", &multicrop_apply_emulated_cpu); }

}  // namespace seer
