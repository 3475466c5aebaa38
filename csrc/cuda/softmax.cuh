// The fused scaled-masked softmax of attention, on CUDA: device kernels and
// their launchers, shared by softmax.cu (softmax_fwd_cuda / softmax_bwd_cuda)
// and attention.cu (the softmax between the cuBLAS GEMMs). The contract is
// softmax_fwd_cpu / attention_fwd_cpu in csrc/ops.h.
//
// A row of Tk scores belongs to one warp (kSoftmaxWarps rows per block, a
// grid-stride loop over rows), so no shared memory or __syncthreads is needed
// and a row of any length works:
//  - the row is cut into packs of VEC consecutive columns (16 bytes of the
//    input type: 4 fp32 or 8 fp16/bf16); lane l owns packs l, l + 32, ...,
//    so a warp reads 512 contiguous bytes per load instruction. The ALIGNED
//    kernels move each pack with one 16-byte load (the fp32 mask in 16-byte
//    pieces); the others load element by element with bounds checks, so any
//    Tk, pointer and mask stride works. fp64 rows use packs of 4 (two 16-byte
//    pieces), so that a pack is always whole Philox groups of 4 columns;
//  - the forward keeps the scores of the lane's first packs in registers
//    (kSoftmaxCacheBytes per lane: 64 fp32 scores, 2048 columns per warp, or
//    32 fp64 ones), so such rows are read once; the columns past the cache
//    are folded in with an online (running max, rescaled sum) update and read
//    a second time, from L2, by the output pass. Math is fp32 for fp32, fp16
//    and bf16 storage and fp64 for fp64 (then the mask and lse are fp64 too,
//    as the contract says);
//  - the causal kernels stop at the diagonal: row i reads and computes only
//    columns j <= i (up to the end of the pack holding column i: the rest of
//    that pack is loaded with it but replaced by -inf, never used), and
//    writes zeros past it without reading anything;
//  - lanes combine in a fixed tree (shfl_down, then lane 0's value is
//    broadcast), so every lane uses the same row sum, bit for bit, run to run;
//  - a row whose scores are all -inf (fully masked, or Tk = 0) gives y = 0
//    and lse = +inf, never NaN;
//  - dropout draws csrc/common/philox.h: one Philox4x32-10 call per 4
//    columns (a pack starts at a multiple of 4 columns), counter
//    (col / 4, row i, bh = b * H + h, offset).
// No atomics anywhere: results are bitwise reproducible.
#pragma once

#include "common/philox.h"
#include "cuda/pack.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

namespace fasttx {
namespace {

constexpr int kSoftmaxThreads = 256;
constexpr int kSoftmaxWarp = 32;
constexpr int kSoftmaxWarps = kSoftmaxThreads / kSoftmaxWarp;  // rows in flight per block
// Scores the forward keeps in registers per lane: 256 bytes (64 fp32
// registers), so fp32/fp16/bf16 rows of up to 2048 columns are read once.
constexpr int kSoftmaxCacheBytes = 256;
// The softmax backward caches two rows (grad_y and y): 128 bytes of each.
constexpr int kSoftmaxBwdCacheBytes = 128;
// Packs per lane loaded back to back past the cache (loads in flight per lane).
constexpr int kSoftmaxTailBatch = 2;
// Grid-stride kernels: more blocks than this buys nothing.
constexpr int64_t kSoftmaxMaxBlocks = int64_t(1) << 16;
constexpr unsigned kSoftmaxFullMask = 0xffffffffu;

// The attention dropout of one call. enabled is dropout_p > 0 (a p so small
// that threshold = floor(p * 2^32) is 0 still scales kept values).
struct DropoutParams {
  uint64_t seed = 0;
  uint32_t offset = 0;
  uint32_t threshold = 0;      // floor(dropout_p * 2^32)
  float keep_scale_f = 1.0f;   // 1 / (1 - dropout_p), for fp32 math
  double keep_scale_d = 1.0;   // the same, for fp64 math
  bool enabled = false;
};

// The math type of a storage type: fp32, or fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Columns per pack: 16 bytes of T, but at least 4 (one Philox group) for fp64.
template <typename T>
constexpr int pack_vec() {
  return sizeof(T) >= 8 ? 4 : int(16 / sizeof(T));
}

// An additive mask (fp32, fp64 for fp64 inputs) viewed as (B, H, Tq, Tk)
// with element strides; a stride is 0 for a broadcast (or size-1) dim; the
// last dim has stride 1.
template <typename A>
struct MaskView {
  const A* ptr = nullptr;  // nullptr: no mask
  int64_t stride_b = 0, stride_h = 0, stride_q = 0;
};
// The same, untyped, as check_mask returns it before dtype dispatch.
struct MaskInfo {
  const void* ptr = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0;
};
template <typename A>
MaskView<A> typed_mask(const MaskInfo& m) {
  return MaskView<A>{static_cast<const A*>(m.ptr), m.stride_b, m.stride_h, m.stride_q};
}

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }  // SFU ex2, a few ulp
__device__ __forceinline__ double fast_exp(double x) { return ::exp(x); }
// max(a, b), NaN if either is NaN, as torch's softmax: fmaxf returns the other operand, so a NaN score
// in a row whose other scores are -inf (causal row 0, a padded row) passed for a fully masked row: 0.
template <typename A>
__device__ __forceinline__ A max_of(A a, A b) {
  return a > b || a != a ? a : b;
}
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }  // correctly rounded even under fast math
__device__ __forceinline__ double reciprocal(double x) { return 1.0 / x; }
// max + log(sum), sum >= 1: the log in fp64 for both (once per row).
__device__ __forceinline__ float max_plus_log(float max, float sum) {
  return static_cast<float>(double(max) + ::log(double(sum)));
}
__device__ __forceinline__ double max_plus_log(double max, double sum) { return max + ::log(sum); }
template <typename A>
__device__ __forceinline__ A keep_scale(const DropoutParams& d) {
  if constexpr (std::is_same_v<A, double>) {
    return d.keep_scale_d;
  } else {
    return d.keep_scale_f;
  }
}

