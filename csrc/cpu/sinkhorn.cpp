// Sinkhorn-Knopp on the CPU: the whole iteration fused in one call, and the step kernels the
// distributed driver uses. Math, shifts and NaN policy: seer_kernels/reference/sinkhorn.py.
//
// Layout: scores are converted once to a contiguous float32 matrix X = (S - m) / eps (B rows of K),
// kept in the output buffer; a log-domain step is one pass over X computing exp(X + f + g - shift)
// with a vectorised exp (the fused op then continues in the scale domain, see sinkhorn_fused_cpu).
// Threads (at::parallel_for, OpenMP underneath) split rows, or tiles of 32 rows x 2048 columns for
// per-prototype sums whose per-chunk partials are added in a fixed order: the result does not depend
// on the number of threads.
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
constexpr int64_t kColBlock = 2048;  // columns per task, so that a few rows still split across threads
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

// Calls fn(c, j0, j1, k0, k1) for every tile of kRowChunk rows x kColBlock columns, in parallel. The
// partition depends only on the shape, so per-chunk partials are the same whatever the thread count.
template <typename Fn>
void for_tiles(int64_t B, int64_t K, const Fn& fn) {
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk, blocks = (K + kColBlock - 1) / kColBlock;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / blocks, kb = t % blocks;
      fn(c, c * kRowChunk, std::min(B, (c + 1) * kRowChunk), kb * kColBlock, std::min(K, (kb + 1) * kColBlock));
    }
  });
}

// out[k] = sum over chunks c of part[c * K + k], chunks added in order (independent of threads). In
// double: a tall matrix has thousands of chunks, and a float running sum of that many positive partials
// drifts by up to ~chunks ulp, which biases the prototype totals and hence every code. Columns go in
// blocks of kSumBlock, so that each chunk's partial row is read contiguously.
void sum_chunks(const float* part, int64_t chunks, int64_t K, float* out) {
  constexpr int64_t kSumBlock = 256;
  at::parallel_for(0, K, 2048, [&](int64_t k0, int64_t k1) {
    double acc[kSumBlock];
    for (int64_t b0 = k0; b0 < k1; b0 += kSumBlock) {
      const int64_t n = std::min(kSumBlock, k1 - b0);
      for (int64_t k = 0; k < n; ++k) acc[k] = part[b0 + k];
      for (int64_t c = 1; c < chunks; ++c) {
        const float* p = part + c * K + b0;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) acc[k] += p[k];
      }
      for (int64_t k = 0; k < n; ++k) out[b0 + k] = static_cast<float>(acc[k]);
    }
  });
}

// Per-prototype reduction over rows: out[k] = reduce_j (x[j,k] + f[k] + g[j]) (max, or sum of
// exp(... - shift[k])). Fixed 32-row chunks give partials that are combined in order.
void reduce_over_rows(const float* x, int64_t B, int64_t K, const float* f, const float* g,
                      const float* shift, bool is_max, float* out) {
  const int64_t chunks = (B + kRowChunk - 1) / kRowChunk;
  std::vector<float> part(chunks * K, is_max ? -INFINITY : 0.f);
  for_tiles(B, K, [&](int64_t c, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
    float* acc = part.data() + c * K + k0;
    for (int64_t j = j0; j < j1; ++j) {
      const float add = g ? g[j] : 0.f;
      if (is_max) acc_max_row(x + j * K + k0, f + k0, add, acc, k1 - k0);
      else acc_exp_row(x + j * K + k0, f + k0, add, shift + k0, acc, k1 - k0);
    }
  });
  if (!is_max) return sum_chunks(part.data(), chunks, K, out);
  at::parallel_for(0, K, 2048, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float acc = part[k];
      for (int64_t c = 1; c < chunks; ++c) acc = max_nan(acc, part[c * K + k]);
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
  for_tiles(B, K, [&](int64_t c, int64_t j0, int64_t j1, int64_t k0, int64_t k1) {
    for (int64_t j = j0; j < j1; ++j)
      colmax_raw_row(s + j * K + k0, part.data() + c * K + k0, bad.data() + c * K + k0, k1 - k0);
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
  check_sinkhorn_shift(shift, scores, scores.size(1 - dim));
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

// Scale-domain helpers (targets are B-scaled: every row of the codes sums to 1).
SEER_SIMD_CLONES float dot_row(const float* e, const float* a, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += e[k] * a[k];
  return acc;
}

SEER_SIMD_CLONES void axpy_row(const float* e, float b, float* acc, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += e[k] * b;
}

SEER_SIMD_CLONES void scale_row(const float* e, const float* a, float b, float* out, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = e[k] * a[k] * b;
}

// Row sweeps that also accumulate per-prototype sums, in fixed chunks of rows: the partition depends
// only on the shape, so the per-chunk partials, added in order, do not depend on the thread count.
// A chunk holds about 2^18 elements (enough work per task, and few partial rows to add up), and at
// most kSweepRows rows: its partials are float running sums over its rows, whose rounding grows with
// the row count (a tall, narrow matrix, e.g. 100000 x 3, would otherwise sum 87381 rows in float and
// miss the float64 codes by 3e-5); the chunks are then added in double (sum_chunks).
constexpr int64_t kSweepRows = 64;
int64_t sweep_chunk(int64_t B, int64_t K) {
  return std::min({B, kSweepRows, std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1))});
}

// Calls fn(j, acc) for every row j, acc = that row's chunk partial (K floats); writes the column sums.
// `part` is scratch memory kept across calls (fresh allocations would page-fault on every call).
template <typename Fn>
void sweep_rows(int64_t B, int64_t K, std::vector<float>& part, float* colsum, const Fn& fn) {
  const int64_t rows = sweep_chunk(B, K), chunks = (B + rows - 1) / rows;
  part.resize(chunks * K);
  std::fill(part.begin(), part.end(), 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t j = c * rows; j < std::min(B, (c + 1) * rows); ++j) fn(j, part.data() + c * K);
  });
  sum_chunks(part.data(), chunks, K, colsum);
}

