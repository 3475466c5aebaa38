// gelu_ffn on CUDA: out = act(x w1^T + b1) w2^T + b2 and its backward, on
// cuBLASLt (the contract is gelu_ffn_fwd_cpu / gelu_ffn_bwd_cpu in csrc/ops.h).
//
// The GEMMs are the work. What is left is to cross the (M, H) hidden
// activations as few times as possible, so the rest rides in GEMM epilogues:
//  - cuBLASLt's GELU is the tanh approximation, so for gelu_tanh in bf16 the
//    first GEMM writes act(preact) and preact at once (GELU_AUX_BIAS), and the
//    backward's grad_out w2 GEMM applies gelu'(preact) and sums grad_b1
//    (DGELU_BGRAD); fp16 and fp32 take the pass below (gelu_epilogue_fits);
//  - gelu (erf) and relu have no cuBLASLt epilogue that also keeps preact, so
//    the GEMM adds the bias (BIAS) and one elementwise pass of 16-byte packs
//    applies act or act' with csrc/common/activation.h, the arithmetic the CPU
//    tests check;
//  - bias gradients are column sums of a weight-gradient GEMM's B operand, which
//    its epilogue produces for free (BGRADB);
//  - when cuBLASLt declines an epilogue (aux ld not a multiple of 8, a bias it
//    cannot read at that alignment), the plain GEMM and fasttx kernels produce
//    the same result instead of failing.
// No fasttx reduction uses atomics, and cuBLAS documents its results as bitwise
// reproducible for a given version, GPU architecture and SM count, so the
// backward is deterministic run to run.
#include "common/activation.h"
#include "ops.h"
#include "cuda/cuda_math.cuh"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDADataType.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

namespace fasttx {
namespace {

constexpr int kThreads = 256;
// The first column_sum pass aims at about a wave of blocks on a large GPU. The
// row chunks follow from (M, N) alone, so the sum is the same on every GPU.
constexpr int64_t kColumnSumBlocks = 1024;

// y = act(z) over a flat array of n_vec packs.
template <typename T, int VEC, Activation A>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(T* __restrict__ y, const T* __restrict__ z, int64_t n_vec) {
  using Acc = at::opmath_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const Pack<T, VEC> in = load<T, VEC>(z + i * VEC);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = T(activation::forward<CudaMath>(Acc(in.v[k]), A));
    store<T, VEC>(y + i * VEC, out);
  }
}

// grad *= act'(z), in place: grad_a becomes grad_h without a second (M, H) buffer.
template <typename T, int VEC, Activation A>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(T* __restrict__ grad, const T* __restrict__ z, int64_t n_vec) {
  using Acc = at::opmath_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const Pack<T, VEC> in = load<T, VEC>(z + i * VEC);
    Pack<T, VEC> g = load<T, VEC>(grad + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g.v[k] = T(activation::backward<CudaMath>(Acc(g.v[k]), Acc(in.v[k]), A));
    store<T, VEC>(grad + i * VEC, g);
  }
}

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

// Calls f(std::integral_constant<Activation, act>), so each kernel is compiled
// per activation with no runtime branching.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kGeluTanh: f(std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
    case Activation::kRelu: f(std::integral_constant<Activation, Activation::kRelu>{}); break;
    default: f(std::integral_constant<Activation, Activation::kGelu>{}); break;
  }
}