// Where one score row sits: row = bh * Tq + i with bh = b * H + h.
struct RowGeometry {
  uint32_t i;        // query index inside its (b, h)
  uint32_t bh;       // b * H + h, the Philox counter word
  int64_t mask_off;  // element offset of the row's mask
  int n_cols;        // columns that can be unmasked: Tk, or min(i + 1, Tk) when causal
};

template <bool CAUSAL, typename A>
__device__ __forceinline__ RowGeometry row_geometry(int64_t row, int64_t tq, int64_t heads, int tk,
                                                    const MaskView<A>& mask) {
  const int64_t i = row % tq;
  const int64_t bh = row / tq;
  const int64_t b = bh / heads, h = bh % heads;
  RowGeometry g;
  g.i = static_cast<uint32_t>(i);
  g.bh = static_cast<uint32_t>(bh);
  g.mask_off = b * mask.stride_b + h * mask.stride_h + i * mask.stride_q;
  g.n_cols = CAUSAL ? static_cast<int>(i + 1 < tk ? i + 1 : int64_t(tk)) : tk;
  return g;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int d = kSoftmaxWarp / 2; d > 0; d /= 2) v = max_of(v, __shfl_xor_sync(kSoftmaxFullMask, v, d));
  return v;  // max is exact and commutative: every lane holds the same value
}

// A fixed tree, then lane 0's sum to everyone: all lanes agree bit for bit.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int d = kSoftmaxWarp / 2; d > 0; d /= 2) v += __shfl_down_sync(kSoftmaxFullMask, v, d);
  return __shfl_sync(kSoftmaxFullMask, v, 0);
}

