"""gelu_ffn Triton kernels: out = act(x @ w1.T + b1) @ w2.T + b2 and its backward, as six GEMMs.

One tiled matmul kernel serves all six. It takes strides, so the transposed operands of the
backward (grad_out.T, grad_h.T, w1.T, w2.T) are views, never copies, and its constexpr epilogue
does the elementwise work while the tile is still in registers:
  * "linear": C = A @ B (+ bias)                      -- second forward GEMM, grad_w1/w2, grad_x
  * "activation": PREACT = A @ B + bias, C = act(PREACT) -- first forward GEMM
  * "activation_grad": C = (A @ B) * act'(PREACT), ACT = act(PREACT), and the fp32 column
    sums of C                                          -- grad_h = (grad_out @ w2) * act'(preact)
The last one loads the preact tile for act' anyway, so it also writes act(preact), the operand
of grad_w2 = grad_out.T @ act(preact): no elementwise kernel re-reads preact, and the grad_w2
GEMM does not recompute act in its K loop, once per row block of its output. The column sums
(grad_b1) are written per row block to a [row_blocks, H] fp32 buffer that the host sums: no
atomics, so grad_b1 is bitwise reproducible.
"""
import os

import triton
import triton.language as tl
import torch

from .bias_gelu import _gelu_and_grad

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")

# The interpreter's bf16 tl.dot multiplies the raw bits; it gets fp32 operands instead.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _act_and_grad(z, ACTIVATION: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(z), act'(z)) in fp32; the grad is 0 unless NEED_GRAD."""
    if ACTIVATION == "relu":
        y = tl.where(z < 0, 0.0, z)  # not maximum: NaN stays NaN, as in torch
        if NEED_GRAD:
            dy = tl.where(z > 0, 1.0, 0.0)  # 0 at z == 0, as torch's threshold_backward
        else:
            dy = 0.0
    else:
        y, dy = _gelu_and_grad(z, ACTIVATION == "gelu_tanh", NEED_GRAD)
    return y, dy


