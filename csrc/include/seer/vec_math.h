// Scalar math written so that GCC vectorises the loops that call it (-O3 -fno-trapping-math
// -fno-math-errno -fopenmp-simd), and multi-versioning of hot loops for AVX2 and AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Hot loops are compiled for AVX-512, AVX2 and the baseline; the loader picks one by CPU features
// (ISA names, not "arch=" names, which GCC dispatches by CPU model and so misses e.g. AMD CPUs).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SEER_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEER_SIMD_CLONES
#endif

// Helpers called inside those loops must be inlined into every clone, or the loop stays scalar.
#if defined(__GNUC__)
#define SEER_INLINE inline __attribute__((always_inline))
#else
#define SEER_INLINE inline
#endif

namespace seer {

SEER_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

SEER_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) for float, about 1 ulp (relative error < 1e-7 where the result is a normal float).
// Results below exp(-86) (~4e-38, just above FLT_MIN) are flushed to 0, which also avoids slow
// denormal arithmetic; -inf gives 0, NaN gives NaN, x > 88 gives inf.
// Method: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) = 1 + r + r^2 p(r)
// polynomial (r + r^2 p(r), p of degree 5 with minimax coefficients), 2^n built in the exponent bits.
SEER_INLINE float expf_vec(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f;
  const float ln2_lo = -2.12194440e-4f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: x + shifter rounds x to an integer in the low bits
  float xc = x < -86.0f ? -86.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  float t = xc * log2e + shifter;
  float n = t - shifter;
  float r = xc - n * ln2_hi - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  uint32_t e = (float_to_bits(t) - 0x4B400000u + 127u) << 23;  // (n + 127) << 23
  y *= bits_to_float(e);
  y = x < -86.0f ? 0.0f : y;
  y = x > 88.0f ? INFINITY : y;
  y = x != x ? x : y;
  return y;
}

// max that propagates NaN (std::max and fmax do not): once NaN, always NaN.
SEER_INLINE float max_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

}  // namespace seer
