// The multi-crop op's packed parameters, per-crop decoding and argument checks, shared by the CPU and
// CUDA kernels (schemas: csrc/ops.cpp; specification: seer_kernels/reference/multicrop.py).
//
// `params` is a float32 CPU matrix with one row of kCols values per crop (written by
// seer_kernels.CropParams.pack):
//   image, top, left, height, width   source window in pixels of images[image] (fractional after draft
//                                     decoding: the box divided by the JPEG reduction factor)
//   flip, jitter                      0 or 1
//   brightness, contrast, saturation, hue   jitter factors, indexed by op id
//   order[4]                          op ids in the order they are applied (a permutation of 0..3)
//   grayscale, sigma, solarize        grayscale 0/1; blur sigma (0 = no blur); solarize 0/1
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "seer/checks.h"
#include "seer/image_ops.h"

namespace seer {

constexpr int kColImage = 0, kColTop = 1, kColLeft = 2, kColHeight = 3, kColWidth = 4, kColFlip = 5,
              kColJitter = 6, kColFactors = 7, kColOrder = 11, kColGray = 15, kColSigma = 16,
              kColSolarize = 17, kCols = 18;

// Largest accepted blur sigma: its kernel (2 ceil(3 sigma) + 1 taps) is evaluated per pixel on the GPU.
constexpr float kMaxSigma = 1000.f;

struct ImageDesc {
  const uint8_t* data;
  int64_t height, width;
  int64_t sc, sy, sx;  // element strides of channel, row, column
};

// One crop's parameters, decoded for the kernels. Jitter ops that are identities (factor 1 for
// brightness, contrast and saturation, hue shift 0) are dropped; contrast splits the rest in two:
// ops[0, n_pre) run on the resampled pixels, then the grey mean of the whole crop is taken, then
// contrast and ops(n_pre, n_ops) run.
struct CropDesc {
  int image;
  float top, left, height, width;
  bool flip, gray, solarize, needs_mean;
  int n_ops, n_pre;
  int ops[4];
  float factor[4];  // by op id
  float sigma;
};

SEER_HD CropDesc load_crop(const float* row) {
  CropDesc d;
  d.image = static_cast<int>(row[kColImage]);
  d.top = row[kColTop];
  d.left = row[kColLeft];
  d.height = row[kColHeight];
  d.width = row[kColWidth];
  d.flip = row[kColFlip] != 0.f;
  d.gray = row[kColGray] != 0.f;
  d.solarize = row[kColSolarize] != 0.f;
  d.sigma = row[kColSigma];
  for (int k = 0; k < 4; ++k) d.factor[k] = row[kColFactors + k];
  d.n_ops = 0;
  d.n_pre = 0;
  d.needs_mean = false;
  if (row[kColJitter] != 0.f) {
    for (int k = 0; k < 4; ++k) {
      const int op = static_cast<int>(row[kColOrder + k]);
      const bool identity = op == img::kHue ? d.factor[op] == 0.f : d.factor[op] == 1.f;
      if (identity) continue;
      if (op == img::kContrast) d.needs_mean = true;
      if (!d.needs_mean) d.n_pre = d.n_ops + 1;
      d.ops[d.n_ops++] = op;
    }
  }
  return d;
}

// ---- host-side checks ----------------------------------------------------------------------------


inline int out_kind_of(at::ScalarType t) {
  if (t == at::kFloat) return img::kOutFloat;
  if (t == at::kBFloat16) return img::kOutBFloat16;
  if (t == at::kHalf) return img::kOutHalf;
  SEER_CHECK_ARG(false, "out_dtype", "expected float32, bfloat16 or float16, got ", t);
  return -1;
}

// Checks every argument and every crop (params are host data even for CUDA images, so this never
// synchronises). A window must lie inside its image: the kernels rely on it for memory safety.
inline void check_multicrop_args(const std::vector<at::Tensor>& images, const at::Tensor& params, int64_t size,
                                 c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                                 at::ScalarType out_dtype, c10::DeviceType dev) {
  SEER_CHECK_ARG(!images.empty(), "images", "expected at least one image");
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& im = images[i];
    SEER_CHECK_ARG(im.device().type() == dev, "images", "image ", i, ": expected a tensor on ", dev, ", got ",
                   im.device());
    SEER_CHECK_ARG(im.device() == images[0].device(), "images", "every image must be on the same device, image ",
                   i, " is on ", im.device(), " and image 0 on ", images[0].device());
    SEER_CHECK_ARG(im.scalar_type() == at::kByte, "images", "image ", i, ": expected uint8, got ",
                   im.scalar_type());
    SEER_CHECK_ARG(im.dim() == 3 && im.size(0) == 3, "images", "image ", i, ": expected shape (3, H, W), got ",
                   im.sizes());
    SEER_CHECK_ARG(im.size(1) > 0 && im.size(2) > 0, "images", "image ", i, ": expected a non-empty image, got ",
                   im.sizes());
    SEER_CHECK_ARG(im.size(1) < (1 << 24) && im.size(2) < (1 << 24), "images", "image ", i,
                   ": sides must be below 2^24 pixels, got ", im.sizes());
  }
  SEER_CHECK_ARG(params.device().is_cpu(), "params", "expected a CPU tensor, got ", params.device());
  SEER_CHECK_ARG(params.scalar_type() == at::kFloat, "params", "expected float32, got ", params.scalar_type());
  SEER_CHECK_ARG(params.dim() == 2 && params.size(1) == kCols, "params", "expected shape (n, ", kCols, "), got ",
                 params.sizes());
  // The CUDA op launches one block per crop (the grey means): grid axis 0 holds at most 2^31 - 1 blocks. A
  // larger count failed to launch, and from 2^32 on it was cast to 32 bits: the means of the crops past the
  // truncated count were never written (contrast read uninitialised memory).
  SEER_CHECK_ARG(params.size(0) <= INT32_MAX, "params", "expected at most ", INT32_MAX, " crops (rows), got ",
                 params.size(0));
  SEER_CHECK_ARG(size >= 1 && size <= 16384, "size", "expected an integer in [1, 16384], got ", size);
  SEER_CHECK_ARG(mean.size() == 3, "mean", "expected 3 values, got ", mean.size());
  SEER_CHECK_ARG(std.size() == 3, "std", "expected 3 values, got ", std.size());
  for (int c = 0; c < 3; ++c) {
    // The kernels compute in float32 (and multiply by 1 / std): values must be finite there, std normal.
    constexpr double kFloat32Max = std::numeric_limits<float>::max();
    constexpr double kFloat32Tiny = std::numeric_limits<float>::min();
    SEER_CHECK_ARG(std::fabs(mean[c]) <= kFloat32Max, "mean", "expected values finite in float32, got ", mean[c]);
    SEER_CHECK_ARG(std::fabs(std[c]) <= kFloat32Max && std::fabs(std[c]) >= kFloat32Tiny, "std",
                   "expected non-zero values finite in float32 (1.17549e-38 <= |std| <= 3.40282e+38), got ",
                   std[c]);
  }
  out_kind_of(out_dtype);

