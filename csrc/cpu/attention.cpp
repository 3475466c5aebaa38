// Flash attention on the CPU (see csrc/ops.h for the contract).
//
// Forward: one task per (batch, q head, block of query rows). A task walks
// the key blocks with two GEMMs each (S = scale Q K^T, acc += P V) and
// keeps only the online softmax state of its rows (common/online_softmax.h)
// in between: O(block) memory, never a Tq x Tk matrix.
//
// Backward: one task per (batch, kv head). It loops over the q heads of its
// group and their query blocks, recomputes P = exp(S - lse) block by block and
// accumulates dQ of the block and dK, dV of the whole kv head in fp32 (the
// output tensors themselves for fp32, task-local buffers for bf16/fp16). No
// two tasks write the same rows, each sums in a fixed order and every GEMM
// runs single-threaded inside a task, so the gradients are bitwise the same
// whatever the thread count.
//
// The block GEMMs come from a policy class, so the softmax passes between
// them are written once:
//   - fp32 and bf16 on AVX-512 machines whose CPU is not Intel's (there MKL
//     is faster; see cpu/block_gemm.cpp): our own register-tiled GEMMs
//     (cpu/block_gemm.h), reading Q, K, V, dO in place (K^T, V^T and the bf16
//     pair layouts packed once per kv head) and transposed operands through
//     strides. bf16 uses AVX512-BF16's dot products where the CPU has them:
//     P and dS are rounded to bf16 before the GEMMs that read them, as
//     FlashAttention does on GPUs; softmax, the online merge and every
//     accumulator stay fp32.
//   - everything else (fp64, fp16, machines below AVX-512, bf16 without
//     AVX512-BF16 or with an odd head dim): the BLAS that libtorch_cpu exports
//     (MKL's sgemm_/dgemm_; at::native::cpublas::gemm's float overloads are
//     not exported, and at::mm_out's dispatch costs more than a small block
//     GEMM), on fp32 copies of bf16/fp16 blocks.
// Measured on 2 AMD EPYC cores (AVX512-BF16), forward+backward: fp32
// (4, 12, 1024, 64) 304 -> 264 ms against BLAS; bf16 causal (4, 12, 1024, 64)
// 176 -> ~95 ms against BLAS on fp32 copies.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/online_softmax.h"
#include "common/philox.h"
#include "cpu/block_gemm.h"
#include "cpu/softmax_kernels.h"

#if AT_BUILD_WITH_BLAS()
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}
#endif
#if AT_MKL_ENABLED()
// MKL's C entry point (the lower-case name is the Fortran one, taking a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int nthreads);
#endif

namespace fasttx {
namespace {

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(A) m x k. BLAS is
// column-major, where a row-major matrix is its transpose: so it computes
// C^T = op(B)^T op(A)^T.
template <typename A>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if AT_BUILD_WITH_BLAS()
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = int(n), in = int(m), ik = int(k), ilda = int(ldb), ildb = int(lda), ildc = int(ldc);
  if constexpr (std::is_same_v<A, float>) sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  else dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
#else
  using at::native::TransposeType;
  at::native::cpublas::gemm_stub(at::kCPU, c10::CppTypeToScalarType<A>::value,
                                 trans_b ? TransposeType::Transpose : TransposeType::NoTranspose,
                                 trans_a ? TransposeType::Transpose : TransposeType::NoTranspose, n, m, k, alpha, b,
                                 ldb, a, lda, beta, c, ldc);
#endif
}

// Inside a task BLAS runs on the calling thread only: the tasks are the
// parallelism, and a task's sums must not depend on how many threads BLAS
// would split them over (at::parallel_for runs a lone task on the caller,
// outside any parallel region, where MKL would otherwise go wide).
struct SingleThreadBlas {
#if AT_MKL_ENABLED()
  int previous = MKL_Set_Num_Threads_Local(1);
  ~SingleThreadBlas() { MKL_Set_Num_Threads_Local(previous); }
#endif
};

// The dropout of csrc/common/philox.h for one (batch, q head).
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t offset = 0, threshold = 0;
  double keep_scale = 1;  // 1 / (1 - dropout_p)

  // Calls f(j, kept) for columns col0 .. col0 + n - 1 of score row `row`.
  template <typename F>
  void for_each(uint32_t bh, int64_t row, int64_t col0, int64_t n, const F& f) const {
    for (int64_t j = 0; j < n;) {
      const int64_t col = col0 + j;
      const Philox4 r = dropout_bits4(seed, offset, bh, uint32_t(row), uint32_t(col >> 2));
      const uint32_t words[4] = {r.x, r.y, r.z, r.w};
      for (int64_t w = col & 3; w < 4 && j < n; ++w, ++j) f(j, dropout_keep(words[w], threshold));
    }
  }
};

Dropout make_dropout(double dropout_p, int64_t seed, int64_t offset) {
  Dropout d;
  d.on = dropout_p > 0;
  d.seed = uint64_t(seed);
  d.offset = uint32_t(uint64_t(offset));
  d.threshold = uint32_t(std::floor(dropout_p * 4294967296.0));
  d.keep_scale = 1.0 / (1.0 - dropout_p);
  return d;
}

// Everything a kernel needs besides the tensors' data.
struct Problem {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, dim;
  bool causal;
  double scale;
  Dropout dropout;
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_q = 0;
  int64_t group() const { return q_heads / kv_heads; }
  // Keys [0, kv_end) are visible to some query row in [i0, i0 + rows): with
  // top-left causal alignment key j is visible to row i iff j <= i.
  int64_t kv_end(int64_t i0, int64_t rows) const { return causal ? std::min(kv_len, i0 + rows) : kv_len; }
  // Columns [j0, j0 + valid) of a key block are visible to row i.
  int64_t visible(int64_t i, int64_t j0, int64_t cols) const {
    return causal ? std::clamp<int64_t>(i - j0 + 1, 0, cols) : cols;
  }
};

// Rows per query block and keys per key block. Bigger blocks amortize the
// per-GEMM overhead and the per-row softmax bookkeeping, but the score
// blocks (q x kv fp32, three of them in the backward) should stay in L2, and
// the causal diagonal wastes about q^2 / 2 scores per query block. Measured
// on 2 AVX-512 Xeon cores (B=4, H=12, D=64, T=512..2048, fp32): forward times
// were flat within noise from 64 x 256 to 256 x 1024; the backward was best
// at 64 x 128.
struct Blocks {
  int64_t q, kv;
};
Blocks forward_blocks(const Problem& p) {
  const int64_t q = p.q_len >= 192 ? 128 : 32;
  return {std::max<int64_t>(1, std::min(q, p.q_len)), std::max<int64_t>(1, std::min<int64_t>(512, p.kv_len))};
}
Blocks backward_blocks(const Problem& p) {
  return {std::max<int64_t>(1, std::min<int64_t>(64, p.q_len)),
          std::max<int64_t>(1, std::min<int64_t>(128, p.kv_len))};
}

// Where the rows of a (B, H, T, D) tensor are: D contiguous values each, at
// any batch, head and row strides. So q, k and v can be views of one packed
// QKV projection, and out can live in (B, T, H, D) memory, where the output
// projection reads it as (B, T, H * D) without a copy.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t b = 0, h = 0, t = 0;  // strides in elements
  T* at(int64_t bi, int64_t hi, int64_t ti) const { return data + bi * b + hi * h + ti * t; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return {static_cast<T*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2)};
}

// Whether dK and dV (and dQ) are summed in a task's own contiguous buffer and
// stored into the gradients when done: always for bf16/fp16 (the sums are
// fp32), and for gradient rows that are not contiguous (the packed QKV
// gradient, rows 3 H D apart: each row on its own page). Measured for that
// gradient (fp32, (8, 6, 256, 64), MKL, 2 threads), the backward took 6.95-6.99
// ms summing apart against 7.05-7.14 ms summing in place.
template <typename T>
bool accumulate_apart(const Problem& p, const Rows<T>& grad_k, const Rows<T>& grad_v) {
  return !std::is_same_v<T, at::opmath_type<T>> || grad_k.t != p.dim || grad_v.t != p.dim;
}

