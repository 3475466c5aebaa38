// bias + GELU kernels in at::vec, for one vector ISA: include this inside a
// cpu/vec/isa_begin.h region (bias_gelu_avx2.cpp, bias_gelu_avx512.cpp).
//
// Eager PyTorch runs x + bias and gelu forward, gelu_backward and sum backward:
// four passes over memory, three of them into a fresh output. Here the forward
// reads x once and writes y once; the backward recomputes x + bias (cheaper
// than storing and re-reading it) and folds the grad_bias row-sum into the
// grad_x pass, so grad_x is never read back.
#pragma once

#ifdef FASTTX_ISA
#include <ATen/Dispatch.h>

#include "common/gelu.h"
#include "cpu/bias_gelu_kernels.h"
#include "cpu/vec/io.h"
#include "cpu/vec/math.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

// Backward tiling: the row chunks come from bias_gelu.cpp (a function of M),
// columns go in kColBlock blocks that keep bias and partial slices in cache.
constexpr int64_t kColBlock = 4096;

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
  const bool stream = stream_forward_output(m * n * int64_t(sizeof(T)));
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
  const bool stream = stream_backward_output(m * n * int64_t(sizeof(T)));
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
  sum_partials(part, chunks, n, db);
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& y, GeluApprox approx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    fwd_kernel(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
               x.size(0), x.size(1), approx);
  });
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& grad_x,
              const at::Tensor& grad_bias, const at::Tensor& partial, GeluApprox approx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    bwd_kernel(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
               grad_x.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
               partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), x.size(0), x.size(1), partial.size(0), approx);
  });
}

const BiasGeluKernels bias_gelu{&forward, &backward};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
