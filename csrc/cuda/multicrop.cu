// Multi-crop augmentation on CUDA: every crop of a batch in one launch per stage (five stages, the
// bodies in seer/multicrop_stages.h, which the CPU test suite runs through a serial emulation).
//
// Stages 1, 3, 4, 5 are one thread per output pixel (all three channels), a grid-stride loop over
// n x S x S pixels; consecutive threads take consecutive x, so loads of the scratch planes, stores of
// the output and (mostly) the source gathers of a warp are contiguous. Stage 2 is one block per crop:
// a fixed-order tree reduction, so results are deterministic run to run.
//
// The parameter matrix and the image table (pointer, size and strides of each image) are host data:
// they are validated on the host, staged in pinned memory and copied asynchronously on the current
// stream. Nothing synchronises the host.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "seer/checks.h"
#include "seer/multicrop.h"
#include "seer/multicrop_stages.h"

namespace seer {
namespace {

constexpr int kThreads = 256;

#define SEER_PIXEL_KERNEL(name, body)                                                                   \
  __global__ void __launch_bounds__(kThreads) name(StageArgs a, int64_t total) {                        \
    const int64_t plane = static_cast<int64_t>(a.S) * a.S;                                              \
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;            \
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)                                            \
      body(a, i / plane, i % plane);                                                                    \
  }

SEER_PIXEL_KERNEL(resample_kernel, stage_resample)
SEER_PIXEL_KERNEL(color_kernel, stage_color)
SEER_PIXEL_KERNEL(blur_h_kernel, stage_blur_h)
SEER_PIXEL_KERNEL(blur_v_kernel, stage_blur_v)

// means[n] = mean grey level of crop n (crops whose jitter includes contrast); one block per crop.
// Sums in double, like the CPU kernels: each thread adds S^2 / 256 values (65536 at S = 4096), and a
// float sum of that many drifts by up to ~1e-3 relative, which contrast passes on to every pixel.
__global__ void __launch_bounds__(kThreads) mean_kernel(StageArgs a) {
  const int64_t n = blockIdx.x;
  if (!load_crop(a.params + n * kCols).needs_mean) return;  // uniform across the block
  const int64_t plane = static_cast<int64_t>(a.S) * a.S;
  double acc = 0.0;
  for (int64_t q = threadIdx.x; q < plane; q += blockDim.x) acc += stage_gray(a, n, q);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ double partial[kThreads / 32];
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    a.means[n] = static_cast<float>(total / static_cast<double>(plane));
  }
}

// Copy `bytes` of host memory to a new device tensor through pinned memory, asynchronously.
at::Tensor to_device_async(const void* src, int64_t bytes, const at::TensorOptions& device_opts) {
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), src, static_cast<size_t>(bytes));
  at::Tensor dev = at::empty({bytes}, device_opts.dtype(at::kByte));
  dev.copy_(host, /*non_blocking=*/true);  // the host allocator keeps `host` alive until the copy ran
  return dev;
}

at::Tensor multicrop_apply_cuda(const std::vector<at::Tensor>& images, const at::Tensor& params, int64_t size,
                                c10::ArrayRef<double> mean, c10::ArrayRef<double> std, at::ScalarType out_dtype) {
  check_multicrop_args(images, params, size, mean, std, out_dtype, at::kCUDA);
  c10::cuda::CUDAGuard guard(images[0].device());
  const int64_t n = params.size(0), plane = size * size;
  const auto opts = images[0].options();
  at::Tensor out = at::empty({n, 3, size, size}, opts.dtype(out_dtype));
  if (n == 0) return out;

  const at::Tensor p = params.contiguous();
  bool any_mean = false, any_blur = false;
  for (int64_t i = 0; i < n; ++i) {
    const CropDesc d = load_crop(p.data_ptr<float>() + i * kCols);
    any_mean |= d.needs_mean;
    any_blur |= d.sigma > 0.f;
  }
  const std::vector<ImageDesc> table = image_table(images);
  const at::Tensor table_dev =
      to_device_async(table.data(), static_cast<int64_t>(table.size() * sizeof(ImageDesc)), opts);
  const at::Tensor params_dev = to_device_async(p.data_ptr<float>(), n * kCols * static_cast<int64_t>(sizeof(float)), opts);

  const auto fopts = opts.dtype(at::kFloat);
  at::Tensor a = at::empty({n, 3, size, size}, fopts);
  at::Tensor b = at::empty({any_blur ? n * 3 * plane : 1}, fopts);
  at::Tensor means = at::empty({n}, fopts);
  const StageArgs args =
      stage_args(reinterpret_cast<const ImageDesc*>(table_dev.data_ptr()),
                 reinterpret_cast<const float*>(params_dev.data_ptr()), n, size, a.data_ptr<float>(),
                 b.data_ptr<float>(), means.data_ptr<float>(), out, mean, std);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = n * plane;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
  resample_kernel<<<blocks, kThreads, 0, stream>>>(args, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (any_mean) {
    mean_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  color_kernel<<<blocks, kThreads, 0, stream>>>(args, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (any_blur) {
    blur_h_kernel<<<blocks, kThreads, 0, stream>>>(args, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blur_v_kernel<<<blocks, kThreads, 0, stream>>>(args, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seer_C, CUDA, m) { m.impl("multicrop_apply", &multicrop_apply_cuda); }

}  // namespace seer
