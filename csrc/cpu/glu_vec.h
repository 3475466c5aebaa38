// glu's elementwise passes in at::vec, for one vector ISA: include this inside
// a cpu/vec/isa_begin.h region (glu_avx2.cpp, glu_avx512.cpp).
//
// Eager act(gate) * up writes act(gate), reads it back for the product, and
// keeps it for backward; its backward runs act's backward and two products,
// four more passes. Here the forward reads gate and up once and writes y once
// (fp32 math, one rounding), and the backward makes both gradients (and, for
// glu_ffn, the recomputed product) from one read of grad, gate and up.
#pragma once

#ifdef FASTTX_ISA
#include <ATen/Dispatch.h>

#include "common/activation.h"
#include "cpu/glu_kernels.h"
#include "cpu/vec/io.h"
#include "cpu/vec/math.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

template <typename T>
void glu_forward_segment(const T* gate, const T* up, T* y, int64_t len, Activation activation, bool stream) {
  using IO = Io<T>;
  using Math = VecMath<typename IO::A>;
  IO::for_each_vector(y, len, [&](int64_t j, int64_t k) {
    const auto a = activation::forward<Math>(IO::load(gate + j, k), activation);
    IO::store(y + j, a * IO::load(up + j, k), k, stream);
  });
}

// prod may be null.
template <typename T>
void glu_backward_segment(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, T* prod, int64_t len,
                          Activation activation, bool stream) {
  using IO = Io<T>;
  using Math = VecMath<typename IO::A>;
  IO::for_each_vector(grad_up, len, [&](int64_t j, int64_t k) {
    const auto g = IO::load(grad + j, k);
    const auto u = IO::load(up + j, k);
    typename IO::V a, da;
    activation::forward_and_grad<Math>(IO::load(gate + j, k), activation, a, da);
    IO::store(grad_gate + j, g * u * da, k);  // may overwrite grad: not streamed, read back by the next GEMM
    IO::store(grad_up + j, g * a, k, stream);
    if (prod) IO::store(prod + j, a * u, k, stream);
  });
}

// Equal contiguous shares per thread; each also first-touches its part of the fresh outputs.
template <typename T>
void glu_forward_kernel(const T* gate, const T* up, T* y, int64_t numel, Activation activation) {
  const bool stream = stream_forward_output(numel * int64_t(sizeof(T)));
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t i0, int64_t i1) {
    glu_forward_segment(gate + i0, up + i0, y + i0, i1 - i0, activation, stream);
    _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
  });
}

template <typename T>
void glu_backward_kernel(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, T* prod, int64_t numel,
                         Activation activation) {
  const bool stream = stream_backward_output(numel * int64_t(sizeof(T)));
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE / 2, [&](int64_t i0, int64_t i1) {
    glu_backward_segment(grad + i0, gate + i0, up + i0, grad_gate + i0, grad_up + i0, prod ? prod + i0 : nullptr,
                         i1 - i0, activation, stream);
    _mm_sfence();  // as in glu_forward_kernel
  });
}

}  // namespace

void glu_forward(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& y, Activation activation) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "glu_fwd_cpu", [&] {
    glu_forward_kernel(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                       gate.numel(), activation);
  });
}

void glu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& grad_gate,
                  const at::Tensor& grad_up, const at::Tensor& prod, Activation activation) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "glu_bwd_cpu", [&] {
    glu_backward_kernel(grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                        grad_gate.mutable_data_ptr<scalar_t>(), grad_up.mutable_data_ptr<scalar_t>(),
                        prod.defined() ? prod.mutable_data_ptr<scalar_t>() : nullptr, gate.numel(), activation);
  });
}

const GluKernels glu{&glu_forward, &glu_backward};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
