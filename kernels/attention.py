"""Flash attention (FlashAttention-2) Triton kernels: forward, and backward without atomics.

The contract is csrc/ops.h's attention_fwd_cpu / attention_bwd_cpu: q (B, Hq, Tq, D), k and v
(B, Hk, Tk, D) contiguous and of one dtype (fp32, fp16, bf16), Hq % Hk == 0 (q head h reads
kv head h // (Hq // Hk)); an optional additive fp32 mask (B, Hq, Tq, Tk) with stride 1 in its
last dim and any (0 for broadcast) others; top-left causal (j <= i) also when Tq != Tk; a fully
masked row gives out 0, lse +inf and zero gradients; dropout from kernels/philox.py
(csrc/common/philox.h's bits), regenerated in the backward, never stored.

Forward: one program per (query block, batch * q head). The scores are kept in log2 units,
s2 = log2(e) * (scale * q.k + mask), so that the online softmax runs on exp2. A causal program
stops its key loop at its last row's diagonal (the blocks above it are skipped by the loop
bound) and applies the causal and key-bound masks in a second loop over only the blocks that
need them (the diagonal ones and the partial last key block); the first loop has no masking.
It saves lse = ln sum_j exp(s_ij) in fp32 (+inf for a fully masked row).

Backward, three kernels:
  * delta: Delta_i = sum_d dO_id * O_id (fp32), one program per (query block, head);
  * dK/dV: one program per (key block, batch * kv head). It walks the q heads of its GQA group
    in order and, for each, the query blocks that see its keys, accumulating dK and dV in fp32
    registers: every kv head's gradient is summed in one fixed order, with no atomics;
  * dQ: one program per (query block, batch * q head), walking key blocks like the forward.
Both recompute P = exp2(s2 - log2(e) lse); lse = +inf gives P = 0, so fully masked rows and the
query rows past Tq (loaded with lse = +inf) contribute nothing. With dropout Z = keep / (1 - p):
dV = sum_i Z P dO, dP = Z (dO . v), dS = P (dP - Delta), dQ = scale dS K, dK = scale dS^T Q.

Head dims 1..256: the head dim is padded to BLOCK_D = max(16, next power of two) with masked
loads (EVEN_D drops the masks when D == BLOCK_D). The host also zero-pads q, k, v (and out,
grad_out) to a multiple of 16 when D is not one, and copies an operand whose address is not
16-byte aligned, and likewise re-lays a mask whose pointer or strides are not (_aligned_mask):
the kernels then always see 16-divisible rows and aligned pointers (vector loads; the scalar-load
variants, for a D like 40 or a Tk like 77, spilled). The zero columns change no score, and their
outputs are sliced off. All accumulation is fp32; fp32 inputs use
tl.dot(input_precision="ieee") (torch's fp32 matmul does not use tf32 by default).
Configs come from a fixed table (_CONFIGS) per kernel, GPU generation, dtype width, dropout
and BLOCK_D; tests/test_triton_aot.py compiles every entry.
"""
import os

import torch
import triton
import triton.language as tl

from .philox import dropout_keep, dropout_keep_t, host_args

