// C++ unit tests of the CPU Sinkhorn kernels, called through the dispatcher as Python would.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <vector>

#include "check.h"

namespace {

at::Tensor fused(const at::Tensor& s, double eps, int64_t iters) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("seer_C::sinkhorn_fused", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  return op.call(s, eps, iters);
}

// SwAV's loop in double precision (the oracle).
std::vector<double> swav_double(const at::Tensor& s, double eps, int iters) {
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor sd = s.to(at::kDouble).contiguous();
  const double* p = sd.data_ptr<double>();
  std::vector<double> q(B * K);
  double total = 0;
  for (int64_t i = 0; i < B * K; ++i) total += q[i] = std::exp(p[i] / eps);
  for (auto& v : q) v /= total;
  for (int it = 0; it < iters; ++it) {
    for (int64_t k = 0; k < K; ++k) {
      double r = 0;
      for (int64_t j = 0; j < B; ++j) r += q[j * K + k];
      for (int64_t j = 0; j < B; ++j) q[j * K + k] /= r * K;
    }
    for (int64_t j = 0; j < B; ++j) {
      double c = 0;
      for (int64_t k = 0; k < K; ++k) c += q[j * K + k];
      for (int64_t k = 0; k < K; ++k) q[j * K + k] /= c * B;
    }
  }
  for (auto& v : q) v *= B;
  return q;
}

double max_err(const at::Tensor& got, const std::vector<double>& want) {
  at::Tensor g = got.contiguous();
  const float* p = g.data_ptr<float>();
  double err = 0;
  for (size_t i = 0; i < want.size(); ++i) err = std::max(err, std::fabs(p[i] - want[i]));
  return err;
}

at::Tensor cosine_like(int64_t b, int64_t k) { return at::rand({b, k}) * 2 - 1; }

}  // namespace

SEER_TEST(matches_swav_in_double) {
  for (auto [b, k, eps, it] : std::vector<std::tuple<int64_t, int64_t, double, int>>{
           {64, 300, 0.05, 3}, {37, 131, 0.03, 10}, {1, 5, 0.05, 3}, {7, 1, 0.05, 2}, {200, 50, 0.05, 3}}) {
    at::Tensor s = cosine_like(b, k);
    at::Tensor got = fused(s, eps, it);
    EXPECT(got.scalar_type() == at::kFloat);
    EXPECT(max_err(got, swav_double(s, eps, it)) <= 1e-5);
  }
}

SEER_TEST(rows_sum_to_one_and_small_epsilon_is_finite) {
  at::Tensor s = cosine_like(128, 300);
  at::Tensor q = fused(s, 0.01, 5);  // exp(100) overflows float32 without the shift
  const float* p = q.data_ptr<float>();
  for (int64_t j = 0; j < 128; ++j) {
    double row = 0;
    for (int64_t k = 0; k < 300; ++k) {
      EXPECT(std::isfinite(p[j * 300 + k]));
      row += p[j * 300 + k];
    }
    EXPECT(std::fabs(row - 1) < 1e-5);
  }
}

SEER_TEST(half_precision_inputs) {
  at::Tensor s = cosine_like(50, 70).to(at::kBFloat16);
  EXPECT(max_err(fused(s, 0.05, 3), swav_double(s, 0.05, 3)) <= 1e-5);
  at::Tensor h = cosine_like(50, 70).to(at::kHalf);
  EXPECT(max_err(fused(h, 0.05, 3), swav_double(h, 0.05, 3)) <= 1e-5);
}

SEER_TEST(non_finite_input_gives_all_nan) {
  at::Tensor s = cosine_like(8, 9);
  s.data_ptr<float>()[13] = std::numeric_limits<float>::infinity();
  at::Tensor q = fused(s, 0.05, 3);
  const float* p = q.data_ptr<float>();
  for (int64_t i = 0; i < q.numel(); ++i) EXPECT(std::isnan(p[i]));
}

SEER_TEST(bad_arguments_throw) {
  EXPECT_THROWS(fused(at::randn({3}), 0.05, 3));
  EXPECT_THROWS(fused(at::randn({3, 4}), 0.0, 3));
  EXPECT_THROWS(fused(at::randn({3, 4}), 0.05, 0));
  EXPECT_THROWS(fused(at::empty({0, 4}), 0.05, 3));
}

int main() { return seer_test::run_all(); }
