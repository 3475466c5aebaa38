// GELU arithmetic, written once and shared by the CPU (at::vec) and CUDA
// kernels, so that the CPU tests check the very formulas the GPU runs.
//
// Every function is a template over the value type T (float, double, or a
// SIMD vector such as at::vec::Vectorized<float>) and a Math policy that
// supplies erf, exp and tanh for T. Keeping the policy separate lets the CPU
// use Sleef-vectorized transcendentals and CUDA use its intrinsics without
// duplicating the formulas.
#pragma once

#include "common/host_device.h"

#include <cmath>
#include <type_traits>
#include <utility>

namespace fasttx {

enum class GeluApprox : int { kNone = 0, kTanh = 1 };

namespace gelu {

// In double, so that T = double gets full precision (a float 1/sqrt(2) is
// off by 1e-8 relative); T(k) rounds them once, at compile time, for float.
constexpr double kInvSqrt2 = 0.70710678118654752440;     // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kCubic = 0.044715;

// Whether the Math policy has normal_cdf_pdf(x, cdf, pdf), which returns
// Phi(x) and phi(x) together (cpu/vec/math.h's float policy builds erf from
// the very exp(-x^2/2) that phi needs, so it computes it once; the forward
// takes its Phi, leaving pdf's one multiply unused).
template <typename Math, typename T, typename = void>
struct HasNormalCdfPdf : std::false_type {};
template <typename Math, typename T>
struct HasNormalCdfPdf<Math, T, std::void_t<decltype(Math::normal_cdf_pdf(
                                    std::declval<T>(), std::declval<T&>(), std::declval<T&>()))>>
    : std::true_type {};

// Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
template <typename Math, typename T>
FASTTX_HOST_DEVICE T erf_forward(T x) {
  if constexpr (HasNormalCdfPdf<Math, T>::value) {
    T cdf, pdf;
    Math::normal_cdf_pdf(x, cdf, pdf);
    return x * cdf;
  } else {
    return T(0.5f) * x * (T(1.0f) + Math::erf(x * T(kInvSqrt2)));
  }
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x).
template <typename Math, typename T>
FASTTX_HOST_DEVICE T erf_grad(T x) {
  T cdf, pdf;
  if constexpr (HasNormalCdfPdf<Math, T>::value) {
    Math::normal_cdf_pdf(x, cdf, pdf);
  } else {
    cdf = T(0.5f) * (T(1.0f) + Math::erf(x * T(kInvSqrt2)));
    pdf = Math::exp(T(-0.5f) * x * x) * T(kInvSqrt2Pi);
  }
  return cdf + x * pdf;
}

// Tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
template <typename Math, typename T>
FASTTX_HOST_DEVICE T tanh_forward(T x) {
  T u = T(kSqrt2OverPi) * x * (T(1.0f) + T(kCubic) * x * x);
  return T(0.5f) * x * (T(1.0f) + Math::tanh(u));
}

// 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx, with t = tanh(u).
template <typename Math, typename T>
FASTTX_HOST_DEVICE T tanh_grad(T x) {
  T x2 = x * x;
  T u = T(kSqrt2OverPi) * x * (T(1.0f) + T(kCubic) * x2);
  T t = Math::tanh(u);
  T du_dx = T(kSqrt2OverPi) * (T(1.0f) + T(3.0 * kCubic) * x2);
  return T(0.5f) * (T(1.0f) + t) + T(0.5f) * x * (T(1.0f) - t * t) * du_dx;
}

template <typename Math, typename T>
FASTTX_HOST_DEVICE T forward(T x, GeluApprox approx) {
  return approx == GeluApprox::kTanh ? tanh_forward<Math>(x) : erf_forward<Math>(x);
}

template <typename Math, typename T>
FASTTX_HOST_DEVICE T grad(T x, GeluApprox approx) {
  return approx == GeluApprox::kTanh ? tanh_grad<Math>(x) : erf_grad<Math>(x);
}

}  // namespace gelu

// Scalar math for float and double, usable on host and device alike.
struct ScalarMath {
  static FASTTX_HOST_DEVICE float erf(float x) { return ::erff(x); }
  static FASTTX_HOST_DEVICE float exp(float x) { return ::expf(x); }
  static FASTTX_HOST_DEVICE float tanh(float x) { return ::tanhf(x); }
  static FASTTX_HOST_DEVICE double erf(double x) { return ::erf(x); }
  static FASTTX_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static FASTTX_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
  // For activation.h, as torch's relu and threshold_backward: relu(NaN) = NaN, and the gradient is
  // selected, where(x > 0, g, 0), never multiplied (0 * NaN would leak an upstream NaN).
  template <typename T>
  static FASTTX_HOST_DEVICE T relu(T x) { return x > T(0) || x != x ? x : T(0); }
  template <typename T>
  static FASTTX_HOST_DEVICE T relu_backward(T g, T x) { return x > T(0) ? g : T(0); }
};

}  // namespace fasttx