// Zeros n rows of dim values, ld apart.
template <typename A>
void zero_rows(A* rows, int64_t n, int64_t dim, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) std::fill(rows + r * ld, rows + r * ld + dim, A(0));
}

// Where a task sums dK and dV of one kv head, zeroed: in `local` (two Tk x D
// blocks) when they are summed apart (see accumulate_apart), else in the
// gradient rows themselves, which then hold the opmath type A.
template <typename A, typename T>
void start_head_grads(A* local, Rows<T> grad_k, Rows<T> grad_v, int64_t b, int64_t kv_head, int64_t Tk, int64_t D,
                      A*& dk, A*& dv, int64_t& dk_ld, int64_t& dv_ld) {
  if (local) {
    dk = local;
    dv = local + Tk * D;
    dk_ld = dv_ld = D;
  } else if constexpr (std::is_same_v<T, A>) {
    dk = grad_k.at(b, kv_head, 0);
    dv = grad_v.at(b, kv_head, 0);
    dk_ld = grad_k.t;
    dv_ld = grad_v.t;
  } else {
    TORCH_CHECK(false, "attention: ", c10::CppTypeToScalarType<T>::value, " gradients are summed apart");
  }
  zero_rows(dk, Tk, D, dk_ld);
  zero_rows(dv, Tk, D, dv_ld);
}

// Rounds n rows of dim opmath values (dim apart) into rows of T at dst's strides.
template <typename T, typename A>
void store_rows(const A* src, int64_t n, int64_t dim, T* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t e = 0; e < dim; ++e) dst[r * ld + e] = T(src[r * dim + e]);
  }
}

// n values of T as opmath A: the data itself when T is A, else converted into buf.
template <typename T, typename A>
const A* as_opmath(const T* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t e = 0; e < n; ++e) buf[e] = A(src[e]);
    return buf;
  }
}

// n rows of dim values, ld apart, as opmath A, and their row stride: in place
// when T is A, else converted into buf, dim apart.
template <typename T, typename A>
std::pair<const A*, int64_t> rows_as_opmath(const T* src, int64_t n, int64_t dim, int64_t ld, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return {src, ld};
  } else {
    for (int64_t r = 0; r < n; ++r) as_opmath(src + r * ld, dim, buf + r * dim);
    return {buf, dim};
  }
}

template <typename A>
A* data(const at::Tensor& t) {
  return static_cast<A*>(t.data_ptr());
}

// The forward's two block GEMMs, S = scale Q K^T and acc += P V, for one
// thread's tasks. This one works in the opmath type A with BLAS: bf16/fp16
// blocks are converted to fp32 first, fp32/fp64 blocks are used in place.
template <typename T>
class BlasForwardGemms {
 public:
  // The GEMM applies the scale to S itself.
  static constexpr double score_scale() { return 1; }
  using A = at::opmath_type<T>;
  BlasForwardGemms(const Problem& p, const Blocks& blk, Rows<const T> k, Rows<const T> v) : p_(p), k_(k), v_(v) {
    constexpr bool kConvert = !std::is_same_v<T, A>;
    const int64_t D = p.dim;
    buf_ = at::empty({kConvert ? blk.q * D + 2 * blk.kv * D : 0},
                     at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    q_buf_ = data<A>(buf_);
    k_buf_ = q_buf_ + blk.q * D;
    v_buf_ = k_buf_ + blk.kv * D;
  }
  void set_rows(const T* q_rows, int64_t ld, int64_t nq, int64_t b, int64_t kv_head) {
    std::tie(q_rows_, q_ld_) = rows_as_opmath(q_rows, nq, p_.dim, ld, q_buf_);
    nq_ = nq;
    b_ = b;
    kv_head_ = kv_head;
  }
  void scores(int64_t j0, int64_t nk, A* s) {
    const int64_t D = p_.dim;
    const auto [k_rows, ldk] = rows_as_opmath(k_.at(b_, kv_head_, j0), nk, D, k_.t, k_buf_);
    gemm<A>(false, true, nq_, nk, D, A(p_.scale), q_rows_, q_ld_, k_rows, ldk, A(0), s, nk);
  }
  void add_probs_times_v(const A* probs, int64_t j0, int64_t nk, A* acc) {
    const int64_t D = p_.dim;
    const auto [v_rows, ldv] = rows_as_opmath(v_.at(b_, kv_head_, j0), nk, D, v_.t, v_buf_);
    gemm<A>(false, false, nq_, D, nk, A(1), probs, nk, v_rows, ldv, A(1), acc, D);
  }

 private:
  const Problem& p_;
  Rows<const T> k_, v_;
  at::Tensor buf_;
  A *q_buf_, *k_buf_, *v_buf_;
  const A* q_rows_ = nullptr;
  int64_t q_ld_ = 0, nq_ = 0, b_ = 0, kv_head_ = 0;
};

// K^T of every kv head packed once for block_gemm (cpu/block_gemm.h), as B
// of S = Q K^T: the size of K.
struct Fp32PackedKt {
  at::Tensor kt;
  int64_t ld, head;  // floats per row and per kv head
};

Fp32PackedKt pack_kt_fp32(const Problem& p, Rows<const float> k) {
  Fp32PackedKt packed;
  const int64_t heads = p.batch * p.kv_heads, D = p.dim, Tk = p.kv_len;
  packed.ld = round_up_16(Tk);
  packed.head = D * packed.ld;
  packed.kt = at::empty({heads * packed.head}, at::kFloat);
  float* kt = packed.kt.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      pack_transposed(k.at(h / p.kv_heads, h % p.kv_heads, 0), Tk, D, k.t, kt + h * packed.head, packed.ld);
    }
  });
  return packed;
}

// The forward's GEMMs for fp32 with our block GEMM: Q and V as they are, K^T
// pre-packed.
class Fp32ForwardGemms {
 public:
  // The GEMM applies the scale to S itself.
  static constexpr double score_scale() { return 1; }
  Fp32ForwardGemms(const Problem& p, const Fp32PackedKt& kt, Rows<const float> v) : p_(p), kt_(kt), v_(v) {}
  void set_rows(const float* q_rows, int64_t ld, int64_t nq, int64_t b, int64_t kv_head) {
    q_rows_ = q_rows;
    q_ld_ = ld;
    nq_ = nq;
    b_ = b;
    kv_head_ = kv_head;
  }
  void scores(int64_t j0, int64_t nk, float* s) {
    const float* kt = kt_.kt.data_ptr<float>() + (b_ * p_.kv_heads + kv_head_) * kt_.head + j0;
    block_gemm(nq_, nk, p_.dim, float(p_.scale), q_rows_, q_ld_, 1, kt, kt_.ld, false, s, nk);
  }
  void add_probs_times_v(const float* probs, int64_t j0, int64_t nk, float* acc) {
    block_gemm(nq_, p_.dim, nk, 1.f, probs, nk, 1, v_.at(b_, kv_head_, j0), v_.t, true, acc, p_.dim);
  }

 private:
  const Problem& p_;
  const Fp32PackedKt& kt_;
  Rows<const float> v_;
  const float* q_rows_ = nullptr;
  int64_t q_ld_ = 0, nq_ = 0, b_ = 0, kv_head_ = 0;
};

// K and V of every kv head packed once for bf16_block_gemm (cpu/block_gemm.h): K^T
// as B of S = Q K^T, V as B of P V. Together the size of K and V.
struct Bf16PackedKv {
  at::Tensor kt, v;
  int64_t kt_ld, v_ld, kt_head, v_head;  // words per row and per kv head
};

