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

#include <optional>
#include <tuple>

namespace fasttx {

// bias_gelu: y = gelu(x + bias) over the last dim. x is (M, N) contiguous,
// bias is (N,), approximate is 0 (erf) or 1 (tanh). The backward returns
// (grad_x, grad_bias); grad_bias is reduced in fp32 in a fixed order so that
// it is bitwise deterministic.
at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, int64_t approximate);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& bias, int64_t approximate);

// Row normalization of (M, N): layer_norm, rms_norm (rms=true: no mean is
// subtracted, no bias) and add_layer_norm (residual given).
//   s = x (+ residual);  y = (s - mean) * rstd * weight + bias
// Returns (y, s, mean, rstd). s is returned only when residual is given
// (else undefined, i.e. None in Python); mean is undefined when rms; mean and
// rstd have shape (M,), in float32 (float64 when x is float64, so that
// gradcheck works). Statistics accumulate in the same type, with
// csrc/common/welford.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms);
// Backward. s is the normalized input (x, or x + residual) saved by the
// forward. grad_s, when given, is the gradient arriving at add_layer_norm's
// second output and is added into grad_input. Returns (grad_input,
// grad_weight, grad_bias); grad_weight/grad_bias are undefined when weight is
// absent / has_bias is false, and are reduced over rows through fp32
// partials in a fixed order (bitwise deterministic).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms);
// The same, mixed precision (used by the eager fast path): a bfloat16/half x
// may be added to a float32 residual, which then sets the statistics' dtype
// (s's and the parameters'), and y is stored in y_dtype (default: that dtype),
// rounded once. The backward reads a narrower grad_y beside float32 s and, with
// low_grad_dtype, also returns grad_input rounded to it (the grad of such an x),
// as a fourth output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, std::optional<at::ScalarType> y_dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms, std::optional<at::ScalarType> low_grad_dtype);
// The eager fast path (cpu/layer_norm_eager.cpp): layer_norm / add_layer_norm /
// rms_norm of x (any rank, normalized over its trailing normalized_shape) with
// autograd, as (y, s or undefined), y in out_dtype when given (as
// y.to(out_dtype), rounded once). Returns nothing unless the input is the
// plain case: CPU tensors of one float dtype once autocast's casts are made
// (or a bf16/half x beside a float32 residual under autocast), not empty,
// shapes that match, no tracing mode; the caller's Python path serves
// everything else.
std::optional<std::tuple<at::Tensor, at::Tensor>> norm_eager_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, bool rms,
    std::optional<at::ScalarType> out_dtype);

// A linear's weight gradient, grad_out^T x: grad_out (M, O), x (M, I), one
// dtype, to (O, I) (cpu/linear_weight_grad.cpp says why not at::mm alone).
at::Tensor linear_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x);
at::Tensor& linear_weight_grad_out_cpu(at::Tensor& out, const at::Tensor& grad_out, const at::Tensor& x);

// linear (cpu/linear.cpp): out = x @ w^T + b, x (M, I), w (O, I), b (O,), one
// dtype, on cpu/matmul.h's GEMMs. The backward returns (grad_x, grad_w,
// grad_b), each undefined unless needs_grad_x, needs_grad_w, has_bias.
at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& w, bool needs_grad_x,
                                                              bool needs_grad_w, bool has_bias);

// gelu_ffn: out = act(x @ w1^T + b1) @ w2^T + b2, nn.Linear's layout:
// x (M, D), w1 (H, D), b1 (H,), w2 (D2, H), b2 (D2,), all contiguous, one dtype.
// activation is csrc/common/activation.h's Activation (0 gelu, 1 gelu_tanh,
// 2 relu). The forward returns (out, preact) with preact = x @ w1^T + b1 of
// shape (M, H), which is all the backward needs besides x and the weights:
// act(preact) is recomputed, never stored. The backward returns (grad_x,
// grad_w1, grad_b1, grad_w2, grad_b2); grad_b1/grad_b2 are undefined when
// has_b1/has_b2 is false.
std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, int64_t activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact, const at::Tensor& w1,
    const at::Tensor& w2, bool has_b1, bool has_b2, int64_t activation);

