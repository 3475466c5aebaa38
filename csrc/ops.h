// Declarations of every kernel entry point the Python layer calls through
// fasttx._C. Each backend file (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu)
// defines its own; bindings.cpp exposes them.
//
// Contract shared by all entry points: inputs arrive validated and
// contiguous from fasttx/ops (dtype, shape and device checks happen there
// and again here with TORCH_CHECK as a last line of defence).
#pragma once

// Only the Tensor type: torch/extension.h (Python, pybind11) would triple nvcc's
// compile time, and only bindings.cpp needs it.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace fasttx {

// bias_gelu: y = gelu(x + bias) over the last dim. x is (M, N) contiguous,
// bias is (N,), approximate is 0 (erf) or 1 (tanh). The backward returns
// (grad_x, grad_bias); grad_bias is reduced in fp32 in a fixed order so that
// it is bitwise deterministic.
at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, int64_t approximate);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& bias, int64_t approximate);
#ifdef FASTTX_WITH_CUDA
at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const at::Tensor& bias, int64_t approximate);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& bias, int64_t approximate);
#endif

}  // namespace fasttx
