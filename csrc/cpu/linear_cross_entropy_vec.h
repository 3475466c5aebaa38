// linear_cross_entropy's row kernel in at::vec, for one vector ISA: include
// this inside a cpu/vec/isa_begin.h region (linear_cross_entropy_avx2.cpp,
// linear_cross_entropy_avx512.cpp). The formulas are linear_cross_entropy.cpp's.
//
// A row of a chunk's logits (V of them, 64 KiB in bf16 at V 32000) is read
// once into an fp32 buffer, softcapped, with its max; a second pass over that
// L2-resident buffer takes exp(z - max) and its sum in place; a third writes
// the gradient over the logits. The scalar loops these replace converted and
// rounded bf16 one element at a time: 80 ms of a bf16 Llama step's 2 s.
#pragma once

#ifdef FASTTX_ISA
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/linear_cross_entropy_kernels.h"
#include "cpu/vec/io.h"
#include "cpu/vec/math.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

using Vf = at::vec::Vectorized<float>;

template <typename T>
void lce_rows_kernel(T* x, const int64_t* target, const float* grad_rows, int64_t ignore_index, float eps, float cap,
                     int64_t rows, int64_t vocab, float* loss, float* lse) {
  using IO = Io<T>;
  using Math = VecMath<float>;
  constexpr int64_t W = IO::W;
  const bool softcap = cap > 0.0f;
  const float inv_cap = softcap ? 1.0f / cap : 0.0f;
  const float smooth = eps / float(vocab);
  const Vf neg_inf(-std::numeric_limits<float>::infinity()), zero(0.0f), vcap(cap), vinv_cap(inv_cap), one(1.0f);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    // z: the softcapped row, then (without softcap) its exps; e: the exps where z must outlive them.
    std::vector<float> z(vocab), e_own(softcap ? vocab : 0);
    float* e = softcap ? e_own.data() : z.data();
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * vocab;
      const int64_t t = target[r];
      TORCH_CHECK(t == ignore_index || (t >= 0 && t < vocab), "linear_cross_entropy: target[", r, "] = ", t,
                  " is not a class index in [0, ", vocab, ") nor ignore_index (", ignore_index, ")");
      const bool ignored = t == ignore_index;
      Vf vmax = neg_inf;
      for (int64_t j = 0; j < vocab; j += W) {
        const int64_t k = std::min(W, vocab - j);
        Vf v = IO::load(xr + j, k);
        if (softcap) v = vcap * Math::tanh(v * vinv_cap);
        v.store(z.data() + j, k);
        vmax = at::vec::maximum(vmax, k == W ? v : Vf::set(neg_inf, v, k));
      }
      const float max = lane_max(vmax);
      const float z_t = ignored ? 0.0f : z[t];
      const bool keep_exps = grad_rows != nullptr && !ignored;
      const Vf vm(max);
      Vf sum = zero, gap = zero;  // sum of exp(z - max), and of max - z for label smoothing
      for (int64_t j = 0; j < vocab; j += W) {
        const int64_t k = std::min(W, vocab - j);
        const Vf v = Vf::loadu(z.data() + j, k);
        Vf ev = Math::exp(v - vm);
        Vf gv = vm - v;
        if (k < W) {
          ev = Vf::set(zero, ev, k);
          gv = Vf::set(zero, gv, k);
        }
        if (keep_exps) ev.store(e + j, k);
        sum = sum + ev;
        if (eps != 0.0f) gap = gap + gv;
      }
      const float total = lane_add(sum);
      const float log_sum = std::log(total);
      lse[r] = max + log_sum;
      loss[r] = ignored ? 0.0f : (1.0f - eps) * (max - z_t) + log_sum + (eps != 0.0f ? smooth * lane_add(gap) : 0.0f);
      if (grad_rows == nullptr) continue;
      if (ignored) {
        std::fill(xr, xr + vocab, T(0));
        continue;
      }
      const float g = grad_rows[r];
      const float p_scale = g / total, shift = g * smooth;
      const Vf vp(p_scale), vshift(shift);
      for (int64_t j = 0; j < vocab; j += W) {
        const int64_t k = std::min(W, vocab - j);
        Vf d = Vf::loadu(e + j, k) * vp - vshift;
        if (softcap) {
          const Vf u = Vf::loadu(z.data() + j, k) * vinv_cap;
          d = d * (one - u * u);
        }
        IO::store(xr + j, d, k);
      }
      float d_t = e[t] * p_scale - shift - g * (1.0f - eps);
      if (softcap) {
        const float u = z[t] * inv_cap;
        d_t *= 1.0f - u * u;
      }
      xr[t] = T(d_t);
    }
  });
}

void rows(const at::Tensor& logits, const int64_t* target, const float* grad_rows, int64_t ignore_index, float eps,
          float cap, float* loss, float* lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "linear_cross_entropy_rows_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "linear_cross_entropy_rows_cpu: the vector kernel takes no float64 (the portable loop does)");
    } else {
      lce_rows_kernel(logits.mutable_data_ptr<scalar_t>(), target, grad_rows, ignore_index, eps, cap, logits.size(0),
                      logits.size(1), loss, lse);
    }
  });
}

}  // namespace

extern const LinearCrossEntropyRowKernels linear_cross_entropy_rows{&rows};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
