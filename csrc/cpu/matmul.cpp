// See cpu/matmul.h.
#include "cpu/matmul.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_features.h"

// ATen's oneDNN matmul: result = beta * result + alpha * mat1 @ mat2, exported
// by libtorch_cpu (TORCH_API) though its header, ATen/native/mkldnn/Matmul.h,
// is not installed. torch is pinned (setup.py), and the tests run it.
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha);
}

namespace fasttx {
namespace {

bool onednn_by_default() {
  const char* v = std::getenv("FASTTX_CPU_GEMM");
  if (v && *v) {
    if (std::strcmp(v, "onednn") == 0) return true;
    if (std::strcmp(v, "blas") == 0) return false;
    TORCH_CHECK(false, "FASTTX_CPU_GEMM must be 'onednn' or 'blas', got '", v, "'");
  }
  return cpu_isa() == CpuIsa::kAvx512 && !cpu_is_intel();
}

// Decided on first use, so that a bad FASTTX_CPU_GEMM raises there, not at load time.
std::atomic<bool>& onednn_enabled() {
  static std::atomic<bool> enabled{onednn_by_default()};
  return enabled;
}

// oneDNN takes each 2-D operand row-major or as a transposed view of one
// (anything else it copies first).
bool row_or_column_major(const at::Tensor& t) {
  return t.dim() == 2 && (t.stride(1) == 1 || t.stride(0) == 1);
}

// Skinny products stay with BLAS: they are cheap either way, and through
// torch 2.14.1's mkldnn_matmul a 1-row product with k >= 3072, n = 768 and B
// transposed corrupted the heap (glibc aborted: "double free or corruption");
// every shape tried with all three sizes >= 2 was right (tests/test_linear.py).
constexpr int64_t kMinOnednnSize = 16;

bool onednn_serves(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
         a.dim() == 2 && b.dim() == 2 && std::min({a.size(0), a.size(1), b.size(1)}) >= kMinOnednnSize &&
         out.is_contiguous() && row_or_column_major(a) && row_or_column_major(b) && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn() && onednn_fp32_gemm_enabled();
}

// out (+)= a @ b on oneDNN, the reduction cut into chunks of kChain, each
// added into out. oneDNN sums long reductions in one register chain: with
// k = 384-3072 its max error was 1.5-4x MKL's (which blocks k) on random
// (2048 x k) x (k x 768) products. In chunks of 256 it was 0.9-1.4x MKL's
// (of 128, 0.6-1.0x, but the GPT's training step ran 7% slower than with
// 256; of 64, 15% slower).
// A chunk of columns of a row-major a (or of rows of a column-major b) is a
// strided view, which ATen copies into oneDNN's layout as it is used: in the
// GPT's training step that ran 3% faster than packing all chunks up front.
constexpr int64_t kChain = 256;

void onednn_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t k = a.size(1);
  for (int64_t k0 = 0; k0 < k; k0 += kChain) {
    const int64_t n = std::min(kChain, k - k0);
    at::native::mkldnn_matmul(a.narrow(1, k0, n), b.narrow(0, k0, n), out, accumulate || k0 > 0 ? 1.f : 0.f, 1.f);
  }
}

}  // namespace

bool onednn_fp32_gemm_enabled() { return onednn_enabled().load(std::memory_order_relaxed); }

bool set_onednn_fp32_gemm_enabled(bool enabled) { return onednn_enabled().exchange(enabled); }

at::Tensor& gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (onednn_serves(out, a, b)) {
    onednn_gemm(out, a, b, accumulate);
    return out;
  }
  if (accumulate) return out.addmm_(a, b);
  return at::mm_out(out, a, b);
}

at::Tensor& gemm_bias_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias) {
  if (!bias) return gemm_out(out, a, b);
  if (onednn_serves(out, a, b)) {
    // The bias as the accumulated C, as BLAS's beta = 1 takes it in at::addmm.
    out.copy_(bias->expand_as(out));
    onednn_gemm(out, a, b, /*accumulate=*/true);
    return out;
  }
  return at::addmm_out(out, *bias, a, b);
}

}  // namespace fasttx
