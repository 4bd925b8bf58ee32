// Multi-crop augmentation on the CPU: one task per crop (at::parallel_for over crops, so one thread in
// a DataLoader worker, where torch sets one thread), every loop over a row of pixels vectorised.
// Per-pixel math: seer/image_ops.h; specification: seer_kernels/reference/multicrop.py.
//
// Per crop of output size S:
//   pass 1, per output row: vertical resampling of the uint8 source rows under the row's taps into a
//     float row of the box's columns (contiguous, so it vectorises for planar CHW and for interleaved
//     HWC images alike), then horizontal resampling as a banded matrix product over blocks of 16
//     outputs (no gathers), with the flip folded into the weights; then the jitter ops that precede
//     contrast.
//     Crops without contrast and blur are finished right there (grayscale, solarize, normalise, cast).
//   pass 2 (crops with contrast): contrast needs the grey mean of the whole crop, so the rows wait in a
//     3 x S x S float buffer (L2-sized) and get contrast, the remaining ops and grayscale here.
//   blur: horizontal pass in place on each buffered row (reflect-padded copy), then the vertical pass
//     fused with the finish. A grayscale crop blurs one plane and writes it to all three channels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "seer/checks.h"
#include "seer/image_ops.h"
#include "seer/multicrop.h"
#include "seer/vec_math.h"

namespace seer {
namespace {

using namespace img;

// Vertical resampling tables: output row i reads source rows lo + idx[i] + k, k < taps, with weight
// w[k n + i] (zero-padded to the crop's largest tap count).
struct Axis {
  int taps = 0, lo = 0, hi = 0;
  std::vector<float> w;
  std::vector<int32_t> idx;
};

void build_axis(int n, float start, float len, int size, float gain, Axis& ax) {
  ax.lo = window_lo(start);
  ax.hi = window_hi(start, len, size);
  int taps = 1;
  for (int i = 0; i < n; ++i) taps = std::max(taps, resample_taps(i, n, start, len, ax.lo, ax.hi).count);
  ax.taps = taps;
  ax.w.assign(static_cast<size_t>(taps) * n, 0.f);
  ax.idx.assign(static_cast<size_t>(n), 0);
  for (int i = 0; i < n; ++i) {
    const Taps t = resample_taps(i, n, start, len, ax.lo, ax.hi);
    float total = 0.f;
    for (int k = 0; k < t.count; ++k) total += tap_weight(t, k);
    for (int k = 0; k < t.count; ++k) ax.w[static_cast<size_t>(k) * n + i] = tap_weight(t, k) * gain / total;
    ax.idx[i] = t.first - ax.lo;
  }
}

// Horizontal resampling as a banded matrix, in blocks of kLanes outputs: block b reads the source
// columns lo + beg[b] + j, j < count[b], and adds mt[off[b] + j kLanes + l] * column to output lane l.
// Each column is broadcast against a contiguous row of weights: no gathers (which GCC emulates with
// scalar loads under generic tuning, and which are slow on many CPUs). The band of a block is about
// (kLanes + 2) * scale wide, so most weights are zero, but every multiply is a full vector lane.
constexpr int kLanes = 16;

struct Bands {
  int lo = 0, hi = 0;
  std::vector<int32_t> beg, count;
  std::vector<int64_t> off;
  std::vector<float> mt;
};

void build_bands(int n, float start, float len, int size, bool flip, Bands& bd) {
  bd.lo = window_lo(start);
  bd.hi = window_hi(start, len, size);
  const int blocks = (n + kLanes - 1) / kLanes;
  bd.beg.assign(blocks, 0);
  bd.count.assign(blocks, 0);
  bd.off.assign(blocks + 1, 0);
  for (int b = 0; b < blocks; ++b) {
    int first = bd.hi - bd.lo, last = 0;
    for (int x = b * kLanes; x < std::min(n, (b + 1) * kLanes); ++x) {
      const Taps t = resample_taps(flip ? n - 1 - x : x, n, start, len, bd.lo, bd.hi);
      first = std::min(first, t.first - bd.lo);
      last = std::max(last, t.first - bd.lo + t.count);
    }
    bd.beg[b] = first;
    bd.count[b] = last - first;
    bd.off[b + 1] = bd.off[b] + static_cast<int64_t>(last - first) * kLanes;
  }
  bd.mt.assign(static_cast<size_t>(bd.off[blocks]), 0.f);
  for (int x = 0; x < n; ++x) {
    const int b = x / kLanes, l = x % kLanes;
    const Taps t = resample_taps(flip ? n - 1 - x : x, n, start, len, bd.lo, bd.hi);
    float total = 0.f;
    for (int k = 0; k < t.count; ++k) total += tap_weight(t, k);
    float* m = bd.mt.data() + bd.off[b] + static_cast<int64_t>(t.first - bd.lo - bd.beg[b]) * kLanes + l;
    for (int k = 0; k < t.count; ++k) m[k * kLanes] = tap_weight(t, k) / total;
  }
}

struct Job {
  const uint8_t* data;
  int64_t height, width, sc, sy;
  bool interleaved;  // HWC memory (sx == 3, sc == 1); otherwise planar rows (sx == 1)
  CropDesc d;
  float mean[3], inv_std[3];
  int out_kind;
  void* out;  // this crop's (3, S, S) block
};

struct Scratch {
  Bands ax;
  Axis ay;
  std::vector<float> tmp, rows, crop, line, acc, bw;
  std::vector<int64_t> offsets;
};

// ---- row loops (inlined into every SIMD clone of process_crop) -----------------------------------

// A block of kLanes floats as a GCC vector (lowered to 1, 2 or 4 registers by each SIMD clone). Written
// with it rather than an `omp simd` loop because GCC otherwise vectorises the loop over columns instead
// and gathers the weights.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

SEER_INLINE Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Store the first n lanes: a full block is one vector store (GCC turns a loop into `rep movs`).
SEER_INLINE void store_lanes(const Lanes& v, float* out, int n) {
  if (n == kLanes) {
    std::memcpy(out, &v, sizeof v);
    return;
  }
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof v);
  for (int l = 0; l < n; ++l) out[l] = tmp[l];
}

// tmp[e] = sum_k w[k wstride] src[k sy + e]: the vertical taps of one output row over n contiguous bytes.
// Tap by tap over the whole row (each source row streams once; tmp stays in L1). GCC vectorises the
// uint8 -> float conversion here, which it does not do for __builtin_convertvector.
SEER_INLINE void vertical(const uint8_t* src, int64_t sy, const float* w, int64_t wstride, int taps, int64_t n,
                          float* tmp) {
  const float w0 = w[0];
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) tmp[e] = w0 * static_cast<float>(src[e]);
  for (int k = 1; k < taps; ++k) {
    const uint8_t* q = src + k * sy;
    const float wk = w[k * wstride];
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) tmp[e] += wk * static_cast<float>(q[e]);
  }
}

