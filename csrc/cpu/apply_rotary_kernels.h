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

// Tokens per block of the row order below: each head's rows of a block are one contiguous span
// of about 64 KiB (128 fp32 tokens at D = 128), long enough for the hardware prefetcher, which
// stops at 4 KiB pages, to run ahead; 16-token (8 KiB fp32, 4 KiB bf16) spans left bf16 at half
// the copy bandwidth. The block's cos and sin rows (up to 256 KiB) stay in L2 for every head.
constexpr int64_t kRotaryHeadSpanBytes = int64_t(64) << 10;
constexpr int64_t kRotaryMinTokenBlock = 16;

// Calls row(x, y, cos, sin) for every row of q and k, in one parallel region over both (a
// separate region for k would leave threads idle at the end of q's and start a second fork),
// and chunk_done() on each thread after its share. The rows go in (b, token block, head of q
// then k, token) order: heads share their tables, so a token block's tables are read from
// memory once and from L1 by every head, where (b, h, t) order streamed all of a batch's
// tables (as many bytes as the row itself) from L2 or L3 again for every head. The order's
// last token block is padded to a whole block; its padding indices are skipped.
template <typename T, typename C, typename F, typename G>
void for_each_rotary_row(const RotaryArgs& a, const F& row, const G& chunk_done) {
  const int64_t heads = a.rows[0].heads + a.rows[1].heads;
  const int64_t row_bytes = std::max<int64_t>(1, a.dim * int64_t(sizeof(T)));
  const int64_t block = std::min(std::max(kRotaryMinTokenBlock, kRotaryHeadSpanBytes / row_bytes), a.tokens);
  const int64_t blocks = (a.tokens + block - 1) / block;
  const int64_t total = a.batch * blocks * heads * block;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(a.dim, 1));
  at::parallel_for(0, total, grain, [&](int64_t r0, int64_t r1) {
    // r = ((b * blocks + tb) * heads + hh) * block + ti, decomposed once and then counted up:
    // four divisions per row cost as much as rotating a 64-element row.
    int64_t ti = r0 % block, hh = (r0 / block) % heads, tb = (r0 / (block * heads)) % blocks;
    int64_t b = r0 / (block * heads * blocks);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = tb * block + ti;
      if (t < a.tokens) {
        const bool is_k = hh >= a.rows[0].heads;
        const RotaryRows& rs = a.rows[is_k];
        const int64_t h = is_k ? hh - a.rows[0].heads : hh;
        const T* x = static_cast<const T*>(rs.x) + b * rs.stride_b + h * rs.stride_h + t * rs.stride_t;
        T* y = static_cast<T*>(rs.y) + ((b * rs.heads + h) * a.tokens + t) * a.dim;
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
      if (++ti == block) {
        ti = 0;
        if (++hh == heads) {
          hh = 0;
          if (++tb == blocks) tb = 0, ++b;
        }
      }
    }
    chunk_done();
  });
}

}  // namespace fasttx