// The dtypes cuBLASLt multiplies here with CUBLAS_COMPUTE_32F.
#define FASTTX_DISPATCH_FFN_TYPES(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// out = act(z) when forward, else out *= act'(z); out and z are (M, H)
// contiguous, so the pass is flat and vectorizes whenever M H and the pointers allow.
void activation_pass(const at::Tensor& out, const at::Tensor& z, Activation act, bool forward) {
  FASTTX_DISPATCH_FFN_TYPES(z.scalar_type(), "gelu_ffn_activation", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* op = out.mutable_data_ptr<scalar_t>();
    const auto* zp = z.const_data_ptr<scalar_t>();
    const bool vectorized = z.numel() % kVec == 0 && aligned16(op) && aligned16(zp);
    with_activation(act, [&](auto a) {
      auto launch = [&](auto kernel, int vec) {
        const int64_t n_vec = z.numel() / vec;
        const int64_t blocks = std::min((n_vec + kThreads - 1) / kThreads, wave(kernel, z.get_device()));
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, zp, n_vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      constexpr Activation A = decltype(a)::value;
      if (forward && vectorized) {
        launch(activation_forward_kernel<scalar_t, kVec, A>, kVec);
      } else if (forward) {
        launch(activation_forward_kernel<scalar_t, 1, A>, 1);
      } else if (vectorized) {
        launch(activation_backward_kernel<scalar_t, kVec, A>, kVec);
      } else {
        launch(activation_backward_kernel<scalar_t, 1, A>, 1);
      }
    });
  });
}

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

// The cuBLASLt state of one gelu_ffn call: x's dtype, the current stream's
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
    TORCH_CHECK(try_gemm(g), "gelu_ffn: cuBLASLt found no algorithm for an ", g.m, " x ", g.n, " x ", g.k,
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

// cuBLASLt's GELU aux matrix (preact here, ld H) needs an ld divisible by 8. Its GELU's accuracy is
// not documented, so the epilogues serve bf16 only, where even tanh.approx's 2^-11 relative error
// stays under half an output ulp (2^-9); fp16 (ulp 2^-11) and fp32 take the accurate activation pass.
bool gelu_epilogue_fits(Activation act, int64_t h, at::ScalarType dtype) {
  return act == Activation::kGeluTanh && h % 8 == 0 && dtype == at::kBFloat16;
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected && t.is_contiguous(), fn, ": ", name, " must be contiguous of sizes ",
              expected, ", got sizes ", t.sizes(), " and strides ", t.strides());
}

// Checks x and returns its (M, D).
std::pair<int64_t, int64_t> check_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous (M, D) tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  return {x.size(0), x.size(1)};
}

// The row count of a weight that must be 2-D, e.g. H of w1 (H, D).
int64_t weight_rows(const char* fn, const char* name, const at::Tensor& w, const char* shape) {
  TORCH_CHECK(w.dim() == 2, fn, ": ", name, " must be a ", shape, " matrix, got sizes ", w.sizes());
  return w.size(0);
}

void check_dims(const char* fn, int64_t d, int64_t h, int64_t d2) {
  TORCH_CHECK(d > 0 && h > 0 && d2 > 0, fn, ": D, H and D2 must be positive, got D = ", d, ", H = ", h,
              ", D2 = ", d2);
}

