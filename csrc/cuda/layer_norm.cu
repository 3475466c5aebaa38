// Row normalization on CUDA: layer_norm, add_layer_norm and rms_norm, forward
// and backward (the contract is layer_norm_fwd_cpu / layer_norm_bwd_cpu in
// csrc/ops.h).
//
// All passes are memory bound: the forward reads x (and residual) and writes y
// (and s), 2-4 MN elements; the backward reads grad_y, s (and grad_s) and
// writes grad_input, 3-4 MN. So the kernels are built to move bytes:
//  - 16-byte loads and stores (LDG.128/STG.128) when N and every pointer allow
//    it, a scalar path otherwise, so any N works;
//  - a row is handled by a group of threads: one warp per row while the row
//    fits in the warp's registers (no shared memory, no __syncthreads, 8 rows
//    in flight per block), one 256-thread block per row above that;
//  - each thread keeps the first few packs of its share of the row in registers as
//    raw 16-byte packs between the statistics pass and the output pass, so
//    such rows are read from memory once; longer rows (any length) re-read the
//    rest from L2;
//  - statistics accumulate in at::opmath_type (fp32 for fp16/bf16): per-pack
//    exact moments merged with Chan's formula from csrc/common/welford.h, so
//    the variance stays accurate when |mean| >> std;
//  - dweight/dbias come from a column-wise kernel whose blocks own fixed row
//    ranges picked from (M, N) alone; each writes an fp32 partial row and a
//    second kernel adds the partials in order: no atomics, bitwise
//    reproducible run to run.
#include "common/welford.h"
#include "ops.h"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fasttx {
namespace {

constexpr int kThreads = 256;  // every kernel's block size
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Packs each thread holds in registers (16 bytes = 4 registers each). The
// forward caches one tensor (s): 8 packs, so a warp holds 256 packs (2048 fp16
// / 1024 fp32 elements) and a block 2048 (16384 fp16 / 8192 fp32). The backward
// caches two (grad_y and s), so 4 packs each keep it at the same register cost.
// The row kernels declare __launch_bounds__(kThreads, 1): without the minimum,
// ptxas aims for occupancy tiers (64 / 80 / 128 registers) and accepts a few
// spills to reach them, and a spilled cache is a round trip to local memory
// per pack. With it they use 40-98 registers (2-6 blocks per SM), except the
// 16-byte bf16 ones on sm_90 (119-132: 1-2 blocks per SM, where the 4-8
// independent 16-byte loads per thread keep the bytes in flight).
constexpr int kForwardCachePacks = 8;
constexpr int kBackwardCachePacks = 4;
// The forward grid-strides over rows; more blocks than this buys nothing.
constexpr int64_t kMaxRowBlocks = 1 << 16;
// dweight/dbias partials: blocks of (kColThreads column packs) x (kColRows rows).
constexpr int kColThreads = 32;
constexpr int kColRows = kThreads / kColThreads;
constexpr int64_t kColTargetBlocks = 1024;  // enough to fill any current GPU
constexpr int64_t kMaxParts = 512;


__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return ::rsqrt(v); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename A>
struct Sums2 {
  A a, b;
};

template <typename A>
__device__ __forceinline__ Welford<A> shfl_down(const Welford<A>& w, int delta) {
  return {__shfl_down_sync(0xffffffffu, w.mean, delta), __shfl_down_sync(0xffffffffu, w.m2, delta),
          __shfl_down_sync(0xffffffffu, w.count, delta)};
}

template <typename A>
__device__ __forceinline__ Welford<A> shfl_lane0(const Welford<A>& w) {
  return {__shfl_sync(0xffffffffu, w.mean, 0), __shfl_sync(0xffffffffu, w.m2, 0),
          __shfl_sync(0xffffffffu, w.count, 0)};
}

template <typename A>
__device__ __forceinline__ Sums2<A> shfl_down(const Sums2<A>& s, int delta) {
  return {__shfl_down_sync(0xffffffffu, s.a, delta), __shfl_down_sync(0xffffffffu, s.b, delta)};
}

template <typename A>
__device__ __forceinline__ Sums2<A> shfl_lane0(const Sums2<A>& s) {
  return {__shfl_sync(0xffffffffu, s.a, 0), __shfl_sync(0xffffffffu, s.b, 0)};
}

struct MergeWelford {
  template <typename A>
  __device__ __forceinline__ Welford<A> operator()(const Welford<A>& a, const Welford<A>& b) const {
    return welford_merge_scalar(a, b);  // lanes past the row end hold empty states
  }
};

struct AddSums {
  template <typename A>
  __device__ __forceinline__ Sums2<A> operator()(const Sums2<A>& x, const Sums2<A>& y) const {
    return {x.a + y.a, x.b + y.b};
  }
};

// Combines the states of the GROUP threads of a row (a warp, or the whole
// block) in a fixed tree, and gives every thread of the group lane 0's result:
// Chan's merge is not commutative bit for bit, so an xor butterfly could leave
// lanes with different statistics. slots has kWarpsPerBlock entries; only
// block-wide groups use it.
template <int GROUP, typename S, typename Merge>
__device__ __forceinline__ S group_reduce(S v, S* slots, Merge merge) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) v = merge(v, shfl_down(v, delta));
  v = shfl_lane0(v);
  if constexpr (GROUP > kWarp) {
    static_assert(GROUP == kThreads, "a row group is a warp or the whole block");
    __syncthreads();  // the previous row's readers are done with slots
    if (threadIdx.x % kWarp == 0) slots[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = slots[0];
#pragma unroll
    for (int w = 1; w < kWarpsPerBlock; ++w) v = merge(v, slots[w]);
  }
  return v;
}