Bf16PackedKv pack_kv_bf16(const Problem& p, Rows<const c10::BFloat16> k, Rows<const c10::BFloat16> v) {
  Bf16PackedKv packed;
  const int64_t heads = p.batch * p.kv_heads, D = p.dim, Tk = p.kv_len;
  packed.kt_ld = round_up_16(Tk);
  packed.v_ld = round_up_16(D);
  packed.kt_head = pairs_of(D) * packed.kt_ld;
  packed.v_head = pairs_of(Tk) * packed.v_ld;
  packed.kt = at::empty({heads * packed.kt_head}, at::kInt);
  packed.v = at::empty({heads * packed.v_head}, at::kInt);
  auto* kt = static_cast<uint32_t*>(packed.kt.data_ptr());
  auto* vp = static_cast<uint32_t*>(packed.v.data_ptr());
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t b = h / p.kv_heads, kv_head = h % p.kv_heads;
      pack_transposed_pairs(k.at(b, kv_head, 0), Tk, D, k.t, kt + h * packed.kt_head, packed.kt_ld);
      pack_row_pairs(v.at(b, kv_head, 0), Tk, D, v.t, vp + h * packed.v_head, packed.v_ld);
    }
  });
  return packed;
}

// The forward's GEMMs with bf16 operands and fp32 sums: Q as it is, K^T and
// V pre-packed by pack_kv_bf16, P rounded to bf16 before P V (as
// FlashAttention does on GPUs). Two engines:
//   - kBlock, bf16_block_gemm (cpu/block_gemm.h): Q's rows read as pairs in
//     place (ld and address even, see pairs_readable);
//   - kBrgemm, oneDNN's brgemm (at::native::cpublas; AMX tiles where the CPU
//     has them): the pairs layout is its VNNI layout for B. It has no alpha,
//     so the softmax pass applies the scale (score_scale). Its reduction
//     length must be even (an odd one raised SIGILL in oneDNN 3.x): odd key
//     counts run one more key, whose P and V entries are 0.
enum class Bf16Engine { kBlock, kBrgemm };

template <Bf16Engine kEngine>
class Bf16ForwardGemms {
 public:
  using BF16 = c10::BFloat16;
  static constexpr bool kBrgemm = kEngine == Bf16Engine::kBrgemm;
  Bf16ForwardGemms(const Problem& p, const Blocks& blk, const Bf16PackedKv& kv) : p_(p), kv_(kv) {
    p_ld_ = 2 * pairs_of(blk.kv);
    probs_ = at::empty({blk.q * p_ld_}, at::kBFloat16);
  }
  Bf16ForwardGemms(const Bf16ForwardGemms&) = delete;
  ~Bf16ForwardGemms() {
    if constexpr (kBrgemm) at::native::cpublas::brgemm_release();
  }
  double score_scale() const { return kBrgemm ? p_.scale : 1.0; }
  void set_rows(const BF16* q_rows, int64_t ld, int64_t nq, int64_t b, int64_t kv_head) {
    q_rows_ = q_rows;
    q_ld_ = ld;
    nq_ = nq;
    kv_head_ = b * p_.kv_heads + kv_head;
  }
  void scores(int64_t j0, int64_t nk, float* s) {
    const auto* kt = static_cast<const uint32_t*>(kv_.kt.data_ptr()) + kv_head_ * kv_.kt_head + j0;
    if constexpr (kBrgemm) {
      at::native::cpublas::brgemm(nq_, nk, p_.dim, q_ld_, kv_.kt_ld, nk, false, q_rows_,
                                  reinterpret_cast<const BF16*>(kt), s);
    } else {
      bf16_block_gemm(nq_, nk, p_.dim / 2, float(p_.scale), reinterpret_cast<const uint32_t*>(q_rows_), q_ld_ / 2, 1,
                      kt, kv_.kt_ld, false, s, nk);
    }
  }
  void add_probs_times_v(const float* probs, int64_t j0, int64_t nk, float* acc) {
    auto* pb = probs_.data_ptr<BF16>();
    convert_rows(probs, nq_, nk, nk, pb, p_ld_);
    // j0 is a multiple of the (even) key block: a whole pair index.
    const auto* vp = static_cast<const uint32_t*>(kv_.v.data_ptr()) + kv_head_ * kv_.v_head + j0 / 2 * kv_.v_ld;
    if constexpr (kBrgemm) {
      at::native::cpublas::brgemm(nq_, p_.dim, 2 * pairs_of(nk), p_ld_, kv_.v_ld, p_.dim, true, pb,
                                  reinterpret_cast<const BF16*>(vp), acc);
    } else {
      bf16_block_gemm(nq_, p_.dim, pairs_of(nk), 1.f, reinterpret_cast<const uint32_t*>(pb), p_ld_ / 2, 1, vp,
                      kv_.v_ld, true, acc, p_.dim);
    }
  }

 private:
  const Problem& p_;
  const Bf16PackedKv& kv_;
  at::Tensor probs_;
  int64_t p_ld_;
  const BF16* q_rows_ = nullptr;
  int64_t q_ld_ = 0, nq_ = 0, kv_head_ = 0;
};

// bf16 takes brgemm where ATen runs it natively; its reductions over D must
// be even (see Bf16ForwardGemms), so odd D takes the BLAS path.
bool use_bf16_brgemm(const Problem& p, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && p.dim % 2 == 0 && bf16_brgemm_available();
}

// Else bf16 takes bf16_block_gemm where the machine has it. Q's rows are read
// as pairs in place, so D must be even; odd D takes the fp32 path.
bool use_bf16_block_gemm(const Problem& p, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && p.dim % 2 == 0 && bf16_block_gemm_available();
}

template <typename T, typename MakeGemms>
void attention_forward_kernel(const Problem& p, const Blocks& blk, const MakeGemms& make_gemms, Rows<const T> q,
                              const at::opmath_type<T>* mask, Rows<T> out, at::opmath_type<T>* lse) {
  using A = at::opmath_type<T>;
  const SoftmaxRowKernels<A>& rows = softmax_row_kernels<A>();
  const int64_t D = p.dim, q_blocks = (p.q_len + blk.q - 1) / blk.q;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);

  at::parallel_for(0, p.batch * p.q_heads * q_blocks, 1, [&](int64_t t0, int64_t t1) {
    SingleThreadBlas single_thread_blas;
    auto gemms = make_gemms();
    const A score_scale = A(gemms.score_scale());
    // Per-thread buffers from ATen's allocator: 64-byte aligned, so MKL sees
    // the same alignment, hence sums in the same order, on every run.
    auto scores_t = at::empty({blk.q * blk.kv}, opts), acc_t = at::empty({blk.q * D}, opts);
    A* scores = data<A>(scores_t);
    A* acc = data<A>(acc_t);
    std::vector<OnlineSoftmax<A>> state(blk.q);

    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / q_blocks, b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t i0 = (task % q_blocks) * blk.q, nq = std::min(blk.q, p.q_len - i0);
      gemms.set_rows(q.at(b, h, i0), q.t, nq, b, h / p.group());
      const A* mask_rows = mask ? mask + b * p.mask_stride_b + h * p.mask_stride_h + i0 * p.mask_stride_q : nullptr;

      std::fill(acc, acc + nq * D, A(0));
      std::fill(state.begin(), state.begin() + nq, online_softmax_init<A>());
      const int64_t kv_end = p.kv_end(i0, nq);
      for (int64_t j0 = 0; j0 < kv_end; j0 += blk.kv) {
        const int64_t nk = std::min(blk.kv, kv_end - j0);
        gemms.scores(j0, nk, scores);
        for (int64_t r = 0; r < nq; ++r) {
          A* s = scores + r * nk;
          const int64_t valid = p.visible(i0 + r, j0, nk);
          const A* m = mask_rows ? mask_rows + r * p.mask_stride_q + j0 : nullptr;
          const A block_max = rows.scale_mask_max(s, m, score_scale, s, valid);
          const A factor = online_softmax_raise_max(state[r], block_max);
          online_softmax_add(state[r], rows.exp_sum(s, online_softmax_safe_max(state[r].max), s, valid));
          std::fill(s + valid, s + nk, A(0));
          // lse and the row sum are of the undropped p; only P V sees the mask.
          if (p.dropout.on) {
            const A keep_scale = A(p.dropout.keep_scale);
            p.dropout.for_each(uint32_t(bh), i0 + r, j0, valid,
                               [&](int64_t j, bool kept) { s[j] = kept ? s[j] * keep_scale : A(0); });
          }
          if (factor != A(1)) rows.scale(acc + r * D, factor, D);
        }
        gemms.add_probs_times_v(scores, j0, nk, acc);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const A inv = online_softmax_inv_sum(state[r]);
        const A* a = acc + r * D;
        T* out_row = out.at(b, h, i0 + r);
        for (int64_t d = 0; d < D; ++d) out_row[d] = T(a[d] * inv);
        lse[bh * p.q_len + i0 + r] = online_softmax_lse(state[r]);
      }
    }
  });
}