// scaled_dot_product_attention, flash style: q (B, Hq, Tq, D), k and v
// (B, Hk, Tk, D), of one dtype; Hq is a multiple of Hk and q head h reads
// k/v head h / (Hq / Hk) (grouped-query attention). The CUDA and Triton
// kernels take them contiguous; the CPU ones read q, k, v, out and grad_out
// through any strides whose last is 1 (views of a packed QKV projection),
// and copy those whose rows overlap (row stride < D: expanded along the
// sequence, as_strided windows), which no GEMM can take.
//   s_ij = scale * q_i . k_j + mask_ij    (j > i is masked when is_causal: top-left aligned,
//                                          torch's rule, also when Tq != Tk)
//   p_ij = softmax_j(s_ij);  out_i = sum_j dropout(p_ij) v_j
// mask, when given, is additive, float32 (float64 for float64 q), of shape
// (B, Hq, Tq, Tk) with stride 1 in its last dim and any other strides,
// 0 for broadcast dims (a key-padding mask (B, 1, 1, Tk) arrives expanded,
// strides (Tk, 0, 0, 1)). -inf masks a score. A row whose scores are all
// masked gives out_i = 0 (torch's rule), and its gradients are 0. NaN is
// never dropped: a NaN score (or +inf, through inf - inf) makes its row's
// out and lse NaN, as in torch. D, Hk >= 1: fasttx/ops/attention.py answers
// zero-size problems without a kernel.
// Dropout (dropout_p in [0, 1)) uses csrc/common/philox.h with
// bh = b * Hq + h, row = i, col = j; threshold = floor(dropout_p * 2^32);
// kept values are scaled by 1 / (1 - dropout_p). The backward regenerates it.
// The forward returns (out, lse): out q's shape, contiguous, except that the
// CPU's is (B, Tq, Hq, D) memory, transposed, when q is such a view (q's
// stride(1) < stride(2), Hq and Tq > 1: see _output_like in
// fasttx/ops/attention.py); lse (B, Hq, Tq) in float32
// (float64 for float64 q) is log sum_j exp(s_ij), before dropout, and +inf
// for a fully masked row so that exp(s_ij - lse_i) recomputes p_ij = 0.
// The backward returns (grad_q, grad_k, grad_v) shaped like q, k, v and
// contiguous, except the CPU's for q, k, v that are the three parts of one
// contiguous (B, T, 3, H, D) tensor: then they are the parts of one such
// tensor, the packed QKV gradient (fasttx.nn.attention.split_heads). It is
// bitwise deterministic (no atomics; grouped heads are summed in a fixed order).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal,
    double scale, double dropout_p, int64_t seed, int64_t offset);

// softmax: y = softmax(scale * x + mask) over the last dim of x (B, H, Tq, Tk)
// contiguous; mask and is_causal as in attention (mask in float32, float64
// for float64 x). A fully masked row gives 0. The backward returns
// grad_x = scale * y * (grad_y - sum(grad_y * y)).
at::Tensor softmax_fwd_cpu(const at::Tensor& x, double scale, const std::optional<at::Tensor>& mask, bool is_causal);
at::Tensor softmax_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale);

// cross_entropy over the rows of logits (N, V) contiguous, target (N,) int64
// in [0, V) or ignore_index. Forward: (loss, row_max, log_sum), each (N,) in
// the opmath type: m = max(x_n), log_sum = log(sum exp(x_n - m)) and
// loss = (m - x[target]) + log_sum, 0 for an ignored row (never lse - x[target]:
// lse = m + log_sum loses log_sum at a large shared offset). Backward:
// grad_x = grad_rows[n] * (softmax(x_n) - onehot(target_n)), 0 for an ignored
// row, in logits' dtype, softmax(x_n) = exp(x_n - m - log_sum).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits,
                                                                     const at::Tensor& target, int64_t ignore_index);
at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& row_max, const at::Tensor& log_sum, int64_t ignore_index);

// apply_rotary: rotary position embeddings on q (B, Hq, T, D) and k (B, Hk, T, D), each read
// through its strides (the last must be 1) and written to a new contiguous tensor of its shape
// and dtype. cos and sin (one shape and dtype: q's, or float32 for 16-bit q; unit last stride)
// are (B, T, Dr) (any strides, a batch stride of 0 included), or with position_ids (B, T) int64
// the (positions, Dr) tables whose rows the ids pick (an id outside them raises). Dr is even,
// 2 <= Dr <= D; features from Dr on are copied. Pairs (a, b) are (j, j + Dr/2) (rotate-half) or
// (2j, 2j + 1) (interleaved); in fp32 (fp64 for fp64), rounded once:
//   forward   y_a = x_a c_a - x_b s_a,  y_b = x_b c_b + x_a s_b
//   backward  (the transposed rotation of the gradients grad_q, grad_k)
//             y_a = x_a c_a + x_b s_b,  y_b = x_b c_b - x_a s_a
// Returns (rotated q, rotated k).
std::tuple<at::Tensor, at::Tensor> apply_rotary_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const std::optional<at::Tensor>& position_ids,
                                                        bool interleaved);
std::tuple<at::Tensor, at::Tensor> apply_rotary_bwd_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const std::optional<at::Tensor>& position_ids,
                                                        bool interleaved);
