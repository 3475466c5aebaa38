// The GEMMs of fasttx's CPU linears (cpu/linear.cpp, cpu/gelu_ffn.cpp,
// cpu/linear_weight_grad.cpp): ATen's BLAS (MKL) or oneDNN's matmul,
// chosen per machine.
//
// Why: ATen sends fp32 at::mm to MKL, whose AVX-512 kernels run on Intel CPUs
// only. On 2 cores of an AMD EPYC (Zen 5, AVX-512) MKL ran the reference
// GPT's linears (2048 tokens, 384 <-> 1536) at 160-180 GFLOP/s in every
// orientation, and oneDNN's matmul, which ATen already links, at 290-365.
// Cut into chunks of the reduction, so that it is as accurate as MKL (see
// cpu/matmul.cpp), forward (bias included) and both gradients of each of
// those linears ran 1.4-2.0x as fast as on MKL. bf16 and half already go to
// oneDNN inside at::mm.
//
// FASTTX_CPU_GEMM=onednn|blas overrides the default (oneDNN for fp32 where
// the CPU is not Intel's and ATen runs its AVX-512 kernels, BLAS elsewhere);
// a bad value raises on first use. torch.backends.mkldnn.enabled = False
// means BLAS.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fasttx {

// Whether fp32 GEMMs below go to oneDNN (the machine's default, the
// environment variable or the tests' switch).
bool onednn_fp32_gemm_enabled();
// The tests' switch. Returns the previous setting.
bool set_onednn_fp32_gemm_enabled(bool enabled);

// out = a @ b, or out += a @ b when accumulate. 2-D operands, any of them a
// transposed view; out contiguous.
at::Tensor& gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);
// out = a @ b + bias (broadcast over rows), bias of out's dtype, taken in as
// the GEMM's accumulated C as at::addmm does (so bf16 is rounded once; fp32 on
// oneDNN adds each reduction chunk to it in turn).
at::Tensor& gemm_bias_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias);

}  // namespace fasttx