// The backward's five block GEMMs for one thread's tasks, in the opmath type
// with BLAS (bf16/fp16 converted to fp32 first). S = scale Q K^T and
// dP = dO V^T; then dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q, with
// dK and dV of the whole kv head in fp32: the output tensors themselves for
// fp32, task-local buffers for bf16/fp16.
template <typename T>
class BlasBackwardGemms {
 public:
  // The GEMM applies the scale to S itself.
  static constexpr double score_scale() { return 1; }
  using A = at::opmath_type<T>;
  static constexpr bool kConvert = !std::is_same_v<T, A>;
  BlasBackwardGemms(const Problem& p, const Blocks& blk, Rows<const T> k, Rows<const T> v, Rows<T> grad_k,
                    Rows<T> grad_v)
      : p_(p), k_(k), v_(v), grad_k_(grad_k), grad_v_(grad_v), local_(accumulate_apart(p, grad_k, grad_v)) {
    const int64_t D = p.dim, Tk = p.kv_len;
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
    head_t_ = at::empty({(kConvert ? 2 * Tk * D : 0) + (local_ ? 2 * Tk * D : 0)}, opts);
    rows_t_ = at::empty({kConvert ? 2 * blk.q * D : 0}, opts);
  }
  void set_head(int64_t b, int64_t kv_head) {
    const int64_t D = p_.dim, Tk = p_.kv_len;
    b_ = b;
    kv_head_ = kv_head;
    A* base = data<A>(head_t_);
    std::tie(k_head_, k_ld_) = rows_as_opmath(k_.at(b, kv_head, 0), Tk, D, k_.t, base);
    std::tie(v_head_, v_ld_) = rows_as_opmath(v_.at(b, kv_head, 0), Tk, D, v_.t, base + (kConvert ? Tk * D : 0));
    start_head_grads(local_ ? base + (kConvert ? 2 * Tk * D : 0) : nullptr, grad_k_, grad_v_, b, kv_head, Tk, D,
                     dk_, dv_, dk_ld_, dv_ld_);
  }
  void set_rows(const T* q_rows, int64_t q_ld, const T* do_rows, int64_t do_ld, int64_t nq) {
    A* buf = data<A>(rows_t_);
    std::tie(q_rows_, q_ld_) = rows_as_opmath(q_rows, nq, p_.dim, q_ld, buf);
    std::tie(do_rows_, do_ld_) = rows_as_opmath(do_rows, nq, p_.dim, do_ld, buf + (kConvert ? nq * p_.dim : 0));
    nq_ = nq;
  }
  void scores_and_grad(int64_t j0, int64_t nk, A* probs, A* grad_probs) {
    const int64_t D = p_.dim;
    gemm<A>(false, true, nq_, nk, D, A(p_.scale), q_rows_, q_ld_, k_head_ + j0 * k_ld_, k_ld_, A(0), probs, nk);
    gemm<A>(false, true, nq_, nk, D, A(1), do_rows_, do_ld_, v_head_ + j0 * v_ld_, v_ld_, A(0), grad_probs, nk);
  }
  void add_grads(const A* dropped, const A* grad_scores, int64_t j0, int64_t nk, A* dq, int64_t dq_ld) {
    const int64_t D = p_.dim;
    const A scale = A(p_.scale);
    gemm<A>(true, false, nk, D, nq_, A(1), dropped, nk, do_rows_, do_ld_, A(1), dv_ + j0 * dv_ld_, dv_ld_);
    gemm<A>(false, false, nq_, D, nk, scale, grad_scores, nk, k_head_ + j0 * k_ld_, k_ld_, A(1), dq, dq_ld);
    gemm<A>(true, false, nk, D, nq_, scale, grad_scores, nk, q_rows_, q_ld_, A(1), dk_ + j0 * dk_ld_, dk_ld_);
  }
  void finish_head() {
    if (local_) {
      store_rows(dk_, p_.kv_len, p_.dim, grad_k_.at(b_, kv_head_, 0), grad_k_.t);
      store_rows(dv_, p_.kv_len, p_.dim, grad_v_.at(b_, kv_head_, 0), grad_v_.t);
    }
  }

 private:
  const Problem& p_;
  Rows<const T> k_, v_;
  Rows<T> grad_k_, grad_v_;
  bool local_;  // dK, dV summed in head_t_, then stored
  at::Tensor head_t_, rows_t_;
  int64_t b_ = 0, kv_head_ = 0, nq_ = 0, k_ld_ = 0, v_ld_ = 0, q_ld_ = 0, do_ld_ = 0, dk_ld_ = 0, dv_ld_ = 0;
  const A *k_head_ = nullptr, *v_head_ = nullptr, *q_rows_ = nullptr, *do_rows_ = nullptr;
  A *dk_ = nullptr, *dv_ = nullptr;
};

// One kv head packed for the bf16 backward GEMMs: K^T and V^T as pairs (B of
// S = Q K^T and dP = dO V^T), K as row pairs (B of dQ = dS K).
void pack_head_pairs(const Problem& p, Rows<const c10::BFloat16> k, Rows<const c10::BFloat16> v, int64_t b,
                     int64_t kv_head, uint32_t* kt, uint32_t* vt, uint32_t* kp, int64_t tk_ld, int64_t d_ld) {
  const c10::BFloat16 *k_head = k.at(b, kv_head, 0), *v_head = v.at(b, kv_head, 0);
  pack_transposed_pairs(k_head, p.kv_len, p.dim, k.t, kt, tk_ld);
  pack_transposed_pairs(v_head, p.kv_len, p.dim, v.t, vt, tk_ld);
  pack_row_pairs(k_head, p.kv_len, p.dim, k.t, kp, d_ld);
}