// Exact moments of one pack (VEC is a power of two, so 1/VEC is exact), merged
// into the thread's running state. The pack is never empty, so the unguarded
// merge is safe even when the state still is.
template <typename A, typename T, int VEC>
__device__ __forceinline__ void accumulate_stats(const Pack<T, VEC>& p, Welford<A>& w, A& sum_sq, bool rms) {
  A sum = 0, sq = 0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const A v = A(p.v[k]);
    sum += v;
    sq += v * v;
  }
  if (rms) {
    sum_sq += sq;
    return;
  }
  // The sum rounds (3c is inexact for most c), and rstd amplifies a mean off
  // by an ulp; the residuals d = v - mean correct it, exactly on a constant
  // pack (each d is then one small multiple of an ulp, summed exactly), where
  // the output must be exactly the bias. M2 = sum(d^2) - sum(d)^2 / VEC.
  const A rough = sum * A(1.0 / VEC);
  A sum_d = 0, m2 = 0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const A d = A(p.v[k]) - rough;
    sum_d += d;
    m2 += d * d;
  }
  const A shift = sum_d * A(1.0 / VEC);
  w = welford_merge(w, Welford<A>{rough + shift, max(m2 - sum_d * shift, A(0)), A(VEC)});
}

template <typename T>
struct ForwardArgs {
  const T* x;
  const T* residual;  // nullable
  const T* weight;    // nullable
  const T* bias;      // nullable
  T* y;
  T* s;  // written when residual is given
  at::opmath_type<T>* mean;  // nullable (rms)
  at::opmath_type<T>* rstd;
  int64_t m, n;
  double eps;
  bool rms;
};

