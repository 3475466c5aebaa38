// The rotary embedding's row loop, shared by the portable kernel
// (apply_rotary.cpp) and the vector ones (apply_rotary_vec.h, compiled per
// ISA). The inputs arrive checked and the outputs allocated.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fasttx {

// One of q and k: (batch, heads, tokens, dim) read through its strides (the last is 1), written
// to a contiguous output.
struct RotaryRows {
  const void* x;
  void* y;
  int64_t heads, stride_b, stride_h, stride_t;
};

// A table (cos or sin): row (b, t) starts at b * stride_b + t * stride_t, or with position ids
// at pos[b, t] * stride_b (the (positions, rot_dim) table's row stride).
struct RotaryTable {
  const void* data;
  int64_t stride_b, stride_t;
};

struct RotaryArgs {
  RotaryRows rows[2];  // q, k
  RotaryTable cos, sin;
  const int64_t* pos;  // (batch, tokens) position ids, or null
  int64_t pos_stride_b, pos_stride_t;
  int64_t batch, tokens, dim, rot_dim;
  bool interleaved;
  bool transpose;  // backward: the transposed rotation of a gradient
};

struct ApplyRotaryKernels {
  // Storage type T (float, double, BFloat16, Half) and table type C (T, or float for the 16-bit
  // types) are given by the dtypes; `table_is_float` says C = float where T is 16-bit.
  void (*run)(const RotaryArgs& args, at::ScalarType dtype, bool table_is_float, bool stream);
};

namespace avx2 { extern const ApplyRotaryKernels apply_rotary; }
namespace avx512 { extern const ApplyRotaryKernels apply_rotary; }

// Calls row(x, y, cos, sin) for every row of q and k, in one parallel region over both (a
// separate region for k would leave threads idle at the end of q's and start a second fork),
// and chunk_done() on each thread after its share. Rows go in (b, h, t) order, so a thread's
// consecutive rows share a batch's tables in cache.
template <typename T, typename C, typename F, typename G>
void for_each_rotary_row(const RotaryArgs& a, const F& row, const G& chunk_done) {
  const int64_t q_rows = a.batch * a.rows[0].heads * a.tokens;
  const int64_t total = q_rows + a.batch * a.rows[1].heads * a.tokens;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(a.dim, 1));
  at::parallel_for(0, total, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool is_k = r >= q_rows;
      const RotaryRows& rs = a.rows[is_k];
      const int64_t i = is_k ? r - q_rows : r;
      const int64_t t = i % a.tokens, h = (i / a.tokens) % rs.heads, b = i / (a.tokens * rs.heads);
      const T* x = static_cast<const T*>(rs.x) + b * rs.stride_b + h * rs.stride_h + t * rs.stride_t;
      T* y = static_cast<T*>(rs.y) + i * a.dim;
      const C* c;
      const C* s;
      if (a.pos) {
        const int64_t p = a.pos[b * a.pos_stride_b + t * a.pos_stride_t];
        c = static_cast<const C*>(a.cos.data) + p * a.cos.stride_b;
        s = static_cast<const C*>(a.sin.data) + p * a.sin.stride_b;
      } else {
        c = static_cast<const C*>(a.cos.data) + b * a.cos.stride_b + t * a.cos.stride_t;
        s = static_cast<const C*>(a.sin.data) + b * a.sin.stride_b + t * a.sin.stride_t;
      }
      row(x, y, c, s);
    }
    chunk_done();
  });
}

}  // namespace fasttx