// Elements p[col0 .. col0 + VEC) as A. ALIGNED: the whole pack lies inside
// the row and p + col0 is aligned to min(VEC, 16 / sizeof(T)) elements; it
// moves in 16-byte pieces. Otherwise columns >= n read as 0, unread.
template <int VEC, bool ALIGNED, typename T, typename A>
__device__ __forceinline__ void load_pack(const T* p, int col0, int n, A (&v)[VEC]) {
  if constexpr (ALIGNED) {
    constexpr int kPiece = VEC < int(16 / sizeof(T)) ? VEC : int(16 / sizeof(T));
    static_assert(VEC % kPiece == 0, "a pack is whole 16-byte pieces");
#pragma unroll
    for (int q = 0; q < VEC / kPiece; ++q) {
      const Pack<T, kPiece> piece = load<T, kPiece>(p + col0 + q * kPiece);
#pragma unroll
      for (int k = 0; k < kPiece; ++k) v[q * kPiece + k] = static_cast<A>(piece.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = col0 + k < n ? static_cast<A>(p[col0 + k]) : A(0);
  }
}

// Stores v to p[col0 .. col0 + VEC) as T; not ALIGNED: only columns < n.
template <int VEC, bool ALIGNED, typename T, typename A>
__device__ __forceinline__ void store_pack(T* p, int col0, int n, const A (&v)[VEC]) {
  if constexpr (ALIGNED) {
    constexpr int kPiece = VEC < int(16 / sizeof(T)) ? VEC : int(16 / sizeof(T));
    static_assert(VEC % kPiece == 0, "a pack is whole 16-byte pieces");
#pragma unroll
    for (int q = 0; q < VEC / kPiece; ++q) {
      Pack<T, kPiece> piece;
#pragma unroll
      for (int k = 0; k < kPiece; ++k) piece.v[k] = static_cast<T>(v[q * kPiece + k]);
      store<T, kPiece>(p + col0 + q * kPiece, piece);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (col0 + k < n) p[col0 + k] = static_cast<T>(v[k]);
    }
  }
}

template <int VEC, bool ALIGNED, typename T>
__device__ __forceinline__ void store_zeros(T* p, int col0, int n) {
  float z[VEC];  // 0 converts exactly to any T
#pragma unroll
  for (int k = 0; k < VEC; ++k) z[k] = 0.0f;
  store_pack<VEC, ALIGNED>(p, col0, n, z);
}

// s = scale * x + mask for the columns col0 .. col0 + VEC of a row, -inf for
// columns >= n_cols (past the row, or past the diagonal when causal). mrow is
// the row's mask or nullptr. The same expression in the forward and in the
// attention backward, so a recomputed score is bitwise the forward's.
template <int VEC, bool ALIGNED, typename TIn, typename A>
__device__ __forceinline__ void load_scores(const TIn* xrow, const A* mrow, int col0, int n_cols, A scale,
                                            A (&s)[VEC]) {
  load_pack<VEC, ALIGNED>(xrow, col0, n_cols, s);
  A m[VEC];
  if (mrow != nullptr) {
    load_pack<VEC, ALIGNED>(mrow, col0, n_cols, m);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] = A(0);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) s[k] = col0 + k < n_cols ? s[k] * scale + m[k] : A(-INFINITY);
}

// f[k] = keep(col0 + k) ? keep_scale : 0, from the Philox bits of columns
// col0 .. col0 + VEC (col0 a multiple of 4): one Philox call per 4 columns.
template <int VEC, typename A>
__device__ __forceinline__ void dropout_factors(A (&f)[VEC], const DropoutParams& d, uint32_t bh, uint32_t row,
                                                int col0) {
  static_assert(VEC % 4 == 0, "dropout draws 4 columns per Philox call");
  const A scale = keep_scale<A>(d);
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) {
    const Philox4 r = dropout_bits4(d.seed, d.offset, bh, row, static_cast<uint32_t>(col0 / 4 + q));
    const uint32_t bits[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) f[4 * q + k] = dropout_keep(bits[k], d.threshold) ? scale : A(0);
  }
}

// v[k] = keep(col0 + k) ? v[k] * keep_scale : 0.
template <int VEC, typename A>
__device__ __forceinline__ void apply_dropout(A (&v)[VEC], const DropoutParams& d, uint32_t bh, uint32_t row,
                                              int col0) {
  A f[VEC];
  dropout_factors(f, d, bh, row, col0);
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = f[k] != A(0) ? v[k] * f[k] : A(0);
}

// ---------------------------------------------------------------------------
// Forward: y = dropout(softmax(scale * x + mask)) over rows of Tk, and
// lse = log sum exp(scale * x + mask) per row (+inf when fully masked).

template <typename TIn, typename TOut>
struct SoftmaxFwdArgs {
  using A = acc_t<TIn>;
  const TIn* x;  // (rows, tk); may alias y when TIn == TOut (each element is read before it is written, by one thread)
  TOut* y;       // (rows, tk)
  A* lse;        // (rows,) or nullptr
  MaskView<A> mask;
  int64_t rows, tq, heads;  // rows = B * heads * tq
  int tk;
  A scale;
  DropoutParams dropout;
};