// The fused iteration runs in the scale domain, with the log domain kept underneath for safety:
//
//   E[j,k] = exp((S[j,k] - m[k]) / eps + f[k] + h[j])      (<= 1 at the start: f = h = 0)
//   Q * B  = diag(b) E diag(a)                               (the B-scaled plan; rows end summing to 1)
//
// A prototype step is a[k] *= (B/K) / total[k], a sample step b[j] = 1 / sum_k E[j,k] a[k]; each round
// is one sweep over E (a dot product per row, then that row's share of the next prototype totals), no
// exp. The exp is taken once, to build E. Two guards keep every value that matters representable:
// * rescue: a sample whose scores are all far below every prototype's best has its whole row of E
//   underflow (sum_k E a < 1e-20); its row is rebuilt in the reference's row frame: shifted first by its
//   best score r[j] = max_k (S - m) in score units (the row's best entry is then exactly 0, its neighbours
//   exact differences), then by h[j] = -max_k (Y / eps + f + log a) with Y = S - m - r[j]. (h[j] holding the
//   whole shift, as it once did, rounded the O(1) terms beside it away: 3e-5 of error in the codes of cosine
//   scores at eps = 1e-5, rows summing to up to B from |max X| ~ 2^24 on.)
// * absorb: when a scaling drifts beyond e^kAbsorb, a and b are folded into f and h and E is rebuilt, so
//   an entry of E that underflowed (< 4e-38) can never grow past 4e-38 e^(2 kAbsorb) ~ 1e-20.
constexpr float kAbsorb = 20.f;
constexpr float kRescueBelow = 1e-20f;

// r: the row's shift in score units (0 unless rescued; (x - 0) is x, so unrescued rows keep their bits)
SEER_SIMD_CLONES void exp_logits_row(const float* s, const float* m, float r, float eps, const float* f, float add,
                                     float* e, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) e[k] = expf_vec(((s[k] - m[k]) - r) / eps + f[k] + add);
}

SEER_SIMD_CLONES float max_diff_row(const float* s, const float* m, int64_t n) {
  float acc = -INFINITY;
#pragma omp simd reduction(max : acc)
  for (int64_t k = 0; k < n; ++k) {
    const float v = s[k] - m[k];
    acc = v > acc ? v : acc;
  }
  return acc;
}

SEER_SIMD_CLONES float max_logits_row(const float* s, const float* m, float r, float eps, const float* f,
                                      const float* la, int64_t n) {
  float acc = -INFINITY;
#pragma omp simd reduction(max : acc)
  for (int64_t k = 0; k < n; ++k) {
    const float v = ((s[k] - m[k]) - r) / eps + f[k] + la[k];
    acc = v > acc ? v : acc;
  }
  return acc;
}

