// Rotary position embeddings on CUDA (contract in csrc/ops.h, shared with the
// CPU kernel): q and k rotated in one launch each, forward and backward by
// one kernel (TRANSPOSE: the transposed rotation of a gradient).
//
// Memory bound: a row of q or k is read once and its rotation written once,
// so the kernel does what moves bytes fastest:
//  - 16-byte loads and stores (LDG.128/STG.128) of x, y and the tables
//    whenever the head dim, rotary dim, strides and pointers allow, single
//    elements otherwise, so any shape and any view works;
//  - a 2-D block: threadIdx.x walks a row's vectors, threadIdx.y picks the
//    row, so the (b, h, t) division is once per row, not per element;
//  - the table rows (B*T*Dr, Hq + Hk times smaller than q and k) are re-read
//    by every head from L2, never from HBM in the steady state.
#include "ops.h"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fasttx {
namespace {

constexpr int kThreads = 256;

struct RotaryParams {
  const void* x;
  void* y;
  const void* cos;
  const void* sin;
  const int64_t* pos;  // (batch, tokens) ids into (positions, rot_dim) tables, or null
  int64_t rows, heads, tokens, dim, rot_dim;
  int64_t x_sb, x_sh, x_st;
  int64_t c_sb, c_st, s_sb, s_st;  // with pos: the tables' row strides in c_sb, s_sb
  int64_t p_sb, p_st;
};

// Thread (tx, ty) takes row blockIdx.x * blockDim.y + ty, and in it the steps
// tx, tx + blockDim.x, ...: first the rotary ones (rotate-half: V pairs (j, j + Dr/2),
// interleaved: max(V, 2) elements, whole adjacent pairs), then the pass-through ones.
template <typename T, typename C, int V, bool INTERLEAVED, bool TRANSPOSE>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
  using Acc = at::opmath_type<T>;
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;
  const int64_t t = row % p.tokens, h = (row / p.tokens) % p.heads, b = row / (p.tokens * p.heads);
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh + t * p.x_st;
  T* y = static_cast<T*>(p.y) + row * p.dim;
  const C* c;
  const C* s;
  if (p.pos) {
    const int64_t id = p.pos[b * p.p_sb + t * p.p_st];
    c = static_cast<const C*>(p.cos) + id * p.c_sb;
    s = static_cast<const C*>(p.sin) + id * p.s_sb;
  } else {
    c = static_cast<const C*>(p.cos) + b * p.c_sb + t * p.c_st;
    s = static_cast<const C*>(p.sin) + b * p.s_sb + t * p.s_st;
  }
  if constexpr (INTERLEAVED) {
    // E elements = E/2 whole pairs per step: one pack, or two single elements when V = 1.
    constexpr int E = V < 2 ? 2 : V;
    for (int64_t e = int64_t(threadIdx.x) * E; e < p.rot_dim; e += int64_t(blockDim.x) * E) {
      Pack<T, V> xv[E / V], out[E / V];
      Pack<C, V> cv[E / V], sv[E / V];
#pragma unroll
      for (int k = 0; k < E / V; ++k) {
        xv[k] = load<T, V>(x + e + k * V);
        cv[k] = load<C, V>(c + e + k * V);
        sv[k] = load<C, V>(s + e + k * V);
      }
#pragma unroll
      for (int i = 0; i < E; i += 2) {
        const int ka = i / V, ia = i % V, kb = (i + 1) / V, ib = (i + 1) % V;
        const Acc xa = Acc(xv[ka].v[ia]), xb = Acc(xv[kb].v[ib]);
        const Acc ca = Acc(cv[ka].v[ia]), cb = Acc(cv[kb].v[ib]), sa = Acc(sv[ka].v[ia]), sb = Acc(sv[kb].v[ib]);
        out[ka].v[ia] = T(TRANSPOSE ? xa * ca + xb * sb : xa * ca - xb * sa);
        out[kb].v[ib] = T(TRANSPOSE ? xb * cb - xa * sa : xb * cb + xa * sb);
      }
#pragma unroll
      for (int k = 0; k < E / V; ++k) store<T, V>(y + e + k * V, out[k]);
    }
  } else {
    const int64_t half = p.rot_dim / 2;
    for (int64_t j = int64_t(threadIdx.x) * V; j < half; j += int64_t(blockDim.x) * V) {
      const Pack<T, V> x1 = load<T, V>(x + j), x2 = load<T, V>(x + half + j);
      const Pack<C, V> c1 = load<C, V>(c + j), c2 = load<C, V>(c + half + j);
      const Pack<C, V> s1 = load<C, V>(s + j), s2 = load<C, V>(s + half + j);
      Pack<T, V> y1, y2;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const Acc xa = Acc(x1.v[i]), xb = Acc(x2.v[i]);
        y1.v[i] = T(TRANSPOSE ? xa * Acc(c1.v[i]) + xb * Acc(s2.v[i]) : xa * Acc(c1.v[i]) - xb * Acc(s1.v[i]));
        y2.v[i] = T(TRANSPOSE ? xb * Acc(c2.v[i]) - xa * Acc(s1.v[i]) : xb * Acc(c2.v[i]) + xa * Acc(s2.v[i]));
      }
      store<T, V>(y + j, y1);
      store<T, V>(y + half + j, y2);
    }
  }
  for (int64_t e = p.rot_dim + int64_t(threadIdx.x) * V; e < p.dim; e += int64_t(blockDim.x) * V) {
    store<T, V>(y + e, load<T, V>(x + e));
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void check_pair(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                const at::Tensor& sin, const std::optional<at::Tensor>& position_ids) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && cos.device() == q.device() && sin.device() == q.device(),
              fn, ": q, k, cos and sin must be on one CUDA device, got ", q.device(), ", ", k.device(), ", ",
              cos.device(), ", ", sin.device());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                  k.size(3) == q.size(3),
              fn, ": q and k must be (batch, heads, tokens, dim) with one batch, tokens and dim, got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), fn, ": k dtype ", k.scalar_type(), " must match q dtype ",
              q.scalar_type());
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK(t->size(3) <= 1 || t->numel() == 0 || t->stride(3) == 1, fn,
                ": q and k need a unit stride on the last dim, got ",
                t->strides());
  }
  const bool wide = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type() &&
                  (cos.scalar_type() == q.scalar_type() || (wide && cos.scalar_type() == at::kFloat)),
              fn, ": cos and sin must share a shape and q's dtype (or float32 for 16-bit q), got ", cos.sizes(), " ",
              cos.scalar_type(), " and ", sin.sizes(), " ", sin.scalar_type());
  TORCH_CHECK(cos.stride(-1) == 1 && sin.stride(-1) == 1, fn, ": cos and sin need a unit stride on the last dim");
  const int64_t rot_dim = cos.size(-1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim >= 2 && rot_dim <= q.size(3), fn,
              ": the rotary dim (cos's last) must be even and in [2, ", q.size(3), "], got ", rot_dim);
  if (position_ids) {
    TORCH_CHECK(position_ids->device() == q.device() && position_ids->scalar_type() == at::kLong &&
                    position_ids->dim() == 2 && position_ids->size(0) == q.size(0) &&
                    position_ids->size(1) == q.size(2) && cos.dim() == 2,
                fn, ": position_ids must be int64 (", q.size(0), ", ", q.size(2),
                ") on q's device with (positions, rot_dim) tables; the caller checks the ids' range");
  } else {
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == q.size(0) && cos.size(1) == q.size(2), fn,
                ": cos and sin must be (", q.size(0), ", ", q.size(2), ", rot_dim), got ", cos.sizes());
  }
}