@triton.jit
def _epilogue(acc, C, BIAS, PREACT, ACT, DBIAS_PARTIAL, tile, pid_m, col0, rows, row_ok, cols, n_left, N,
              EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """The EPILOGUE of the module docstring on the tile columns ``cols`` (of n_left still in the matrix)."""
    col_ok = cols < n_left
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if EPILOGUE == "activation_grad":
        # act(z) and act'(z) of the stored (rounded) preact: the values the forward used.
        z = tl.load(PREACT + tile + offs, mask=mask, other=0.0).to(tl.float32)
        y, dy = _act_and_grad(z, ACTIVATION, True)
        tl.store(ACT + tile + offs, y.to(ACT.dtype.element_ty), mask=mask)
        if ACTIVATION == "relu":
            acc = tl.where(z > 0, acc, 0.0)  # a select, as torch's threshold_backward: 0 * NaN would leak
        else:
            acc = acc * dy
        if HAS_BIAS:
            # Rows past M hold 0 (their A rows loaded as 0), so they add nothing. Fixed-shape
            # tree sum of the unrounded fp32 tile: the same order every run.
            tl.store(DBIAS_PARTIAL + pid_m.to(tl.int64) * N + col0 + cols, tl.sum(acc, axis=0), mask=col_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + col0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == "activation":
            # Round first, so act sees exactly the preact the backward will load.
            z = acc.to(PREACT.dtype.element_ty)
            tl.store(PREACT + tile + offs, z, mask=mask)
            acc, _ = _act_and_grad(z.to(tl.float32), ACTIVATION, False)
    tl.store(C + tile + offs, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _ffn_matmul_kernel(A, B, C, BIAS, PREACT, ACT, DBIAS_PARTIAL, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn,
                       EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                       UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # C, PREACT and ACT are contiguous (M, N). Absent tensors arrive as a dummy pointer. HAS_BIAS
    # adds BIAS ("linear", "activation") or writes the DBIAS_PARTIAL column sums ("activation_grad").
    # GROUP_M row blocks walk the column blocks together, so their A rows and B columns stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    # The int64 part of each offset is one scalar per tile (M * K etc. may pass 2^31); within
    # the tile int32 suffices, which saves 64-bit arithmetic and registers per element.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M - pid_m * BLOCK_M
    col_ok = cols < N - pid_n * BLOCK_N
    a_ptrs = A + row0 * stride_am + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + col0 * stride_bn + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = ks < K - k
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # "ieee" matters for fp32 only (16-bit operands take mma/wgmma either way): torch's
        # fp32 matmul does not use tf32 by default, and the tests hold us to torch's error.
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # The epilogue runs on two BLOCK_N / 2 halves in turn: a whole tile's preact, act and act'
    # next to the accumulator would spill.
    acc_left, acc_right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    tile = row0 * N + col0
    cols_left = tl.arange(0, BLOCK_N // 2)
    n_left = N - pid_n * BLOCK_N
    _epilogue(acc_left, C, BIAS, PREACT, ACT, DBIAS_PARTIAL, tile, pid_m, col0, rows, row_ok, cols_left, n_left, N,
              EPILOGUE, HAS_BIAS, ACTIVATION)
    _epilogue(acc_right, C, BIAS, PREACT, ACT, DBIAS_PARTIAL, tile, pid_m, col0, rows, row_ok, BLOCK_N // 2 + cols_left,
              n_left, N, EPILOGUE, HAS_BIAS, ACTIVATION)


# ---- dispatcher: a deterministic heuristic (the autotuner needs a GPU to time configs) ----

def _make_config(block_m, block_n, num_warps, elem_bytes):
    # BLOCK_K spans 64 bytes of a row. 128 bytes (BLOCK_K = 64 in 16-bit) spilled at 128 x 128
    # when a size or stride is not a multiple of 8 elements (e.g. H = 1000): every element then
    # takes its own load and address, and activation_grad's epilogue adds to that.
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64 // elem_bytes, GROUP_M=8,
                num_warps=num_warps, num_stages=4)


# Large / medium / small output tiles. BLOCK_M is 64 rows per 4 warps: one wgmma warpgroup on sm_90.
_TILES = ((128, 128, 8), (64, 128, 4), (64, 64, 4))
HALF_CONFIGS = tuple(_make_config(*tile, elem_bytes=2) for tile in _TILES)
FP32_CONFIGS = tuple(_make_config(*tile, elem_bytes=4) for tile in _TILES)
# Every config _config can return; tests/test_triton_aot.py compiles each of them.
CONFIGS = HALF_CONFIGS + FP32_CONFIGS

_WAVE = 132  # programs that fill an H100 (A100: 108) once; fewer leave SMs idle


def _config(M, N, dtype):
    """The largest tile that still gives a full wave of programs (the smallest when none does)."""
    configs = FP32_CONFIGS if dtype == torch.float32 else HALF_CONFIGS
    for cfg in configs[:-1]:
        if triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]) >= _WAVE:
            return cfg
    return configs[-1]


def _matmul(a, b, c, epilogue="linear", bias=None, preact=None, act=None, reduce_bias=False, activation="relu"):
    """c = epilogue(a @ b) for (M, K) and (K, N) views of any strides; returns the fp32 column
    sums of c for reduce_bias ("activation_grad" only), else None. "linear" ignores activation;
    its fixed default keeps one compiled kernel per layout."""
    M, K = a.shape
    N = b.shape[1]
    cfg = _config(M, N, a.dtype)
    row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    dbias_partial = torch.empty((row_blocks, N), dtype=torch.float32, device=a.device) if reduce_bias else None
    if c.numel():
        dummy = c
        _ffn_matmul_kernel[(row_blocks * triton.cdiv(N, cfg["BLOCK_N"]),)](
            a, b, c, bias if bias is not None else dummy, preact if preact is not None else dummy,
            act if act is not None else dummy, dbias_partial if reduce_bias else dummy, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            EPILOGUE=epilogue, HAS_BIAS=bias is not None or reduce_bias, ACTIVATION=activation,
            UPCAST_DOT=_INTERPRET and a.dtype == torch.bfloat16, **cfg)
    if not reduce_bias:
        return None
    return dbias_partial.sum(0) if M else torch.zeros(N, dtype=torch.float32, device=a.device)


def _check(x, w1, b1, w2, b2, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: dtype {x.dtype} is not float32, float16 or bfloat16")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (M, D) tensor, got shape {tuple(x.shape)}, strides {x.stride()}")
    D = x.shape[1]
    if w1.dim() != 2 or w1.shape[1] != D:
        raise ValueError(f"w1: shape {tuple(w1.shape)}, expected (H, {D}) for x of shape {tuple(x.shape)}")
    H = w1.shape[0]
    if w2.dim() != 2 or w2.shape[1] != H:
        raise ValueError(f"w2: shape {tuple(w2.shape)}, expected (D2, {H}) for w1 of shape {tuple(w1.shape)}")
    for name, bias, n in (("b1", b1, H), ("b2", b2, w2.shape[0])):
        if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
            raise ValueError(f"{name}: shape {tuple(bias.shape)}, expected a contiguous ({n},)")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected x's {x.dtype} on {x.device}")


def gelu_ffn_forward(x, w1, b1, w2, b2, activation):
    """(out, preact): out = act(preact) @ w2.T + b2 with preact = x @ w1.T + b1, both in x's dtype."""
    _check(x, w1, b1, w2, b2, activation)
    M, H = x.shape[0], w1.shape[0]
    preact = x.new_empty((M, H))
    hidden = x.new_empty((M, H))  # act(preact): the second GEMM's operand, dropped afterwards
    _matmul(x, w1.t(), hidden, "activation", bias=b1, preact=preact, activation=activation)
    out = x.new_empty((M, w2.shape[0]))
    _matmul(hidden, w2.t(), out, bias=b2)
    return out, preact


def gelu_ffn_backward(grad_out, x, preact, w1, w2, has_b1, has_b2, activation):
    """(grad_x, grad_w1, grad_b1, grad_w2, grad_b2) in x's dtype; the bias grads are None without
    the bias and bitwise reproducible for a given problem with it. grad_out may have any strides."""
    _check(x, w1, None, w2, None, activation)
    M, H, D2 = x.shape[0], w1.shape[0], w2.shape[0]
    if preact.shape != (M, H) or not preact.is_contiguous() or preact.dtype != x.dtype:
        raise ValueError(f"preact: shape {tuple(preact.shape)} {preact.dtype}, "
                         f"expected a contiguous ({M}, {H}) {x.dtype}")
    if grad_out.shape != (M, D2) or grad_out.dtype != x.dtype:
        raise ValueError(f"grad_out: shape {tuple(grad_out.shape)} {grad_out.dtype}, expected ({M}, {D2}) {x.dtype}")
    grad_h = torch.empty_like(preact)
    hidden = torch.empty_like(preact)
    grad_b1 = _matmul(grad_out, w2, grad_h, "activation_grad", preact=preact, act=hidden,
                      reduce_bias=has_b1, activation=activation)
    grad_w2 = x.new_empty(w2.shape)
    _matmul(grad_out.t(), hidden, grad_w2)
    grad_w1 = x.new_empty(w1.shape)
    _matmul(grad_h.t(), x, grad_w1)
    grad_x = torch.empty_like(x)
    _matmul(grad_h, w1, grad_x)
    grad_b2 = grad_out.sum(0, dtype=torch.float32).to(x.dtype) if has_b2 else None
    return grad_x, grad_w1, grad_b1.to(x.dtype) if has_b1 else None, grad_w2, grad_b2
