// The multi-crop op as five element-wise stages over every pixel of every crop: the bodies of the
// CUDA kernels (csrc/cuda/multicrop.cu, one launch per stage for all crops of a batch) and of their
// serial CPU emulation (csrc/cpu/multicrop_emulate.cpp), which the CPU test suite runs so that the
// indexing of the GPU code is tested on machines without a GPU.
//
//   1. resample   a = jitter ops before contrast (flip (resized_crop (image)))    one thread per pixel
//   2. mean       means[n] = mean grey level of a[n] (crops with contrast only)     one block per crop
//   3. colour     contrast, the remaining jitter ops, grayscale; finished to out  one thread per pixel
//                 (solarize, normalise, cast) unless the crop is blurred, then back into a
//   4. blur_h     b = horizontal Gaussian of a (blurred crops only)               one thread per pixel
//   5. blur_v     out = finish(vertical Gaussian of b) (blurred crops only)       one thread per pixel
//
// Every output element is written exactly once, by stage 3 or stage 5. Bodies take (crop n, pixel p =
// y S + x) and only read what earlier stages wrote, so any execution order within a stage is valid.
#pragma once

#include <cstdint>
#include <vector>

#include "seer/image_ops.h"
#include "seer/multicrop.h"

namespace seer {

struct StageArgs {
  const ImageDesc* images;
  const float* params;  // (n, kCols)
  int64_t n;
  int S;
  float* a;      // (n, 3, S, S) scratch
  float* b;      // (n, 3, S, S) scratch for the horizontal blur
  float* means;  // (n,) grey means for contrast
  void* out;     // (n, 3, S, S) of out_kind
  int out_kind;
  float mean[3], inv_std[3];
};

SEER_HD void store_out(void* out, int kind, int64_t i, float v) {
  if (kind == img::kOutFloat) static_cast<float*>(out)[i] = v;
  else if (kind == img::kOutBFloat16) static_cast<uint16_t*>(out)[i] = img::float_to_bf16_bits(v);
  else static_cast<uint16_t*>(out)[i] = img::float_to_half_bits(v);
}

// Solarize, normalise and store pixel p of crop n.
SEER_HD void finish_pixel(const StageArgs& a, const CropDesc& d, int64_t n, int64_t p, float r, float g, float b) {
  const int64_t plane = static_cast<int64_t>(a.S) * a.S;
  const float v[3] = {r, g, b};
  for (int c = 0; c < 3; ++c) {
    const float x = d.solarize ? img::solarize(v[c]) : v[c];
    store_out(a.out, a.out_kind, (n * 3 + c) * plane + p, (x - a.mean[c]) * a.inv_std[c]);
  }
}

SEER_HD void stage_resample(const StageArgs& a, int64_t n, int64_t p) {
  const CropDesc d = load_crop(a.params + n * kCols);
  const ImageDesc im = a.images[d.image];
  const int S = a.S;
  const int y = static_cast<int>(p / S), x = static_cast<int>(p % S);
  const int xs = d.flip ? S - 1 - x : x;  // hflip: output column x samples where column S-1-x would
  const img::Taps ty = img::resample_taps(y, S, d.top, d.height, img::window_lo(d.top),
                                          img::window_hi(d.top, d.height, static_cast<int>(im.height)));
  const img::Taps tx = img::resample_taps(xs, S, d.left, d.width, img::window_lo(d.left),
                                          img::window_hi(d.left, d.width, static_cast<int>(im.width)));
  float wsx = 0.f;
  for (int k = 0; k < tx.count; ++k) wsx += img::tap_weight(tx, k);
  float r = 0.f, g = 0.f, b = 0.f, wsy = 0.f;
  for (int ky = 0; ky < ty.count; ++ky) {
    const float wy = img::tap_weight(ty, ky);
    wsy += wy;
    const uint8_t* row = im.data + static_cast<int64_t>(ty.first + ky) * im.sy + static_cast<int64_t>(tx.first) * im.sx;
    float rr = 0.f, gg = 0.f, bb = 0.f;
    for (int kx = 0; kx < tx.count; ++kx) {
      const float wx = img::tap_weight(tx, kx);
      const uint8_t* px = row + static_cast<int64_t>(kx) * im.sx;
      rr += wx * static_cast<float>(px[0]);
      gg += wx * static_cast<float>(px[im.sc]);
      bb += wx * static_cast<float>(px[2 * im.sc]);
    }
    r += wy * rr;
    g += wy * gg;
    b += wy * bb;
  }
  const float norm = 1.f / (wsx * wsy * 255.f);  // weights sum to 1, and uint8 -> [0, 1]
  r *= norm;
  g *= norm;
  b *= norm;
  for (int k = 0; k < d.n_pre; ++k) img::apply_jitter_op(d.ops[k], d.factor[d.ops[k]], 0.f, r, g, b);
  const int64_t plane = static_cast<int64_t>(S) * S;
  float* dst = a.a + n * 3 * plane + p;
  dst[0] = r;
  dst[plane] = g;
  dst[2 * plane] = b;
}

// Grey level of pixel p of crop n in a (stage 2 sums it).
SEER_HD float stage_gray(const StageArgs& a, int64_t n, int64_t p) {
  const int64_t plane = static_cast<int64_t>(a.S) * a.S;
  const float* src = a.a + n * 3 * plane + p;
  return img::gray_of(src[0], src[plane], src[2 * plane]);
}

SEER_HD void stage_color(const StageArgs& a, int64_t n, int64_t p) {
  const CropDesc d = load_crop(a.params + n * kCols);
  const int64_t plane = static_cast<int64_t>(a.S) * a.S;
  float* src = a.a + n * 3 * plane + p;
  float r = src[0], g = src[plane], b = src[2 * plane];
  if (d.needs_mean) {
    const float mean = a.means[n];
    for (int k = d.n_pre; k < d.n_ops; ++k) img::apply_jitter_op(d.ops[k], d.factor[d.ops[k]], mean, r, g, b);
  }
  if (d.gray) r = g = b = img::gray_of(r, g, b);
  if (d.sigma > 0.f) {
    src[0] = r;
    src[plane] = g;
    src[2 * plane] = b;
  } else {
    finish_pixel(a, d, n, p, r, g, b);
  }
}

// Normalised Gaussian of radius ceil(3 sigma) along one axis of the three planes of crop `rgb` (planes
// `plane` apart), around (y, x), reflecting, into out[3]. The channels share one pass over the taps, so
// each weight is evaluated once, not once per channel.
SEER_HD void blur_at(const float* rgb, int64_t plane, int S, int y, int x, bool horizontal, float sigma,
                     float out[3]) {
  const int radius = img::blur_radius(sigma);
  float acc[3] = {0.f, 0.f, 0.f}, ws = 0.f;
  for (int k = -radius; k <= radius; ++k) {
    const float w = img::blur_weight(k, sigma);
    const int yy = horizontal ? y : img::reflect_index(y + k, S);
    const int xx = horizontal ? img::reflect_index(x + k, S) : x;
    const int64_t q = static_cast<int64_t>(yy) * S + xx;
    for (int c = 0; c < 3; ++c) acc[c] += w * rgb[c * plane + q];
    ws += w;
  }
  for (int c = 0; c < 3; ++c) out[c] = acc[c] / ws;
}

SEER_HD void stage_blur_h(const StageArgs& a, int64_t n, int64_t p) {
  const float sigma = a.params[n * kCols + kColSigma];
  if (!(sigma > 0.f)) return;
  const int S = a.S;
  const int64_t plane = static_cast<int64_t>(S) * S;
  float v[3];
  blur_at(a.a + n * 3 * plane, plane, S, static_cast<int>(p / S), static_cast<int>(p % S), true, sigma, v);
  for (int c = 0; c < 3; ++c) a.b[(n * 3 + c) * plane + p] = v[c];
}

SEER_HD void stage_blur_v(const StageArgs& a, int64_t n, int64_t p) {
  const float sigma = a.params[n * kCols + kColSigma];
  if (!(sigma > 0.f)) return;  // before decoding the whole row: most pixels of a batch are not blurred
  const CropDesc d = load_crop(a.params + n * kCols);
  const int S = a.S;
  const int64_t plane = static_cast<int64_t>(S) * S;
  float v[3];
  blur_at(a.b + n * 3 * plane, plane, S, static_cast<int>(p / S), static_cast<int>(p % S), false, sigma, v);
  finish_pixel(a, d, n, p, v[0], v[1], v[2]);
}

// ---- host side: what the CUDA launcher and its CPU emulation fill in the same way ------------------

// One descriptor per image (data, size, strides), in the order `params` indexes them.
inline std::vector<ImageDesc> image_table(const std::vector<at::Tensor>& images) {
  std::vector<ImageDesc> table;
  table.reserve(images.size());
  for (const auto& im : images)
    table.push_back({im.data_ptr<uint8_t>(), im.size(1), im.size(2), im.stride(0), im.stride(1), im.stride(2)});
  return table;
}

// The stages' arguments: `images` and `params` where the stages run (device copies for the kernels),
// scratch `a`, `b`, `means` and `out` as the stage comments above describe; mean/std already checked.
inline StageArgs stage_args(const ImageDesc* images, const float* params, int64_t n, int64_t size, float* a,
                            float* b, float* means, const at::Tensor& out, c10::ArrayRef<double> mean,
                            c10::ArrayRef<double> std) {
  StageArgs args{};
  args.images = images;
  args.params = params;
  args.n = n;
  args.S = static_cast<int>(size);
  args.a = a;
  args.b = b;
  args.means = means;
  args.out = out.data_ptr();
  args.out_kind = out_kind_of(out.scalar_type());
  for (int c = 0; c < 3; ++c) {
    args.mean[c] = static_cast<float>(mean[c]);
    args.inv_std[c] = static_cast<float>(1.0 / std[c]);
  }
  return args;
}

}  // namespace seer