// R, G, B[x] = sum_j M[x, j] channel[j] over the bands; channel c of column j is tc[j * stride] (stride 1:
// three planar rows; stride 3: one interleaved r, g, b row). Six accumulators (three channels, even and
// odd columns) hide the latency of the fused multiply-adds.
SEER_INLINE void horizontal(const float* t0, const float* t1, const float* t2, int64_t stride, const Bands& bd,
                            int S, float* R, float* G, float* B) {
  const int blocks = static_cast<int>(bd.beg.size());
  for (int b = 0; b < blocks; ++b) {
    Lanes r0 = {}, g0 = {}, b0 = {}, r1 = {}, g1 = {}, b1 = {};
    const float* m = bd.mt.data() + bd.off[b];
    const int count = bd.count[b];
    int64_t e = bd.beg[b] * stride;
    int j = 0;
    for (; j + 1 < count; j += 2, e += 2 * stride) {
      const Lanes w0 = load_lanes(m + j * kLanes), w1 = load_lanes(m + (j + 1) * kLanes);
      r0 += w0 * t0[e];
      g0 += w0 * t1[e];
      b0 += w0 * t2[e];
      r1 += w1 * t0[e + stride];
      g1 += w1 * t1[e + stride];
      b1 += w1 * t2[e + stride];
    }
    if (j < count) {
      const Lanes w0 = load_lanes(m + j * kLanes);
      r0 += w0 * t0[e];
      g0 += w0 * t1[e];
      b0 += w0 * t2[e];
    }
    const int n = std::min(kLanes, S - b * kLanes);
    store_lanes(r0 + r1, R + b * kLanes, n);
    store_lanes(g0 + g1, G + b * kLanes, n);
    store_lanes(b0 + b1, B + b * kLanes, n);
  }
}