struct ScaleState {
  const float* s;  // scores, contiguous float32
  const float* m;  // per-prototype max
  float eps;
  int64_t B, K;
  float* e;        // E, B x K (the output buffer)
  std::vector<float> f, h, r, a, b, total, log_a;  // r: rows' shifts in score units (the rescue)
  std::vector<float>& part;  // per-thread scratch reused across calls
};

void rebuild(ScaleState& st) {  // E from the potentials; a = b = 1; prototype totals of E
  sweep_rows(st.B, st.K, st.part, st.total.data(), [&](int64_t j, float* acc) {
    float* ej = st.e + j * st.K;
    exp_logits_row(st.s + j * st.K, st.m, st.r[j], st.eps, st.f.data(), st.h[j], ej, st.K);
    axpy_row(ej, 1.f, acc, st.K);
  });
  std::fill(st.a.begin(), st.a.end(), 1.f);
  std::fill(st.b.begin(), st.b.end(), 1.f);
}

void absorb(ScaleState& st) {
  for (int64_t k = 0; k < st.K; ++k) st.f[k] += std::log(st.a[k]);
  for (int64_t j = 0; j < st.B; ++j) st.h[j] += std::log(st.b[j]);
  rebuild(st);
}

// Sample step fused with the next prototype totals: b[j] = 1 / sum_k E a, total[k] = a[k] sum_j E b.
void sample_step(ScaleState& st) {
  const int64_t K = st.K;
  bool have_log_a = false;
  sweep_rows(st.B, K, st.part, st.total.data(), [&](int64_t j, float* acc) {
    float* ej = st.e + j * K;
    float c = dot_row(ej, st.a.data(), K);
    if (!(c >= kRescueBelow)) {  // rare; log a is shared by every rescued row of this sweep
#pragma omp critical(seer_sinkhorn_log_a)
      if (!have_log_a) {
        for (int64_t k = 0; k < K; ++k) st.log_a[k] = std::log(st.a[k]);
        have_log_a = true;
      }
      st.r[j] = max_diff_row(st.s + j * K, st.m, K);
      st.h[j] = -max_logits_row(st.s + j * K, st.m, st.r[j], st.eps, st.f.data(), st.log_a.data(), K);
      exp_logits_row(st.s + j * K, st.m, st.r[j], st.eps, st.f.data(), st.h[j], ej, K);
      c = dot_row(ej, st.a.data(), K);
    }
    st.b[j] = 1.f / c;
    axpy_row(ej, st.b[j], acc, K);
  });
  for (int64_t k = 0; k < K; ++k) st.total[k] *= st.a[k];
}

at::Tensor sinkhorn_fused_cpu(const at::Tensor& scores, double eps, int64_t iterations) {
  check_sinkhorn_fused_args(scores, eps, iterations, at::kCPU);
  const at::Tensor s = as_float_matrix(scores);
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor out = at::empty({B, K}, s.options());
  thread_local std::vector<float> scratch;
  ScaleState st{s.data_ptr<float>(), nullptr, static_cast<float>(eps), B, K, out.data_ptr<float>(),
                {}, {}, {}, {}, {}, {}, {}, scratch};
  std::vector<float> m(K);
  colmax_raw(st.s, B, K, m.data());
  if (std::any_of(m.begin(), m.end(), [](float v) { return v != v; })) return out.fill_(kNaN);
  st.m = m.data();
  st.f.assign(K, 0.f), st.h.assign(B, 0.f), st.r.assign(B, 0.f), st.a.assign(K, 1.f), st.b.assign(B, 1.f);
  st.total.assign(K, 0.f), st.log_a.assign(K, 0.f);
  rebuild(st);  // E = exp((S - m) / eps): every column has max 1, so no prototype total underflows
  const float target = static_cast<float>(B) / static_cast<float>(K);
  for (int64_t it = 0; it < iterations; ++it) {
    float drift = 0.f;
    for (int64_t k = 0; k < K; ++k) {  // prototype step: every total becomes B / K
      st.a[k] *= target / st.total[k];
      drift = std::max(drift, std::fabs(std::log(st.a[k])));
    }
    for (int64_t j = 0; j < B; ++j) drift = std::max(drift, std::fabs(std::log(st.b[j])));
    if (!(drift <= kAbsorb)) {
      absorb(st);
      for (int64_t k = 0; k < K; ++k) st.a[k] = target / st.total[k];
    }
    sample_step(st);
  }
  float* e = st.e;
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / K), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) scale_row(e + j * K, st.a.data(), st.b[j], e + j * K, K);
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
