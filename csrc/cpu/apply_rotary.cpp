// Rotary position embeddings on the CPU (contract in csrc/ops.h): checks,
// allocation, the choice of kernels for this CPU, and the portable kernel for
// CPUs without a vector ISA of ours. The vector kernels are apply_rotary_vec.h.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstring>
#include <type_traits>

#include "cpu/apply_rotary_kernels.h"
#include "cpu/cpu_features.h"

namespace fasttx {
namespace {

const ApplyRotaryKernels* vector_kernels() {
  switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
    case CpuIsa::kAvx512: return &avx512::apply_rotary;
    case CpuIsa::kAvx2: return &avx2::apply_rotary;
#endif
    default: return nullptr;
  }
}

// The pair (a, b) of element j < rot_dim / 2: rotate-half (j, j + rot_dim/2), interleaved (2j, 2j + 1).
template <typename T, typename C>
void portable_row(const T* x, T* y, const C* c, const C* s, const RotaryArgs& a) {
  using A = at::opmath_type<T>;
  const int64_t half = a.rot_dim / 2;
  for (int64_t j = 0; j < half; ++j) {
    const int64_t i0 = a.interleaved ? 2 * j : j, i1 = a.interleaved ? 2 * j + 1 : j + half;
    const A x0 = A(x[i0]), x1 = A(x[i1]);
    const A c0 = A(c[i0]), c1 = A(c[i1]), s0 = A(s[i0]), s1 = A(s[i1]);
    y[i0] = T(a.transpose ? x0 * c0 + x1 * s1 : x0 * c0 - x1 * s0);
    y[i1] = T(a.transpose ? x1 * c1 - x0 * s0 : x1 * c1 + x0 * s1);
  }
  if (a.rot_dim < a.dim) std::memcpy(y + a.rot_dim, x + a.rot_dim, (a.dim - a.rot_dim) * sizeof(T));
}

void run_portable(const RotaryArgs& args, at::ScalarType dtype, bool table_is_float) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "apply_rotary_cpu", [&] {
    auto go = [&](auto table_tag) {
      using C = decltype(table_tag);
      for_each_rotary_row<scalar_t, C>(
          args, [&](const scalar_t* x, scalar_t* y, const C* c, const C* s) { portable_row(x, y, c, s, args); },
          [] {});
    };
    if (table_is_float) go(float{});
    else go(scalar_t{});
  });
}

void check_pair(const char* fn, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, fn, ": q and k must be 4-D (batch, heads, tokens, dim), got shapes ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), fn, ": k of shape ",
              k.sizes(), " must match q ", q.sizes(), " in batch, tokens and dim");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), fn, ": k dtype ", k.scalar_type(), " must match q dtype ",
              q.scalar_type());
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK(t->device().is_cpu(), fn, ": q and k must be CPU tensors");
    TORCH_CHECK(t->size(3) <= 1 || t->numel() == 0 || t->stride(3) == 1, fn,
                ": q and k need a unit stride on the last dim, got strides ",
                t->strides());
  }
}

RotaryArgs make_args(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& out_q,
                     const at::Tensor& out_k, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& position_ids, bool interleaved, bool transpose) {
  const int64_t batch = q.size(0), tokens = q.size(2), dim = q.size(3);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(), fn,
              ": cos and sin must have one shape and dtype, got ", cos.sizes(), " ", cos.scalar_type(), " and ",
              sin.sizes(), " ", sin.scalar_type());
  const bool wide = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() || (wide && cos.scalar_type() == at::kFloat), fn,
              ": cos and sin must have q's dtype (or float32 for 16-bit q), got ", cos.scalar_type(), " for q ",
              q.scalar_type());
  const int64_t rot_dim = cos.size(-1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim >= 2 && rot_dim <= dim, fn,
              ": the rotary dim (cos's last) must be even and in [2, ", dim, "], got ", rot_dim);
  TORCH_CHECK(cos.stride(-1) == 1 && sin.stride(-1) == 1 && cos.device().is_cpu() && sin.device().is_cpu(), fn,
              ": cos and sin must be CPU tensors with a unit stride on the last dim");
  RotaryArgs a{};
  a.rows[0] = {q.const_data_ptr(), out_q.mutable_data_ptr(), q.size(1), q.stride(0), q.stride(1), q.stride(2)};
  a.rows[1] = {k.const_data_ptr(), out_k.mutable_data_ptr(), k.size(1), k.stride(0), k.stride(1), k.stride(2)};
  a.batch = batch, a.tokens = tokens, a.dim = dim, a.rot_dim = rot_dim;
  a.interleaved = interleaved, a.transpose = transpose;
  if (position_ids) {
    const at::Tensor& pos = *position_ids;
    TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 2 && pos.size(0) == batch && pos.size(1) == tokens,
                fn, ": position_ids must be int64 of shape (", batch, ", ", tokens, "), got ", pos.scalar_type(),
                " ", pos.sizes());
    TORCH_CHECK(cos.dim() == 2, fn, ": with position_ids cos and sin are (positions, rot_dim) tables, got ",
                cos.sizes());
    // A serial scan of B*T ids, before any thread reads a table row through them.
    const int64_t* p = pos.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t id = p[b * pos.stride(0) + t * pos.stride(1)];
        TORCH_CHECK(id >= 0 && id < cos.size(0), fn, ": position id ", id, " is outside [0, ", cos.size(0), ")");
      }
    a.pos = p, a.pos_stride_b = pos.stride(0), a.pos_stride_t = pos.stride(1);
    a.cos = {cos.const_data_ptr(), cos.stride(0), 0};
    a.sin = {sin.const_data_ptr(), sin.stride(0), 0};
  } else {
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == batch && cos.size(1) == tokens, fn,
                ": cos and sin must be (", batch, ", ", tokens, ", rot_dim), got ", cos.sizes());
    a.cos = {cos.const_data_ptr(), cos.stride(0), cos.stride(1)};
    a.sin = {sin.const_data_ptr(), sin.stride(0), sin.stride(1)};
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor> rotate(const char* fn, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const std::optional<at::Tensor>& position_ids, bool interleaved,
                                          bool transpose) {
  check_pair(fn, q, k);
  auto out_q = empty_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto out_k = empty_output(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  const RotaryArgs args = make_args(fn, q, k, out_q, out_k, cos, sin, position_ids, interleaved, transpose);
  const bool table_is_float = cos.scalar_type() != q.scalar_type();
  if (const ApplyRotaryKernels* kernels = vector_kernels()) {
    const int64_t bytes = (out_q.numel() + out_k.numel()) * int64_t(q.element_size());
    kernels->run(args, q.scalar_type(), table_is_float,
                 transpose ? stream_backward_output(bytes) : stream_forward_output(bytes));
  } else {
    run_portable(args, q.scalar_type(), table_is_float);
  }
  return {out_q, out_k};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rotary_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const std::optional<at::Tensor>& position_ids,
                                                        bool interleaved) {
  return rotate("apply_rotary_fwd_cpu", q, k, cos, sin, position_ids, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_bwd_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const std::optional<at::Tensor>& position_ids,
                                                        bool interleaved) {
  return rotate("apply_rotary_bwd_cpu", grad_q, grad_k, cos, sin, position_ids, interleaved, true);
}

}  // namespace fasttx