// s = x + residual rounded to T, as the CPU does: the backward reads the stored
// s, and (s - mean) must be the same there. Written out when a residual is given.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_sum(const ForwardArgs<T>& a, int64_t i) {
  using A = at::opmath_type<T>;
  Pack<T, VEC> v = load<T, VEC>(a.x + i);
  if (a.residual != nullptr) {
    const Pack<T, VEC> r = load<T, VEC>(a.residual + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v.v[k] = T(A(v.v[k]) + A(r.v[k]));
    store<T, VEC>(a.s + i, v);
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void write_output(const ForwardArgs<T>& a, const Pack<T, VEC>& v, int64_t i,
                                             int64_t col, at::opmath_type<T> mean, at::opmath_type<T> rstd) {
  using A = at::opmath_type<T>;
  Pack<T, VEC> w, b, out;
  if (a.weight != nullptr) w = load<T, VEC>(a.weight + col);
  if (a.bias != nullptr) b = load<T, VEC>(a.bias + col);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    A o = (A(v.v[k]) - mean) * rstd;
    if (a.weight != nullptr) o *= A(w.v[k]);
    if (a.bias != nullptr) o += A(b.v[k]);
    out.v[k] = T(o);
  }
  store<T, VEC>(a.y + i, out);
}

// GROUP threads (a warp or the block) per row; thread `rank` of the group owns
// packs rank, rank + GROUP, ... of the row. Pass 1 loads the row (caching the
// first CACHE packs) and gathers statistics, pass 2 writes y.
template <typename T, int VEC, int GROUP, int CACHE>
__global__ void __launch_bounds__(kThreads, 1) norm_forward_kernel(const ForwardArgs<T> a) {
  using A = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  __shared__ Welford<A> stat_slots[kWarpsPerBlock];
  __shared__ Sums2<A> sum_slots[kWarpsPerBlock];
  constexpr int kGroups = kThreads / GROUP;
  const int rank = threadIdx.x % GROUP;
  const int64_t n_packs = a.n / VEC;
  const int64_t row_step = int64_t(gridDim.x) * kGroups;
  for (int64_t row = int64_t(blockIdx.x) * kGroups + threadIdx.x / GROUP; row < a.m; row += row_step) {
    const int64_t row_off = row * a.n;
    // Cached pack k sits at base + k * GROUP * VEC: a compile-time offset from
    // one per-row address, so the cache costs no extra address registers.
    const int64_t base = row_off + rank * VEC;
    P cache[CACHE];
    Welford<A> w = welford_init<A>();
    A sum_sq = 0;
#pragma unroll
    for (int k = 0; k < CACHE; ++k) {
      if (rank + k * GROUP < n_packs) {
        cache[k] = load_sum<T, VEC>(a, base + k * GROUP * VEC);
        accumulate_stats(cache[k], w, sum_sq, a.rms);
      }
    }
    // The tail past the cache exists only for block-wide rows (a warp gets a
    // row only when it fits). `unroll 1`: unrolled, its hoisted loads would
    // cost registers in every instantiation for rows that rarely need it.
    if constexpr (GROUP > kWarp) {
#pragma unroll 1
      for (int64_t p = rank + int64_t(CACHE) * GROUP; p < n_packs; p += GROUP) {
        accumulate_stats(load_sum<T, VEC>(a, row_off + p * VEC), w, sum_sq, a.rms);
      }
    }

    A mean = 0, var;
    if (a.rms) {
      var = group_reduce<GROUP>(Sums2<A>{sum_sq, A(0)}, sum_slots, AddSums{}).a / A(a.n);
    } else {
      w = group_reduce<GROUP>(w, stat_slots, MergeWelford{});
      mean = w.mean;
      var = w.m2 / A(a.n);
    }
    const A rstd = inv_sqrt(var + A(a.eps));
    if (rank == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }

#pragma unroll
    for (int k = 0; k < CACHE; ++k) {
      if (rank + k * GROUP < n_packs) {
        write_output<T, VEC>(a, cache[k], base + k * GROUP * VEC, (rank + k * GROUP) * VEC, mean, rstd);
      }
    }
    // Beyond the cache: read s back (this thread wrote it) or x, from L2.
    if constexpr (GROUP > kWarp) {
      const T* src = a.residual != nullptr ? a.s : a.x;
#pragma unroll 1
      for (int64_t p = rank + int64_t(CACHE) * GROUP; p < n_packs; p += GROUP) {
        const int64_t i = row_off + p * VEC;
        write_output<T, VEC>(a, load<T, VEC>(src + i), i, p * VEC, mean, rstd);
      }
    }
  }
}

template <typename T>
struct BackwardArgs {
  const T* grad_y;
  const T* grad_s;  // nullable
  const T* s;
  const at::opmath_type<T>* mean;  // nullable (rms)
  const at::opmath_type<T>* rstd;
  const T* weight;  // nullable
  T* grad_input;
  int64_t m, n;
  bool rms;
};

// grad_input = (g - mean(g) - xhat * mean(g * xhat)) * rstd (+ grad_s), with
// g = grad_y * weight and xhat = (s - mean) * rstd; rms drops the mean(g) term.
// Same row groups and register cache as the forward, here of grad_y and s.
template <typename T, int VEC, int GROUP, int CACHE>
__global__ void __launch_bounds__(kThreads, 1) norm_backward_input_kernel(const BackwardArgs<T> a) {
  using A = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  __shared__ Sums2<A> sum_slots[kWarpsPerBlock];
  constexpr int kGroups = kThreads / GROUP;
  const int rank = threadIdx.x % GROUP;
  const int64_t n_packs = a.n / VEC;
  const int64_t row_step = int64_t(gridDim.x) * kGroups;
  for (int64_t row = int64_t(blockIdx.x) * kGroups + threadIdx.x / GROUP; row < a.m; row += row_step) {
    const int64_t row_off = row * a.n;
    const int64_t base = row_off + rank * VEC;  // as in the forward
    const A mean = a.rms ? A(0) : a.mean[row];
    const A rstd = a.rstd[row];

    // g and g * xhat of one pack, added into the row sums. g = dy * w is
    // rounded (mul_rn: never contracted) in the sums and in write_pack alike: an
    // FMA in one place only breaks the exact cancellation g - mean(g) = 0 of
    // N = 1 and constant rows, leaving (dy*w - round(dy*w)) * rstd.
    auto add_pack = [&](const P& dy, const P& sv, int64_t col, Sums2<A>& sums) {
      P w;
      if (a.weight != nullptr) w = load<T, VEC>(a.weight + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A g = a.weight != nullptr ? mul_rn(A(dy.v[k]), A(w.v[k])) : A(dy.v[k]);
        sums.a += g;
        sums.b += g * ((A(sv.v[k]) - mean) * rstd);
      }
    };
    auto write_pack = [&](const P& dy, const P& sv, int64_t i, int64_t col, A mean_g, A mean_gx) {
      P w, gs, out;
      if (a.weight != nullptr) w = load<T, VEC>(a.weight + col);
      if (a.grad_s != nullptr) gs = load<T, VEC>(a.grad_s + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A g = a.weight != nullptr ? mul_rn(A(dy.v[k]), A(w.v[k])) : A(dy.v[k]);
        const A xhat = (A(sv.v[k]) - mean) * rstd;
        A v = (g - mean_g - xhat * mean_gx) * rstd;
        if (a.grad_s != nullptr) v += A(gs.v[k]);
        out.v[k] = T(v);
      }
      store<T, VEC>(a.grad_input + i, out);
    };

    P dy_cache[CACHE], s_cache[CACHE];
    Sums2<A> sums{A(0), A(0)};
#pragma unroll
    for (int k = 0; k < CACHE; ++k) {
      if (rank + k * GROUP < n_packs) {
        dy_cache[k] = load<T, VEC>(a.grad_y + base + k * GROUP * VEC);
        s_cache[k] = load<T, VEC>(a.s + base + k * GROUP * VEC);
        add_pack(dy_cache[k], s_cache[k], (rank + k * GROUP) * VEC, sums);
      }
    }
    if constexpr (GROUP > kWarp) {  // the tail, as in the forward
#pragma unroll 1
      for (int64_t p = rank + int64_t(CACHE) * GROUP; p < n_packs; p += GROUP) {
        const int64_t i = row_off + p * VEC;
        add_pack(load<T, VEC>(a.grad_y + i), load<T, VEC>(a.s + i), p * VEC, sums);
      }
    }
    sums = group_reduce<GROUP>(sums, sum_slots, AddSums{});
    const A mean_g = a.rms ? A(0) : sums.a / A(a.n);
    const A mean_gx = sums.b / A(a.n);

#pragma unroll
    for (int k = 0; k < CACHE; ++k) {
      if (rank + k * GROUP < n_packs) {
        write_pack(dy_cache[k], s_cache[k], base + k * GROUP * VEC, (rank + k * GROUP) * VEC, mean_g, mean_gx);
      }
    }
    if constexpr (GROUP > kWarp) {
#pragma unroll 1
      for (int64_t p = rank + int64_t(CACHE) * GROUP; p < n_packs; p += GROUP) {
        const int64_t i = row_off + p * VEC;
        write_pack(load<T, VEC>(a.grad_y + i), load<T, VEC>(a.s + i), i, p * VEC, mean_g, mean_gx);
      }
    }
  }
}

// Column sums of grad_y * xhat (dweight) and grad_y (dbias) over the rows
// [part * m / parts, (part + 1) * m / parts) of block (bx, part). Thread
// (tx, ty) owns column pack bx * kColThreads + tx and walks rows ty, ty +
// kColRows, ...: a warp reads 32 consecutive packs of a row (512 contiguous
// bytes when vectorized). The kColRows sums of a column are then added in ty
// order through shared memory, and the block writes its fp32 partial rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    norm_backward_params_kernel(at::opmath_type<T>* __restrict__ dweight_part, at::opmath_type<T>* __restrict__ dbias_part,
                                const T* __restrict__ grad_y, const T* __restrict__ s,
                                const at::opmath_type<T>* __restrict__ mean, const at::opmath_type<T>* __restrict__ rstd,
                                int64_t m, int64_t n, int64_t parts) {
  using A = at::opmath_type<T>;
  __shared__ A column_sums[kThreads * VEC];
  const int tx = threadIdx.x % kColThreads, ty = threadIdx.x / kColThreads;
  const int64_t col = (int64_t(blockIdx.x) * kColThreads + tx) * VEC;
  const int64_t part = blockIdx.y;
  // m * part / parts without int64 overflow for any m < 2^63 / kMaxParts.
  const int64_t row_begin = m / parts * part + m % parts * part / parts;
  const int64_t row_end = m / parts * (part + 1) + m % parts * (part + 1) / parts;
  A dw[VEC] = {}, db[VEC] = {};
  if (col < n) {
    for (int64_t row = row_begin + ty; row < row_end; row += kColRows) {
      const int64_t i = row * n + col;
      const Pack<T, VEC> dy = load<T, VEC>(grad_y + i);
      const Pack<T, VEC> sv = load<T, VEC>(s + i);
      const A mu = mean != nullptr ? mean[row] : A(0);
      const A rs = rstd[row];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dw[k] += A(dy.v[k]) * ((A(sv.v[k]) - mu) * rs);
        db[k] += A(dy.v[k]);
      }
    }
  }
  // Layout [ty][k][tx]: consecutive tx hit consecutive banks on write and read.
  auto reduce_into = [&](A* out, const A* sums) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) column_sums[(ty * VEC + k) * kColThreads + tx] = sums[k];
    __syncthreads();
    if (ty == 0 && col < n && out != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        A total = 0;
        for (int j = 0; j < kColRows; ++j) total += column_sums[(j * VEC + k) * kColThreads + tx];
        out[part * n + col + k] = total;
      }
    }
    __syncthreads();
  };
  if (dweight_part != nullptr) reduce_into(dweight_part, dw);
  if (dbias_part != nullptr) reduce_into(dbias_part, db);
}

