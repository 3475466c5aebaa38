// bias + GELU on the CPU: y = gelu(x + bias), and its backward.
//
// Eager PyTorch runs x + bias and gelu forward, gelu_backward and sum backward:
// four passes over memory, three of them into a fresh output. Here the forward
// reads x once and writes y once; the backward recomputes x + bias (cheaper
// than storing and re-reading it) and folds the grad_bias row-sum into the
// grad_x pass, so grad_x is never read back.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fasttx {
// Backward tiling: at most kMaxChunks row chunks of at least kMinChunkRows rows
// (bounding the fp32 partial sums to 1/16 of grad_x), columns in kColBlock blocks.
constexpr int64_t kMaxChunks = 64, kMinChunkRows = 16, kColBlock = 4096;
// Outputs of at least this size bypass the cache (see Io::store).
constexpr int64_t kStreamBytes = int64_t(16) << 20;
}  // namespace fasttx

// torch builds extensions for baseline x86-64, where at::vec::Vectorized is a
// scalar loop around std::erf. The kernels are therefore compiled for AVX-512
// (the ISA set of ATen's own AVX512 kernels, whose Sleef functions libtorch
// exports) and only called when ATen reports that capability at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTTX_BIAS_GELU_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// In C++ the target pragma does not define __AVX512F__, which sleef.h needs
// to declare its 16-lane functions.
#ifndef __AVX512F__
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX512F__
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "common/gelu.h"  // included here so its templates get the target too

namespace fasttx {
namespace {

using at::vec::Vectorized;

// Sleef's tanh costs as much as 3.5 exps. For float, (1 - e) / (1 + e) with
// e = exp(-2|u|) is within 1e-7 absolute, all that GELU's 1 + tanh(u) needs.
template <typename A>
struct VecMath {
  using V = Vectorized<A>;
  static V erf(V x) { return x.erf(); }
  static V exp(V x) { return x.exp(); }
  static V tanh(V u) {
    if constexpr (!std::is_same_v<A, float>) return u.tanh();
    const V e = (V(-2.0f) * u.abs()).exp();
    return ((V(1.0f) - e) / (V(1.0f) + e)) | (u & V(-0.0f));  // sign of u
  }
};

// Moves one register of opmath values (float, or double for double) from and
// to T; k < size() handles a row's tail with masked loads/stores. Outputs too
// big to stay in cache are written with streaming stores: they skip reading
// each destination line before overwriting it, a third of the traffic.
template <typename T>
struct Io {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  static constexpr int64_t W = V::size();
  static constexpr uintptr_t kStoreBytes = W * sizeof(T);  // alignment a stream store needs

  static V load(const T* p, int64_t k) {
    if constexpr (std::is_same_v<T, A>) return V::loadu(p, k);
    else return std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, k)));
  }
  static void store(T* p, V v, int64_t k, bool stream) {
    if constexpr (std::is_same_v<T, A>) {
      if (!stream || k < W) v.store(p, k);
      else if constexpr (std::is_same_v<A, float>) _mm512_stream_ps(p, v);
      else _mm512_stream_pd(p, v);
    } else {
      auto r = at::vec::convert_from_float<T>(v, v);
      if (!stream || k < W) r.store(p, k);
      else _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(r));
    }
  }
  // Calls f(j, k) over [0, len) in steps of k <= W elements; the first step is
  // shortened so that every later full step of `out` is aligned for streaming.
  template <typename F>
  static void for_each_vector(const T* out, int64_t len, const F& f) {
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(out) % kStoreBytes;
    const auto head = int64_t((kStoreBytes - misalign) % kStoreBytes / sizeof(T));
    for (int64_t j = 0, k = head ? head : W; j < len; j += k, k = W) f(j, std::min(k, len - j));
  }
};

template <typename T>
void fwd_segment(const T* x, const T* b, T* y, int64_t len, GeluApprox a, bool stream) {
  using IO = Io<T>;
  IO::for_each_vector(y, len, [&](int64_t j, int64_t k) {
    auto z = IO::load(x + j, k) + IO::load(b + j, k);
    IO::store(y + j, gelu::forward<VecMath<typename IO::A>>(z, a), k, stream);
  });
}

// grad_x for one row segment, added into the chunk's partial row-sum `part`.
template <typename T>
void bwd_segment(const T* g, const T* x, const T* b, T* dx, at::opmath_type<T>* part, int64_t len,
                 GeluApprox a, bool stream) {
  using IO = Io<T>;
  IO::for_each_vector(dx, len, [&](int64_t j, int64_t k) {
    auto z = IO::load(x + j, k) + IO::load(b + j, k);
    auto d = IO::load(g + j, k) * gelu::grad<VecMath<typename IO::A>>(z, a);
    IO::store(dx + j, d, k, stream);
    (IO::V::loadu(part + j, k) + d).store(part + j, k);
  });
}

