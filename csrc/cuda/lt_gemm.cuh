// cuBLASLt GEMMs with epilogues, and the deterministic column sums behind
// them, for the FFN ops (gelu_ffn.cu, glu_ffn.cu). Moved out of gelu_ffn.cu
// unchanged, so both ops issue their GEMMs the same way. Internal linkage:
// each .cu includes its own copy.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDADataType.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>

namespace fasttx {
namespace {

constexpr int kThreads = 256;
// The first column_sum pass aims at about a wave of blocks on a large GPU. The
// row chunks follow from (M, N) alone, so the sum is the same on every GPU.
constexpr int64_t kColumnSumBlocks = 1024;

// out[c, j] = the sum of in[r, j] over the rows r of chunk c (gridDim.y chunks
// of rows_per_chunk rows), in increasing r, in fp32. Run twice, rows (M, n) of T
// into fp32 partials and then the partials into one bias-gradient row: a fixed
// order both times, so the sum is deterministic. Reads are coalesced across j.
template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(Out* __restrict__ out, const In* __restrict__ in, int64_t rows, int64_t n,
                      int64_t rows_per_chunk) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t end = std::min(rows, begin + rows_per_chunk);
  float s = 0;
  for (int64_t r = begin; r < end; ++r) s += float(in[r * n + j]);
  out[int64_t(blockIdx.y) * n + j] = Out(s);
}

// Blocks in one wave of `kernel` on `device`: the grid-stride kernels need no more.
template <typename Kernel>
int64_t wave(Kernel kernel, int device) {
  int sms = 0, blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  return int64_t(sms) * blocks_per_sm;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The dtypes cuBLASLt multiplies here with CUBLAS_COMPUTE_32F.
#define FASTTX_DISPATCH_FFN_TYPES(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// grad_bias[j] = the sum over rows of rows[:, j], for when cuBLASLt declines BGRADB.
void column_sum(const at::Tensor& grad_bias, const at::Tensor& rows) {
  const int64_t m = rows.size(0), n = rows.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto col_blocks = (n + kThreads - 1) / kThreads;
  FASTTX_DISPATCH_FFN_TYPES(rows.scalar_type(), "gelu_ffn_column_sum", [&] {
    const int64_t chunks_wanted = std::clamp<int64_t>(kColumnSumBlocks / col_blocks, 1, m);
    const int64_t rows_per_chunk = (m + chunks_wanted - 1) / chunks_wanted;
    const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
    auto partial = at::empty({chunks, n}, rows.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
    column_sum_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
        partial.mutable_data_ptr<float>(), rows.const_data_ptr<scalar_t>(), m, n, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_sum_kernel<float, scalar_t><<<dim3(static_cast<unsigned>(col_blocks), 1), kThreads, 0, stream>>>(
        grad_bias.mutable_data_ptr<scalar_t>(), partial.const_data_ptr<float>(), chunks, n, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// cuBLASLt is column-major. A contiguous row-major (r, c) tensor X, read
// column-major, is the (c, r) matrix X' = X^T with ld = c, so Y = A B is issued
// as Y' = B' A' with no copy, and a torch-side transpose becomes an op on the
// prime. The GEMMs (m x n x k, ops on the primes):
//   preact' = w1'^T x'         (H x M x D,  T N)    out'    = w2'^T a'      (D2 x M x H, T N)
//   grad_a' = w2' grad_out'    (H x M x D2, N N)    grad_x' = w1' grad_h'   (D x M x H,  N N)
//   grad_w2' = a' grad_out'^T  (H x D2 x M, N T)    grad_w1' = x' grad_h'^T (D x H x M,  N T)
// A bias epilogue runs along the m rows of the output, which are each Linear's
// output features, and BGRADB sums B over k: a row-major (M, n) operand over its M rows.
struct Gemm {
  cublasOperation_t op_a, op_b;
  int64_t m, n, k;
  const void* a;  // m x k (ld m) for N, stored k x m (ld k) for T
  const void* b;  // k x n (ld k) for N, stored n x k (ld n) for T
  void* d;        // m x n, ld m
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  void* bias = nullptr;  // read by BIAS epilogues, written by BGRAD ones
  void* aux = nullptr;   // preact, m x n, ld m: written by GELU_AUX, read by DGELU
  bool accumulate = false;  // d += op(a) op(b)
};

template <auto Destroy>
struct Destroyer {
  template <typename P>
  void operator()(P p) const { Destroy(p); }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, Destroyer<cublasLtMatmulDescDestroy>>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, Destroyer<cublasLtMatrixLayoutDestroy>>;
using Preference =
    std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, Destroyer<cublasLtMatmulPreferenceDestroy>>;

template <typename V>
void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}
template <typename V>
void set(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

Layout layout(cudaDataType type, int64_t rows, int64_t cols) {
  cublasLtMatrixLayout_t l = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, rows, cols, rows));
  return Layout(l);
}

// The largest power of two (up to 256) dividing p: tells the heuristic which kernels may vector-load.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return static_cast<uint32_t>(std::min<uintptr_t>(a & (~a + 1), 256));
}

// The cuBLASLt state of one gelu_ffn or glu_ffn call: x's dtype, the current stream's
// handle, and one workspace from the caching allocator for all of its GEMMs
// (they run in order on that stream).
class Lt {
 public:
  explicit Lt(const at::Tensor& x)
      : handle_(at::cuda::getCurrentCUDABlasLtHandle()),
        stream_(at::cuda::getCurrentCUDAStream()),
        dtype_(x.scalar_type()),
        type_(at::cuda::ScalarTypeToCudaDataType(dtype_)),
        workspace_(at::empty({int64_t(at::cuda::getCUDABlasLtWorkspaceSize())}, x.options().dtype(at::kByte))) {}

  // Runs g and returns true, or returns false having done nothing when no
  // cuBLASLt algorithm takes this GEMM with these pointers (the heuristic
  // checks the bias and aux alignment).
  bool try_gemm(const Gemm& g) const {
    cublasLtMatmulDesc_t raw_desc = nullptr;
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const MatmulDesc desc(raw_desc);
    set(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, int32_t(g.op_a));
    set(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, int32_t(g.op_b));
    set(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t(g.epilogue));
    if (g.bias != nullptr) set(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    if (g.aux != nullptr) {
      set(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
      set(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.m);
    }
    const Layout a = g.op_a == CUBLAS_OP_N ? layout(type_, g.m, g.k) : layout(type_, g.k, g.m);
    const Layout b = g.op_b == CUBLAS_OP_N ? layout(type_, g.k, g.n) : layout(type_, g.n, g.k);
    const Layout d = layout(type_, g.m, g.n);

    cublasLtMatmulPreference_t raw_pref = nullptr;
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
    const Preference pref(raw_pref);
    set(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t(workspace_.numel()));
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(g.a));
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(g.b));
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(g.d));
    set(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(g.d));

    cublasLtMatmulHeuristicResult_t heuristic = {};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle_, raw_desc, a.get(), b.get(), d.get(),
                                                                 d.get(), raw_pref, 1, &heuristic, &found);
    // A declined epilogue (NOT_SUPPORTED or INVALID_VALUE) is the caller's cue
    // to fall back; a plain GEMM has no fallback, so its status is reported.
    if (g.epilogue == CUBLASLT_EPILOGUE_DEFAULT) TORCH_CUDABLAS_CHECK(status);
    if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
    const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
    TORCH_CUDABLAS_CHECK(cublasLtMatmul(handle_, raw_desc, &alpha, g.a, a.get(), g.b, b.get(), &beta, g.d,
                                        d.get(), g.d, d.get(), &heuristic.algo, workspace_.data_ptr(),
                                        workspace_.numel(), stream_));
    return true;
  }

  void gemm(const Gemm& g) const {
    TORCH_CHECK(try_gemm(g), "fasttx: cuBLASLt found no algorithm for an ", g.m, " x ", g.n, " x ", g.k,
                " GEMM in ", dtype_);
  }

  // d = op(a) op(b) + bias along d's rows (bias optional), where d is g.d as
  // the row-major (n, m) tensor. An unaligned bias the BIAS epilogue declines
  // is broadcast into d first and accumulated onto, still rounded once.
  void gemm_bias(Gemm g, const at::Tensor& d, const std::optional<at::Tensor>& bias) const {
    if (bias.has_value()) {
      g.epilogue = CUBLASLT_EPILOGUE_BIAS;
      g.bias = bias->data_ptr();
      if (try_gemm(g)) return;
      d.copy_(bias->expand_as(d));
      g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      g.bias = nullptr;
      g.accumulate = true;
    }
    gemm(g);
  }

  // A weight gradient whose B operand is the row-major (M, n) `rows`, with the
  // bias gradient (rows summed over M) from BGRADB when grad_bias is defined,
  // or from column_sum when cuBLASLt declines that epilogue.
  void weight_grad(Gemm g, const at::Tensor& rows, const at::Tensor& grad_bias) const {
    if (grad_bias.defined()) {
      g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
      g.bias = grad_bias.data_ptr();
      if (try_gemm(g)) return;
      column_sum(grad_bias, rows);
      g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      g.bias = nullptr;
    }
    gemm(g);
  }

 private:
  cublasLtHandle_t handle_;
  cudaStream_t stream_;
  at::ScalarType dtype_;
  cudaDataType type_;
  at::Tensor workspace_;
};

}  // namespace
}  // namespace fasttx