// The same GEMMs with bf16 operands and fp32 accumulation (cpu/block_gemm.h).
// Per kv head: K^T, V^T and K packed once. Per query block: Q and dO packed
// for the GEMMs that reduce over query rows. Per key block: P and dS rounded
// to bf16, packed as each GEMM reads them.
class Bf16BackwardGemms {
 public:
  // The GEMM applies the scale to S itself.
  static constexpr double score_scale() { return 1; }
  using BF16 = c10::BFloat16;
  Bf16BackwardGemms(const Problem& p, const Blocks& blk, Rows<const BF16> k, Rows<const BF16> v, Rows<BF16> grad_k,
                    Rows<BF16> grad_v)
      : p_(p), k_(k), v_(v), grad_k_(grad_k), grad_v_(grad_v) {
    const int64_t D = p.dim, Tk = p.kv_len;
    tk_ld_ = round_up_16(Tk);
    d_ld_ = round_up_16(D);
    kv_ld_ = round_up_16(blk.kv);
    ds_ld_ = 2 * pairs_of(blk.kv);
    const int64_t q_pairs = pairs_of(blk.q);
    // Words: K^T, V^T, K pairs | Q, dO pairs | P, dS pairs | dS rows.
    const int64_t head_words = 2 * (D / 2) * tk_ld_ + pairs_of(Tk) * d_ld_;
    const int64_t row_words = 2 * q_pairs * d_ld_, block_words = 2 * q_pairs * kv_ld_ + blk.q * ds_ld_ / 2;
    words_t_ = at::empty({head_words + row_words + block_words}, at::kInt);
    uint32_t* w = static_cast<uint32_t*>(words_t_.data_ptr());
    kt_ = w;
    vt_ = kt_ + (D / 2) * tk_ld_;
    kp_ = vt_ + (D / 2) * tk_ld_;
    qp_ = kp_ + pairs_of(Tk) * d_ld_;
    dop_ = qp_ + q_pairs * d_ld_;
    pp_ = dop_ + q_pairs * d_ld_;
    dsp_ = pp_ + q_pairs * kv_ld_;
    dsr_ = dsp_ + q_pairs * kv_ld_;
    grads_t_ = at::empty({2 * Tk * D}, at::kFloat);
    dk_ = grads_t_.data_ptr<float>();
    dv_ = dk_ + Tk * D;
  }
  void set_head(int64_t b, int64_t kv_head) {
    b_ = b;
    kv_head_ = kv_head;
    pack_head_pairs(p_, k_, v_, b, kv_head, kt_, vt_, kp_, tk_ld_, d_ld_);
    std::fill(dk_, dk_ + grads_t_.numel(), 0.f);  // dK and dV
  }
  // Q's and dO's rows are read as pairs in place: their ld and address are even (see pairs_readable).
  void set_rows(const BF16* q_rows, int64_t q_ld, const BF16* do_rows, int64_t do_ld, int64_t nq) {
    q_rows_ = reinterpret_cast<const uint32_t*>(q_rows);
    do_rows_ = reinterpret_cast<const uint32_t*>(do_rows);
    q_ld_ = q_ld / 2;
    do_ld_ = do_ld / 2;
    pack_row_pairs(q_rows, nq, p_.dim, q_ld, qp_, d_ld_);
    pack_row_pairs(do_rows, nq, p_.dim, do_ld, dop_, d_ld_);
    nq_ = nq;
  }
  void scores_and_grad(int64_t j0, int64_t nk, float* probs, float* grad_probs) {
    const int64_t half_d = p_.dim / 2;
    bf16_block_gemm(nq_, nk, half_d, float(p_.scale), q_rows_, q_ld_, 1, kt_ + j0, tk_ld_, false, probs, nk);
    bf16_block_gemm(nq_, nk, half_d, 1.f, do_rows_, do_ld_, 1, vt_ + j0, tk_ld_, false, grad_probs, nk);
  }
  void add_grads(const float* dropped, const float* grad_scores, int64_t j0, int64_t nk, float* dq, int64_t dq_ld) {
    const int64_t D = p_.dim, q_pairs = pairs_of(nq_);
    const float scale = float(p_.scale);
    // The transposed products read P and dS as pairs of rows (a_row = 1).
    pack_row_pairs(dropped, nq_, nk, nk, pp_, kv_ld_);
    bf16_block_gemm(nk, D, q_pairs, 1.f, pp_, 1, kv_ld_, dop_, d_ld_, true, dv_ + j0 * D, D);
    pack_row_pairs(grad_scores, nq_, nk, nk, dsp_, kv_ld_);
    bf16_block_gemm(nk, D, q_pairs, scale, dsp_, 1, kv_ld_, qp_, d_ld_, true, dk_ + j0 * D, D);
    // j0 is a multiple of the (even) key block: a whole pair index into K.
    auto* ds_rows = reinterpret_cast<BF16*>(dsr_);
    convert_rows(grad_scores, nq_, nk, nk, ds_rows, ds_ld_);
    bf16_block_gemm(nq_, D, pairs_of(nk), scale, dsr_, ds_ld_ / 2, 1, kp_ + j0 / 2 * d_ld_, d_ld_, true, dq, dq_ld);
  }
  void finish_head() {
    store_rows(dk_, p_.kv_len, p_.dim, grad_k_.at(b_, kv_head_, 0), grad_k_.t);
    store_rows(dv_, p_.kv_len, p_.dim, grad_v_.at(b_, kv_head_, 0), grad_v_.t);
  }

 private:
  const Problem& p_;
  Rows<const BF16> k_, v_;
  Rows<BF16> grad_k_, grad_v_;
  at::Tensor words_t_, grads_t_;
  int64_t tk_ld_, d_ld_, kv_ld_, ds_ld_, b_ = 0, kv_head_ = 0, nq_ = 0, q_ld_ = 0, do_ld_ = 0;
  uint32_t *kt_, *vt_, *kp_, *qp_, *dop_, *pp_, *dsp_, *dsr_;
  const uint32_t *q_rows_ = nullptr, *do_rows_ = nullptr;
  float *dk_, *dv_;
};

// The backward's GEMMs on brgemm (see Bf16ForwardGemms). brgemm reads A
// row-major only, so the two products that reduce over query rows are taken
// transposed: dV^T += dO^T P and dK^T += Q^T dS, with Q^T and dO^T made once
// per query block, P and dS packed as pairs of rows (B), and dK^T, dV^T of
// the whole kv head summed in fp32 and stored transposed (dK times the
// scale) when the head is done. dQ += (scale dS) K reads dS rounded to bf16
// with the scale, and K packed per head.
class BrgemmBackwardGemms {
 public:
  using BF16 = c10::BFloat16;
  BrgemmBackwardGemms(const Problem& p, const Blocks& blk, Rows<const BF16> k, Rows<const BF16> v,
                      Rows<BF16> grad_k, Rows<BF16> grad_v)
      : p_(p), k_(k), v_(v), grad_k_(grad_k), grad_v_(grad_v) {
    const int64_t D = p.dim, Tk = p.kv_len;
    tk_ld_ = round_up_16(Tk);
    d_ld_ = round_up_16(D);
    kv_ld_ = round_up_16(blk.kv);
    ds_ld_ = 2 * pairs_of(blk.kv);
    qt_ld_ = 2 * pairs_of(blk.q);
    // Words: K^T, V^T, K pairs | Q^T, dO^T rows | P, dS pairs | dS rows.
    const int64_t head_words = 2 * (D / 2) * tk_ld_ + pairs_of(Tk) * d_ld_;
    const int64_t row_words = D * qt_ld_;
    const int64_t block_words = 2 * pairs_of(blk.q) * kv_ld_ + blk.q * ds_ld_ / 2;
    words_t_ = at::empty({head_words + row_words + block_words}, at::kInt);
    uint32_t* w = static_cast<uint32_t*>(words_t_.data_ptr());
    kt_ = w;
    vt_ = kt_ + (D / 2) * tk_ld_;
    kp_ = vt_ + (D / 2) * tk_ld_;
    qt_ = reinterpret_cast<BF16*>(kp_ + pairs_of(Tk) * d_ld_);
    dot_ = qt_ + D * qt_ld_;
    pp_ = reinterpret_cast<uint32_t*>(dot_ + D * qt_ld_);
    dsp_ = pp_ + pairs_of(blk.q) * kv_ld_;
    dsr_ = reinterpret_cast<BF16*>(dsp_ + pairs_of(blk.q) * kv_ld_);
    grads_t_ = at::empty({2 * D * tk_ld_}, at::kFloat);
    dkt_ = grads_t_.data_ptr<float>();
    dvt_ = dkt_ + D * tk_ld_;
  }
  BrgemmBackwardGemms(const BrgemmBackwardGemms&) = delete;
  ~BrgemmBackwardGemms() { at::native::cpublas::brgemm_release(); }
  double score_scale() const { return p_.scale; }
  void set_head(int64_t b, int64_t kv_head) {
    b_ = b;
    kv_head_ = kv_head;
    pack_head_pairs(p_, k_, v_, b, kv_head, kt_, vt_, kp_, tk_ld_, d_ld_);
    std::fill(dkt_, dkt_ + grads_t_.numel(), 0.f);  // dK^T and dV^T
  }
  void set_rows(const BF16* q_rows, int64_t q_ld, const BF16* do_rows, int64_t do_ld, int64_t nq) {
    q_rows_ = q_rows;
    do_rows_ = do_rows;
    q_ld_ = q_ld;
    do_ld_ = do_ld;
    transpose_rows(q_rows, nq, p_.dim, q_ld, qt_, qt_ld_);
    transpose_rows(do_rows, nq, p_.dim, do_ld, dot_, qt_ld_);
    nq_ = nq;
  }
  void scores_and_grad(int64_t j0, int64_t nk, float* probs, float* grad_probs) {
    const int64_t D = p_.dim;
    at::native::cpublas::brgemm(nq_, nk, D, q_ld_, tk_ld_, nk, false, q_rows_, bf16(kt_ + j0), probs);
    at::native::cpublas::brgemm(nq_, nk, D, do_ld_, tk_ld_, nk, false, do_rows_, bf16(vt_ + j0), grad_probs);
  }
  void add_grads(const float* dropped, const float* grad_scores, int64_t j0, int64_t nk, float* dq, int64_t dq_ld) {
    const int64_t D = p_.dim, q_even = 2 * pairs_of(nq_);
    pack_row_pairs(dropped, nq_, nk, nk, pp_, kv_ld_);
    at::native::cpublas::brgemm(D, nk, q_even, qt_ld_, kv_ld_, tk_ld_, true, dot_, bf16(pp_), dvt_ + j0);
    pack_row_pairs(grad_scores, nq_, nk, nk, dsp_, kv_ld_);
    at::native::cpublas::brgemm(D, nk, q_even, qt_ld_, kv_ld_, tk_ld_, true, qt_, bf16(dsp_), dkt_ + j0);
    convert_rows(grad_scores, nq_, nk, nk, dsr_, ds_ld_, float(p_.scale));
    // j0 is a multiple of the (even) key block: a whole pair index into K.
    at::native::cpublas::brgemm(nq_, D, 2 * pairs_of(nk), ds_ld_, d_ld_, dq_ld, true, dsr_,
                                bf16(kp_ + j0 / 2 * d_ld_), dq);
  }
  void finish_head() {
    store_transposed(dkt_, p_.dim, p_.kv_len, tk_ld_, float(p_.scale), grad_k_.at(b_, kv_head_, 0), grad_k_.t);
    store_transposed(dvt_, p_.dim, p_.kv_len, tk_ld_, 1.f, grad_v_.at(b_, kv_head_, 0), grad_v_.t);
  }

