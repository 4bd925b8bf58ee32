// Sinkhorn-Knopp on CUDA. Math, shifts, row frame and NaN policy: seer_kernels/reference/sinkhorn.py.
// Divisions by epsilon are IEEE (__fdiv_rn) as in the reference; exp uses the fast __expf.
//
// Row frame: after the first prototype step every step runs on Y = D - max_k D[j, k] (D = S - m), formed
// in score units before the division by epsilon, as the reference does. Without it a sample whose best
// score lies far below every prototype's best (scores near 1e37, or a tiny epsilon) had its potential g
// absorb a huge -A_j, and the O(1) terms of each step rounded away beside it: on an H200 4 of the 6 huge-
// logit cases of tests/ops/test_sinkhorn.py missed the float64 codes (rows summing to up to B).
//
// sinkhorn_fused: when the matrix fits in the shared memory of the co-resident blocks, one
// cooperative launch runs the whole iteration. Block b owns a slice of prototypes (columns) for all
// B samples, so every per-prototype sum is local; per-sample sums are written as per-block partials,
// a grid-wide barrier follows, and every block adds the partials of all blocks in the same order
// (deterministic, no atomics). Scores are read once and codes written once.
// Otherwise (and for the distributed driver) the iteration runs as step kernels: reductions over
// rows or columns with split partials combined in a fixed order, and an element-wise finalize.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "seer/checks.h"
#include "seer/sinkhorn.h"

namespace cg = cooperative_groups;

namespace seer {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ float max_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }
__device__ __forceinline__ bool nonfinite(float v) { return !isfinite(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

enum Mode : int { kMaxRaw = 0, kMax = 1, kSumExp = 2 };

template <int MODE>
__device__ __forceinline__ float reduce_init() { return MODE == kSumExp ? 0.f : -INFINITY; }

// Memory-level parallelism for ordered reductions. Each thread below runs one sequential chain of
// additions (that order is what makes the results deterministic), and each step needs a load. Compiled
// as plain loops, nvcc places each load next to its use and every IEEE division (__fdiv_rn) becomes a
// branch in SASS, so a thread has 1 to 4 loads in flight (the SASS of these loops for sm_90): the step
// kernels read the scores at about 0.8 TB/s on an H200 (bench/results/nvidia-h200-profile.txt) and the
// cooperative kernel's combine waits on dozens of L2 round trips per round. ordered_loop loads kBatch
// steps into registers first, then consumes them in the same order as the plain loop: same operations,
// same order, same bits. An empty asm statement that reads and writes every loaded value keeps the
// compiler from sinking the loads back between the uses.
constexpr int kBatch = 16;

template <int W>
struct Vals { float x[W]; };  // what one step loads (score, then the per-row or per-column terms)

template <int W>
struct Batch { float v[W][kBatch]; };

#define SEER_F16(a) "+f"(a[0]), "+f"(a[1]), "+f"(a[2]), "+f"(a[3]), "+f"(a[4]), "+f"(a[5]), "+f"(a[6]), \
    "+f"(a[7]), "+f"(a[8]), "+f"(a[9]), "+f"(a[10]), "+f"(a[11]), "+f"(a[12]), "+f"(a[13]), "+f"(a[14]), "+f"(a[15])
static_assert(kBatch == 16, "SEER_F16 lists 16 operands");
__device__ __forceinline__ void loads_done(Batch<1>& b) { asm volatile("" : SEER_F16(b.v[0])); }
__device__ __forceinline__ void loads_done(Batch<2>& b) { asm volatile("" : SEER_F16(b.v[0]), SEER_F16(b.v[1])); }
__device__ __forceinline__ void loads_done(Batch<3>& b) {
  asm volatile("" : SEER_F16(b.v[0]), SEER_F16(b.v[1]), SEER_F16(b.v[2]));
}
#undef SEER_F16

// use(load(i)) for i = first, first + step, ... < end, in that order; load returns Vals<W>. BATCHED = false
// is the plain loop: the batch holds W x 16 more registers per thread (a step kernel went from about 30 to
// 57-72), which costs occupancy where a thread has too few steps to fill a batch (see launch_reduce).
template <int W, bool BATCHED = true, typename Load, typename Use>
__device__ __forceinline__ void ordered_loop(int first, int end, int step, Load&& load, Use&& use) {
  int i = first;
  if constexpr (BATCHED) {
    for (; end - i > (kBatch - 1) * step; i += kBatch * step) {
      Batch<W> b;
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        const Vals<W> r = load(i + t * step);
#pragma unroll
        for (int w = 0; w < W; ++w) b.v[w][t] = r.x[w];
      }
      loads_done(b);
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        Vals<W> r;
#pragma unroll
        for (int w = 0; w < W; ++w) r.x[w] = b.v[w][t];
        use(r);
      }
    }
  }
  for (; i < end; i += step) use(load(i));
}