// Blocks per SM the row kernels ask ptxas for: 2 (at most 128 registers) for
// the 16-byte fp32-math kernels; 1 for the element-wise fallbacks and for
// fp64 math (libdevice exp), which need more than 128 registers not to spill.
template <typename A, bool ALIGNED>
constexpr int row_kernel_min_blocks() {
  return ALIGNED && sizeof(A) == 4 ? 2 : 1;
}

template <typename TIn, typename TOut, bool CAUSAL, bool ALIGNED>
__global__ void __launch_bounds__(kSoftmaxThreads, (row_kernel_min_blocks<acc_t<TIn>, ALIGNED>()))
    softmax_fwd_kernel(const SoftmaxFwdArgs<TIn, TOut> a) {
  using A = acc_t<TIn>;
  constexpr int VEC = pack_vec<TIn>();
  constexpr int CACHE = kSoftmaxCacheBytes / int(VEC * sizeof(A));  // packs per lane
  constexpr int TAIL = kSoftmaxTailBatch;
  constexpr A kNegInf = A(-INFINITY);
  const int lane = threadIdx.x % kSoftmaxWarp;
  const int total_packs = (a.tk + VEC - 1) / VEC;
  const int64_t row_step = int64_t(gridDim.x) * kSoftmaxWarps;
  for (int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + threadIdx.x / kSoftmaxWarp; row < a.rows;
       row += row_step) {
    const RowGeometry g = row_geometry<CAUSAL>(row, a.tq, a.heads, a.tk, a.mask);
    const TIn* xrow = a.x + row * a.tk;
    const A* mrow = a.mask.ptr != nullptr ? a.mask.ptr + g.mask_off : nullptr;
    const int valid_packs = (g.n_cols + VEC - 1) / VEC;  // packs holding a column < n_cols

    // Pass 1: the cached packs (scores kept), the lane's max over them.
    A cache[CACHE][VEC];
    A m = kNegInf;
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const int p = lane + c * kSoftmaxWarp;
      if (p < valid_packs) {
        load_scores<VEC, ALIGNED>(xrow, mrow, p * VEC, g.n_cols, a.scale, cache[c]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) m = max_of(m, cache[c][k]);
      }
    }
    // The packs past the cache: running max m and a sum l rescaled to it.
    // m_safe stands in for m = -inf (all seen scores -inf): exp(-inf - 0) = 0
    // where exp(-inf - -inf) would be NaN.
    A l = A(0);
#pragma unroll 1
    for (int p0 = lane + CACHE * kSoftmaxWarp; p0 < valid_packs; p0 += TAIL * kSoftmaxWarp) {
      A s[TAIL][VEC];
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < valid_packs) {
          load_scores<VEC, ALIGNED>(xrow, mrow, p * VEC, g.n_cols, a.scale, s[t]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) s[t][k] = kNegInf;
        }
      }
      A pm = kNegInf;
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) pm = max_of(pm, s[t][k]);
      }
      if (pm > m || pm != pm) {  // a NaN max is kept (see max_of)
        l *= fast_exp(m - pm);  // m = -inf: l is 0 and stays 0
        m = pm;
      }
      const A m_safe = m == kNegInf ? A(0) : m;
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) l += fast_exp(s[t][k] - m_safe);
      }
    }
    // The cached scores become exp(s - m), added to l.
    {
      const A m_safe = m == kNegInf ? A(0) : m;
#pragma unroll
      for (int c = 0; c < CACHE; ++c) {
        if (lane + c * kSoftmaxWarp < valid_packs) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            cache[c][k] = fast_exp(cache[c][k] - m_safe);
            l += cache[c][k];
          }
        }
      }
    }

    // The row: max M over lanes, sum L of every lane's l rescaled to M.
    const A row_max = warp_max(m);
    const bool dead = row_max == kNegInf;  // every score -inf (or Tk = 0): y = 0, lse = +inf
    const A lane_to_row = m == kNegInf ? A(0) : fast_exp(m - row_max);
    const A row_sum = warp_sum(l * lane_to_row);  // >= 1 unless dead: the max itself adds exp(0)
    const A inv_sum = dead ? A(0) : reciprocal(row_sum);
    if (a.lse != nullptr && lane == 0) a.lse[row] = dead ? A(INFINITY) : max_plus_log(row_max, row_sum);

    // Pass 2: y = exp(s - M) / L, dropped; zeros past the last valid pack.
    TOut* yrow = a.y + row * a.tk;
    const A cached_factor = lane_to_row * inv_sum;
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const int p = lane + c * kSoftmaxWarp;
      if (p < valid_packs) {
        A v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = cache[c][k] * cached_factor;
        if (a.dropout.enabled) apply_dropout(v, a.dropout, g.bh, g.i, p * VEC);
        store_pack<VEC, ALIGNED>(yrow, p * VEC, a.tk, v);
      } else if (p < total_packs) {
        store_zeros<VEC, ALIGNED>(yrow, p * VEC, a.tk);
      }
    }
    const A row_max_safe = dead ? A(0) : row_max;