// glu: y = act(gate) * up, elementwise. gate, up (and grad) contiguous, one shape and dtype;
// activation is csrc/common/activation.h's Activation: 0 gelu, 1 gelu_tanh or 3 silu.
// The backward returns (grad_gate, grad_up), recomputing act(gate) from gate.
at::Tensor glu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, int64_t activation);
std::tuple<at::Tensor, at::Tensor> glu_bwd_cpu(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                               int64_t activation);

// glu_ffn: out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down, nn.Linear's
// layout: x (M, D), w_gate and w_up (H, D), w_down (D2, H), biases (H,) (H,) (D2,), all contiguous,
// one dtype; activation as glu's. The forward returns (out, gate, up), the two (M, H)
// pre-activations the backward needs besides x and the weights (act(gate) * up is recomputed,
// never stored). The backward returns (grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up,
// grad_w_down, grad_b_down), the bias grads undefined where has_b_* is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_ffn_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    int64_t activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_ffn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate, bool has_b_up,
    bool has_b_down, int64_t activation);
// linear_cross_entropy's row kernel over one chunk of logits (C, V) contiguous
// (fp32/fp64, or bf16/fp16), target (C,) int64 in [0, V) or ignore_index. With
// z = softcap(x) = softcap * tanh(x / softcap) (z = x when softcap is 0),
// m = max z, log_sum = log sum exp(z - m) and eps = label_smoothing, returns
// (loss, lse), each (C,) in the opmath type: loss = (1 - eps)(m - z_t) +
// eps / V * sum_j (m - z_j) + log_sum (0 for an ignored row), lse = m + log_sum.
// With grad_rows (C,) (opmath type), overwrites the logits in place with
// grad_rows[n] * (softmax(z) - (1 - eps) onehot(t) - eps / V) * (1 - (z / softcap)^2)
// (no last factor without softcap; 0 for an ignored row).
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_rows_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& grad_rows,
                                                                 int64_t ignore_index, double label_smoothing,
                                                                 double softcap);
// out = a @ b (out += a @ b when accumulate) on cpu/matmul.h's GEMM; one dtype; out contiguous.
void linear_cross_entropy_gemm_cpu(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

#ifdef FASTTX_WITH_CUDA
at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const at::Tensor& bias, int64_t approximate);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& bias, int64_t approximate);
// The CUDA norm family: the contract of layer_norm_fwd_cpu / layer_norm_bwd_cpu.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms);
// gelu_ffn on cuBLASLt: the contract of gelu_ffn_fwd_cpu / gelu_ffn_bwd_cpu.
std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, int64_t activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact, const at::Tensor& w1,
    const at::Tensor& w2, bool has_b1, bool has_b2, int64_t activation);
// glu and glu_ffn on CUDA (glu_ffn's GEMMs on cuBLASLt): the contracts of the CPU entry points above.
at::Tensor glu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t activation);
std::tuple<at::Tensor, at::Tensor> glu_bwd_cuda(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                                int64_t activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_ffn_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    int64_t activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_ffn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate, bool has_b_up,
    bool has_b_down, int64_t activation);
// attention on cuBLAS batched GEMMs around the fused scaled-masked softmax,
// and that softmax alone: the contracts of the CPU entry points above.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal,
    double scale, double dropout_p, int64_t seed, int64_t offset);
at::Tensor softmax_fwd_cuda(const at::Tensor& x, double scale, const std::optional<at::Tensor>& mask,
                            bool is_causal);
at::Tensor softmax_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y, double scale);
// cross_entropy on CUDA: the contract of cross_entropy_fwd_cpu / cross_entropy_bwd_cpu
// (float32/float16/bfloat16 logits; a target outside [0, V) that is not ignore_index poisons its row with NaN).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                                      const at::Tensor& target, int64_t ignore_index);
at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& row_max, const at::Tensor& log_sum, int64_t ignore_index);
// apply_rotary on CUDA: the contract of apply_rotary_fwd_cpu / apply_rotary_bwd_cpu.
std::tuple<at::Tensor, at::Tensor> apply_rotary_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& position_ids,
                                                         bool interleaved);
std::tuple<at::Tensor, at::Tensor> apply_rotary_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& position_ids,
                                                         bool interleaved);
// linear_cross_entropy's row kernel on CUDA: the contract of linear_cross_entropy_rows_cpu (fp32/fp16/bf16
// logits; a target outside [0, V) that is not ignore_index poisons its row with NaN).
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_rows_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& grad_rows,
                                                                  int64_t ignore_index, double label_smoothing,
                                                                  double softcap);
#endif

}  // namespace fasttx