// ---- step kernels --------------------------------------------------------------------------

// One step of a row or column reduction: score v of sample j, prototype k.
//   kMaxRaw: max of the raw scores (non-finite ones flagged in `bad`);
//   kMax:    max of x = (v - m_k) / eps + f_k + g_j;
//   kSumExp: sum of exp(x - shift).
//   rj: the row frame's shift of sample j (0 outside the frame: (v - mk) - 0 is v - mk, bit for bit).
template <int MODE>
__device__ __forceinline__ void reduce_step(float& acc, bool& bad, float v, float mk, float fk, float gj, float rj,
                                            float eps, float sh) {
  if constexpr (MODE == kMaxRaw) {
    bad |= nonfinite(v);
    acc = fmaxf(acc, v);
  } else {
    const float x = __fdiv_rn((v - mk) - rj, eps) + fk + gj;
    if constexpr (MODE == kMax) acc = max_nan(acc, x);
    else acc += __expf(x - sh);
  }
}

// Per-prototype partials over a split of rows: partial[split][k]. One thread per column k, so the
// loads of a warp are contiguous along k. FRAME: x takes the row frame's shift r[j] (else r is unused).
template <typename T, int MODE, bool BATCHED, bool FRAME>
__global__ void reduce_rows_kernel(const T* __restrict__ s, int64_t sb, int64_t sk, int B, int K,
                                   const float* __restrict__ m, const float* __restrict__ f,
                                   const float* __restrict__ g, const float* __restrict__ r,
                                   const float* __restrict__ shift, int shift_stride, float eps, int rows_per_split,
                                   float* __restrict__ partial) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int j0 = blockIdx.y * rows_per_split;
  const int j1 = min(B, j0 + rows_per_split);
  float acc = reduce_init<MODE>();
  bool bad = false;
  const float mk = MODE == kMaxRaw ? 0.f : m[k];
  const float fk = MODE == kMaxRaw ? 0.f : f[k];
  const float sh = MODE == kSumExp ? shift[k * shift_stride] : 0.f;
  constexpr int W = MODE == kMaxRaw ? 1 : (FRAME ? 3 : 2);  // the score, then g_j, then r_j
  ordered_loop<W, BATCHED>(
      j0, j1, 1,
      [&](int j) {
        Vals<W> val;
        val.x[0] = to_float(s[j * sb + k * sk]);
        if constexpr (W > 1) val.x[1] = g[j];
        if constexpr (W > 2) val.x[2] = r[j];
        return val;
      },
      [&](const Vals<W>& val) {
        reduce_step<MODE>(acc, bad, val.x[0], mk, fk, val.x[W > 1 ? 1 : 0], W > 2 ? val.x[W - 1] : 0.f, eps, sh);
      });
  partial[static_cast<int64_t>(blockIdx.y) * K + k] = bad ? NAN : acc;
}