#pragma unroll 1
    for (int p0 = lane + CACHE * kSoftmaxWarp; p0 < total_packs; p0 += TAIL * kSoftmaxWarp) {
      A s[TAIL][VEC];
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < valid_packs) load_scores<VEC, ALIGNED>(xrow, mrow, p * VEC, g.n_cols, a.scale, s[t]);
      }
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < valid_packs) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) s[t][k] = fast_exp(s[t][k] - row_max_safe) * inv_sum;
          if (a.dropout.enabled) apply_dropout(s[t], a.dropout, g.bh, g.i, p * VEC);
          store_pack<VEC, ALIGNED>(yrow, p * VEC, a.tk, s[t]);
        } else if (p < total_packs) {
          store_zeros<VEC, ALIGNED>(yrow, p * VEC, a.tk);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward of softmax(scale * x + mask): grad_x = scale * y * (g - sum_j g_j y_j).

template <typename T>
struct SoftmaxBwdArgs {
  T* grad_x;         // (rows, tk); may alias grad_y or y
  const T* grad_y;   // (rows, tk)
  const T* y;        // (rows, tk)
  int64_t rows;
  int tk;
  acc_t<T> scale;
};

template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(kSoftmaxThreads, (row_kernel_min_blocks<acc_t<T>, ALIGNED>()))
    softmax_bwd_kernel(const SoftmaxBwdArgs<T> a) {
  using A = acc_t<T>;
  constexpr int VEC = pack_vec<T>();
  constexpr int CACHE = kSoftmaxBwdCacheBytes / int(VEC * sizeof(A));
  constexpr int TAIL = kSoftmaxTailBatch;
  const int lane = threadIdx.x % kSoftmaxWarp;
  const int total_packs = (a.tk + VEC - 1) / VEC;
  const int64_t row_step = int64_t(gridDim.x) * kSoftmaxWarps;
  for (int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + threadIdx.x / kSoftmaxWarp; row < a.rows;
       row += row_step) {
    const T* grow = a.grad_y + row * a.tk;
    const T* yrow = a.y + row * a.tk;
    A gc[CACHE][VEC], yc[CACHE][VEC];
    A dot = A(0);
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const int p = lane + c * kSoftmaxWarp;
      if (p < total_packs) {
        load_pack<VEC, ALIGNED>(grow, p * VEC, a.tk, gc[c]);
        load_pack<VEC, ALIGNED>(yrow, p * VEC, a.tk, yc[c]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += gc[c][k] * yc[c][k];
      }
    }
#pragma unroll 1
    for (int p0 = lane + CACHE * kSoftmaxWarp; p0 < total_packs; p0 += TAIL * kSoftmaxWarp) {
      A gt[TAIL][VEC], yt[TAIL][VEC];
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < total_packs) {
          load_pack<VEC, ALIGNED>(grow, p * VEC, a.tk, gt[t]);
          load_pack<VEC, ALIGNED>(yrow, p * VEC, a.tk, yt[t]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) gt[t][k] = yt[t][k] = A(0);
        }
      }
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += gt[t][k] * yt[t][k];
      }
    }
    dot = warp_sum(dot);

    T* xrow = a.grad_x + row * a.tk;
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const int p = lane + c * kSoftmaxWarp;
      if (p < total_packs) {
        A v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = a.scale * yc[c][k] * (gc[c][k] - dot);
        store_pack<VEC, ALIGNED>(xrow, p * VEC, a.tk, v);
      }
    }
#pragma unroll 1
    for (int p0 = lane + CACHE * kSoftmaxWarp; p0 < total_packs; p0 += TAIL * kSoftmaxWarp) {
      A gt[TAIL][VEC], yt[TAIL][VEC];
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < total_packs) {
          load_pack<VEC, ALIGNED>(grow, p * VEC, a.tk, gt[t]);
          load_pack<VEC, ALIGNED>(yrow, p * VEC, a.tk, yt[t]);
        }
      }