 private:
  static const BF16* bf16(const uint32_t* words) { return reinterpret_cast<const BF16*>(words); }
  const Problem& p_;
  Rows<const BF16> k_, v_;
  Rows<BF16> grad_k_, grad_v_;
  at::Tensor words_t_, grads_t_;
  int64_t tk_ld_, d_ld_, kv_ld_, ds_ld_, qt_ld_, b_ = 0, kv_head_ = 0, nq_ = 0, q_ld_ = 0, do_ld_ = 0;
  uint32_t *kt_, *vt_, *kp_, *pp_, *dsp_;
  BF16 *qt_, *dot_, *dsr_;
  const BF16 *q_rows_ = nullptr, *do_rows_ = nullptr;
  float *dkt_, *dvt_;
};

// The backward's GEMMs for fp32 with our block GEMM: K^T and V^T packed per
// kv head, everything else read in place, P^T and dS^T through A's strides.
// dK and dV accumulate in the output tensors.
class Fp32BackwardGemms {
 public:
  // The GEMM applies the scale to S itself.
  static constexpr double score_scale() { return 1; }
  Fp32BackwardGemms(const Problem& p, Rows<const float> k, Rows<const float> v, Rows<float> grad_k,
                    Rows<float> grad_v)
      : p_(p), k_(k), v_(v), grad_k_(grad_k), grad_v_(grad_v), tk_ld_(round_up_16(p.kv_len)),
        local_(accumulate_apart(p, grad_k, grad_v)) {
    packed_t_ = at::empty({2 * p.dim * tk_ld_ + (local_ ? 2 * p.kv_len * p.dim : 0)}, at::kFloat);
    kt_ = packed_t_.data_ptr<float>();
    vt_ = kt_ + p.dim * tk_ld_;
  }
  void set_head(int64_t b, int64_t kv_head) {
    const int64_t D = p_.dim, Tk = p_.kv_len;
    k_head_ = k_.at(b, kv_head, 0);
    pack_transposed(k_head_, Tk, D, k_.t, kt_, tk_ld_);
    pack_transposed(v_.at(b, kv_head, 0), Tk, D, v_.t, vt_, tk_ld_);
    b_ = b;
    kv_head_ = kv_head;
    start_head_grads(local_ ? vt_ + D * tk_ld_ : nullptr, grad_k_, grad_v_, b, kv_head, Tk, D, dk_, dv_, dk_ld_,
                     dv_ld_);
  }
  void set_rows(const float* q_rows, int64_t q_ld, const float* do_rows, int64_t do_ld, int64_t nq) {
    q_rows_ = q_rows;
    do_rows_ = do_rows;
    q_ld_ = q_ld;
    do_ld_ = do_ld;
    nq_ = nq;
  }
  void scores_and_grad(int64_t j0, int64_t nk, float* probs, float* grad_probs) {
    const int64_t D = p_.dim;
    block_gemm(nq_, nk, D, float(p_.scale), q_rows_, q_ld_, 1, kt_ + j0, tk_ld_, false, probs, nk);
    block_gemm(nq_, nk, D, 1.f, do_rows_, do_ld_, 1, vt_ + j0, tk_ld_, false, grad_probs, nk);
  }
  void add_grads(const float* dropped, const float* grad_scores, int64_t j0, int64_t nk, float* dq, int64_t dq_ld) {
    const int64_t D = p_.dim, ldk = dk_ld_, ldv = dv_ld_;
    const float scale = float(p_.scale);
    block_gemm(nk, D, nq_, 1.f, dropped, 1, nk, do_rows_, do_ld_, true, dv_ + j0 * ldv, ldv);
    block_gemm(nq_, D, nk, scale, grad_scores, nk, 1, k_head_ + j0 * k_.t, k_.t, true, dq, dq_ld);
    block_gemm(nk, D, nq_, scale, grad_scores, 1, nk, q_rows_, q_ld_, true, dk_ + j0 * ldk, ldk);
  }
  void finish_head() {
    if (local_) {
      store_rows(dk_, p_.kv_len, p_.dim, grad_k_.at(b_, kv_head_, 0), grad_k_.t);
      store_rows(dv_, p_.kv_len, p_.dim, grad_v_.at(b_, kv_head_, 0), grad_v_.t);
    }
  }

 private:
  const Problem& p_;
  Rows<const float> k_, v_;
  Rows<float> grad_k_, grad_v_;
  int64_t tk_ld_;
  bool local_;  // dK, dV summed in packed_t_, then stored
  int64_t b_ = 0, kv_head_ = 0, nq_ = 0, q_ld_ = 0, do_ld_ = 0, dk_ld_ = 0, dv_ld_ = 0;
  at::Tensor packed_t_;
  float *kt_, *vt_, *dk_ = nullptr, *dv_ = nullptr;
  const float *k_head_ = nullptr, *q_rows_ = nullptr, *do_rows_ = nullptr;
};

