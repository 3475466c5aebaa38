"""Row-normalization Triton kernels: LayerNorm, add + LayerNorm and RMSNorm, forward and backward.

The contract is fasttx/ops/layer_norm.py's _torch_forward / _torch_backward: rows of a
contiguous (M, N) input, all math in fp32, s = x + residual rounded to x's dtype before
the statistics. The variance is two-pass (mean first, then the centred sum of squares),
so it stays accurate when |mean| >> std, where E[x^2] - E[x]^2 would cancel; the
second pass also corrects the mean by the mean of the residuals s - mean.

Two code paths, chosen by the LOOPED constexpr:
  * tile: a row fits one register tile (N <= _MAX_TILE_N = 4096); small rows are packed
    BLOCK_M to a program as a [BLOCK_M, BLOCK_N] tile.
  * looped: one row at a time, walked in BLOCK_N column chunks; the forward passes
    over the row three times (mean, centred squares, normalize) and the backward twice
    (the two row sums, then grad_input); the re-reads come from L2.
The backward is deterministic: each program owns a fixed range of rows and writes its
own fp32 dweight/dbias row of a [programs, N] buffer, which the host sums. No atomics.
"""
import triton
import triton.language as tl
import torch


@triton.jit
def _load_s(X, R, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """s = x (+ residual), in x's dtype: the sum is rounded once, as the reference's x + residual."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    else:
        s = x
    return s


@triton.jit
def _inv_std(var, eps):
    # sqrt_rn and a true division, both correctly rounded; tl.rsqrt (rsqrt.approx) is not.
    return 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def _fwd_tile(pid, X, R, W, B, Y, S, MEAN, RSTD, M, N, eps, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # int64 where M * N may pass 2^31: the tile's first row; within the tile int32 suffices (BLOCK_M * N <= 4096).
    row0 = pid.to(tl.int64) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    X += row0 * N
    Y += row0 * N
    if HAS_RESIDUAL:
        R += row0 * N
        S += row0 * N
    s = _load_s(X, R, offs, mask, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(S + offs, s, mask=mask)
    s = s.to(tl.float32)
    if RMS:
        centred = s  # masked lanes loaded 0
    else:
        # The fp32 sum of N values ~ |mean| is off by a few ulps of |mean|, which every output
        # inherits when |mean| >> std; the mean of the residuals s - mean (small, so nearly
        # exact) corrects it to about one rounding.
        mean = tl.sum(s, axis=1) / N
        mean += tl.sum(tl.where(mask, s - mean[:, None], 0.0), axis=1) / N
        tl.store(MEAN + rows, mean, mask=row_ok)
        centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = _inv_std(tl.sum(centred * centred, axis=1) / N, eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_looped(pid, X, R, W, B, Y, S, MEAN, RSTD, N, eps, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = pid.to(tl.int64)
    base = row * N
    # Pass 1: the sum (LayerNorm) or sum of squares (RMSNorm); s is written here, once.
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        s = _load_s(X, R, base + cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(S + base + cols, s, mask=mask)
        s = s.to(tl.float32)
        if RMS:
            acc += s * s
        else:
            acc += s
    if RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) / N
    else:
        mean = tl.sum(acc, axis=0) / N
        # Pass 2: the sums of c = s - mean and of c^2. s is recomputed from x (+ r), not read back
        # from S, so no load depends on this program's own stores.
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            s = _load_s(X, R, base + cols, mask, HAS_RESIDUAL).to(tl.float32)
            centred = tl.where(mask, s - mean, 0.0)
            acc += centred
            acc_sq += centred * centred
        # The fp32 sum of pass 1 is off by a few ulps of |mean|, which every output inherits when
        # |mean| >> std; the mean of the residuals corrects it to about one rounding, and removes
        # its (tiny) share from the variance: sum (c - d)^2 / N = sum c^2 / N - d^2.
        mean_shift = tl.sum(acc, axis=0) / N
        mean += mean_shift
        var = tl.maximum(tl.sum(acc_sq, axis=0) / N - mean_shift * mean_shift, 0.0)
        tl.store(MEAN + row, mean)
    rstd = _inv_std(var, eps)
    tl.store(RSTD + row, rstd)
    # Pass 3: normalize.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        s = _load_s(X, R, base + cols, mask, HAS_RESIDUAL).to(tl.float32)
        y = (s - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(X, R, W, B, Y, S, MEAN, RSTD, M, N, eps,
                     RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, LOOPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Absent tensors (R, W, B, S, MEAN) arrive as a dummy pointer and are never touched.
    if LOOPED:
        _fwd_looped(tl.program_id(0), X, R, W, B, Y, S, MEAN, RSTD, N, eps,
                    RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, BLOCK_N)
    else:
        _fwd_tile(tl.program_id(0), X, R, W, B, Y, S, MEAN, RSTD, M, N, eps,
                  RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _bwd_tile(pid, GY, GS, S, MEAN, RSTD, W, DX, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_prog,
              RMS: tl.constexpr, HAS_GRAD_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    # dweight/dbias column sums stay in registers across the program's rows.
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(0, rows_per_prog, BLOCK_M):
        # The int64 part of the offset is one scalar per tile; within the tile int32 suffices
        # (BLOCK_M * N <= 4096), which saves the per-element 64-bit arithmetic and its registers.
        row0 = row_start + r
        base = row0 * N
        row_ok = tl.arange(0, BLOCK_M) < (row_end - row0).to(tl.int32)
        mask = row_ok[:, None] & col_ok[None, :]
        offs = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
        gy = tl.load(GY + base + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + base + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row0 + tl.arange(0, BLOCK_M), mask=row_ok, other=0.0)
        if RMS:
            xhat = s * rstd[:, None]
        else:
            mean = tl.load(MEAN + row0 + tl.arange(0, BLOCK_M), mask=row_ok, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = gy * w[None, :]
        else:
            g = gy
        proj = tl.sum(g * xhat, axis=1) / N
        if RMS:
            dx = (g - proj[:, None] * xhat) * rstd[:, None]
        else:
            dx = (g - (tl.sum(g, axis=1) / N)[:, None] - proj[:, None] * xhat) * rstd[:, None]
        if HAS_GRAD_S:
            dx += tl.load(GS + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)
        # Masked lanes hold gy = 0, so they add nothing. Fixed-shape tree sums: same order every run.
        if HAS_WEIGHT:
            dw_acc += tl.sum(gy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(gy, axis=0)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid.to(tl.int64) * N + cols, db_acc, mask=col_ok)


@triton.jit
def _bwd_looped(pid, GY, GS, S, MEAN, RSTD, W, DX, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_prog,
                RMS: tl.constexpr, HAS_GRAD_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr):
    row_start = pid.to(tl.int64) * rows_per_prog
    n_rows = tl.minimum(rows_per_prog, M - pid * rows_per_prog)  # < 2^31: both are row counts
    partial_base = pid.to(tl.int64) * N
    for i in range(0, n_rows):
        row = row_start + i
        base = row * N
        rstd = tl.load(RSTD + row)
        if RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row)
        # Pass 1: sum(g * xhat) and sum(g) over the row.
        acc_gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            gy = tl.load(GY + base + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(S + base + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = (s - mean) * rstd  # times gy = 0 on masked lanes
            if HAS_WEIGHT:
                g = gy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                g = gy
            acc_gx += g * xhat
            acc_g += g
        proj = tl.sum(acc_gx, axis=0) / N
        if RMS:
            g_mean = 0.0
        else:
            g_mean = tl.sum(acc_g, axis=0) / N
        # Pass 2: grad_input, and this row's share of the program's dweight/dbias partial row.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            gy = tl.load(GY + base + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(S + base + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = (s - mean) * rstd
            if HAS_WEIGHT:
                g = gy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                g = gy
            dx = (g - g_mean - proj * xhat) * rstd
            if HAS_GRAD_S:
                dx += tl.load(GS + base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
            # The partial row (zeroed by the host) is read and written only by this program, each
            # element by the thread that owns it in this same layout: a plain read-modify-write.
            if HAS_WEIGHT:
                dw_ptr = DW_PARTIAL + partial_base + cols
                tl.store(dw_ptr, tl.load(dw_ptr, mask=mask, other=0.0) + gy * xhat, mask=mask)
            if HAS_BIAS:
                db_ptr = DB_PARTIAL + partial_base + cols
                tl.store(db_ptr, tl.load(db_ptr, mask=mask, other=0.0) + gy, mask=mask)


@triton.jit
def _norm_bwd_kernel(GY, GS, S, MEAN, RSTD, W, DX, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_prog,
                     RMS: tl.constexpr, HAS_GRAD_S: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, LOOPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Absent tensors (GS, MEAN, W, the partials) arrive as a dummy pointer and are never touched.
    if LOOPED:
        _bwd_looped(tl.program_id(0), GY, GS, S, MEAN, RSTD, W, DX, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_prog,
                    RMS, HAS_GRAD_S, HAS_WEIGHT, HAS_BIAS, BLOCK_N)
    else:
        _bwd_tile(tl.program_id(0), GY, GS, S, MEAN, RSTD, W, DX, DW_PARTIAL, DB_PARTIAL, M, N, rows_per_prog,
                  RMS, HAS_GRAD_S, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N)


# ---- dispatcher: a deterministic heuristic (the autotuner needs a GPU to time configs) ----

_MAX_TILE_N = 4096    # widest row held in one register tile; wider rows take the looped path
_SMALL_TILE = 1024    # elements per program for rows up to 512 wide: several rows per tile
_BLOCK_NS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_LOOP_BLOCK_N = 4096  # column chunk of the looped path
_BWD_PROGRAMS = 512   # backward aims for about this many programs: a few per SM on 108-132 SMs


def _tile_config(block_n):
    # 8 fp32 elements per thread up to 2048 wide, 16 at 4096. The backward holds several fp32
    # tiles at once (gy, s, xhat, g, dx) plus the two column sums: multi-row tiles of 2048
    # elements spilled in some builds at 4 and at 8 warps, 8192-wide rows at 8 and at 16.
    block_m = max(1, _SMALL_TILE // block_n)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if block_n <= 1024 else 8, LOOPED=False)


_LOOPED_CONFIG = dict(BLOCK_M=1, BLOCK_N=_LOOP_BLOCK_N, num_warps=8, LOOPED=True)

# Every config _config can return; tests/test_triton_aot.py compiles each of them.
CONFIGS = tuple(_tile_config(bn) for bn in _BLOCK_NS) + (_LOOPED_CONFIG,)


def _config(M, N):
    """Config for an (M, N) problem; the same for forward and backward."""
    if N > _MAX_TILE_N:
        return _LOOPED_CONFIG
    return _tile_config(max(16, triton.next_power_of_2(N)))


# The backward is compiled with no FMA contraction: fused into g - mean(g), the product g = gy * w
# would be exact there but rounded in sum(g), and the exact cancellations of N = 1 and of constant
# rows would leave (gy*w - round(gy*w)) * rstd. Memory-bound: the unfused ops cost nothing.
BWD_OPTIONS = dict(enable_fp_fusion=False)


def _launch_args(cfg):
    return dict(LOOPED=cfg["LOOPED"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])


def _check(x, *others):
    assert x.dim() == 2 and x.is_contiguous(), "x must be a contiguous (M, N) tensor"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    for t in others:
        if t is not None:
            assert t.is_contiguous() and t.dtype == x.dtype and t.device == x.device


def norm_forward(x, residual, weight, bias, eps, rms):
    """(y, s, mean, rstd) as _torch_forward: s only with a residual, mean only without rms."""
    _check(x, residual, weight, bias)
    M, N = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    mean = None if rms else torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    cfg = _config(M, N)
    dummy = x
    _norm_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, residual if residual is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, y, s if s is not None else dummy,
        mean if mean is not None else rstd, rstd, M, N, float(eps),
        RMS=bool(rms), HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, **_launch_args(cfg))
    return y, s, mean, rstd


def _rows_per_prog(M, cfg):
    """Rows per backward program: a multiple of BLOCK_M chosen from (M, N) alone, never from the
    device, so the partial sums -- and so grad_weight / grad_bias -- are the same on every run."""
    return triton.cdiv(triton.cdiv(M, _BWD_PROGRAMS), cfg["BLOCK_M"]) * cfg["BLOCK_M"]


def norm_backward(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms):
    """(grad_input, grad_weight, grad_bias) as _torch_backward; bitwise reproducible for a given (M, N)."""
    _check(s, grad_y, grad_s, weight)
    assert rstd.dtype == torch.float32 and (rms or mean.dtype == torch.float32)
    M, N = s.shape
    has_bias = bool(has_bias)
    cfg = _config(M, N)
    rows_per_prog = _rows_per_prog(M, cfg)
    programs = triton.cdiv(M, rows_per_prog)
    # The looped path accumulates into its partial row, so it must start from zero.
    new_partial = torch.zeros if cfg["LOOPED"] else torch.empty
    dw_partial = new_partial((programs, N), dtype=torch.float32, device=s.device) if weight is not None else None
    db_partial = new_partial((programs, N), dtype=torch.float32, device=s.device) if has_bias else None
    grad_input = torch.empty_like(s)
    dummy = rstd
    _norm_bwd_kernel[(programs,)](
        grad_y, grad_s if grad_s is not None else s, s, mean if mean is not None else dummy, rstd,
        weight if weight is not None else s, grad_input,
        dw_partial if dw_partial is not None else dummy, db_partial if db_partial is not None else dummy,
        M, N, rows_per_prog, RMS=bool(rms), HAS_GRAD_S=grad_s is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=has_bias, **_launch_args(cfg), **BWD_OPTIONS)
    grad_weight = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    grad_bias = db_partial.sum(0).to(s.dtype) if has_bias else None  # weight's dtype is s's
    return grad_input, grad_weight, grad_bias
