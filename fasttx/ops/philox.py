"""The attention dropout mask in PyTorch: the bits of csrc/common/philox.h, computed with int64 tensors.

The torch backend draws its mask here, so every backend drops the same scores
for the same seed; the tests use it as the reference for the kernels' masks.

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (col // 4, row, bh, offset),  bh = b * H + h
    bits    = word (col % 4) of Philox4x32-10(counter, key)
    keep    = bits >= floor(dropout_p * 2**32)

uint32 arithmetic on int64 tensors: a product of two uint32 values wraps in
int64, but its low 64 bits are exact, so its high and low words are too.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 of broadcastable int64 counters holding uint32 values; returns four uint32 words."""
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """floor(dropout_p * 2^32): scores whose bits are below it are dropped."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1) for a dropout mask, got {dropout_p}")
    return int(dropout_p * 2.0**32)


def dropout_keep_mask(seed: int, offset: int, batch: int, heads: int, rows: int, cols: int, dropout_p: float,
                      device="cpu") -> Tensor:
    """The bool keep mask of shape (batch, heads, rows, cols)."""
    threshold = dropout_threshold(dropout_p)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    as_i64 = dict(dtype=torch.int64, device=device)
    col = torch.arange(cols, **as_i64)
    row = torch.arange(rows, **as_i64).view(rows, 1)
    bh = torch.arange(batch * heads, **as_i64).view(batch * heads, 1, 1)
    group = (col // 4).view(1, 1, cols)
    words = philox4x32_10(group, row.view(1, rows, 1), bh, torch.tensor(offset & _MASK32, **as_i64), k0, k1)
    word = col % 4
    bits = torch.where(word == 0, words[0], torch.where(word == 1, words[1], torch.where(word == 2, words[2], words[3])))
    return (bits >= threshold).view(batch, heads, rows, cols)
