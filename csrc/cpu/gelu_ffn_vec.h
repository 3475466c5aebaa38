// gelu_ffn's elementwise passes in at::vec, for one vector ISA: include this
// inside a cpu/vec/isa_begin.h region (gelu_ffn_avx2.cpp, gelu_ffn_avx512.cpp).
//
// Eager fc2(gelu(fc1(x))) keeps both fc1's output and gelu's for backward,
// and its backward writes gelu_backward's output and sums it for grad_b1 in
// another pass. Here only preact is kept, and the backward's one pass makes
// grad_h, the recomputed activation and grad_b1's partial sums from one read
// of grad_a and preact.
#pragma once

#ifdef FASTTX_ISA
#include <ATen/Dispatch.h>

#include "common/activation.h"
#include "cpu/gelu_ffn_kernels.h"
#include "cpu/vec/io.h"
#include "cpu/vec/math.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

// Column blocks of the backward keep b1's partial slice in L1.
constexpr int64_t kFfnColBlock = 4096;

template <typename T>
void forward_segment(const T* preact, T* act, int64_t len, Activation activation, bool stream) {
  using IO = Io<T>;
  IO::for_each_vector(act, len, [&](int64_t j, int64_t k) {
    IO::store(act + j, activation::forward<VecMath<typename IO::A>>(IO::load(preact + j, k), activation), k, stream);
  });
}

// act may be null: then only grad (and part) are written.
template <typename T>
void act_grad_segment(T* grad, const T* preact, T* act, at::opmath_type<T>* part, int64_t len, Activation activation,
                      bool stream) {
  using IO = Io<T>;
  using Math = VecMath<typename IO::A>;
  IO::for_each_vector(act ? act : grad, len, [&](int64_t j, int64_t k) {
    const auto z = IO::load(preact + j, k);
    const auto d = activation::backward<Math>(IO::load(grad + j, k), z, activation);
    IO::store(grad + j, d, k);
    if (act) IO::store(act + j, activation::forward<Math>(z, activation), k, stream);
    if (part) (IO::V::loadu(part + j, k) + d).store(part + j, k);
  });
}

template <typename T>
void forward_kernel(const T* preact, T* act, int64_t numel, Activation activation) {
  const bool stream = stream_forward_output(numel * int64_t(sizeof(T)));
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t i0, int64_t i1) {
    forward_segment(preact + i0, act + i0, i1 - i0, activation, stream);
    _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
  });
}

// Work item (k, cb): rows of chunk k, columns of block cb, summed into
// part[k] in row order. The tiling is a function of the shape alone, so
// grad_b1 is bitwise reproducible whatever the thread count.
template <typename T>
void backward_kernel(T* grad, const T* preact, T* act, T* db, at::opmath_type<T>* part, int64_t m, int64_t n,
                     int64_t chunks, Activation activation) {
  using A = at::opmath_type<T>;
  const int64_t blocks = (n + kFfnColBlock - 1) / kFfnColBlock;
  const bool stream = stream_backward_output(m * n * int64_t(sizeof(T)));
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t k = w / blocks, cb = w % blocks;
      const int64_t c0 = n * cb / blocks, len = n * (cb + 1) / blocks - c0;
      A* pk = db ? part + k * n + c0 : nullptr;
      if (pk) std::fill(pk, pk + len, A(0));
      for (int64_t r = m * k / chunks; r < m * (k + 1) / chunks; ++r) {
        const int64_t off = r * n + c0;
        act_grad_segment(grad + off, preact + off, act ? act + off : nullptr, pk, len, activation, stream);
      }
    }
    _mm_sfence();  // as in forward_kernel
  });
  if (db) sum_partials(part, chunks, n, db);
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace

void forward(const at::Tensor& preact, const at::Tensor& act, Activation activation) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, preact.scalar_type(), "gelu_ffn_fwd_cpu", [&] {
    forward_kernel(preact.const_data_ptr<scalar_t>(), act.mutable_data_ptr<scalar_t>(), preact.numel(), activation);
  });
}

void backward(const at::Tensor& grad_a, const at::Tensor& preact, const at::Tensor& act, const at::Tensor& grad_b1,
              const at::Tensor& partial, Activation activation) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, preact.scalar_type(), "gelu_ffn_bwd_cpu", [&] {
    backward_kernel(grad_a.mutable_data_ptr<scalar_t>(), preact.const_data_ptr<scalar_t>(),
                    data_or_null<scalar_t>(act), data_or_null<scalar_t>(grad_b1),
                    data_or_null<at::opmath_type<scalar_t>>(partial), preact.size(0), preact.size(1),
                    partial.defined() ? partial.size(0) : 1, activation);
  });
}

const FfnActivationKernels gelu_ffn{&forward, &backward};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