template <typename T, typename C>
void launch(const at::Tensor& x, const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin,
            const std::optional<at::Tensor>& position_ids, bool interleaved, bool transpose) {
  RotaryParams p{};
  p.x = x.const_data_ptr(), p.y = y.mutable_data_ptr(), p.cos = cos.const_data_ptr(), p.sin = sin.const_data_ptr();
  p.rows = x.size(0) * x.size(1) * x.size(2);
  if (p.rows == 0) return;
  p.heads = x.size(1), p.tokens = x.size(2), p.dim = x.size(3), p.rot_dim = cos.size(-1);
  p.x_sb = x.stride(0), p.x_sh = x.stride(1), p.x_st = x.stride(2);
  if (position_ids) {
    p.pos = position_ids->const_data_ptr<int64_t>();
    p.p_sb = position_ids->stride(0), p.p_st = position_ids->stride(1);
    p.c_sb = cos.stride(0), p.s_sb = sin.stride(0);
  } else {
    p.c_sb = cos.stride(0), p.c_st = cos.stride(1), p.s_sb = sin.stride(0), p.s_st = sin.stride(1);
  }
  // 16-byte packs of T where every row start, half and tail is a multiple of them (the tables'
  // packs then hold the same count of C, 16 or 32 bytes, aligned likewise).
  constexpr int kVec = 16 / sizeof(T);
  const int64_t unit = interleaved ? p.rot_dim : p.rot_dim / 2;
  bool vec = unit % kVec == 0 && p.rot_dim % kVec == 0 && p.dim % kVec == 0 && aligned(p.x, 16) &&
             aligned(p.y, 16) && aligned(p.cos, kVec * sizeof(C)) && aligned(p.sin, kVec * sizeof(C));
  for (int64_t stride : {p.x_sb, p.x_sh, p.x_st, p.c_sb, p.c_st, p.s_sb, p.s_st}) vec = vec && stride % kVec == 0;
  const auto go = [&](auto v, auto il, auto tr) {
    constexpr int V = decltype(v)::value;
    const auto kernel = rotary_kernel<T, C, V, decltype(il)::value, decltype(tr)::value>;
    const int64_t vectors = std::max(interleaved ? p.rot_dim / std::max(V, 2) : p.rot_dim / 2 / V,
                                     (p.dim - p.rot_dim) / V);
    int tx = 1;
    while (tx < vectors && tx < 32) tx *= 2;  // one warp at most per row: rows are short
    const int ty = kThreads / tx;
    const int64_t blocks = (p.rows + ty - 1) / ty;
    TORCH_CHECK(blocks <= 0x7fffffff, "apply_rotary_cuda: ", p.rows, " rows exceed the grid");
    kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(tx, ty), 0, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto with_flags = [&](auto v) {
    using F = std::false_type;
    using Tr = std::true_type;
    if (interleaved) transpose ? go(v, Tr{}, Tr{}) : go(v, Tr{}, F{});
    else transpose ? go(v, F{}, Tr{}) : go(v, F{}, F{});
  };
  if (vec) with_flags(std::integral_constant<int, kVec>{});
  else with_flags(std::integral_constant<int, 1>{});
}

std::tuple<at::Tensor, at::Tensor> rotate(const char* fn, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const std::optional<at::Tensor>& position_ids, bool interleaved,
                                          bool transpose) {
  check_pair(fn, q, k, cos, sin, position_ids);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out_q = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto out_k = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "apply_rotary_cuda", [&] {
    for (auto [x, y] : {std::pair{&q, &out_q}, std::pair{&k, &out_k}}) {
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        launch<scalar_t, scalar_t>(*x, *y, cos, sin, position_ids, interleaved, transpose);
      } else if (cos.scalar_type() == q.scalar_type()) {
        launch<scalar_t, scalar_t>(*x, *y, cos, sin, position_ids, interleaved, transpose);
      } else {
        launch<scalar_t, float>(*x, *y, cos, sin, position_ids, interleaved, transpose);
      }
    }
  });
  return {out_q, out_k};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rotary_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& position_ids,
                                                         bool interleaved) {
  return rotate("apply_rotary_fwd_cuda", q, k, cos, sin, position_ids, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& position_ids,
                                                         bool interleaved) {
  return rotate("apply_rotary_bwd_cuda", grad_q, grad_k, cos, sin, position_ids, interleaved, true);
}

}  // namespace fasttx