template <typename T, typename MakeGemms>
void attention_backward_kernel(const Problem& p, const Blocks& blk, const MakeGemms& make_gemms,
                               Rows<const T> grad_out, Rows<const T> q, Rows<const T> out,
                               const at::opmath_type<T>* lse, const at::opmath_type<T>* mask, Rows<T> grad_q) {
  using A = at::opmath_type<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const SoftmaxRowKernels<A>& rows = softmax_row_kernels<A>();
  const int64_t D = p.dim;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);

  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    SingleThreadBlas single_thread_blas;
    auto gemms = make_gemms();
    const A score_scale = A(gemms.score_scale());
    const int64_t sq = blk.q * blk.kv;
    auto scores_t = at::empty({(p.dropout.on ? 3 : 2) * sq}, opts);
    A* probs = data<A>(scores_t);                        // P, recomputed
    A* grad_scores = probs + sq;                         // dP, then dS in place
    A* dropped = p.dropout.on ? probs + 2 * sq : probs;  // P with dropout: what V saw
    auto row_t = at::empty({2 * blk.q + 2 * D}, opts);
    A* row_lse = data<A>(row_t);
    A* row_delta = row_lse + blk.q;  // D_i = dO_i . O_i
    A* out_row = row_delta + blk.q;
    A* do_row = out_row + D;
    const bool dq_apart = kConvert || grad_q.t != D;
    auto dq_t = at::empty({dq_apart ? blk.q * D : 0}, opts);  // dQ of a block, summed apart (see accumulate_apart)

    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / p.kv_heads, kv_head = task % p.kv_heads;
      gemms.set_head(b, kv_head);
      // The group's q heads in order, each adding into the same dK, dV.
      for (int64_t g = 0; g < p.group(); ++g) {
        const int64_t h = kv_head * p.group() + g, bh = b * p.q_heads + h;
        for (int64_t i0 = 0; i0 < p.q_len; i0 += blk.q) {
          const int64_t nq = std::min(blk.q, p.q_len - i0), row0 = bh * p.q_len + i0;
          gemms.set_rows(q.at(b, h, i0), q.t, grad_out.at(b, h, i0), grad_out.t, nq);
          A* dq = dq_apart ? data<A>(dq_t) : reinterpret_cast<A*>(grad_q.at(b, h, i0));
          const int64_t dq_ld = dq_apart ? D : grad_q.t;
          zero_rows(dq, nq, D, dq_ld);
          for (int64_t r = 0; r < nq; ++r) {
            row_lse[r] = lse[row0 + r];
            row_delta[r] = rows.dot(as_opmath(grad_out.at(b, h, i0 + r), D, do_row),
                                    as_opmath(out.at(b, h, i0 + r), D, out_row), D);
          }
          const A* mask_rows =
              mask ? mask + b * p.mask_stride_b + h * p.mask_stride_h + i0 * p.mask_stride_q : nullptr;

          const int64_t kv_end = p.kv_end(i0, nq);
          for (int64_t j0 = 0; j0 < kv_end; j0 += blk.kv) {
            const int64_t nk = std::min(blk.kv, kv_end - j0);
            gemms.scores_and_grad(j0, nk, probs, grad_scores);
            for (int64_t r = 0; r < nq; ++r) {
              A* pr = probs + r * nk;
              const int64_t valid = p.visible(i0 + r, j0, nk);
              const A* m = mask_rows ? mask_rows + r * p.mask_stride_q + j0 : nullptr;
              // Scales (where the GEMM did not) and adds the mask; the max is not needed.
              if (m || score_scale != A(1)) rows.scale_mask_max(pr, m, score_scale, pr, valid);
              rows.exp_sum(pr, row_lse[r], pr, valid);  // exp(s - (+inf)) = 0 in fully masked rows
              std::fill(pr + valid, pr + nk, A(0));
              A* gs = grad_scores + r * nk;
              if (p.dropout.on) {
                // dP of the undropped p is dP of the dropped one times the same factor.
                A* dr = dropped + r * nk;
                const A keep_scale = A(p.dropout.keep_scale);
                p.dropout.for_each(uint32_t(bh), i0 + r, j0, valid, [&](int64_t j, bool kept) {
                  const A z = kept ? keep_scale : A(0);
                  dr[j] = pr[j] * z;
                  gs[j] *= z;
                });
                std::fill(dr + valid, dr + nk, A(0));
              }
              rows.softmax_grad(pr, gs, row_delta[r], A(1), gs, nk);  // dS; 0 where p is
            }
            gemms.add_grads(dropped, grad_scores, j0, nk, dq, dq_ld);
          }
          if (dq_apart) store_rows(dq, nq, D, grad_q.at(b, h, i0), grad_q.t);
        }
      }
      gemms.finish_head();
    }
  });
}

// The checks of the contract, naming what came and what was expected.
Problem check_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, bool is_causal, double scale, double dropout_p,
                      int64_t seed, int64_t offset) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, Hq, Tq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hk, Tk, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, Hk, Tk, D), got shape ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype, op, ": k dtype ", k.scalar_type(), " must match q dtype ", dtype);
  TORCH_CHECK(v.scalar_type() == dtype, op, ": v dtype ", v.scalar_type(), " must match q dtype ", dtype);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": q, k, v must be CPU tensors, got ", q.device(), ", ", k.device(), ", ", v.device());
  Problem p;
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.q_len = q.size(2);
  p.dim = q.size(3);
  p.kv_heads = k.size(1);
  p.kv_len = k.size(2);
  TORCH_CHECK(k.size(0) == p.batch && k.size(3) == p.dim, op, ": k must be (B, Hk, Tk, D) = (", p.batch,
              ", Hk, Tk, ", p.dim, ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(p.dim > 0, op, ": head dim D must be positive, got ", p.dim);
  TORCH_CHECK(p.kv_heads > 0 && p.q_heads % p.kv_heads == 0, op, ": q heads (", p.q_heads,
              ") must be a multiple of k/v heads (", p.kv_heads, ")");
  TORCH_CHECK(p.dim <= std::numeric_limits<int>::max() / 1024, op, ": head dim ", p.dim, " is too large");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  p.causal = is_causal;
  p.scale = scale;
  p.dropout = make_dropout(dropout_p, seed, offset);
  if (mask) {
    const auto mask_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(mask->scalar_type() == mask_dtype, op, ": mask must be ", mask_dtype, " for ", dtype, " q, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->device().is_cpu(), op, ": mask must be a CPU tensor, got ", mask->device());
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == p.batch && mask->size(1) == p.q_heads &&
                    mask->size(2) == p.q_len && mask->size(3) == p.kv_len,
                op, ": mask must have shape (B, Hq, Tq, Tk) = (", p.batch, ", ", p.q_heads, ", ", p.q_len, ", ",
                p.kv_len, ") (expanded, strides may be 0), got ", mask->sizes());
    TORCH_CHECK(mask->stride(3) == 1 || p.kv_len <= 1, op, ": mask must have stride 1 in its last dim, got strides ",
                mask->strides());
    p.mask_stride_b = mask->stride(0);
    p.mask_stride_h = mask->stride(1);
    p.mask_stride_q = mask->stride(2);
  }
  return p;
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " must be ",
              like.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// A (B, H, T, D) input as the kernels read it: rows of D contiguous values,
// at least D apart (the GEMMs take the row stride as their leading dimension,
// and BLAS and brgemm refuse one below D), at any batch and head strides (0
// included). Inputs whose rows overlap (a key expanded along the sequence,
// as_strided views: row stride 0 < D) are copied contiguous; a lone row gets
// the stride D, which no element is read through.
at::Tensor with_contiguous_rows(const at::Tensor& t) {
  const int64_t D = t.size(3);
  if (D > 1 && t.stride(3) != 1) return t.contiguous();
  if (t.size(2) > 1) return t.stride(2) >= D ? t : t.contiguous();
  if (t.stride(2) >= D && t.stride(3) == 1) return t;
  return t.as_strided(t.sizes(), {t.stride(0), t.stride(1), D, 1});
}

// Whether every row of a bf16 tensor starts on a pair (4 bytes): the bf16
// GEMMs read Q's and dO's rows as pairs in place.
bool pairs_readable(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 != 0) return false;
  for (int64_t d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 2 != 0) return false;
  }
  return true;
}

