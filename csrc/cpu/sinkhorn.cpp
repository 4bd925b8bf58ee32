// Sinkhorn-Knopp on the CPU: the whole iteration fused in one call, and the step kernels the
// distributed driver uses. Math, shifts and NaN policy: seer_kernels/reference/sinkhorn.py.
//
// Layout: scores are converted once to a contiguous float32 matrix X = (S - m) / eps (B rows of K),
// kept in the output buffer; every step is then one pass over X computing exp(X + f + g - shift)
// with a vectorised exp. Threads (at::parallel_for, OpenMP underneath) split rows, or fixed chunks
// of 32 rows for per-prototype sums whose partials are added in a fixed order: the result does not
// depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "seer/checks.h"
#include "seer/sinkhorn.h"
#include "seer/vec_math.h"

namespace seer {
namespace {

constexpr int64_t kRowChunk = 32;    // rows per partial sum of a per-prototype reduction
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- leaf loops over one row of K values (vectorised, multi-versioned) ----------------------

SEER_SIMD_CLONES void logits_row(const float* s, const float* m, float eps, float* x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) x[k] = (s[k] - m[k]) / eps;
}

// Raw per-column max with a flag for non-finite entries (the flag becomes NaN in the result).
SEER_SIMD_CLONES void colmax_raw_row(const float* s, float* acc, int32_t* bad, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    float v = s[k];
    bad[k] |= (v != v || std::fabs(v) == INFINITY) ? 1 : 0;
    acc[k] = v > acc[k] ? v : acc[k];
  }
}

SEER_SIMD_CLONES void acc_max_row(const float* x, const float* f, float add, float* acc, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] = max_nan(acc[k], x[k] + f[k] + add);
}

SEER_SIMD_CLONES void acc_exp_row(const float* x, const float* f, float add, const float* shift, float* acc,
                                  int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += expf_vec(x[k] + f[k] + add - shift[k]);
}

SEER_SIMD_CLONES float row_max(const float* x, const float* f, float add, int64_t n) {
  float acc = -INFINITY;
  int32_t nan = 0;
#pragma omp simd reduction(max : acc) reduction(| : nan)
  for (int64_t k = 0; k < n; ++k) {
    float v = x[k] + f[k] + add;
    nan |= v != v ? 1 : 0;
    acc = v > acc ? v : acc;
  }
  return nan ? kNaN : acc;
}

SEER_SIMD_CLONES float row_sumexp(const float* x, const float* f, float add, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += expf_vec(x[k] + f[k] + add);
  return acc;
}

SEER_SIMD_CLONES void exp_row(const float* x, const float* f, float add, float* out, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = expf_vec(x[k] + f[k] + add);
}

// ---- whole-matrix reductions ---------------------------------------------------------------

// Per-prototype reduction over rows: out[k] = reduce_j (x[j,k] + f[k] + g[j]) (max, or sum of
// exp(... - shift[k])). Fixed 32-row chunks give partials that are combined in order.
void reduce_over_rows(const float* x, int64_t B, int64_t K, const float* f, const float* g,
                      const float* shift, bool is_max, float* out) {
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  std::vector<float> part(chunks * K, is_max ? -INFINITY : 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = part.data() + c * K;
      for (int64_t j = c * kRowChunk; j < std::min(B, (c + 1) * kRowChunk); ++j) {
        const float add = g ? g[j] : 0.f;
        if (is_max) acc_max_row(x + j * K, f, add, acc, K);
        else acc_exp_row(x + j * K, f, add, shift, acc, K);
      }
    }
  });
  at::parallel_for(0, K, 2048, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float acc = part[k];
      for (int64_t c = 1; c < chunks; ++c) acc = is_max ? max_nan(acc, part[c * K + k]) : acc + part[c * K + k];
      out[k] = acc;
    }
  });
}