SEER_INLINE void row_op(int op, float f, float mean, float* R, float* G, float* B, int S) {
  switch (op) {
    case kBrightness:
#pragma omp simd
      for (int x = 0; x < S; ++x) {
        float r = R[x], g = G[x], b = B[x];
        adjust_brightness(r, g, b, f);
        R[x] = r, G[x] = g, B[x] = b;
      }
      break;
    case kContrast:
#pragma omp simd
      for (int x = 0; x < S; ++x) {
        float r = R[x], g = G[x], b = B[x];
        adjust_contrast(r, g, b, f, mean);
        R[x] = r, G[x] = g, B[x] = b;
      }
      break;
    case kSaturation:
#pragma omp simd
      for (int x = 0; x < S; ++x) {
        float r = R[x], g = G[x], b = B[x];
        adjust_saturation(r, g, b, f);
        R[x] = r, G[x] = g, B[x] = b;
      }
      break;
    default:
#pragma omp simd
      for (int x = 0; x < S; ++x) {
        float r = R[x], g = G[x], b = B[x];
        adjust_hue(r, g, b, f);
        R[x] = r, G[x] = g, B[x] = b;
      }
  }
}

SEER_INLINE float row_gray_sum(const float* R, const float* G, const float* B, int S) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int x = 0; x < S; ++x) acc += gray_of(R[x], G[x], B[x]);
  return acc;
}

SEER_INLINE void row_grayscale(float* R, float* G, float* B, int S) {
#pragma omp simd
  for (int x = 0; x < S; ++x) {
    const float l = gray_of(R[x], G[x], B[x]);
    R[x] = l, G[x] = l, B[x] = l;
  }
}

// Solarize, normalise and store one channel row.
SEER_INLINE void finish_row(const float* src, bool sol, float mean, float inv_std, int kind, void* out, int64_t off,
                            int S) {
  if (kind == kOutFloat) {
    float* o = static_cast<float*>(out) + off;
#pragma omp simd
    for (int x = 0; x < S; ++x) o[x] = ((sol ? solarize(src[x]) : src[x]) - mean) * inv_std;
  } else if (kind == kOutBFloat16) {
    uint16_t* o = static_cast<uint16_t*>(out) + off;
#pragma omp simd
    for (int x = 0; x < S; ++x) o[x] = float_to_bf16_bits(((sol ? solarize(src[x]) : src[x]) - mean) * inv_std);
  } else {
    uint16_t* o = static_cast<uint16_t*>(out) + off;
#pragma omp simd
    for (int x = 0; x < S; ++x) o[x] = float_to_half_bits(((sol ? solarize(src[x]) : src[x]) - mean) * inv_std);
  }
}

SEER_INLINE void finish_rows(const Job& j, const float* const* ch, int y, int S) {
  for (int c = 0; c < 3; ++c)
    finish_row(ch[c], j.d.solarize, j.mean[c], j.inv_std[c], j.out_kind, j.out,
               (static_cast<int64_t>(c) * S + y) * S, S);
}

// Resampled row y of the crop (values in [0, 1]) into R, G, B.
SEER_INLINE void resample_row(const Job& j, Scratch& s, int y, int S, float* R, float* G, float* B) {
  const Axis& ay = s.ay;
  const Bands& ax = s.ax;
  const int first = ay.lo + ay.idx[y];
  const float* wy = ay.w.data() + y;
  int taps = 0;  // the row's own tap count: trailing zero weights are padding
  for (int k = 0; k < ay.taps; ++k) taps = wy[static_cast<int64_t>(k) * S] != 0.f ? k + 1 : taps;
  const int64_t span = ax.hi - ax.lo;
  float* tmp = s.tmp.data();
  if (j.interleaved) {
    const uint8_t* src = j.data + first * j.sy + static_cast<int64_t>(ax.lo) * 3;
    vertical(src, j.sy, wy, S, taps, span * 3, tmp);
    horizontal(tmp, tmp + 1, tmp + 2, 3, ax, S, R, G, B);
  } else {
    for (int c = 0; c < 3; ++c)
      vertical(j.data + c * j.sc + first * j.sy + ax.lo, j.sy, wy, S, taps, span, tmp + c * span);
    horizontal(tmp, tmp + span, tmp + 2 * span, 1, ax, S, R, G, B);
  }
}