Activation check_activation(const char* fn, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2, fn,
              ": activation must be 0 (gelu), 1 (gelu_tanh) or 2 (relu), got ", activation);
  return static_cast<Activation>(activation);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                     const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                     const std::optional<at::Tensor>& b2, int64_t activation) {
  constexpr const char* fn = "gelu_ffn_fwd_cuda";
  const auto [m, d] = check_x(fn, x);
  const int64_t h = weight_rows(fn, "w1", w1, "(H, D)");
  const int64_t d2 = weight_rows(fn, "w2", w2, "(D2, H)");
  check_dims(fn, d, h, d2);
  check_tensor(fn, "w1", w1, x, {h, d});
  check_tensor(fn, "w2", w2, x, {d2, h});
  if (b1.has_value()) check_tensor(fn, "b1", *b1, x, {h});
  if (b2.has_value()) check_tensor(fn, "b2", *b2, x, {d2});
  const Activation act = check_activation(fn, activation);

  const c10::cuda::CUDAGuard guard(x.device());
  auto preact = at::empty({m, h}, x.options());
  auto out = at::empty({m, d2}, x.options());
  if (m == 0) return {out, preact};
  const Lt lt(x);
  auto a = at::empty_like(preact);

  const Gemm up{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d,
                .a = w1.const_data_ptr(), .b = x.const_data_ptr(), .d = preact.mutable_data_ptr()};
  Gemm fused = up;  // writes a, with preact as its aux output
  fused.d = a.mutable_data_ptr();
  fused.epilogue = b1.has_value() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  fused.bias = b1.has_value() ? b1->data_ptr() : nullptr;
  fused.aux = preact.mutable_data_ptr();
  if (!gelu_epilogue_fits(act, h, x.scalar_type()) || !lt.try_gemm(fused)) {
    lt.gemm_bias(up, preact, b1);
    activation_pass(a, preact, act, /*forward=*/true);
  }
  lt.gemm_bias(Gemm{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = d2, .n = m, .k = h,
                    .a = w2.const_data_ptr(), .b = a.const_data_ptr(), .d = out.mutable_data_ptr()},
               out, b2);
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact, const at::Tensor& w1,
    const at::Tensor& w2, bool has_b1, bool has_b2, int64_t activation) {
  constexpr const char* fn = "gelu_ffn_bwd_cuda";
  const auto [m, d] = check_x(fn, x);
  const int64_t h = weight_rows(fn, "w1", w1, "(H, D)");
  const int64_t d2 = weight_rows(fn, "w2", w2, "(D2, H)");
  check_dims(fn, d, h, d2);
  check_tensor(fn, "w1", w1, x, {h, d});
  check_tensor(fn, "w2", w2, x, {d2, h});
  check_tensor(fn, "grad_out", grad_out, x, {m, d2});
  check_tensor(fn, "preact", preact, x, {m, h});
  const Activation act = check_activation(fn, activation);

  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_w1 = at::empty_like(w1);
  auto grad_w2 = at::empty_like(w2);
  auto grad_b1 = has_b1 ? at::empty({h}, x.options()) : at::Tensor();
  auto grad_b2 = has_b2 ? at::empty({d2}, x.options()) : at::Tensor();
  if (m == 0) {
    for (auto* t : {&grad_w1, &grad_w2, &grad_b1, &grad_b2}) {
      if (t->defined()) t->zero_();
    }
    return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
  }
  const Lt lt(x);

  // grad_w2 needs act(preact), which the forward did not keep.
  auto a = at::empty_like(preact);
  activation_pass(a, preact, act, /*forward=*/true);
  lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = h, .n = d2, .k = m,
                      .a = a.const_data_ptr(), .b = grad_out.const_data_ptr(), .d = grad_w2.mutable_data_ptr()},
                 grad_out, grad_b2);

  auto grad_h = at::empty_like(preact);
  const Gemm down{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d2,
                  .a = w2.const_data_ptr(), .b = grad_out.const_data_ptr(), .d = grad_h.mutable_data_ptr()};
  Gemm fused = down;  // grad_h = grad_a gelu'(preact), and grad_b1
  fused.epilogue = has_b1 ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
  fused.bias = has_b1 ? grad_b1.data_ptr() : nullptr;
  fused.aux = const_cast<void*>(preact.const_data_ptr());
  const bool dgelu_fused = gelu_epilogue_fits(act, h, grad_out.scalar_type()) && lt.try_gemm(fused);
  if (!dgelu_fused) {
    lt.gemm(down);
    activation_pass(grad_h, preact, act, /*forward=*/false);
  }
  lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = d, .n = h, .k = m,
                      .a = x.const_data_ptr(), .b = grad_h.const_data_ptr(), .d = grad_w1.mutable_data_ptr()},
                 grad_h, dgelu_fused ? at::Tensor() : grad_b1);
  lt.gemm(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = d, .n = m, .k = h,
               .a = w1.const_data_ptr(), .b = grad_h.const_data_ptr(), .d = grad_x.mutable_data_ptr()});
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace fasttx
