// The scaled, masked, causal softmax over the last dim on the CPU (see
// csrc/ops.h): y = softmax(scale * x + mask). One pass per row kernel of
// softmax_kernels.h (scale+mask+max, exp+sum, normalize), in fp32 for
// bf16/fp16 rows, which go through a per-thread fp32 row buffer; rows are
// independent, so the work is split over them.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/softmax_kernels.h"

namespace fasttx {
namespace {

// Rows per parallel chunk: about ATen's grain of elements.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1)); }

template <typename T>
void softmax_forward_kernel(const T* x, const at::opmath_type<T>* mask, const int64_t mask_strides[3], T* y,
                            int64_t heads, int64_t q_len, int64_t kv_len, double scale, bool causal, int64_t rows) {
  using A = at::opmath_type<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const SoftmaxRowKernels<A>& kern = softmax_row_kernels<A>();
  at::parallel_for(0, rows, row_grain(kv_len), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(kConvert ? 2 * kv_len : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % q_len, h = (r / q_len) % heads, b = r / (q_len * heads);
      const int64_t valid = causal ? std::min(kv_len, i + 1) : kv_len;  // top-left: key j <= query i
      const T* xr = x + r * kv_len;
      T* yr = y + r * kv_len;
      const A* in = nullptr;
      A* s = nullptr;
      if constexpr (kConvert) {
        for (int64_t j = 0; j < valid; ++j) buf[j] = A(xr[j]);
        in = buf.data();
        s = buf.data() + kv_len;
      } else {
        in = xr;
        s = yr;
      }
      const A* m = mask ? mask + b * mask_strides[0] + h * mask_strides[1] + i * mask_strides[2] : nullptr;
      const A max = kern.scale_mask_max(in, m, A(scale), s, valid);
      A sum = 0;
      if (max == -std::numeric_limits<A>::infinity()) {
        std::fill(s, s + valid, A(0));  // fully masked: 0, not NaN
      } else {
        sum = kern.exp_sum(s, max, s, valid);
        kern.scale(s, A(1) / sum, valid);
      }
      if constexpr (kConvert) {
        for (int64_t j = 0; j < valid; ++j) yr[j] = T(s[j]);
      }
      // Past the causal diagonal: 0, or NaN in a NaN row (a NaN or +inf score), as torch's softmax of
      // the -inf-filled row gives exp(-inf - NaN) = NaN there.
      std::fill(yr + valid, yr + kv_len, sum != sum ? std::numeric_limits<T>::quiet_NaN() : T(0));
    }
  });
}

template <typename T>
void softmax_backward_kernel(const T* grad_y, const T* y, T* grad_x, int64_t cols, double scale, int64_t rows) {
  using A = at::opmath_type<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const SoftmaxRowKernels<A>& kern = softmax_row_kernels<A>();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(kConvert ? 3 * cols : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * cols;
      if constexpr (kConvert) {
        A* gy = buf.data();
        A* yy = gy + cols;
        A* gx = yy + cols;
        for (int64_t j = 0; j < cols; ++j) {
          gy[j] = A(grad_y[off + j]);
          yy[j] = A(y[off + j]);
        }
        kern.softmax_grad(yy, gy, kern.dot(gy, yy, cols), A(scale), gx, cols);
        for (int64_t j = 0; j < cols; ++j) grad_x[off + j] = T(gx[j]);
      } else {
        kern.softmax_grad(y + off, grad_y + off, kern.dot(grad_y + off, y + off, cols), A(scale), grad_x + off,
                          cols);
      }
    }
  });
}

}  // namespace

at::Tensor softmax_fwd_cpu(const at::Tensor& x, double scale, const std::optional<at::Tensor>& mask,
                           bool is_causal) {
  const char* op = "softmax_fwd_cpu";
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous 4-D (B, H, Tq, Tk) CPU tensor, got shape ", x.sizes(), ", strides ",
              x.strides());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", dtype);
  int64_t mask_strides[3] = {0, 0, 0};
  if (mask) {
    const auto mask_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(mask->scalar_type() == mask_dtype, op, ": mask must be ", mask_dtype, " for ", dtype, " x, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->device().is_cpu(), op,
                ": mask must be a CPU tensor of x's shape ", x.sizes(), " (expanded, strides may be 0), got ",
                mask->sizes());
    TORCH_CHECK(mask->stride(3) == 1 || x.size(3) <= 1, op, ": mask must have stride 1 in its last dim, got strides ",
                mask->strides());
    for (int d = 0; d < 3; ++d) mask_strides[d] = mask->stride(d);
  }
  auto y = at::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1) * x.size(2);
  if (rows == 0 || x.size(3) == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "softmax_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    softmax_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), mask ? mask->data_ptr<A>() : nullptr, mask_strides,
                                     y.data_ptr<scalar_t>(), x.size(1), x.size(2), x.size(3), scale, is_causal, rows);
  });
  return y;
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale) {
  const char* op = "softmax_bwd_cpu";
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous() && y.device().is_cpu(), op,
              ": y must be a contiguous CPU tensor, got shape ", y.sizes(), ", strides ", y.strides());
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.is_contiguous() && grad_y.device().is_cpu(), op,
              ": grad_y must be a contiguous CPU tensor of y's shape ", y.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " must match y dtype ", y.scalar_type());
  const auto dtype = y.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": y must be float32, float64, bfloat16 or float16, got ", dtype);
  auto grad_x = at::empty_like(y);
  const int64_t cols = y.size(-1), rows = cols ? y.numel() / cols : 0;
  if (rows == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "softmax_bwd_cpu", [&] {
    softmax_backward_kernel<scalar_t>(grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                      grad_x.data_ptr<scalar_t>(), cols, scale, rows);
  });
  return grad_x;
}

}  // namespace fasttx
