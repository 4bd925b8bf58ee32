// Per-pixel math of the multi-crop op, shared by the C++ CPU kernel, the CUDA kernels and the CPU
// emulation of the CUDA stages, so that every path computes the same thing. The specification is
// seer_kernels/reference/multicrop.py (torchvision.transforms.v2.functional on float images in [0, 1]).
//
// Everything here is branch-free scalar code (ternaries, no early returns) so that GCC vectorises the
// `omp simd` row loops that call it; on the GPU each thread calls it for its own pixel.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "seer/vec_math.h"

#if defined(__CUDACC__)
#define SEER_HD __host__ __device__ __forceinline__
#else
#define SEER_HD SEER_INLINE
#endif

namespace seer {
namespace img {

SEER_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

SEER_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SEER_HD float clamp01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }
// Ternaries, not fminf/fmaxf: GCC vectorises these (inputs are never NaN).
SEER_HD float min2(float a, float b) { return a < b ? a : b; }
SEER_HD float max2(float a, float b) { return a > b ? a : b; }
SEER_HD float min3(float a, float b, float c) { return min2(a, min2(b, c)); }
SEER_HD float max3(float a, float b, float c) { return max2(a, max2(b, c)); }

// ---- antialiased bilinear resampling (torch's interpolate(mode="bilinear", antialias=True)) --------
//
// Output i of an axis of n outputs samples the source interval [start, start + len) (source pixels,
// pixel j covering [j, j + 1)). With scale = len / n the filter is the triangle
//     w(j) = max(0, 1 - |(j + 0.5 - c) / s|),   c = start + scale (i + 0.5),   s = max(scale, 1),
// i.e. a tent as wide as one output pixel when downsampling (the antialias) and plain linear
// interpolation when upsampling. Taps are limited to [lo, hi) (the crop box: torchvision crops before it
// resizes) and the weights are renormalised to sum 1 over the taps kept.
// A fractional window (a box in a JPEG decoded at reduced size) also weights each tap by the part of
// its pixel inside the window, so that content outside the box barely leaks in; for an integer window
// that factor is exactly 1.
// Windows narrower than this (in pixels) are widened to the pixel that holds them (resample_taps).
constexpr float kNarrowestWindow = 0x1p-64f;

struct Taps {
  int first;         // first source pixel (absolute)
  int count;         // number of taps, >= 1
  float center;      // c - first: the tap j = first + k has offset k + 0.5 - center
  float invscale;    // 1 / s
  float beg, end;    // the window relative to first: [start - first, start + len - first)
};

SEER_HD Taps resample_taps(int i, int n, float start, float len, int lo, int hi) {
  const float scale = len / static_cast<float>(n);
  const float support = scale >= 1.f ? scale : 1.f;
  const float invscale = scale >= 1.f ? 1.f / scale : 1.f;
  // Relative to lo: for an integer box (start == lo) this is exactly torch's center = scale * (i + 0.5).
  const float c = (start - static_cast<float>(lo)) + scale * (static_cast<float>(i) + 0.5f);
  int first = static_cast<int>(floorf(c - support + 0.5f));
  int last = static_cast<int>(floorf(c + support + 0.5f));
  first = first < 0 ? 0 : first;
  last = last > hi - lo ? hi - lo : last;
  last = last <= first ? first + 1 : last;  // c lies inside [0, hi - lo], so this only guards rounding
  Taps t;
  t.first = lo + first;
  t.count = last - first;
  t.center = c - static_cast<float>(first);
  t.invscale = invscale;
  t.beg = (start - static_cast<float>(lo)) - static_cast<float>(first);
  t.end = t.beg + len;
  // A window narrower than half a float32 ulp of beg has end == beg: every coverage would be 0 and the
  // normalised weights 0 / 0 (NaN crops); one narrower than 2^-64 of a pixel has coverages that underflow
  // to 0 once multiplied by the triangle (subnormal widths). Such a window lies inside one pixel (in float32
  // no start is within 2^-64 below a pixel boundary other than 0), so it is widened to that whole pixel,
  // which then gets all the weight: the exact limit, and what the reference computes (the same rule).
  const bool empty = !(t.end - t.beg >= kNarrowestWindow);
  t.beg = empty ? floorf(t.beg) : t.beg;
  t.end = empty ? t.beg + 1.f : t.end;
  return t;
}

// Unnormalised weight of tap k (0 <= k < count): triangle times the tap's pixel coverage.
SEER_HD float tap_weight(const Taps& t, int k) {
  const float fk = static_cast<float>(k);
  const float x = fabsf((fk + 0.5f - t.center) * t.invscale);
  const float cover = clamp01(min2(fk + 1.f, t.end) - max2(fk, t.beg));
  return (x < 1.f ? 1.f - x : 0.f) * cover;
}

// Source range [lo, hi) of an axis for a crop window [start, start + len) of an image of `size` pixels.
SEER_HD int window_lo(float start) {
  const int lo = static_cast<int>(floorf(start));
  return lo < 0 ? 0 : lo;
}
// At least lo + 1: a window narrower than half a float32 ulp of its integer start has start + len ==
// start, so ceilf would give lo and an empty range, while resample_taps still returns one tap there.
SEER_HD int window_hi(float start, float len, int size) {
  const int hi = static_cast<int>(ceilf(start + len));
  const int lo1 = window_lo(start) + 1;
  const int h = hi > lo1 ? hi : lo1;
  return h > size ? size : h;
}

// ---- colour operations (float images in [0, 1]; torchvision v2 functional semantics) ----------------

// rgb_to_grayscale: ITU-R 601-2 luma with torchvision's (not quite normalised) weights.
SEER_HD float gray_of(float r, float g, float b) { return r * 0.2989f + g * 0.587f + b * 0.114f; }

// _blend(x, y, f) = clamp(f x + (1 - f) y, 0, 1).
SEER_HD float blend(float x, float y, float f) { return clamp01(x * f + y * (1.f - f)); }

SEER_HD void adjust_brightness(float& r, float& g, float& b, float f) {
  r = clamp01(r * f);
  g = clamp01(g * f);
  b = clamp01(b * f);
}

// Contrast blends towards the mean grey level of the whole (current) image: `mean` is that mean.
SEER_HD void adjust_contrast(float& r, float& g, float& b, float f, float mean) {
  r = blend(r, mean, f);
  g = blend(g, mean, f);
  b = blend(b, mean, f);
}

SEER_HD void adjust_saturation(float& r, float& g, float& b, float f) {
  const float l = gray_of(r, g, b);
  r = blend(r, l, f);
  g = blend(g, l, f);
  b = blend(b, l, f);
}

// Hue rotation through HSV (torchvision's _rgb_to_hsv / _hsv_to_rgb, Pillow's formulas):
//   v = max, s = (max - min) / max, h in [0, 1) from the sector of the largest channel; h' = (h + f) mod 1.
// Back to RGB without sector selects: channel c = v - v s clamp(min(k, 4 - k), 0, 1) with
// k = (n_c + 6 h') mod 6, n = (5, 3, 1) for (r, g, b). That equals torchvision's per-sector choice
// among v, p = v (1 - s), q = v (1 - s frac), t = v (1 - s (1 - frac)) (up to rounding), and vectorises
// into a few min/max instead of chains of blends.
SEER_HD float hsv_channel(float n, float h6, float v, float vs) {
  float k = n + h6;
  k = k >= 6.f ? k - 6.f : k;
  const float m = min2(k, 4.f - k);
  return v - vs * (m < 0.f ? 0.f : (m > 1.f ? 1.f : m));
}

SEER_HD void adjust_hue(float& r, float& g, float& b, float f) {
  const float maxc = max3(r, g, b), minc = min3(r, g, b);
  const bool eqc = maxc == minc;
  const float range = maxc - minc;
  const float s = range / (eqc ? 1.f : maxc);
  // torchvision's bc - gc, 2 + rc - bc, 4 + gc - rc with xc = (max - x) / range, one division instead of
  // three: (g - b) / range, 2 + (b - r) / range, 4 + (r - g) / range (equal up to rounding).
  const float num = maxc == r ? g - b : (maxc == g ? b - r : r - g);
  const float offset = maxc == r ? 0.f : (maxc == g ? 2.f : 4.f);
  float h = num / (eqc ? 1.f : range) + offset;
  h = h * (1.f / 6.f) + 1.f;
  h = h - floorf(h);  // fmod(h, 1) for h > 0
  h = h + f;
  h = h - floorf(h);  // remainder(h, 1) in [0, 1]
  const float h6 = h * 6.f;
  const float vs = maxc * s;
  r = hsv_channel(5.f, h6, maxc, vs);
  g = hsv_channel(3.f, h6, maxc, vs);
  b = hsv_channel(1.f, h6, maxc, vs);
}

// Jitter op ids (CropParams.jitter_order): 0 brightness, 1 contrast, 2 saturation, 3 hue.
enum JitterOp : int { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

SEER_HD void apply_jitter_op(int op, float factor, float mean, float& r, float& g, float& b) {
  if (op == kBrightness) adjust_brightness(r, g, b, factor);
  else if (op == kContrast) adjust_contrast(r, g, b, factor, mean);
  else if (op == kSaturation) adjust_saturation(r, g, b, factor);
  else adjust_hue(r, g, b, factor);
}

SEER_HD float solarize(float v) { return v >= 0.5f ? 1.f - v : v; }

// ---- Gaussian blur (gaussian_blur with kernel size 2 ceil(3 sigma) + 1, reflect padding) ------------

// Radius ceil(3 sigma), in double like Python's math.ceil(3 * sigma) so the kernel size agrees exactly.
SEER_HD int blur_radius(float sigma) { return sigma > 0.f ? static_cast<int>(ceil(3.0 * static_cast<double>(sigma))) : 0; }

// Unnormalised tap weight exp(-k^2 / (2 sigma^2)) (torchvision: softmax(-(x / sigma)^2), x = k / sqrt 2).
SEER_HD float blur_weight(int k, float sigma) {
  const float x = static_cast<float>(k) / sigma;
  return expf(-0.5f * x * x);
}

// Reflect padding without repeating the edge (torch's "reflect"): -1 -> 1, n -> n - 2. Folds any
// distance (a radius larger than the image reflects again), and n == 1 maps everything to 0.
SEER_HD int reflect_index(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * (n - 1);
  int m = i % period;
  m = m < 0 ? m + period : m;
  return m < n ? m : period - m;
}

// ---- output conversion ------------------------------------------------------------------------

// float -> bfloat16 bits, round to nearest even (as torch's c10::BFloat16), NaN -> 0x7FC0.
SEER_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// float -> IEEE half bits, round to nearest even, overflow to inf, subnormals exact.
// Normal results: rebias the exponent (-112) and round the 13 dropped mantissa bits with the
// "add 0xfff + odd bit" trick. Subnormal results: adding 0.5f puts the value's bits at the half
// subnormal positions of the sum's mantissa, and the FPU rounds (to nearest even) for us.
SEER_HD uint16_t float_to_half_bits(float f) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // 0xC8000000 = -(112 << 23)
  const uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN : inf
  const uint32_t mag = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : normal);
  return static_cast<uint16_t>(mag | sign);
}

// Output element kinds (the op's out_dtype).
enum OutKind : int { kOutFloat = 0, kOutBFloat16 = 1, kOutHalf = 2 };

}  // namespace img
}  // namespace seer
