// linear_cross_entropy's vectorized row kernel, compiled once per ISA
// (linear_cross_entropy_avx2.cpp, linear_cross_entropy_avx512.cpp from
// linear_cross_entropy_vec.h) and chosen at run time by
// linear_cross_entropy.cpp, which keeps a portable loop for fp64 and for CPUs
// below AVX2.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fasttx {

struct LinearCrossEntropyRowKernels {
  // The contract of linear_cross_entropy_rows_cpu (csrc/ops.h) for float, bf16 and fp16 logits, checked
  // already: loss and lse are fp32 (rows,), grad_rows null or fp32 (rows,); cap = 0 means no softcap.
  void (*rows)(const at::Tensor& logits, const int64_t* target, const float* grad_rows, int64_t ignore_index,
               float eps, float cap, float* loss, float* lse);
};

namespace avx2 { extern const LinearCrossEntropyRowKernels linear_cross_entropy_rows; }
namespace avx512 { extern const LinearCrossEntropyRowKernels linear_cross_entropy_rows; }

}  // namespace fasttx