// dst[x] = sum_k w[k] src_k[x] for x < n, with src_k = base + off[k]: kLanes outputs at a time with the
// accumulator in registers (one load per tap), the tail one by one.
SEER_INLINE void weighted_rows(const float* base, const int64_t* off, const float* w, int taps, int n, float* dst) {
  int x = 0;
  for (; x + kLanes <= n; x += kLanes) {
    Lanes acc = {};
    for (int k = 0; k < taps; ++k) acc += load_lanes(base + off[k] + x) * w[k];
    std::memcpy(dst + x, &acc, sizeof acc);
  }
  for (; x < n; ++x) {
    float acc = 0.f;
    for (int k = 0; k < taps; ++k) acc += base[off[k] + x] * w[k];
    dst[x] = acc;
  }
}

// Gaussian blur of the buffered crop, then finish. Planes: 1 for a grayscale crop (identical channels).
SEER_INLINE void blur_and_finish(const Job& j, Scratch& s, int S) {
  const int64_t plane = static_cast<int64_t>(S) * S;
  const int radius = blur_radius(j.d.sigma);
  const int taps = 2 * radius + 1;
  s.bw.resize(taps);
  s.offsets.resize(taps);
  float total = 0.f;
  for (int k = 0; k < taps; ++k) total += (s.bw[k] = blur_weight(k - radius, j.d.sigma));
  for (int k = 0; k < taps; ++k) s.bw[k] /= total;
  const float* bw = s.bw.data();
  int64_t* off = s.offsets.data();
  const int planes = j.d.gray ? 1 : 3;
  // Horizontal, in place row by row through a reflect-padded copy (only the 2 radius border values need
  // the modulo index): tap k reads line[x + k].
  s.line.resize(S + 2 * radius);
  float* line = s.line.data();
  for (int k = 0; k < taps; ++k) off[k] = k;
  for (int c = 0; c < planes; ++c) {
    for (int y = 0; y < S; ++y) {
      float* row = s.crop.data() + c * plane + static_cast<int64_t>(y) * S;
      for (int e = 0; e < radius; ++e) {
        line[e] = row[reflect_index(e - radius, S)];
        line[S + radius + e] = row[reflect_index(S + e, S)];
      }
      std::copy(row, row + S, line + radius);
      weighted_rows(line, off, bw, taps, S, row);
    }
  }
  // Vertical, fused with the finish: tap k of output row y reads row reflect(y - radius + k).
  s.acc.resize(3 * static_cast<size_t>(S));
  for (int y = 0; y < S; ++y) {
    for (int k = 0; k < taps; ++k) off[k] = static_cast<int64_t>(reflect_index(y - radius + k, S)) * S;
    for (int c = 0; c < planes; ++c) weighted_rows(s.crop.data() + c * plane, off, bw, taps, S, s.acc.data() + c * S);
    const float* ch[3] = {s.acc.data(), s.acc.data() + (planes == 3 ? S : 0), s.acc.data() + (planes == 3 ? 2 * S : 0)};
    finish_rows(j, ch, y, S);
  }
}