# The interpreter's bf16 tl.dot multiplies the raw bits; it gets fp32 operands instead.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot_operand(x, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, MASK_H, rows, row_ok, ds, d_ok, lo, hi, Tk, D, stride_mm, qk_scale,
               seed_lo, seed_hi, offset, bh, threshold,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               EVEN_D: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The online softmax over key blocks [lo, hi). MASKED: apply the key bound (and causal) masks."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        if MASKED:
            kt_mask = col_ok[None, :] & d_ok[:, None]
            v_mask = col_ok[:, None] & d_ok[None, :]
        else:
            kt_mask = d_ok[:, None]
            v_mask = d_ok[None, :]
        if EVEN_D and not MASKED:
            kt = tl.load(K + cols[None, :] * D + ds[:, None])
        else:
            kt = tl.load(K + cols[None, :] * D + ds[:, None], mask=kt_mask, other=0.0)
        s = tl.dot(q, _dot_operand(kt, UPCAST_DOT), input_precision="ieee") * qk_scale
        if HAS_MASK:
            bias = tl.load(MASK_H + rows[:, None] * stride_mm + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s += bias * LOG2E
        if MASKED:
            visible = col_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible score yet keeps m = -inf; subtracting 0 instead gives p = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            # l_i sums p before dropout; the 1 / (1 - p) scale is applied once at the end.
            p = tl.where(dropout_keep(seed_lo, seed_hi, offset, bh, rows, cols, threshold), p, 0.0)
        if EVEN_D and not MASKED:
            v = tl.load(V + cols[:, None] * D + ds[None, :])
        else:
            v = tl.load(V + cols[:, None] * D + ds[None, :], mask=v_mask, other=0.0)
        acc = tl.dot(_dot_operand(p.to(V.dtype.element_ty), UPCAST_DOT), _dot_operand(v, UPCAST_DOT), acc,
                     input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


# Values that change from call to call: Triton turns an int argument equal to 1 into a constant, which
# would recompile for that value and break philox's bitcasts of a constant (_u32).
_RUNTIME_INTS = ["seed_lo", "seed_hi", "offset", "threshold"]


@triton.jit
def _program_block(n_blocks):
    """(block index, batch * head) of this program in a 1-D grid of n_blocks * heads programs.
    Consecutive programs share a head (its K and V stay in L2); the last block goes first,
    which under causal masking is the longest."""
    pid = tl.program_id(0)
    return n_blocks - 1 - pid % n_blocks, pid // n_blocks


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_fwd_kernel(Q, K, V, MASK, OUT, LSE, stride_mb, stride_mh, stride_mm, Hq, Tq, Tk, D, group, qk_scale,
                     seed_lo, seed_hi, offset, threshold, out_scale,
                     IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     EVEN_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = _program_block(tl.cdiv(Tq, BLOCK_M))
    b = bh // Hq
    h = bh % Hq
    # int64 per-head bases (B * H * T * D may pass 2^31); within a head int32 suffices.
    Q += bh.to(tl.int64) * Tq * D
    OUT += bh.to(tl.int64) * Tq * D
    kv_head = b * (Hq // group) + h // group
    K += kv_head.to(tl.int64) * Tk * D
    V += kv_head.to(tl.int64) * Tk * D
    MASK_H = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    q = tl.load(Q + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = _dot_operand(q, UPCAST_DOT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = Tk // BLOCK_N * BLOCK_N  # key blocks before it lie wholly inside Tk
    if IS_CAUSAL:
        # Keys below the block's first row are visible to all its rows; none past its last row is.
        full_end = tl.minimum(full_end, pid_m * BLOCK_M // BLOCK_N * BLOCK_N)
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M)
    else:
        hi = Tk
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, MASK_H, rows, row_ok, ds, d_ok, 0, full_end, Tk, D,
                               stride_mm, qk_scale, seed_lo, seed_hi, offset, bh, threshold, False, IS_CAUSAL,
                               HAS_MASK, HAS_DROPOUT, EVEN_D, UPCAST_DOT, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, MASK_H, rows, row_ok, ds, d_ok, full_end, hi, Tk, D,
                               stride_mm, qk_scale, seed_lo, seed_hi, offset, bh, threshold, True, IS_CAUSAL,
                               HAS_MASK, HAS_DROPOUT, EVEN_D, UPCAST_DOT, BLOCK_N)

    empty = l_i == 0.0  # every score of the row masked: out 0, lse +inf
    out = acc * (out_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(OUT + rows[:, None] * D + ds[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(OUT, DO, DELTA, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = _program_block(tl.cdiv(Tq, BLOCK_M))
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.arange(0, BLOCK_D)
    mask = (rows < Tq)[:, None] & (ds < D)[None, :]
    offs = bh.to(tl.int64) * Tq * D + rows[:, None] * D + ds[None, :]
    o = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, MASK_H, LSE, DELTA, cols, col_ok, ds, d_ok, lo, hi, Tq, D, stride_mm,
                    qk_scale, seed_lo, seed_hi, offset, bh, threshold, drop_scale,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV (BLOCK_N, BLOCK_D) += the query blocks [lo, hi) of one q head, in the transposed frame
    (keys along rows): P^T = exp2(K Q^T s - lse). MASKED: apply the causal mask."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        qt = tl.load(Q + rows[None, :] * D + ds[:, None], mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        qt = _dot_operand(qt, UPCAST_DOT)
        do = tl.load(DO + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = _dot_operand(do, UPCAST_DOT)
        # Rows past Tq get lse = +inf: P = 0 whatever their (zero) q gives.
        lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision="ieee") * qk_scale
        if HAS_MASK:
            bias = tl.load(MASK_H + rows[None, :] * stride_mm + cols[:, None],
                           mask=row_ok[None, :] & col_ok[:, None], other=0.0)
            st += bias * LOG2E
        pt = tl.exp2(st - lse2[None, :])
        if MASKED:
            if IS_CAUSAL:
                pt = tl.where(cols[:, None] <= rows[None, :], pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        if HAS_DROPOUT:
            keep = dropout_keep_t(seed_lo, seed_hi, offset, bh, rows, cols, threshold)
            pdt = tl.where(keep, pt, 0.0)  # dV's 1 / (1 - p) is applied once at the end
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            pdt = pt
        dv = tl.dot(_dot_operand(pdt.to(Q.dtype.element_ty), UPCAST_DOT), do, dv, input_precision="ieee")
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(_dot_operand(dst.to(Q.dtype.element_ty), UPCAST_DOT), tl.trans(qt), dk, input_precision="ieee")
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, DK, DV, stride_mb, stride_mh, stride_mm, Hq, Tq, Tk, D,
                          group, qk_scale, sm_scale, seed_lo, seed_hi, offset, threshold, drop_scale,
                          IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          EVEN_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, bhk = _program_block(tl.cdiv(Tk, BLOCK_N))
    Hk = Hq // group
    b = bhk // Hk
    hk = bhk % Hk
    K += bhk.to(tl.int64) * Tk * D
    V += bhk.to(tl.int64) * Tk * D
    DK += bhk.to(tl.int64) * Tk * D
    DV += bhk.to(tl.int64) * Tk * D

    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = _dot_operand(tl.load(K + cols[:, None] * D + ds[None, :], mask=kv_mask, other=0.0), UPCAST_DOT)
    v = _dot_operand(tl.load(V + cols[:, None] * D + ds[None, :], mask=kv_mask, other=0.0), UPCAST_DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        # Query rows i < start_n see none of these keys; rows i >= start_n + BLOCK_N - 1 see all.
        lo = start_n // BLOCK_M * BLOCK_M
        mask_end = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        mask_end = 0
    # The q heads of the group in a fixed order: dK, dV are bitwise reproducible.
    for g in range(0, group):
        h = hk * group + g
        bh = b * Hq + h
        q_off = bh.to(tl.int64) * Tq * D
        row_off = bh.to(tl.int64) * Tq
        MASK_H = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + q_off, DO + q_off, MASK_H, LSE + row_off, DELTA + row_off, cols,
                                 col_ok, ds, d_ok, lo, mask_end, Tq, D, stride_mm, qk_scale, seed_lo, seed_hi,
                                 offset, bh, threshold, drop_scale, True, IS_CAUSAL, HAS_MASK, HAS_DROPOUT,
                                 UPCAST_DOT, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q + q_off, DO + q_off, MASK_H, LSE + row_off, DELTA + row_off, cols,
                                 col_ok, ds, d_ok, mask_end, Tq, Tq, D, stride_mm, qk_scale,
                                 seed_lo, seed_hi, offset, bh, threshold, drop_scale, False, IS_CAUSAL, HAS_MASK,
                                 HAS_DROPOUT, UPCAST_DOT, BLOCK_M)
    dk *= sm_scale
    if HAS_DROPOUT:
        dv *= drop_scale
    tl.store(DK + cols[:, None] * D + ds[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + cols[:, None] * D + ds[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K, V, MASK_H, rows, row_ok, ds, d_ok, lo, hi, Tk, D, stride_mm, qk_scale,
                  seed_lo, seed_hi, offset, bh, threshold, drop_scale,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  EVEN_D: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ (BLOCK_M, BLOCK_D) += key blocks [lo, hi). MASKED: apply the key bound (and causal) masks."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        if MASKED:
            kt_mask = col_ok[None, :] & d_ok[:, None]
        else:
            kt_mask = d_ok[:, None]
        if EVEN_D and not MASKED:
            kt = tl.load(K + cols[None, :] * D + ds[:, None])
            vt = tl.load(V + cols[None, :] * D + ds[:, None])
        else:
            kt = tl.load(K + cols[None, :] * D + ds[:, None], mask=kt_mask, other=0.0)
            vt = tl.load(V + cols[None, :] * D + ds[:, None], mask=kt_mask, other=0.0)
        kt = _dot_operand(kt, UPCAST_DOT)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        if HAS_MASK:
            bias = tl.load(MASK_H + rows[:, None] * stride_mm + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s += bias * LOG2E
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            # Also the key bound: a key past Tk (zero k) could give exp2 = inf, and inf * 0 = NaN.
            visible = col_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, _dot_operand(vt, UPCAST_DOT), input_precision="ieee")
        if HAS_DROPOUT:
            dp = tl.where(dropout_keep(seed_lo, seed_hi, offset, bh, rows, cols, threshold), dp * drop_scale, 0.0)
        ds_ = p * (dp - delta[:, None])
        dq = tl.dot(_dot_operand(ds_.to(K.dtype.element_ty), UPCAST_DOT), tl.trans(kt), dq, input_precision="ieee")
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, DELTA, DQ, stride_mb, stride_mh, stride_mm, Hq, Tq, Tk, D, group,
                        qk_scale, sm_scale, seed_lo, seed_hi, offset, threshold, drop_scale,
                        IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        EVEN_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = _program_block(tl.cdiv(Tq, BLOCK_M))
    b = bh // Hq
    h = bh % Hq
    Q += bh.to(tl.int64) * Tq * D
    DO += bh.to(tl.int64) * Tq * D
    DQ += bh.to(tl.int64) * Tq * D
    kv_head = b * (Hq // group) + h // group
    K += kv_head.to(tl.int64) * Tk * D
    V += kv_head.to(tl.int64) * Tk * D
    MASK_H = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _dot_operand(tl.load(Q + rows[:, None] * D + ds[None, :], mask=q_mask, other=0.0), UPCAST_DOT)
    do = _dot_operand(tl.load(DO + rows[:, None] * D + ds[None, :], mask=q_mask, other=0.0), UPCAST_DOT)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = Tk // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, pid_m * BLOCK_M // BLOCK_N * BLOCK_N)
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M)
    else:
        hi = Tk
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, MASK_H, rows, row_ok, ds, d_ok, 0, full_end, Tk, D, stride_mm,
                       qk_scale, seed_lo, seed_hi, offset, bh, threshold, drop_scale, False, IS_CAUSAL, HAS_MASK,
                       HAS_DROPOUT, EVEN_D, UPCAST_DOT, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, MASK_H, rows, row_ok, ds, d_ok, full_end, hi, Tk, D, stride_mm,
                       qk_scale, seed_lo, seed_hi, offset, bh, threshold, drop_scale, True, IS_CAUSAL, HAS_MASK,
                       HAS_DROPOUT, EVEN_D, UPCAST_DOT, BLOCK_N)
    dq *= sm_scale
    tl.store(DQ + rows[:, None] * D + ds[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---- configs: a fixed table (the autotuner needs a GPU to time configs) ----
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, GPU generation, dtype width in bytes,
# dropout) and BLOCK_D. Each entry is the first tile of a preference list (largest first) that
# compiled, for its generation, with no register spill and within shared memory (sm_80 entries
# were also held to 99 KB, the sm_86/sm_89 limit, when all sizes are 16-divisible) in the heaviest
# variant (causal, mask, padded head dim, and dropout for the dropout entries), with sizes
# 16-divisible and, for 16-bit entries, also with Tq and Tk not (ptxas spilled a few of the larger
# tiles there; those entries were stepped down). tests/test_triton_aot.py checks every entry. They
# are not tuned on a GPU (none was available): they bound resources, they do not promise the
# fastest tile. fp32 runs tl.dot in "ieee" precision (FMA, no tensor cores), whose operands take
# many more registers: its tiles are much smaller.

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
ARCHS = (80, 90)
BLOCK_DS = (16, 32, 64, 128, 256)
_DELTA_BLOCK_M = 64

_CONFIGS = {
    # (kernel, arch, dtype width, dropout): {BLOCK_D: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
    ('fwd', 80, 2, False):
        {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 2), 128: (128, 32, 8, 2), 256: (32, 32, 4, 2)},
    ('fwd', 80, 2, True):
        {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 2), 128: (128, 32, 8, 2), 256: (32, 32, 4, 2)},
    ('fwd', 80, 4, False):
        {16: (128, 64, 8, 2), 32: (32, 32, 4, 2), 64: (32, 16, 4, 2), 128: (32, 16, 4, 2), 256: (32, 16, 4, 2)},
    ('fwd', 80, 4, True):
        {16: (128, 64, 8, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ('fwd', 90, 2, False):
        {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (128, 32, 8, 2)},
    ('fwd', 90, 2, True):
        {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (128, 32, 8, 2)},
    ('fwd', 90, 4, False):
        {16: (128, 64, 8, 3), 32: (128, 32, 8, 2), 64: (32, 32, 4, 2), 128: (32, 16, 4, 2), 256: (32, 16, 4, 2)},
    ('fwd', 90, 4, True):
        {16: (128, 64, 8, 3), 32: (128, 32, 8, 2), 64: (32, 32, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ('bwd_dkdv', 80, 2, False):
        {16: (16, 64, 4, 2), 32: (32, 64, 8, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 8, 1)},
    ('bwd_dkdv', 80, 2, True):
        {16: (16, 64, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 8, 1)},
    ('bwd_dkdv', 80, 4, False):
        {16: (16, 32, 4, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 1)},
    ('bwd_dkdv', 80, 4, True):
        {16: (16, 16, 2, 1), 32: (16, 16, 4, 1), 64: (16, 32, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ('bwd_dkdv', 90, 2, False):
        {16: (32, 128, 8, 2), 32: (16, 64, 4, 2), 64: (16, 64, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 1)},
    ('bwd_dkdv', 90, 2, True):
        {16: (16, 64, 4, 2), 32: (16, 64, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ('bwd_dkdv', 90, 4, False):
        {16: (32, 32, 8, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 2, 1), 256: (16, 16, 4, 1)},
    ('bwd_dkdv', 90, 4, True):
        {16: (32, 32, 8, 2), 32: (16, 32, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 2, 1), 256: (16, 16, 4, 1)},
    ('bwd_dq', 80, 2, False):
        {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (64, 64, 8, 2), 256: (32, 32, 4, 2)},
    ('bwd_dq', 80, 2, True):
        {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (64, 32, 8, 2), 256: (32, 16, 4, 2)},
    ('bwd_dq', 80, 4, False):
        {16: (32, 32, 8, 2), 32: (32, 16, 4, 2), 64: (16, 16, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ('bwd_dq', 80, 4, True):
        {16: (32, 32, 8, 2), 32: (32, 32, 8, 2), 64: (32, 16, 4, 2), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ('bwd_dq', 90, 2, False):
        {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (128, 32, 8, 2), 256: (128, 32, 8, 2)},
    ('bwd_dq', 90, 2, True):
        {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (128, 32, 8, 2), 256: (32, 16, 4, 2)},
    ('bwd_dq', 90, 4, False):
        {16: (32, 32, 8, 2), 32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (32, 16, 4, 2), 256: (32, 16, 4, 2)},
    ('bwd_dq', 90, 4, True):
        {16: (32, 32, 8, 2), 32: (32, 32, 8, 2), 64: (32, 32, 8, 2), 128: (32, 16, 4, 2), 256: (16, 16, 4, 1)},
}


def _as_dict(entry):
    block_m, block_n, num_warps, num_stages = entry
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


# Every config _config can return, as (kernel, arch, dtype width, dropout, BLOCK_D, config dict);
# tests/test_triton_aot.py compiles each of them.
CONFIGS = tuple((kernel, arch, width, dropout, block_d, _as_dict(entry))
                for (kernel, arch, width, dropout), per_d in _CONFIGS.items() for block_d, entry in per_d.items())


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _arch(device):
    """The table's GPU generation for ``device``: 90 for Hopper (and Blackwell datacenter parts),
    80 otherwise, and off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


def _config(kernel, head_dim, dtype, arch=80, dropout=False):
    """The config dict (BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` for this head dim,
    dtype, GPU generation and dropout; always one of CONFIGS."""
    width = 4 if dtype == torch.float32 else 2
    return _as_dict(_CONFIGS[(kernel, arch, width, bool(dropout))][_block_d(head_dim)])


# ---- host functions ----

def _check(q, k, v, mask):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q: dtype {q.dtype} is not float32, float16 or bfloat16")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 4-D tensor, got shape {tuple(t.shape)}, "
                             f"strides {t.stride()}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected q's {q.dtype} on {q.device}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, Hk, Tk, D) with Hq % Hk == 0 "
                         f"for q {tuple(q.shape)}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim {D} is not in 1..256")
    if mask is not None:
        if mask.dtype != torch.float32 or mask.device != q.device:
            raise TypeError(f"mask: {mask.dtype} on {mask.device}, expected float32 on {q.device}")
        if mask.shape != (B, Hq, Tq, k.shape[2]) or (mask.shape[3] > 1 and mask.stride(3) != 1):
            raise ValueError(f"mask: shape {tuple(mask.shape)} strides {mask.stride()}, expected "
                             f"({B}, {Hq}, {Tq}, {k.shape[2]}) with last-dim stride 1")


def _aligned(t, d_padded):
    """t with its last dim zero-padded to d_padded, and 16-byte aligned (a copy only when needed)."""
    if t.shape[-1] != d_padded:
        return torch.nn.functional.pad(t, (0, d_padded - t.shape[-1]))
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _aligned_mask(mask):
    """(mask, its (b, h, i) strides) with the pointer 16-byte aligned and those strides 16-divisible
    (0 for a broadcast or size-1 dim). Else a copy of its distinct values, rows padded to a multiple
    of 16 (the padding is never read): scalar mask loads of an odd Tk spilled. A key-padding or
    (Tq, Tk) mask copies only its own B*Tk or Tq*Tk values; a full mask costs one extra pass over it,
    next to the kernels' own reads."""
    strides = [st if n > 1 else 0 for n, st in zip(mask.shape[:3], mask.stride()[:3])]
    if mask.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in strides):
        return mask, tuple(strides)
    Tk = mask.shape[3]
    src = mask
    for dim, st in enumerate(strides):
        if st == 0:
            src = src.narrow(dim, 0, 1)
    buf = mask.new_zeros(src.shape[:3] + (_padded_dim(Tk),))
    buf[..., :Tk].copy_(src)
    return buf, tuple(buf.stride(d) if strides[d] else 0 for d in range(3))


def _padded_dim(D):
    return triton.cdiv(D, 16) * 16


def _common_args(q, k, mask, scale, dropout_p, seed, offset):
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    (seed_lo, seed_hi, offset, threshold), drop_scale = host_args(seed, offset, dropout_p)
    if mask is not None:
        mask_arg, strides = _aligned_mask(mask)
    else:
        mask_arg, strides = q, (0, 0, 0)  # a dummy pointer when absent
    log2e = 1.4426950408889634
    flags = dict(HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0, EVEN_D=D == _block_d(D),
                 UPCAST_DOT=_INTERPRET and q.dtype == torch.bfloat16, BLOCK_D=_block_d(D))
    return (mask_arg, strides, (Hq, Tq, Tk, D, Hq // Hk), scale * log2e,
            (seed_lo, seed_hi, offset, threshold), drop_scale, flags)


def attention_forward(q, k, v, mask, is_causal, scale, dropout_p, seed, offset):
    """(out, lse): out like q; lse (B, Hq, Tq) fp32, +inf for fully masked rows."""
    _check(q, k, v, mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    B, Hq, Tq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or k.shape[2] == 0:  # no launch: no rows, or nothing to attend to (out 0, lse +inf)
        return out.zero_(), lse.fill_(float("inf"))
    Dp = _padded_dim(D)
    q, k, v = (_aligned(t, Dp) for t in (q, k, v))
    out_p = out if Dp == D else q.new_empty((B, Hq, Tq, Dp))
    mask_arg, strides, sizes, qk_scale, drop, drop_scale, flags = _common_args(q, k, mask, scale, dropout_p,
                                                                                seed, offset)
    cfg = _config("fwd", D, q.dtype, _arch(q.device), dropout_p > 0)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]) * B * Hq,)
    _attn_fwd_kernel[grid](q, k, v, mask_arg, out_p, lse, *strides, *sizes, qk_scale, *drop, drop_scale,
                           IS_CAUSAL=bool(is_causal), **flags, **cfg)
    if out_p is not out:
        out.copy_(out_p[..., :D])
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, offset):
    """(grad_q, grad_k, grad_v) shaped like q, k, v; bitwise deterministic."""
    _check(q, k, v, mask)
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name}: shape {tuple(t.shape)} {t.dtype}, expected q's {tuple(q.shape)} {q.dtype}")
    if lse.shape != (B, Hq, Tq) or lse.dtype != torch.float32:
        raise ValueError(f"lse: shape {tuple(lse.shape)} {lse.dtype}, expected ({B}, {Hq}, {Tq}) float32")
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    Dp = _padded_dim(D)
    q, k, v, grad_out, out = (_aligned(t, Dp) for t in (q, k, v, grad_out, out))
    lse = lse if lse.data_ptr() % 16 == 0 else lse.clone()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_arg, strides, sizes, qk_scale, drop, drop_scale, flags = _common_args(q, k, mask, scale, dropout_p,
                                                                                seed, offset)
    arch = _arch(q.device)
    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(Tq, _DELTA_BLOCK_M) * B * Hq,)](
        out, grad_out, delta, Tq, Dp, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=flags["BLOCK_D"], num_warps=4)
    cfg = _config("bwd_dkdv", D, q.dtype, arch, dropout_p > 0)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, cfg["BLOCK_N"]) * B * Hk,)](
        q, k, v, mask_arg, grad_out, lse, delta, grad_k, grad_v, *strides, *sizes, qk_scale, scale, *drop,
        drop_scale, IS_CAUSAL=bool(is_causal), **flags, **cfg)
    cfg = _config("bwd_dq", D, q.dtype, arch, dropout_p > 0)
    _attn_bwd_dq_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"]) * B * Hq,)](
        q, k, v, mask_arg, grad_out, lse, delta, grad_q, *strides, *sizes, qk_scale, scale, *drop, drop_scale,
        IS_CAUSAL=bool(is_causal), **flags, **cfg)
    if Dp != D:
        return tuple(g[..., :D].contiguous() for g in (grad_q, grad_k, grad_v))
    return grad_q, grad_k, grad_v
