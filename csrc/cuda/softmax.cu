// The fused scaled-masked softmax on CUDA, forward and backward (the contract
// is softmax_fwd_cpu / softmax_bwd_cpu in csrc/ops.h):
//   y = softmax(scale * x + mask) over the last dim of x (B, H, Tq, Tk),
//   grad_x = scale * y * (grad_y - sum(grad_y * y)).
// The kernels live in softmax.cuh (a warp per row, fp32 math (fp64 for fp64), 16-byte packs
// when aligned, a causal variant that stops at the diagonal); attention.cu
// runs the same forward between its GEMMs.
#include "ops.h"
#include "cuda/softmax.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

namespace fasttx {
namespace {

#define FASTTX_DISPATCH_SOFTMAX_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

// Checks a (B, H, Tq, Tk) score tensor named `name`.
void check_scores(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor, got ", t.device());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble, fn, ": ",
              name, " must be float32, float16, bfloat16 or float64, got ", type);
  TORCH_CHECK(t.dim() == 4, fn, ": ", name, " must be a 4-D (B, H, Tq, Tk) tensor, got sizes ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got sizes ", t.sizes(), " and strides ",
              t.strides());
  TORCH_CHECK(t.size(3) <= std::numeric_limits<int>::max(), fn, ": ", name, " rows must have at most 2^31 - 1 ",
              "columns, got Tk = ", t.size(3));
}

}  // namespace

at::Tensor softmax_fwd_cuda(const at::Tensor& x, double scale, const std::optional<at::Tensor>& mask,
                            bool is_causal) {
  constexpr const char* fn = "softmax_fwd_cuda";
  check_scores(fn, "x", x);
  const int64_t b = x.size(0), h = x.size(1), tq = x.size(2), tk = x.size(3);
  const MaskInfo mask_info = check_mask(fn, mask, x, b, h, tq, tk);

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const int64_t rows = b * h * tq;
  if (rows == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTTX_DISPATCH_SOFTMAX_TYPES(x.scalar_type(), fn, [&] {
    using A = acc_t<scalar_t>;
    SoftmaxFwdArgs<scalar_t, scalar_t> a{};
    a.x = x.const_data_ptr<scalar_t>();
    a.y = y.mutable_data_ptr<scalar_t>();
    a.lse = nullptr;
    a.mask = typed_mask<A>(mask_info);
    a.rows = rows;
    a.tq = tq;
    a.heads = h;
    a.tk = static_cast<int>(tk);
    a.scale = static_cast<A>(scale);
    launch_softmax_fwd(a, is_causal, stream);
  });
  return y;
}

at::Tensor softmax_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y, double scale) {
  constexpr const char* fn = "softmax_bwd_cuda";
  check_scores(fn, "y", y);
  check_scores(fn, "grad_y", grad_y);
  TORCH_CHECK(grad_y.device() == y.device(), fn, ": grad_y must be on y's device ", y.device(), ", got ",
              grad_y.device());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(), fn, ": grad_y must have y's dtype ", y.scalar_type(),
              ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.sizes() == y.sizes(), fn, ": grad_y must have y's sizes ", y.sizes(), ", got ",
              grad_y.sizes());

  const c10::cuda::CUDAGuard guard(y.device());
  auto grad_x = at::empty_like(y);
  const int64_t tk = y.size(3);
  const int64_t rows = tk == 0 ? 0 : y.numel() / tk;
  if (rows == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTTX_DISPATCH_SOFTMAX_TYPES(y.scalar_type(), fn, [&] {
    SoftmaxBwdArgs<scalar_t> a{};
    a.grad_x = grad_x.mutable_data_ptr<scalar_t>();
    a.grad_y = grad_y.const_data_ptr<scalar_t>();
    a.y = y.const_data_ptr<scalar_t>();
    a.rows = rows;
    a.tk = static_cast<int>(tk);
    a.scale = static_cast<acc_t<scalar_t>>(scale);
    constexpr int kVec = pack_vec<scalar_t>();
    const bool aligned = tk % kVec == 0 && softmax_aligned16(a.grad_x) && softmax_aligned16(a.grad_y) &&
                         softmax_aligned16(a.y);
    const int blocks = softmax_blocks(rows);
    if (aligned) {
      softmax_bwd_kernel<scalar_t, true><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
    } else {
      softmax_bwd_kernel<scalar_t, false><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace fasttx