SEER_SIMD_CLONES void process_crop(const Job& j, Scratch& s, int S) {
  const CropDesc& d = j.d;
  const int64_t plane = static_cast<int64_t>(S) * S;
  build_bands(S, d.left, d.width, static_cast<int>(j.width), d.flip, s.ax);
  build_axis(S, d.top, d.height, static_cast<int>(j.height), 1.f / 255.f, s.ay);
  s.tmp.resize(static_cast<size_t>(s.ax.hi - s.ax.lo) * 3);
  const bool blur = d.sigma > 0.f;
  const bool buffered = d.needs_mean || blur;
  s.rows.resize(3 * static_cast<size_t>(S));
  if (buffered) s.crop.resize(3 * static_cast<size_t>(plane));
  double gray_total = 0.0;
  for (int y = 0; y < S; ++y) {
    float* R = buffered ? s.crop.data() + static_cast<int64_t>(y) * S : s.rows.data();
    float* G = R + (buffered ? plane : S);
    float* B = G + (buffered ? plane : S);
    resample_row(j, s, y, S, R, G, B);
    for (int k = 0; k < d.n_pre; ++k) row_op(d.ops[k], d.factor[d.ops[k]], 0.f, R, G, B, S);
    if (d.needs_mean) {
      gray_total += row_gray_sum(R, G, B, S);
      continue;
    }
    if (d.gray) row_grayscale(R, G, B, S);
    if (!blur) {
      const float* ch[3] = {R, G, B};
      finish_rows(j, ch, y, S);
    }
  }
  if (d.needs_mean) {
    const float mean = static_cast<float>(gray_total / static_cast<double>(plane));
    for (int y = 0; y < S; ++y) {
      float* R = s.crop.data() + static_cast<int64_t>(y) * S;
      float* G = R + plane;
      float* B = G + plane;
      for (int k = d.n_pre; k < d.n_ops; ++k) row_op(d.ops[k], d.factor[d.ops[k]], mean, R, G, B, S);
      if (d.gray) row_grayscale(R, G, B, S);
      if (!blur) {
        const float* ch[3] = {R, G, B};
        finish_rows(j, ch, y, S);
      }
    }
  }
  if (blur) blur_and_finish(j, s, S);
}

// Planar rows (sx == 1; any strides when W == 1, where sx is never used) or interleaved HWC memory.
bool is_planar(const at::Tensor& im) { return im.size(2) == 1 || im.stride(2) == 1; }
bool is_interleaved(const at::Tensor& im) { return im.stride(2) == 3 && im.stride(0) == 1; }

// A view the kernel can read row by row; other layouts are copied once.
at::Tensor readable(const at::Tensor& im) { return is_planar(im) || is_interleaved(im) ? im : im.contiguous(); }

at::Tensor multicrop_apply_cpu(const std::vector<at::Tensor>& images, const at::Tensor& params, int64_t size,
                               c10::ArrayRef<double> mean, c10::ArrayRef<double> std, at::ScalarType out_dtype) {
  check_multicrop_args(images, params, size, mean, std, out_dtype, at::kCPU);
  const int S = static_cast<int>(size);
  const int64_t n = params.size(0);
  at::Tensor out = at::empty({n, 3, size, size}, images[0].options().dtype(out_dtype));
  if (n == 0) return out;
  std::vector<at::Tensor> views;
  views.reserve(images.size());
  for (const auto& im : images) views.push_back(readable(im));
  const at::Tensor p = params.contiguous();
  const int kind = out_kind_of(out_dtype);
  const int64_t elem = out.element_size();
  std::vector<Job> jobs(n);
  for (int64_t i = 0; i < n; ++i) {
    Job& j = jobs[i];
    j.d = load_crop(p.data_ptr<float>() + i * kCols);
    const at::Tensor& im = views[j.d.image];
    j.data = im.data_ptr<uint8_t>();
    j.height = im.size(1);
    j.width = im.size(2);
    j.sc = im.stride(0);
    j.sy = im.stride(1);
    j.interleaved = !is_planar(im);
    for (int c = 0; c < 3; ++c) {
      j.mean[c] = static_cast<float>(mean[c]);
      j.inv_std[c] = static_cast<float>(1.0 / std[c]);
    }
    j.out_kind = kind;
    j.out = static_cast<char*>(out.data_ptr()) + i * 3 * size * size * elem;
  }
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    Scratch s;
    for (int64_t i = b; i < e; ++i) process_crop(jobs[i], s, S);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seer_C, CPU, m) { m.impl("multicrop_apply", &multicrop_apply_cpu); }

}  // namespace seer
