"""Philox4x32-10 in Triton: the attention dropout bits of csrc/common/philox.h.

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (col // 4, row, bh, offset)
    bits    = word (col % 4) of Philox4x32-10(counter, key)
    keep    = bits >= threshold,   threshold = floor(dropout_p * 2^32)

One Philox call yields the bits of four adjacent columns, so the tile helpers run it once per
group of four columns and interleave the four words back into columns: a quarter of the work
of one call per element. They assume what every caller here passes: the column indices of a
tile are consecutive and start at a multiple of 4 (a key block start; blocks are >= 16 wide).

All arithmetic is uint32 (wrapping multiply, tl.umulhi for the high half). The host passes the
32-bit values (seed halves, offset, threshold) as int32 bit patterns (``as_i32``), so that the
kernel signature does not change with their values; the kernel bitcasts them back.
"""
import triton
import triton.language as tl

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)


def as_i32(value):
    """The int32 with the bit pattern of ``value & 0xffffffff`` (a kernel argument; see the docstring)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def host_args(seed, offset, dropout_p):
    """(seed_lo, seed_hi, offset, threshold) as int32 bit patterns, and the keep scale 1 / (1 - p)."""
    seed &= (1 << 64) - 1  # an int64 seed, read as the uint64 of philox.h
    threshold = int(dropout_p * 4294967296.0)  # floor: dropout_p >= 0; < 2^32 as dropout_p < 1
    return (as_i32(seed), as_i32(seed >> 32), as_i32(offset), as_i32(threshold)), 1.0 / (1.0 - dropout_p)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds of counter (c0, c1, c2, c3) under key (k0, k1), all uint32 (broadcastable)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def _u32(x):
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def _first_of_four(cols, N: tl.constexpr):
    """cols[0::4] of a 1-D tensor of N elements."""
    half, _ = tl.split(tl.reshape(cols, (N // 2, 2)))
    quarter, _ = tl.split(tl.reshape(half, (N // 4, 2)))
    return quarter


@triton.jit
def dropout_keep(seed_lo, seed_hi, offset, bh, rows, cols, threshold):
    """The keep mask (len(rows), len(cols)) of the score tile rows x cols of head bh.

    seed_lo, seed_hi, offset, threshold: the int32 bit patterns of host_args; bh a scalar;
    rows, cols 1-D int32 tensors, cols consecutive from a multiple of 4.
    """
    BLOCK_M: tl.constexpr = rows.shape[0]
    BLOCK_N: tl.constexpr = cols.shape[0]
    groups = (_first_of_four(cols, BLOCK_N) // 4).to(tl.uint32)
    c0 = tl.broadcast_to(groups[None, :], (BLOCK_M, BLOCK_N // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_N // 4))
    c2 = tl.zeros((BLOCK_M, BLOCK_N // 4), dtype=tl.uint32) + bh.to(tl.uint32)
    c3 = tl.zeros((BLOCK_M, BLOCK_N // 4), dtype=tl.uint32) + _u32(offset)
    x, y, z, w = philox4x32_10(c0, c1, c2, c3, _u32(seed_lo), _u32(seed_hi))
    # join appends the new axis last, so join(join(x, z), join(y, w))[m, g, a, b] is word 2a + b
    # of group g: column 4g + 2a + b once flattened.
    bits = tl.reshape(tl.join(tl.join(x, z), tl.join(y, w)), (BLOCK_M, BLOCK_N))
    return bits >= _u32(threshold)


@triton.jit
def dropout_keep_t(seed_lo, seed_hi, offset, bh, rows, cols, threshold):
    """dropout_keep's mask transposed, (len(cols), len(rows)), computed in that layout (no tile transpose)."""
    BLOCK_M: tl.constexpr = rows.shape[0]
    BLOCK_N: tl.constexpr = cols.shape[0]
    groups = (_first_of_four(cols, BLOCK_N) // 4).to(tl.uint32)
    c0 = tl.broadcast_to(groups[:, None], (BLOCK_N // 4, BLOCK_M))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[None, :], (BLOCK_N // 4, BLOCK_M))
    c2 = tl.zeros((BLOCK_N // 4, BLOCK_M), dtype=tl.uint32) + bh.to(tl.uint32)
    c3 = tl.zeros((BLOCK_N // 4, BLOCK_M), dtype=tl.uint32) + _u32(offset)
    x, y, z, w = philox4x32_10(c0, c1, c2, c3, _u32(seed_lo), _u32(seed_hi))
    # [g, m, a, b] -> [g, a, b, m]: column 4g + 2a + b becomes row 4g + 2a + b.
    bits = tl.permute(tl.join(tl.join(x, z), tl.join(y, w)), (0, 2, 3, 1))
    bits = tl.reshape(bits, (BLOCK_N, BLOCK_M))
    return bits >= _u32(threshold)
