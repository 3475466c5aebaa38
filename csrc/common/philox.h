// The attention dropout mask: one counter-based Philox4x32-10 draw per four
// score columns, shared by every backend (C++, CUDA; kernels/philox.py in
// Triton and fasttx/ops/philox.py in PyTorch compute the same bits).
//
// Why counter-based: the mask is a pure function of
// (seed, offset, batch*heads index, row, column), so a backward pass
// regenerates it instead of storing a T x T bit mask, and every backend,
// tile shape and thread count draws the same mask.
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (col / 4, row, bh, offset)
//   bits    = word (col % 4) of Philox4x32-10(counter, key)
//   keep    = bits >= threshold,   threshold = floor(dropout_p * 2^32)
//
// A kept value is scaled by 1 / (1 - dropout_p).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fasttx {

struct Philox4 {
  uint32_t x, y, z, w;
};

FASTTX_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), the constants of Random123.
FASTTX_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = philox_mulhi(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = philox_mulhi(kM1, c.z), lo1 = kM1 * c.z;
    c = {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// The four draws of columns 4*col_group .. 4*col_group + 3 of one score row.
FASTTX_HOST_DEVICE Philox4 dropout_bits4(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t row,
                                         uint32_t col_group) {
  return philox4x32_10({col_group, row, bh, offset}, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

FASTTX_HOST_DEVICE uint32_t dropout_bits(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t row, uint32_t col) {
  const Philox4 r = dropout_bits4(seed, offset, bh, row, col >> 2);
  switch (col & 3u) {
    case 0: return r.x;
    case 1: return r.y;
    case 2: return r.z;
    default: return r.w;
  }
}

// threshold = floor(dropout_p * 2^32), computed once on the host; dropout_p < 1.
FASTTX_HOST_DEVICE bool dropout_keep(uint32_t bits, uint32_t threshold) { return bits >= threshold; }

}  // namespace fasttx
