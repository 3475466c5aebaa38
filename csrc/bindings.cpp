// The Python face of fasttx._C: plain functions, one pair per op and device.
// Dispatch, autograd and torch.library registration live in fasttx/ops.
#include "ops.h"

#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "cpu/block_gemm.h"
#include "cpu/matmul.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttx C++/CUDA kernels";
#ifdef FASTTX_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  // The torch whose headers built this module: fasttx/extension.py refuses to use it under another.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
  m.def("bias_gelu_fwd_cpu", &fasttx::bias_gelu_fwd_cpu, "gelu(x + bias), CPU");
  m.def("bias_gelu_bwd_cpu", &fasttx::bias_gelu_bwd_cpu, "bias_gelu backward, CPU");
  m.def("layer_norm_fwd_cpu", &fasttx::layer_norm_fwd_cpu, "layer/rms/add-layer norm forward, CPU");
  m.def("layer_norm_bwd_cpu", &fasttx::layer_norm_bwd_cpu, "layer/rms/add-layer norm backward, CPU");
  m.def("norm_eager_cpu", &fasttx::norm_eager_cpu, "the norm family with autograd, plain eager CPU calls only",
        py::arg("x"), py::arg("residual"), py::arg("normalized_shape"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("rms"), py::arg("out_dtype") = py::none());
  m.def("linear_weight_grad_cpu", &fasttx::linear_weight_grad_cpu, "grad_out^T x, a linear's weight grad, CPU");
  m.def("linear_fwd_cpu", &fasttx::linear_fwd_cpu, "x w^T + b on fasttx's CPU GEMM choice");
  m.def("linear_bwd_cpu", &fasttx::linear_bwd_cpu, "linear backward on fasttx's CPU GEMM choice");
  m.def("onednn_fp32_gemm_enabled", &fasttx::onednn_fp32_gemm_enabled,
        "whether fasttx's CPU linears run fp32 GEMMs on oneDNN (cpu/matmul.h)");
  m.def("set_onednn_fp32_gemm_enabled", &fasttx::set_onednn_fp32_gemm_enabled,
        "the tests' switch between oneDNN and BLAS; returns the old setting");
  m.def("gelu_ffn_fwd_cpu", &fasttx::gelu_ffn_fwd_cpu, "act(x w1^T + b1) w2^T + b2, CPU");
  m.def("gelu_ffn_bwd_cpu", &fasttx::gelu_ffn_bwd_cpu, "gelu_ffn backward, CPU");
  m.def("glu_fwd_cpu", &fasttx::glu_fwd_cpu, "act(gate) * up, CPU");
  m.def("glu_bwd_cpu", &fasttx::glu_bwd_cpu, "glu backward, CPU");
  m.def("glu_ffn_fwd_cpu", &fasttx::glu_ffn_fwd_cpu, "(act(x w_gate^T + b) * (x w_up^T + b)) w_down^T + b, CPU");
  m.def("glu_ffn_bwd_cpu", &fasttx::glu_ffn_bwd_cpu, "glu_ffn backward, CPU");
  m.def("attention_fwd_cpu", &fasttx::attention_fwd_cpu, "flash attention forward, CPU");
  m.def("attention_bwd_cpu", &fasttx::attention_bwd_cpu, "flash attention backward, CPU");
  m.def("softmax_fwd_cpu", &fasttx::softmax_fwd_cpu, "scaled masked softmax forward, CPU");
  m.def("softmax_bwd_cpu", &fasttx::softmax_bwd_cpu, "scaled masked softmax backward, CPU");
  m.def("cross_entropy_fwd_cpu", &fasttx::cross_entropy_fwd_cpu, "cross-entropy over logits rows forward, CPU");
  m.def("cross_entropy_bwd_cpu", &fasttx::cross_entropy_bwd_cpu, "cross-entropy over logits rows backward, CPU");
  m.def("apply_rotary_fwd_cpu", &fasttx::apply_rotary_fwd_cpu, "rotary position embeddings on q and k, CPU");
  m.def("apply_rotary_bwd_cpu", &fasttx::apply_rotary_bwd_cpu, "apply_rotary backward, CPU");
  m.def("linear_cross_entropy_rows_cpu", &fasttx::linear_cross_entropy_rows_cpu,
        "linear_cross_entropy's row kernel over a chunk of logits, CPU");
  m.def("linear_cross_entropy_gemm_cpu", &fasttx::linear_cross_entropy_gemm_cpu,
        "out (+)= a @ b on fasttx's CPU GEMM choice, for linear_cross_entropy's chunks");
  // For the tests: whether CPU attention takes our block GEMMs (cpu/block_gemm.h), and a switch to BLAS.
  m.def("block_gemm_available", &fasttx::block_gemm_available, "our fp32 block GEMMs in use for fp32 attention");
  m.def("bf16_block_gemm_available", &fasttx::bf16_block_gemm_available,
        "our AVX512-BF16 block GEMMs in use for bf16 attention");
  m.def("set_block_gemm_enabled", &fasttx::set_block_gemm_enabled,
        "enable or disable both; returns the old setting");
  m.def("bf16_brgemm_available", &fasttx::bf16_brgemm_available, "oneDNN's brgemm in use for bf16 attention");
  m.def("set_bf16_brgemm_enabled", &fasttx::set_bf16_brgemm_enabled,
        "enable or disable it; returns the old setting");
#ifdef FASTTX_WITH_CUDA
  m.def("bias_gelu_fwd_cuda", &fasttx::bias_gelu_fwd_cuda, "gelu(x + bias), CUDA");
  m.def("bias_gelu_bwd_cuda", &fasttx::bias_gelu_bwd_cuda, "bias_gelu backward, CUDA");
  m.def("layer_norm_fwd_cuda", &fasttx::layer_norm_fwd_cuda, "layer/rms/add-layer norm forward, CUDA");
  m.def("layer_norm_bwd_cuda", &fasttx::layer_norm_bwd_cuda, "layer/rms/add-layer norm backward, CUDA");
  m.def("gelu_ffn_fwd_cuda", &fasttx::gelu_ffn_fwd_cuda, "act(x w1^T + b1) w2^T + b2, cuBLASLt");
  m.def("gelu_ffn_bwd_cuda", &fasttx::gelu_ffn_bwd_cuda, "gelu_ffn backward, cuBLASLt");
  m.def("glu_fwd_cuda", &fasttx::glu_fwd_cuda, "act(gate) * up, CUDA");
  m.def("glu_bwd_cuda", &fasttx::glu_bwd_cuda, "glu backward, CUDA");
  m.def("glu_ffn_fwd_cuda", &fasttx::glu_ffn_fwd_cuda, "glu_ffn forward, cuBLASLt + a fused glu pass");
  m.def("glu_ffn_bwd_cuda", &fasttx::glu_ffn_bwd_cuda, "glu_ffn backward, cuBLASLt + a fused glu pass");
  m.def("attention_fwd_cuda", &fasttx::attention_fwd_cuda, "attention forward: cuBLAS GEMMs + fused softmax, CUDA");
  m.def("attention_bwd_cuda", &fasttx::attention_bwd_cuda, "attention backward: cuBLAS GEMMs + fused softmax, CUDA");
  m.def("softmax_fwd_cuda", &fasttx::softmax_fwd_cuda, "scaled masked softmax forward, CUDA");
  m.def("softmax_bwd_cuda", &fasttx::softmax_bwd_cuda, "scaled masked softmax backward, CUDA");
  m.def("cross_entropy_fwd_cuda", &fasttx::cross_entropy_fwd_cuda, "cross-entropy over logits rows forward, CUDA");
  m.def("cross_entropy_bwd_cuda", &fasttx::cross_entropy_bwd_cuda, "cross-entropy over logits rows backward, CUDA");
  m.def("apply_rotary_fwd_cuda", &fasttx::apply_rotary_fwd_cuda, "rotary position embeddings on q and k, CUDA");
  m.def("apply_rotary_bwd_cuda", &fasttx::apply_rotary_bwd_cuda, "apply_rotary backward, CUDA");
  m.def("linear_cross_entropy_rows_cuda", &fasttx::linear_cross_entropy_rows_cuda,
        "linear_cross_entropy's row kernel over a chunk of logits, CUDA");
#endif
}