// out[j] = sum over p of partial[p, j], p in increasing order: the fixed order
// that makes dweight/dbias deterministic. Reads are coalesced across j.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(T* __restrict__ out, const at::opmath_type<T>* __restrict__ partial, int64_t parts, int64_t n) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  at::opmath_type<T> total = 0;
  for (int64_t p = 0; p < parts; ++p) total += partial[p * n + j];
  out[j] = T(total);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(vec) with vec a std::integral_constant: kVec when the 16-byte path
// applies, 1 otherwise.
template <int kVec, typename F>
void with_vec(bool vectorized, F&& f) {
  if (vectorized) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// A warp per row while the row fits in the warp's register cache (short rows
// would leave most of a block idle, and a warp needs no __syncthreads); the
// whole block per row above that, so long rows get 256 threads' worth of
// loads in flight.
template <typename WarpKernel, typename BlockKernel, typename Args>
void launch_rows(WarpKernel warp_kernel, BlockKernel block_kernel, const Args& args, int64_t n_packs,
                 int cache_packs, cudaStream_t stream) {
  const bool per_warp = n_packs <= int64_t(kWarp) * cache_packs;
  const int64_t rows_per_block = per_warp ? kWarpsPerBlock : 1;
  const auto blocks = static_cast<unsigned>(std::min((args.m + rows_per_block - 1) / rows_per_block, kMaxRowBlocks));
  if (per_warp) {
    warp_kernel<<<blocks, kThreads, 0, stream>>>(args);
  } else {
    block_kernel<<<blocks, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "layer_norm: ", name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              "layer_norm: ", name, " must be contiguous with the shape and dtype of x ", x.sizes(), ", got ",
              t.sizes(), " ", t.scalar_type());
}

void check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!given(t)) return;
  TORCH_CHECK(t->device() == x.device(), "layer_norm: ", name, " must be on ", x.device(), ", got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
              "layer_norm: ", name, " must be a contiguous (", x.size(1), ",) tensor of dtype ", x.scalar_type(),
              ", got ", t->sizes(), " ", t->scalar_type());
}