  const at::Tensor p = params.contiguous();
  const float* rows = p.data_ptr<float>();
  const int64_t n_images = static_cast<int64_t>(images.size());
  for (int64_t n = 0; n < p.size(0); ++n) {
    const float* r = rows + n * kCols;
    for (int k = 0; k < kCols; ++k)
      SEER_CHECK_ARG(std::isfinite(r[k]), "params", "crop ", n, ": column ", k, " is not finite (", r[k], ")");
    const float idx = r[kColImage];
    SEER_CHECK_ARG(idx == std::floor(idx) && idx >= 0 && idx < static_cast<float>(n_images), "params", "crop ", n,
                   ": image index ", idx, " is not an integer in [0, ", n_images, ")");
    const at::Tensor& im = images[static_cast<size_t>(idx)];
    const double H = static_cast<double>(im.size(1)), W = static_cast<double>(im.size(2));
    const double top = r[kColTop], left = r[kColLeft], h = r[kColHeight], w = r[kColWidth];
    SEER_CHECK_ARG(h > 0 && w > 0 && top >= 0 && left >= 0 && top + h <= H && left + w <= W, "params", "crop ", n,
                   ": box (top ", top, ", left ", left, ", height ", h, ", width ", w,
                   ") is empty or lies outside image ", static_cast<int64_t>(idx), " of size ", im.size(1), "x",
                   im.size(2));
    for (int col : {kColFlip, kColJitter, kColGray, kColSolarize})
      SEER_CHECK_ARG(r[col] == 0.f || r[col] == 1.f, "params", "crop ", n, ": column ", col,
                     " must be 0 or 1, got ", r[col]);
    int seen = 0;
    for (int k = 0; k < 4; ++k) {
      const float op = r[kColOrder + k];
      SEER_CHECK_ARG(op == 0.f || op == 1.f || op == 2.f || op == 3.f, "params", "crop ", n,
                     ": jitter order must hold op ids 0..3, got ", op);
      seen |= 1 << static_cast<int>(op);
    }
    SEER_CHECK_ARG(seen == 15, "params", "crop ", n, ": jitter order must be a permutation of 0..3");
    for (int k = 0; k < 3; ++k)
      SEER_CHECK_ARG(r[kColFactors + k] >= 0.f, "params", "crop ", n, ": jitter factor ", k, " must be >= 0, got ",
                     r[kColFactors + k]);
    SEER_CHECK_ARG(std::fabs(r[kColFactors + 3]) <= 0.5f, "params", "crop ", n,
                   ": hue shift must lie in [-0.5, 0.5], got ", r[kColFactors + 3]);
    SEER_CHECK_ARG(r[kColSigma] >= 0.f && r[kColSigma] <= kMaxSigma, "params", "crop ", n,
                   ": blur sigma must lie in [0, ", kMaxSigma, "], got ", r[kColSigma]);
  }
}

}  // namespace seer