// Per-sample partials over a split of columns: partial[split][j]; one block per (row, split).
template <typename T, int MODE, bool BATCHED, bool FRAME>
__global__ void reduce_cols_kernel(const T* __restrict__ s, int64_t sb, int64_t sk, int B, int K,
                                   const float* __restrict__ m, const float* __restrict__ f,
                                   const float* __restrict__ g, const float* __restrict__ r,
                                   const float* __restrict__ shift, int shift_stride, float eps, int cols_per_split,
                                   float* __restrict__ partial) {
  const int j = blockIdx.x;
  const int k0 = blockIdx.y * cols_per_split;
  const int k1 = min(K, k0 + cols_per_split);
  const float gj = MODE == kMaxRaw ? 0.f : g[j];
  const float rj = FRAME && MODE != kMaxRaw ? r[j] : 0.f;
  const float sh = MODE == kSumExp ? shift[j * shift_stride] : 0.f;
  float acc = reduce_init<MODE>();
  bool bad = false;
  constexpr int W = MODE == kMaxRaw ? 1 : 3;  // the score, then m_k and f_k
  ordered_loop<W, BATCHED>(
      k0 + static_cast<int>(threadIdx.x), k1, static_cast<int>(blockDim.x),
      [&](int k) {
        Vals<W> val;
        val.x[0] = to_float(s[j * sb + k * sk]);
        if constexpr (W > 1) {
          val.x[1] = m[k];
          val.x[2] = f[k];
        }
        return val;
      },
      [&](const Vals<W>& val) {
        reduce_step<MODE>(acc, bad, val.x[0], val.x[W > 1 ? 1 : 0], val.x[W - 1], gj, rj, eps, sh);
      });
  if (MODE == kMaxRaw && bad) acc = NAN;
  __shared__ float red[kWarps];
  acc = MODE == kSumExp ? warp_sum(acc) : warp_max(acc);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = red[0];
    for (int w = 1; w < kWarps; ++w) total = MODE == kSumExp ? total + red[w] : max_nan(total, red[w]);
    partial[static_cast<int64_t>(blockIdx.y) * B + j] = total;
  }
}

__global__ void combine_partials_kernel(const float* __restrict__ partial, int splits, int n, bool is_sum,
                                        float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = partial[i];
  for (int p = 1; p < splits; ++p) {
    const float v = partial[static_cast<int64_t>(p) * n + i];
    acc = is_sum ? acc + v : max_nan(acc, v);
  }
  out[i] = acc;
}

// r: the row frame's shifts, or null (outside the frame).
template <typename T>
__global__ void finalize_kernel(const T* __restrict__ s, int64_t sb, int64_t sk, int B, int K,
                                const float* __restrict__ m, const float* __restrict__ f,
                                const float* __restrict__ g, const float* __restrict__ r, float eps, float log_scale,
                                float* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(B) * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i / K), k = static_cast<int>(i % K);
    const float rj = r != nullptr ? r[j] : 0.f;
    const float x = __fdiv_rn((to_float(s[j * sb + k * sk]) - m[k]) - rj, eps) + f[k] + g[j];
    out[i] = __expf(x + log_scale);
  }
}

// pot[i] -= add + shift[i] + log(sums[i])   (shift may be null)
__global__ void update_potential_kernel(float* __restrict__ pot, const float* __restrict__ sums,
                                        const float* __restrict__ shift, float add, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) pot[i] -= add + (shift ? shift[i] : 0.f) + logf(sums[i]);
}

// ---- the cooperative fused kernel ------------------------------------------------------------

struct CoopArgs {
  int64_t sb, sk;
  int B, K, cols_per_block, ld;  // ld = cols_per_block | 1: odd row pitch, no bank conflicts per column
  float eps, log_b, log_k;
  int iterations;
  float* out;
  float* part;       // [2][gridDim][B] per-block partial row sums (double-buffered by iteration parity)
  float* part_max;   // [gridDim][B]
  float* part_dmax;  // [gridDim][B] per-block partial row maxima of D = S - m (the row frame)
  int* poison;       // one int, zeroed before launch
};