#pragma unroll
      for (int t = 0; t < TAIL; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < total_packs) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) gt[t][k] = a.scale * yt[t][k] * (gt[t][k] - dot);
          store_pack<VEC, ALIGNED>(xrow, p * VEC, a.tk, gt[t]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

inline bool softmax_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int softmax_blocks(int64_t rows) {
  return static_cast<int>(std::min((rows + kSoftmaxWarps - 1) / kSoftmaxWarps, kSoftmaxMaxBlocks));
}

// Checks an optional additive mask against the (B, H, Tq, Tk) scores of a
// tensor `ref` (x or q) and returns its view. fn names the entry point.
inline MaskInfo check_mask(const char* fn, const std::optional<at::Tensor>& mask, const at::Tensor& ref, int64_t b,
                           int64_t h, int64_t tq, int64_t tk) {
  MaskInfo view;
  if (!mask.has_value()) return view;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == ref.device(), fn, ": mask must be on the device of the inputs, ", ref.device(),
              ", got ", m.device());
  const auto expected = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(m.scalar_type() == expected, fn, ": mask must be ", expected, " for ", ref.scalar_type(),
              " inputs, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 4 && m.size(0) == b && m.size(1) == h && m.size(2) == tq && m.size(3) == tk, fn,
              ": mask must have sizes (B, H, Tq, Tk) = (", b, ", ", h, ", ", tq, ", ", tk, ") (broadcast dims ",
              "expanded, with stride 0), got sizes ", m.sizes());
  TORCH_CHECK(m.stride(3) == 1 || tk <= 1, fn, ": mask must have stride 1 in its last dim, got strides ",
              m.strides());
  TORCH_CHECK(m.stride(0) >= 0 && m.stride(1) >= 0 && m.stride(2) >= 0, fn,
              ": mask strides must be non-negative, got ", m.strides());
  view.ptr = m.const_data_ptr();
  // A size-1 dim is only ever indexed at 0: its stride does not matter.
  view.stride_b = b > 1 ? m.stride(0) : 0;
  view.stride_h = h > 1 ? m.stride(1) : 0;
  view.stride_q = tq > 1 ? m.stride(2) : 0;
  return view;
}

// True when the mask rows can be read in 16-byte pieces (4 fp32 or 2 fp64).
template <typename A>
bool mask_aligned16(const MaskView<A>& m) {
  constexpr int64_t kPiece = 16 / sizeof(A);
  return m.ptr == nullptr || (softmax_aligned16(m.ptr) && m.stride_b % kPiece == 0 && m.stride_h % kPiece == 0 &&
                              m.stride_q % kPiece == 0);
}

// Launches the forward on the current stream (the caller holds the device
// guard). a.x and a.y are whole (rows, tk) contiguous buffers.
template <typename TIn, typename TOut>
void launch_softmax_fwd(const SoftmaxFwdArgs<TIn, TOut>& a, bool causal, cudaStream_t stream) {
  if (a.rows == 0) return;
  constexpr int VEC = pack_vec<TIn>();
  const bool aligned = a.tk % VEC == 0 && softmax_aligned16(a.x) && softmax_aligned16(a.y) && mask_aligned16(a.mask);
  const int blocks = softmax_blocks(a.rows);
  if (causal && aligned) {
    softmax_fwd_kernel<TIn, TOut, true, true><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
  } else if (causal) {
    softmax_fwd_kernel<TIn, TOut, true, false><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
  } else if (aligned) {
    softmax_fwd_kernel<TIn, TOut, false, true><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
  } else {
    softmax_fwd_kernel<TIn, TOut, false, false><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Philox parameters of dropout_p (0 <= dropout_p < 1, checked by the caller).
inline DropoutParams make_dropout(double dropout_p, int64_t seed, int64_t offset) {
  DropoutParams d;
  d.enabled = dropout_p > 0.0;
  if (!d.enabled) return d;
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint32_t>(offset);  // the counter word is 32 bits, as in philox.h
  d.threshold = static_cast<uint32_t>(std::floor(dropout_p * 4294967296.0));
  d.keep_scale_d = 1.0 / (1.0 - dropout_p);
  d.keep_scale_f = static_cast<float>(d.keep_scale_d);
  return d;
}

}  // namespace
}  // namespace fasttx