at::Tensor with_pair_rows(const at::Tensor& t) {
  return pairs_readable(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Whether q, k, v are the three parts of one contiguous (B, T, 3, H, D)
// tensor (the packed QKV projection, split into heads).
bool packed_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (q.sizes() != k.sizes() || q.sizes() != v.sizes()) return false;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), row = 3 * H * D;
  const auto* base = static_cast<const char*>(q.data_ptr());
  const auto part = int64_t(q.element_size()) * H * D;
  const std::vector<int64_t> strides{T * row, D, row, 1};
  return B > 0 && H > 0 && T > 0 && D > 0 && q.strides() == strides && k.strides() == strides &&
         v.strides() == strides && static_cast<const char*>(k.data_ptr()) == base + part &&
         static_cast<const char*>(v.data_ptr()) == base + 2 * part;
}

// The gradients: for q, k, v of one packed QKV tensor, the three parts of one
// such tensor, which becomes the QKV projection's gradient without a copy
// (fasttx.nn.MultiheadSelfAttention); else contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_grads_like(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v) {
  if (packed_qkv(q, k, v)) {
    auto packed = at::empty({q.size(0), q.size(2), 3, q.size(1), q.size(3)}, q.options());
    return {packed.select(2, 0).transpose(1, 2), packed.select(2, 1).transpose(1, 2),
            packed.select(2, 2).transpose(1, 2)};
  }
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options())};
}

// out in q's memory order: (B, T, H, D) when q is a view of such memory (the
// packed QKV projection of fasttx.nn.MultiheadSelfAttention), so that the
// output projection reads it as (B, T, H * D) in place. The rule is
// fasttx/ops/attention.py's _output_like, which the other backends follow.
at::Tensor empty_output_like(const at::Tensor& q) {
  if (q.size(1) > 1 && q.size(2) > 1 && q.stride(1) < q.stride(2)) {
    return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  }
  return at::empty(q.sizes(), q.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                                                     bool is_causal, double scale, double dropout_p, int64_t seed,
                                                     int64_t offset) {
  const Problem p =
      check_problem("attention_fwd_cpu", q_in, k_in, v_in, mask, is_causal, scale, dropout_p, seed, offset);
  auto q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  auto out = empty_output_like(q_in);
  auto lse = at::empty({p.batch, p.q_heads, p.q_len}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  const Blocks blk = forward_blocks(p);
  const bool brgemm = use_bf16_brgemm(p, q.scalar_type());
  if (brgemm || use_bf16_block_gemm(p, q.scalar_type())) {
    using BF16 = c10::BFloat16;
    if (!brgemm) q = with_pair_rows(q);  // the block GEMMs read Q's rows as pairs in place
    const Bf16PackedKv kv = pack_kv_bf16(p, rows_of<const BF16>(k), rows_of<const BF16>(v));
    const auto run = [&](const auto& make_gemms) {
      attention_forward_kernel<BF16>(p, blk, make_gemms, rows_of<const BF16>(q),
                                     mask ? mask->data_ptr<float>() : nullptr, rows_of<BF16>(out), data<float>(lse));
    };
    if (brgemm) run([&] { return Bf16ForwardGemms<Bf16Engine::kBrgemm>(p, blk, kv); });
    else run([&] { return Bf16ForwardGemms<Bf16Engine::kBlock>(p, blk, kv); });
    return {out, lse};
  }
  if (q.scalar_type() == at::kFloat && block_gemm_available()) {
    const Fp32PackedKt kt = pack_kt_fp32(p, rows_of<const float>(k));
    const auto v_rows = rows_of<const float>(v);
    attention_forward_kernel<float>(
        p, blk, [&] { return Fp32ForwardGemms(p, kt, v_rows); }, rows_of<const float>(q),
        mask ? mask->data_ptr<float>() : nullptr, rows_of<float>(out), data<float>(lse));
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto k_rows = rows_of<const scalar_t>(k), v_rows = rows_of<const scalar_t>(v);
    attention_forward_kernel<scalar_t>(
        p, blk, [&] { return BlasForwardGemms<scalar_t>(p, blk, k_rows, v_rows); }, rows_of<const scalar_t>(q),
        mask ? mask->data_ptr<A>() : nullptr, rows_of<scalar_t>(out), data<A>(lse));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "attention_bwd_cpu";
  const Problem p = check_problem(op, q_in, k_in, v_in, mask, is_causal, scale, dropout_p, seed, offset);
  check_like(op, "grad_out", grad_out_in, q_in);
  check_like(op, "out", out_in, q_in);
  auto q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  auto out = with_contiguous_rows(out_in), grad_out = with_contiguous_rows(grad_out_in);
  const auto lse_dtype = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.q_heads && lse.size(2) == p.q_len &&
                  lse.is_contiguous() && lse.scalar_type() == lse_dtype,
              op, ": lse must be a contiguous ", lse_dtype, " tensor of shape (", p.batch, ", ", p.q_heads, ", ",
              p.q_len, "), got ", lse.scalar_type(), " ", lse.sizes());
  auto [grad_q, grad_k, grad_v] = empty_grads_like(q_in, k_in, v_in);
  const Blocks blk = backward_blocks(p);
  const bool brgemm = use_bf16_brgemm(p, q.scalar_type());
  if (brgemm || use_bf16_block_gemm(p, q.scalar_type())) {
    using BF16 = c10::BFloat16;
    if (!brgemm) {  // the block GEMMs read Q's and dO's rows as pairs in place
      q = with_pair_rows(q);
      grad_out = with_pair_rows(grad_out);
    }
    const auto gk = rows_of<BF16>(grad_k), gv = rows_of<BF16>(grad_v);
    const auto k_rows = rows_of<const BF16>(k), v_rows = rows_of<const BF16>(v);
    const auto run = [&](const auto& make_gemms) {
      attention_backward_kernel<BF16>(p, blk, make_gemms, rows_of<const BF16>(grad_out), rows_of<const BF16>(q),
                                      rows_of<const BF16>(out), data<float>(lse),
                                      mask ? mask->data_ptr<float>() : nullptr, rows_of<BF16>(grad_q));
    };
    if (brgemm) run([&] { return BrgemmBackwardGemms(p, blk, k_rows, v_rows, gk, gv); });
    else run([&] { return Bf16BackwardGemms(p, blk, k_rows, v_rows, gk, gv); });
    return {grad_q, grad_k, grad_v};
  }
  if (q.scalar_type() == at::kFloat && block_gemm_available()) {
    const auto k_rows = rows_of<const float>(k), v_rows = rows_of<const float>(v);
    const auto gk = rows_of<float>(grad_k), gv = rows_of<float>(grad_v);
    attention_backward_kernel<float>(
        p, blk, [&] { return Fp32BackwardGemms(p, k_rows, v_rows, gk, gv); }, rows_of<const float>(grad_out),
        rows_of<const float>(q), rows_of<const float>(out), data<float>(lse),
        mask ? mask->data_ptr<float>() : nullptr, rows_of<float>(grad_q));
    return {grad_q, grad_k, grad_v};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto gk = rows_of<scalar_t>(grad_k), gv = rows_of<scalar_t>(grad_v);
    const auto k_rows = rows_of<const scalar_t>(k), v_rows = rows_of<const scalar_t>(v);
    attention_backward_kernel<scalar_t>(
        p, blk, [&] { return BlasBackwardGemms<scalar_t>(p, blk, k_rows, v_rows, gk, gv); },
        rows_of<const scalar_t>(grad_out), rows_of<const scalar_t>(q), rows_of<const scalar_t>(out), data<A>(lse),
        mask ? mask->data_ptr<A>() : nullptr, rows_of<scalar_t>(grad_q));
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace fasttx