// Row j's max over every block's partial, by one warp (call from all its lanes): a max is exact, so the
// lanes may take the partials in any order and every block still gets the same bits (sums, below, keep
// one fixed order instead). All nblk loads are in flight at once: one L2 round trip, not nblk / 16.
// (No __restrict__ on part: other blocks wrote it in this launch, so it must not go through the read-only cache.)
__device__ __forceinline__ float max_over_blocks(const float* part, int B, int j, int nblk, int lane) {
  float mx = -INFINITY;
  for (int b = lane; b < nblk; b += 32) mx = max_nan(mx, part[static_cast<int64_t>(b) * B + j]);
  return warp_max(mx);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sinkhorn_coop_kernel(const T* __restrict__ s, CoopArgs a) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ float smem[];
  const int B = a.B, ld = a.ld;
  const int k0 = blockIdx.x * a.cols_per_block;
  const int kc = max(0, min(a.cols_per_block, a.K - k0));
  float* tile = smem;                       // B x ld
  float* g = tile + static_cast<int64_t>(B) * ld;  // B
  float* f = g + B;                         // cols_per_block
  float* mcol = f + a.cols_per_block;       // cols_per_block
  float* shift0 = mcol + a.cols_per_block;  // B: round 0's sample-step shifts (each row's max of X)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nblk = gridDim.x;

  // Load the tile, flag non-finite scores.
  bool bad = false;
  for (int idx = threadIdx.x; idx < B * kc; idx += blockDim.x) {
    const int j = idx / kc, c = idx - j * kc;
    const float v = to_float(s[j * a.sb + (k0 + c) * a.sk]);
    bad |= nonfinite(v);
    tile[j * ld + c] = v;
  }
  for (int j = threadIdx.x; j < B; j += blockDim.x) g[j] = 0.f;
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(a.poison, 1);
  // Column max, then D = S - m in place (score units); f = 0.
  for (int c = warp; c < kc; c += kWarps) {
    float mx = -INFINITY;
    for (int j = lane; j < B; j += 32) mx = fmaxf(mx, tile[j * ld + c]);
    mx = warp_max(mx);
    if (lane == 0) { mcol[c] = mx; f[c] = 0.f; }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * kc; idx += blockDim.x) {
    const int j = idx / kc, c = idx - j * kc;
    tile[j * ld + c] = tile[j * ld + c] - mcol[c];
  }
  __syncthreads();
  // The row frame's shift max_k D[j, k]: per-block partials now, combined after the barrier.
  for (int j = warp; j < B; j += kWarps) {
    float mx = -INFINITY;
    for (int c = lane; c < kc; c += 32) mx = max_nan(mx, tile[j * ld + c]);
    mx = warp_max(mx);
    if (lane == 0) a.part_dmax[static_cast<int64_t>(blockIdx.x) * B + j] = mx;
  }
  grid.sync();  // poison flag and row-max partials complete
  const float poison = *reinterpret_cast<volatile int*>(a.poison) ? NAN : 0.f;
  // First prototype step on X = D / eps (f = g = 0, shift 0): f_c = -(log K + log sum_j exp(X)).
  for (int c = warp; c < kc; c += kWarps) {
    float acc = 0.f;
    for (int j = lane; j < B; j += 32) acc += __expf(__fdiv_rn(tile[j * ld + c], a.eps) + 0.f + g[j]);
    acc = warp_sum(acc) + poison;
    if (lane == 0) f[c] = f[c] - (a.log_k + 0.f + logf(acc));
  }
  __syncthreads();
  // Into the row frame: X = Y / eps with Y = D - max_k D (m = 0 from here on; g, still 0, is h).
  for (int j = warp; j < B; j += kWarps) {
    const float r = max_over_blocks(a.part_dmax, B, j, nblk, lane);
    for (int c = lane; c < kc; c += 32) tile[j * ld + c] = __fdiv_rn(tile[j * ld + c] - r, a.eps);
  }
  __syncthreads();

  for (int it = 0; it < a.iterations; ++it) {
    // Prototype step (local; round 0's came before the frame): f_c -= log K - log B + log sum_j
    // exp(X + f_c + g_j + log B).
    if (it > 0) {
      const float row_shift = -a.log_b;
      for (int c = warp; c < kc; c += kWarps) {
        float acc = 0.f;
        const float fc = f[c];
        for (int j = lane; j < B; j += 32) acc += __expf(tile[j * ld + c] + fc + g[j] - row_shift);
        acc = warp_sum(acc);
        if (lane == 0) f[c] = fc - (a.log_k + row_shift + logf(acc));
      }
      __syncthreads();
    }
    // Sample step: per-block partials over my columns, barrier, combine in block order.
    float* part = a.part + static_cast<int64_t>(it & 1) * nblk * B;
    if (it == 0) {
      for (int j = warp; j < B; j += kWarps) {
        float mx = -INFINITY;
        for (int c = lane; c < kc; c += 32) mx = max_nan(mx, tile[j * ld + c] + f[c] + g[j]);
        mx = warp_max(mx);
        if (lane == 0) a.part_max[static_cast<int64_t>(blockIdx.x) * B + j] = mx;
      }
      grid.sync();
      for (int j = warp; j < B; j += kWarps) {  // the true row max (see the reference)
        const float mx = max_over_blocks(a.part_max, B, j, nblk, lane);
        if (lane == 0) shift0[j] = mx;
      }
      __syncthreads();
    }
    for (int j = warp; j < B; j += kWarps) {
      const float sh = it == 0 ? shift0[j] : -a.log_k;
      float acc = 0.f;
      for (int c = lane; c < kc; c += 32) acc += __expf(tile[j * ld + c] + f[c] + g[j] - sh);
      acc = warp_sum(acc);
      if (lane == 0) part[static_cast<int64_t>(blockIdx.x) * B + j] = acc;
    }
    grid.sync();
    // The sums in block order, one thread per row (the same order in every block: the same bits).
    // Measured on an H200 at (32, 16384), 3 iterations: this kernel took 155 us when these loops had about
    // 3 L2 loads in flight; with ordered_loop's 16 (same additions, same order) the whole op took 97.6 us
    // of GPU time (329f20b), and 67.9 us once the maxima above went to a warp per row (they need no order;
    // 4f0cc75). If the sums are still slow, the next step is a warp per row summing the partials in a fixed
    // lane order (the same in every block, so still deterministic, but other bits than today's).
    for (int j = threadIdx.x; j < B; j += blockDim.x) {
      const float sh = it == 0 ? shift0[j] : -a.log_k;
      float u = 0.f;
      ordered_loop<1>(0, nblk, 1, [&](int b) { return Vals<1>{{part[static_cast<int64_t>(b) * B + j]}}; },
                      [&](const Vals<1>& v) { u += v.x[0]; });
      g[j] = g[j] - (a.log_b + sh + logf(u));
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < B * kc; idx += blockDim.x) {
    const int j = idx / kc, c = idx - j * kc;
    a.out[static_cast<int64_t>(j) * a.K + k0 + c] = __expf(tile[j * ld + c] + f[c] + g[j] + a.log_b);
  }
}

// ---- host side -------------------------------------------------------------------------------

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename Fn>
void dispatch_dtype(const at::Tensor& s, Fn&& fn) {
  switch (s.scalar_type()) {
    case at::kFloat: fn(s.data_ptr<float>()); break;
    case at::kBFloat16: fn(reinterpret_cast<const __nv_bfloat16*>(s.data_ptr<at::BFloat16>())); break;
    case at::kHalf: fn(reinterpret_cast<const __half*>(s.data_ptr<at::Half>())); break;
    default: SEER_CHECK_ARG(false, "scores", "unsupported dtype ", s.scalar_type());
  }
}

// r: the row frame's shifts (x = ((v - m_k) - r_j) / eps + f_k + g_j), or null outside the frame.
template <int MODE>
void launch_reduce(const at::Tensor& s, const float* m, const float* f, const float* g, const float* r,
                   const float* shift, int shift_stride, float eps, int64_t dim, float* out) {
  const int B = static_cast<int>(s.size(0)), K = static_cast<int>(s.size(1));
  const int64_t sb = s.stride(0), sk = s.stride(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int lines = dim == 0 ? K : B, reduced = dim == 0 ? B : K;
  const int line_blocks = dim == 0 ? (K + kThreads - 1) / kThreads : B;
  // Split the reduced dimension until about two waves of blocks cover the GPU.
  int splits = std::max(1, std::min((2 * sm_count() + line_blocks - 1) / line_blocks, (reduced + 255) / 256));
  const int per_split = (reduced + splits - 1) / splits;
  splits = (reduced + per_split - 1) / per_split;
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, lines}, s.options().dtype(at::kFloat));
  float* pp = splits == 1 ? out : partial.data_ptr<float>();
  // Batched loads pay off where each thread has at least two batches of steps (rows for dim 0, columns
  // strided by the block for dim 1); below that the plain loop keeps the occupancy.
  const int steps_per_thread = dim == 0 ? per_split : (per_split + kThreads - 1) / kThreads;
  const bool batched = steps_per_thread >= 2 * kBatch;
  constexpr bool kF = MODE != kMaxRaw;  // the raw max has no frame: no such kernels to build
  const bool frame = kF && r != nullptr;
  dispatch_dtype(s, [&](auto* sp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(sp)>>;
    if (dim == 0) {
      dim3 grid(line_blocks, splits);
      auto kernel = batched ? (frame ? reduce_rows_kernel<T, MODE, true, kF> : reduce_rows_kernel<T, MODE, true, false>)
                            : (frame ? reduce_rows_kernel<T, MODE, false, kF> : reduce_rows_kernel<T, MODE, false, false>);
      kernel<<<grid, kThreads, 0, stream>>>(sp, sb, sk, B, K, m, f, g, r, shift, shift_stride, eps, per_split, pp);
    } else {
      dim3 grid(B, splits);
      auto kernel = batched ? (frame ? reduce_cols_kernel<T, MODE, true, kF> : reduce_cols_kernel<T, MODE, true, false>)
                            : (frame ? reduce_cols_kernel<T, MODE, false, kF> : reduce_cols_kernel<T, MODE, false, false>);
      kernel<<<grid, kThreads, 0, stream>>>(sp, sb, sk, B, K, m, f, g, r, shift, shift_stride, eps, per_split, pp);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    combine_partials_kernel<<<(lines + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        pp, splits, lines, MODE == kSumExp, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::Tensor sinkhorn_max_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& m,
                             const std::optional<at::Tensor>& f, const std::optional<at::Tensor>& g, double eps,
                             int64_t dim) {
  check_sinkhorn_step_args(scores, m, f, g, eps, dim, at::kCUDA);
  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor out = at::empty({dim == 0 ? K : B}, scores.options().dtype(at::kFloat));
  if (!m.has_value()) {
    launch_reduce<kMaxRaw>(scores, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 1.f, dim, out.data_ptr<float>());
    return out;
  }
  const at::Tensor mv = f32(*m);
  const at::Tensor fv = f.has_value() ? f32(*f) : at::zeros({K}, out.options());
  const at::Tensor gv = g.has_value() ? f32(*g) : at::zeros({B}, out.options());
  launch_reduce<kMax>(scores, mv.data_ptr<float>(), fv.data_ptr<float>(), gv.data_ptr<float>(), nullptr, nullptr, 0,
                      static_cast<float>(eps), dim, out.data_ptr<float>());
  return out;
}

at::Tensor sinkhorn_sumexp_cuda(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                                const at::Tensor& g, double eps, int64_t dim, const at::Tensor& shift) {
  check_sinkhorn_step_args(scores, m, f, g, eps, dim, at::kCUDA);
  check_sinkhorn_shift(shift, scores, scores.size(1 - dim));
  c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor mv = f32(m), fv = f32(f), gv = f32(g), sh = f32(shift);
  at::Tensor out = at::empty({scores.size(1 - dim)}, scores.options().dtype(at::kFloat));
  launch_reduce<kSumExp>(scores, mv.data_ptr<float>(), fv.data_ptr<float>(), gv.data_ptr<float>(), nullptr,
                         sh.data_ptr<float>(), sh.dim() == 0 ? 0 : 1, static_cast<float>(eps), dim,
                         out.data_ptr<float>());
  return out;
}

void launch_finalize(const at::Tensor& s, const float* m, const float* f, const float* g, const float* r, float eps,
                     float log_scale, float* out) {
  const int64_t n = s.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 32LL * sm_count()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(s, [&](auto* sp) {
    finalize_kernel<<<blocks, kThreads, 0, stream>>>(sp, s.stride(0), s.stride(1), static_cast<int>(s.size(0)),
                                                    static_cast<int>(s.size(1)), m, f, g, r, eps, log_scale, out);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sinkhorn_finalize_cuda(const at::Tensor& scores, const at::Tensor& m, const at::Tensor& f,
                                  const at::Tensor& g, double eps, double log_scale) {
  check_sinkhorn_step_args(scores, m, f, g, eps, 0, at::kCUDA);
  c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor mv = f32(m), fv = f32(f), gv = f32(g);
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  launch_finalize(scores, mv.data_ptr<float>(), fv.data_ptr<float>(), gv.data_ptr<float>(), nullptr,
                  static_cast<float>(eps), static_cast<float>(log_scale), out.data_ptr<float>());
  return out;
}

// Shared memory of the cooperative kernel for blocks of `cpb` columns (row pitch cpb | 1): the tile, g and
// round 0's shifts (B each), f and the column maxima (cpb each).
int64_t coop_smem_bytes(int64_t B, int64_t cpb) { return 4 * (B * (cpb | 1) + 2 * B + 2 * cpb); }

bool try_coop(const at::Tensor& s, float eps, int iterations, float log_b, float log_k, at::Tensor& out) {
  const int B = static_cast<int>(s.size(0)), K = static_cast<int>(s.size(1));
  int dev = s.get_device();
  int coop = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // Large B: every block would re-read B x blocks partials per round; the step kernels do better.
  if (!coop || B > 4096) return false;
  const int sms = sm_count();
  const int cpb = (K + sms - 1) / sms;  // one block per SM
  const int64_t smem = coop_smem_bytes(B, cpb);
  if (smem > max_smem) return false;
  const int blocks = (K + cpb - 1) / cpb;
  bool launched = false;
  dispatch_dtype(s, [&](auto* sp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(sp)>>;
    auto kernel = sinkhorn_coop_kernel<T>;
    // Always the device maximum, so concurrent callers with other shapes never shrink it.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    if (per_sm * sms < blocks) return;  // not all blocks co-resident: use the step kernels
    const int64_t nb = static_cast<int64_t>(blocks) * B;
    at::Tensor scratch = at::empty({4 * nb + 1}, out.options());
    float* sp0 = scratch.data_ptr<float>();
    C10_CUDA_CHECK(cudaMemsetAsync(sp0 + 4 * nb, 0, sizeof(int), at::cuda::getCurrentCUDAStream()));
    CoopArgs a{s.stride(0), s.stride(1), B, K, cpb, cpb | 1, eps, log_b, log_k, iterations,
               out.data_ptr<float>(), sp0, sp0 + 2 * nb, sp0 + 3 * nb, reinterpret_cast<int*>(sp0 + 4 * nb)};
    const T* sptr = sp;
    void* params[] = {reinterpret_cast<void*>(&sptr), reinterpret_cast<void*>(&a)};
    const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(blocks),
                                                        dim3(kThreads), params, smem,
                                                        at::cuda::getCurrentCUDAStream());
    if (err == cudaErrorCooperativeLaunchTooLarge) {  // fewer co-resident blocks than the API said (MPS)
      (void)cudaGetLastError();
      return;
    }
    C10_CUDA_CHECK(err);
    launched = true;
  });
  return launched;
}

at::Tensor sinkhorn_fused_cuda(const at::Tensor& scores, double eps_d, int64_t iterations) {
  check_sinkhorn_fused_args(scores, eps_d, iterations, at::kCUDA);
  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), K = scores.size(1);
  const float eps = static_cast<float>(eps_d);
  // Rounded once from double, as the reference's math.log(B) reaches its float32 ops (logf may be 1 ulp off).
  const float log_b = static_cast<float>(std::log(static_cast<double>(B)));
  const float log_k = static_cast<float>(std::log(static_cast<double>(K)));
  auto fopts = scores.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, K}, fopts);
  if (try_coop(scores, eps, static_cast<int>(iterations), log_b, log_k, out)) return out;

  // Step kernels, same iteration as the reference driver (no host synchronisation), with the row frame's
  // shifts r as a vector (the driver materialises Y = D - r instead; B x K floats we need not allocate).
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor m = at::empty({K}, fopts), f = at::zeros({K}, fopts), g = at::zeros({B}, fopts);
  at::Tensor r = at::empty({B}, fopts);
  at::Tensor rs = at::empty({K}, fopts), u = at::empty({B}, fopts), c = at::empty({B}, fopts);
  // Shifts as device scalars (at::full launches a fill kernel: no host synchronisation).
  const at::Tensor zero = at::full({1}, 0.0, fopts), neg_log_b = at::full({1}, -log_b, fopts);
  const at::Tensor neg_log_k = at::full({1}, -log_k, fopts);
  float *mp = m.data_ptr<float>(), *fp = f.data_ptr<float>(), *gp = g.data_ptr<float>(), *rp = r.data_ptr<float>();
  // A non-finite score makes its column max NaN, hence that prototype's f, hence every g: all NaN.
  launch_reduce<kMaxRaw>(scores, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 1.f, 0, mp);
  // r_j = max_k D[j, k]: the kMax reduction at eps = 1 with f = g = 0 (both still zero) is D itself, exactly.
  launch_reduce<kMax>(scores, mp, fp, gp, nullptr, nullptr, 0, 1.f, 1, rp);
  // First prototype step, before the frame: X = D / eps, shift 0.
  launch_reduce<kSumExp>(scores, mp, fp, gp, nullptr, zero.data_ptr<float>(), 0, eps, 0, rs.data_ptr<float>());
  update_potential_kernel<<<(K + kThreads - 1) / kThreads, kThreads, 0, stream>>>(fp, rs.data_ptr<float>(), nullptr,
                                                                                  log_k, static_cast<int>(K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t it = 0; it < iterations; ++it) {
    if (it > 0) {
      launch_reduce<kSumExp>(scores, mp, fp, gp, rp, neg_log_b.data_ptr<float>(), 0, eps, 0, rs.data_ptr<float>());
      update_potential_kernel<<<(K + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          fp, rs.data_ptr<float>(), nullptr, log_k - log_b, static_cast<int>(K));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (it == 0) {
      launch_reduce<kMax>(scores, mp, fp, gp, rp, nullptr, 0, eps, 1, c.data_ptr<float>());
      launch_reduce<kSumExp>(scores, mp, fp, gp, rp, c.data_ptr<float>(), 1, eps, 1, u.data_ptr<float>());
      update_potential_kernel<<<(B + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          gp, u.data_ptr<float>(), c.data_ptr<float>(), log_b, static_cast<int>(B));
    } else {
      launch_reduce<kSumExp>(scores, mp, fp, gp, rp, neg_log_k.data_ptr<float>(), 0, eps, 1, u.data_ptr<float>());
      update_potential_kernel<<<(B + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          gp, u.data_ptr<float>(), nullptr, log_b - log_k, static_cast<int>(B));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_finalize(scores, mp, fp, gp, rp, eps, log_b, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seer_C, CUDA, m) {
  m.impl("sinkhorn_fused", &sinkhorn_fused_cuda);
  m.impl("sinkhorn_max", &sinkhorn_max_cuda);
  m.impl("sinkhorn_sumexp", &sinkhorn_sumexp_cuda);
  m.impl("sinkhorn_finalize", &sinkhorn_finalize_cuda);
}

}  // namespace seer