// Per-sample reduction over prototypes: out[j] = max_k (x + f + g) or sum_k exp(x + f + g - shift[j]).
void reduce_over_cols(const float* x, int64_t B, int64_t K, const float* f, const float* g,
                      const float* shift, int64_t shift_stride, bool is_max, float* out) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float add = g ? g[j] : 0.f;
      out[j] = is_max ? row_max(x + j * K, f, add, K)
                      : row_sumexp(x + j * K, f, add - shift[j * shift_stride], K);
    }
  });
}

// m[k] = max_j s[j,k]; NaN where a column holds NaN or +-inf.
void colmax_raw(const float* s, int64_t B, int64_t K, float* m) {
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  std::vector<float> part(chunks * K, -INFINITY);
  std::vector<int32_t> bad(chunks * K, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t j = c * kRowChunk; j < std::min(B, (c + 1) * kRowChunk); ++j)
        colmax_raw_row(s + j * K, part.data() + c * K, bad.data() + c * K, K);
  });
  for (int64_t k = 0; k < K; ++k) {
    float acc = part[k];
    int32_t b = bad[k];
    for (int64_t c = 1; c < chunks; ++c) {
      acc = std::max(acc, part[c * K + k]);
      b |= bad[c * K + k];
    }
    m[k] = b ? kNaN : acc;
  }
}

void logits(const float* s, const float* m, float eps, int64_t B, int64_t K, float* x) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / K), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) logits_row(s + j * K, m, eps, x + j * K, K);
  });
}

at::Tensor as_float_matrix(const at::Tensor& scores) { return scores.to(at::kFloat).contiguous(); }

// X = (S - m) / eps for a step op (f, g added inside the reductions).
at::Tensor step_logits(const at::Tensor& s, const at::Tensor& m, double eps) {
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor x = at::empty({B, K}, s.options());
  logits(s.data_ptr<float>(), m.data_ptr<float>(), static_cast<float>(eps), B, K, x.data_ptr<float>());
  return x;
}

at::Tensor vec_or_zeros(const std::optional<at::Tensor>& t, int64_t n, const at::Tensor& like) {
  if (t.has_value()) return t->to(at::kFloat).contiguous();
  return at::zeros({n}, like.options().dtype(at::kFloat));
}

// ---- ops ---------------------------------------------------------------------------------------

at::Tensor sinkhorn_max_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& m,
                            const std::optional<at::Tensor>& f, const std::optional<at::Tensor>& g, double eps,
                            int64_t dim) {
  check_sinkhorn_step_args(scores, m, f, g, eps, dim, at::kCPU);
  const at::Tensor s = as_float_matrix(scores);
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor out = at::empty({dim == 0 ? K : B}, s.options());
  if (!m.has_value()) {
    if (dim == 0) {
      colmax_raw(s.data_ptr<float>(), B, K, out.data_ptr<float>());
    } else {  // per-row raw max: the same on the transpose
      const at::Tensor st = s.t().contiguous();
      colmax_raw(st.data_ptr<float>(), K, B, out.data_ptr<float>());
    }
    return out;
  }
  const at::Tensor x = step_logits(s, m->to(at::kFloat).contiguous(), eps);
  const at::Tensor fv = vec_or_zeros(f, K, s), gv = vec_or_zeros(g, B, s);
  if (dim == 0)
    reduce_over_rows(x.data_ptr<float>(), B, K, fv.data_ptr<float>(), gv.data_ptr<float>(), nullptr, true,
                     out.data_ptr<float>());
  else
    reduce_over_cols(x.data_ptr<float>(), B, K, fv.data_ptr<float>(), gv.data_ptr<float>(), nullptr, 0, true,
                     out.data_ptr<float>());
  return out;
}