// Splits the flat range so every thread gets an equal, contiguous share of y
// and so also first-touches (page-faults) its own part of the fresh output.
template <typename T>
void fwd_kernel(const T* x, const T* b, T* y, int64_t m, int64_t n, GeluApprox a) {
  const bool stream = m * n * int64_t(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, m * n, at::internal::GRAIN_SIZE, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t c = i % n, len = std::min(n - c, i1 - i);
      fwd_segment(x + i, b + c, y + i, len, a, stream);
      i += len;
    }
    _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
  });
}

// Work item (k, cb) covers the rows of chunk k and the columns of block cb and
// sums them into part[k] in row order. The tiling depends only on the shape,
// never on the thread count, so after the fixed-order sum over k grad_bias is
// bitwise reproducible. Column blocks keep the bias and partial slices in L1.
template <typename T>
void bwd_kernel(const T* g, const T* x, const T* b, T* dx, T* db, at::opmath_type<T>* part, int64_t m,
                int64_t n, int64_t chunks, GeluApprox a) {
  using A = at::opmath_type<T>;
  const int64_t blocks = (n + kColBlock - 1) / kColBlock;
  const bool stream = m * n * int64_t(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t k = w / blocks, cb = w % blocks;
      const int64_t c0 = n * cb / blocks, len = n * (cb + 1) / blocks - c0;
      A* pk = part + k * n + c0;
      std::fill(pk, pk + len, A(0));
      for (int64_t r = m * k / chunks; r < m * (k + 1) / chunks; ++r) {
        const int64_t off = r * n + c0;
        bwd_segment(g + off, x + off, b + c0, dx + off, pk, len, a, stream);
      }
    }
    _mm_sfence();  // as in fwd_kernel
  });
  // Fixed-order reduction of the partials, vectorized across columns.
  using IO = Io<T>;
  constexpr int64_t W = IO::W;
  at::parallel_for(0, n, at::internal::GRAIN_SIZE / chunks, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += W) {
      const int64_t kk = std::min(W, j1 - j);
      auto s = IO::V::loadu(part + j, kk);
      for (int64_t k = 1; k < chunks; ++k) s = s + IO::V::loadu(part + k * n + j, kk);
      IO::store(db + j, s, kk, false);
    }
  });
}

}  // namespace
}  // namespace fasttx
#pragma GCC pop_options
#endif  // AVX-512 kernels

namespace fasttx {
namespace {

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ",
              x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.size(0) == x.size(1), op,
              ": bias must be a contiguous 1-D tensor of size ", x.size(1), ", got shape ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), op, ": bias dtype ", bias.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(approximate == 0 || approximate == 1, op, ": approximate must be 0 (erf) or 1 (tanh), got ",
              approximate);
}

bool use_avx512() {
#ifdef FASTTX_BIAS_GELU_AVX512
  static const bool ok = at::get_cpu_capability() == "AVX512";  // honours ATEN_CPU_CAPABILITY
  return ok;
#else
  return false;
#endif
}

// A fresh output above glibc's 32 MB mmap threshold costs one page fault per
// 4 KB on first touch; asking for transparent huge pages (THP "madvise" mode)
// cuts that 512-fold. Advisory only: if it fails, 4 KB pages are used.
at::Tensor empty_output(const at::Tensor& like) {
  auto t = at::empty(like.sizes(), like.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

const char* approx_name(int64_t approximate) { return approximate == 1 ? "tanh" : "none"; }

}  // namespace

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  check_inputs("bias_gelu_fwd_cpu", x, bias, approximate);
  // Without AVX-512, ATen's own kernels (vectorized for this CPU) beat ours.
  if (!use_avx512()) return at::gelu(x + bias, approx_name(approximate));
  auto y = empty_output(x);
#ifdef FASTTX_BIAS_GELU_AVX512
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    fwd_kernel(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
               x.size(0), x.size(1), static_cast<GeluApprox>(approximate));
  });
#endif
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& bias, int64_t approximate) {
  check_inputs("bias_gelu_bwd_cpu", x, bias, approximate);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "bias_gelu_bwd_cpu: grad must be contiguous with the shape and dtype of x, got shape ", grad.sizes(),
              " and dtype ", grad.scalar_type());
  const auto acc = at::toOpMathType(x.scalar_type());
  if (!use_avx512()) {
    auto dx = at::gelu_backward(grad.to(acc), (x + bias).to(acc), approx_name(approximate));
    return {dx.to(x.scalar_type()), dx.sum(0).to(bias.scalar_type())};
  }
  const int64_t m = x.size(0), n = x.size(1);
  const int64_t chunks = std::max<int64_t>(1, std::min(kMaxChunks, m / kMinChunkRows));
  auto dx = empty_output(x);
  auto db = at::empty_like(bias);
  auto part = at::empty({chunks, n}, x.options().dtype(acc));
#ifdef FASTTX_BIAS_GELU_AVX512
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    bwd_kernel(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
               dx.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>(),
               part.mutable_data_ptr<at::opmath_type<scalar_t>>(), m, n, chunks,
               static_cast<GeluApprox>(approximate));
  });
#endif
  return {dx, db};
}

}  // namespace fasttx