// mean / rstd: (M,) contiguous in the accumulation dtype, on s's device.
void check_stat(const at::Tensor& t, const char* name, const at::Tensor& s, at::ScalarType acc) {
  TORCH_CHECK(t.device() == s.device(), "layer_norm backward: ", name, " must be on ", s.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == s.size(0) && t.is_contiguous() && t.scalar_type() == acc,
              "layer_norm backward: ", name, " must be a contiguous (", s.size(0), ",) tensor of dtype ", acc,
              ", got ", t.sizes(), " ", t.scalar_type());
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  TORCH_CHECK(x.is_cuda(), "layer_norm: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "layer_norm: x must be a contiguous 2-D tensor, got ", x.sizes());
  const bool has_res = given(residual);
  if (has_res) check_rows(*residual, "residual", x);
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  TORCH_CHECK(!(rms && given(bias)), "rms_norm takes no bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  const auto acc = acc_type(x);
  auto y = at::empty_like(x);
  auto s = has_res ? at::empty_like(x) : at::Tensor();
  auto mean = rms ? at::Tensor() : at::empty({m}, x.options().dtype(acc));
  auto rstd = at::empty({m}, x.options().dtype(acc));
  if (m == 0) return {y, s, mean, rstd};
  if (n == 0) {  // as the CPU: mean 0, variance 0/0
    if (!rms) mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, s, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    ForwardArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                               has_res ? residual->const_data_ptr<scalar_t>() : nullptr,
                               ptr_or_null<scalar_t>(weight),
                               ptr_or_null<scalar_t>(bias),
                               y.mutable_data_ptr<scalar_t>(),
                               has_res ? s.mutable_data_ptr<scalar_t>() : nullptr,
                               rms ? nullptr : mean.mutable_data_ptr<A>(),
                               rstd.mutable_data_ptr<A>(),
                               m,
                               n,
                               eps,
                               rms};
    const bool vectorized = n % kVec == 0 && aligned16(args.x) && aligned16(args.residual) &&
                            aligned16(args.weight) && aligned16(args.bias) && aligned16(args.y) && aligned16(args.s);
    with_vec<kVec>(vectorized, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      constexpr int C = kForwardCachePacks;
      launch_rows(norm_forward_kernel<scalar_t, V, kWarp, C>, norm_forward_kernel<scalar_t, V, kThreads, C>, args,
                  n / V, C, c10::cuda::getCurrentCUDAStream());
    });
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms) {
  TORCH_CHECK(s.is_cuda(), "layer_norm backward: s must be a CUDA tensor, got ", s.device());
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous(), "layer_norm backward: s must be a contiguous 2-D tensor");
  check_rows(grad_y, "grad_y", s);
  const bool has_gs = given(grad_s);
  if (has_gs) check_rows(*grad_s, "grad_s", s);
  check_param(weight, "weight", s);
  TORCH_CHECK(rms || given(mean), "layer_norm backward: mean is required unless rms");
  const auto acc = acc_type(s);
  if (!rms) check_stat(*mean, "mean", s, acc);
  check_stat(rstd, "rstd", s, acc);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t m = s.size(0), n = s.size(1);
  const bool has_w = given(weight);
  const auto param_dtype = has_w ? weight->scalar_type() : s.scalar_type();
  auto gx = at::empty_like(s);
  auto dw = has_w ? at::empty({n}, s.options().dtype(param_dtype)) : at::Tensor();
  auto db = has_bias ? at::empty({n}, s.options().dtype(param_dtype)) : at::Tensor();
  if (m == 0 || n == 0) {  // no rows: the column sums are empty sums
    if (has_w) dw.zero_();
    if (has_bias) db.zero_();
    return {gx, dw, db};
  }
  // Row parts depend only on (M, N), never on the device or on alignment, so
  // dweight/dbias are bitwise reproducible: about kColTargetBlocks blocks, at
  // least kColRows rows each.
  const int64_t col_units = (n + kColThreads - 1) / kColThreads;
  const int64_t parts = std::max<int64_t>(
      1, std::min({kMaxParts, (m + kColRows - 1) / kColRows, (kColTargetBlocks + col_units - 1) / col_units}));
  auto dw_part = has_w ? at::empty({parts, n}, s.options().dtype(acc)) : at::Tensor();
  auto db_part = has_bias ? at::empty({parts, n}, s.options().dtype(acc)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "layer_norm_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    BackwardArgs<scalar_t> args{grad_y.const_data_ptr<scalar_t>(),
                                has_gs ? grad_s->const_data_ptr<scalar_t>() : nullptr,
                                s.const_data_ptr<scalar_t>(),
                                rms ? nullptr : mean->const_data_ptr<A>(),
                                rstd.const_data_ptr<A>(),
                                ptr_or_null<scalar_t>(weight),
                                gx.mutable_data_ptr<scalar_t>(),
                                m,
                                n,
                                rms};
    const bool vectorized = n % kVec == 0 && aligned16(args.grad_y) && aligned16(args.grad_s) &&
                            aligned16(args.s) && aligned16(args.weight) && aligned16(args.grad_input);
    A* dwp = has_w ? dw_part.mutable_data_ptr<A>() : nullptr;
    A* dbp = has_bias ? db_part.mutable_data_ptr<A>() : nullptr;
    with_vec<kVec>(vectorized, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      constexpr int C = kBackwardCachePacks;
      launch_rows(norm_backward_input_kernel<scalar_t, V, kWarp, C>,
                  norm_backward_input_kernel<scalar_t, V, kThreads, C>, args, n / V, C, stream);
      if (dwp == nullptr && dbp == nullptr) return;
      const dim3 grid(static_cast<unsigned>((n / V + kColThreads - 1) / kColThreads), static_cast<unsigned>(parts));
      norm_backward_params_kernel<scalar_t, V>
          <<<grid, kThreads, 0, stream>>>(dwp, dbp, args.grad_y, args.s, args.mean, args.rstd, m, n, parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    if (has_w) {
      column_sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(dw.mutable_data_ptr<scalar_t>(), dwp, parts, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (has_bias) {
      column_sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(db.mutable_data_ptr<scalar_t>(), dbp, parts, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, dw, db};
}

}  // namespace fasttx