at::Tensor sinkhorn_sumexp_cpu(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                               const at::Tensor& g, double eps, int64_t dim, const at::Tensor& shift) {
  check_sinkhorn_step_args(scores, m, f, g, eps, dim, at::kCPU);
  check_sinkhorn_shift(shift, scores.size(1 - dim));
  const at::Tensor s = as_float_matrix(scores);
  const int64_t B = s.size(0), K = s.size(1);
  const at::Tensor x = step_logits(s, m.to(at::kFloat).contiguous(), eps);
  const at::Tensor fv = f.to(at::kFloat).contiguous(), gv = g.to(at::kFloat).contiguous();
  at::Tensor sh = shift.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({dim == 0 ? K : B}, s.options());
  if (dim == 0) {
    if (sh.dim() == 0) sh = sh.expand({K}).contiguous();
    reduce_over_rows(x.data_ptr<float>(), B, K, fv.data_ptr<float>(), gv.data_ptr<float>(), sh.data_ptr<float>(),
                     false, out.data_ptr<float>());
  } else {
    reduce_over_cols(x.data_ptr<float>(), B, K, fv.data_ptr<float>(), gv.data_ptr<float>(), sh.data_ptr<float>(),
                     sh.dim() == 0 ? 0 : 1, false, out.data_ptr<float>());
  }
  return out;
}

at::Tensor sinkhorn_finalize_cpu(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                                 const at::Tensor& g, double eps, double log_scale) {
  check_sinkhorn_step_args(scores, m, f, g, eps, 0, at::kCPU);
  const at::Tensor s = as_float_matrix(scores);
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor x = step_logits(s, m.to(at::kFloat).contiguous(), eps);
  const at::Tensor fv = f.to(at::kFloat).contiguous(), gv = g.to(at::kFloat).contiguous();
  const float* fp = fv.data_ptr<float>();
  const float* gp = gv.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / K), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) exp_row(xp + j * K, fp, gp[j] + static_cast<float>(log_scale), xp + j * K, K);
  });
  return x;
}

at::Tensor sinkhorn_fused_cpu(const at::Tensor& scores, double eps, int64_t iterations) {
  check_sinkhorn_fused_args(scores, eps, iterations, at::kCPU);
  const at::Tensor s = as_float_matrix(scores);
  const int64_t B = s.size(0), K = s.size(1);
  const float log_b = std::log(static_cast<float>(B)), log_k = std::log(static_cast<float>(K));
  at::Tensor out = at::empty({B, K}, s.options());
  std::vector<float> m(K), f(K, 0.f), g(B, 0.f), r(K), shift(K), c(B);
  colmax_raw(s.data_ptr<float>(), B, K, m.data());
  if (std::any_of(m.begin(), m.end(), [](float v) { return v != v; })) return out.fill_(kNaN);
  float* x = out.data_ptr<float>();
  logits(s.data_ptr<float>(), m.data(), static_cast<float>(eps), B, K, x);
  for (int64_t it = 0; it < iterations; ++it) {
    // prototypes: f -= log K + LSE_j X
    const float row_shift = it == 0 ? 0.f : -log_b;
    std::fill(shift.begin(), shift.end(), row_shift);
    reduce_over_rows(x, B, K, f.data(), g.data(), shift.data(), false, r.data());
    for (int64_t k = 0; k < K; ++k) f[k] -= log_k + row_shift + std::log(r[k]);
    // samples: g -= log B + LSE_k X (first round: shift by the true row max)
    if (it == 0) {
      reduce_over_cols(x, B, K, f.data(), g.data(), nullptr, 0, true, c.data());
    } else {
      std::fill(c.begin(), c.end(), -log_k);
    }
    std::vector<float> u(B);
    reduce_over_cols(x, B, K, f.data(), g.data(), c.data(), 1, false, u.data());
    for (int64_t j = 0; j < B; ++j) g[j] -= log_b + c[j] + std::log(u[j]);
  }
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / K), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) exp_row(x + j * K, f.data(), g[j] + log_b, x + j * K, K);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seer_C, CPU, m) {
  m.impl("sinkhorn_fused", &sinkhorn_fused_cpu);
  m.impl("sinkhorn_max", &sinkhorn_max_cpu);
  m.impl("sinkhorn_sumexp", &sinkhorn_sumexp_cpu);
  m.impl("sinkhorn_finalize", &sinkhorn_finalize_cpu);
}

}  // namespace seer
