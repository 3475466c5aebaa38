"""glu_ffn Triton kernels: out = (act(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w_down.T + b_down
and its backward.

One tiled matmul kernel (gelu_ffn's, extended) serves every GEMM. It takes strides, so the
transposed operands of the backward are views, never copies, and its constexpr epilogue does
the elementwise work while the tiles are in registers:
  * "glu" (forward, gate and up): TWO B operands, w_gate.T and w_up.T, walked in the same K
    loop over the same A tile of x, into two accumulators: GATE = x w_gate^T + b_gate and
    UP = x w_up^T + b_up are written for backward and C = act(GATE) * UP for the down GEMM.
    Two B pointers rather than one GEMM over the stacked [w_gate; w_up]: the stacked weight
    would be a per-call concat (2 H D elements copied every forward, as many bytes as the
    weights themselves) or a change of the parameters' layout (LlamaMLP's state_dict keeps
    them apart); with two pointers each x tile is still loaded once for both products, which
    is all the stacking buys, and the epilogue has gate and up of the same (row, column) in
    one program, which a stacked GEMM's [gate | up] tile would only give with BLOCK_N
    straddling the middle.
  * "glu_grad" (backward, grad_prod = grad_out @ w_down): loads the GATE and UP tiles and
    writes C = grad_gate = grad_prod * UP * act'(GATE), C2 = grad_up = grad_prod * act(GATE)
    and C3 = act(GATE) * UP, the recomputed product that grad_w_down needs; with biases, the
    fp32 column sums of grad_gate and grad_up per row block, summed on the host (no atomics:
    bitwise reproducible).
  * "linear": C = A @ B (+ bias) (+ C when ACCUMULATE: grad_x's second half, grad_up @ w_up).
"""
import os

import triton
import triton.language as tl
import torch

from .glu import _glu_act_and_grad

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# The interpreter's bf16 tl.dot multiplies the raw bits; it gets fp32 operands instead.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _epilogue(acc, acc2, C, C2, C3, BIAS, BIAS2, GATE, UP, DB_PARTIAL, DB2_PARTIAL, tile, pid_m, col0, rows, row_ok,
              cols, n_left, N, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
              ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr):
    """The EPILOGUE of the module docstring on the tile columns ``cols`` (of n_left still in the matrix)."""
    col_ok = cols < n_left
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if EPILOGUE == "glu":
        if HAS_BIAS:
            acc += tl.load(BIAS + col0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS2:
            acc2 += tl.load(BIAS2 + col0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # Rounded first, so the product uses exactly the gate and up the backward will load.
        z = acc.to(C2.dtype.element_ty)
        u = acc2.to(C3.dtype.element_ty)
        tl.store(C2 + tile + offs, z, mask=mask)
        tl.store(C3 + tile + offs, u, mask=mask)
        a, _ = _glu_act_and_grad(z.to(tl.float32), ACTIVATION, False)
        acc = a * u.to(tl.float32)
    elif EPILOGUE == "glu_grad":
        z = tl.load(GATE + tile + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(UP + tile + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _glu_act_and_grad(z, ACTIVATION, True)
        grad_up = acc * a
        tl.store(C2 + tile + offs, grad_up.to(C2.dtype.element_ty), mask=mask)
        tl.store(C3 + tile + offs, (a * u).to(C3.dtype.element_ty), mask=mask)
        acc = acc * u * da
        # Rows past M hold 0 (their A rows loaded as 0, their gate/up as 0): they add nothing.
        if HAS_BIAS:
            tl.store(DB_PARTIAL + pid_m.to(tl.int64) * N + col0 + cols, tl.sum(acc, axis=0), mask=col_ok)
        if HAS_BIAS2:
            tl.store(DB2_PARTIAL + pid_m.to(tl.int64) * N + col0 + cols, tl.sum(grad_up, axis=0), mask=col_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + col0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACCUMULATE:
            acc += tl.load(C + tile + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + tile + offs, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _glu_ffn_matmul_kernel(A, B, B2, C, C2, C3, BIAS, BIAS2, GATE, UP, DB_PARTIAL, DB2_PARTIAL, M, N, K,
                           stride_am, stride_ak, stride_bk, stride_bn,
                           EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
                           ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    # C, C2, C3, GATE and UP are contiguous (M, N); B2 has B's strides. Absent tensors arrive as a
    # dummy pointer. GROUP_M row blocks walk the column blocks together, so their A rows and B
    # columns stay in L2.
    DUAL: tl.constexpr = EPILOGUE == "glu"
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    # int64 per-tile bases (M * K etc. may pass 2^31), int32 within the tile.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M - pid_m * BLOCK_M
    col_ok = cols < N - pid_n * BLOCK_N
    a_ptrs = A + row0 * stride_am + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_offs = col0 * stride_bn + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    b_ptrs = B + b_offs
    b2_ptrs = B2 + b_offs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = ks < K - k
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # "ieee": torch's fp32 matmul does not use tf32 by default, and the tests hold us to torch's error.
        acc = tl.dot(a, b, acc, input_precision="ieee")
        if DUAL:
            b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST_DOT:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision="ieee")
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # The epilogue runs on two BLOCK_N / 2 halves in turn, as gelu_ffn's: whole tiles of gate,
    # up, act and act' next to the accumulators would spill.
    acc_l, acc_r = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    acc2_l, acc2_r = tl.split(tl.permute(tl.reshape(acc2, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    tile = row0 * N + col0
    half = tl.arange(0, BLOCK_N // 2)
    n_left = N - pid_n * BLOCK_N
    _epilogue(acc_l, acc2_l, C, C2, C3, BIAS, BIAS2, GATE, UP, DB_PARTIAL, DB2_PARTIAL, tile, pid_m, col0, rows,
              row_ok, half, n_left, N, EPILOGUE, HAS_BIAS, HAS_BIAS2, ACTIVATION, ACCUMULATE)
    _epilogue(acc_r, acc2_r, C, C2, C3, BIAS, BIAS2, GATE, UP, DB_PARTIAL, DB2_PARTIAL, tile, pid_m, col0, rows,
              row_ok, BLOCK_N // 2 + half, n_left, N, EPILOGUE, HAS_BIAS, HAS_BIAS2, ACTIVATION, ACCUMULATE)


# ---- dispatcher: a deterministic heuristic (the autotuner needs a GPU to time configs) ----

def _make_config(block_m, block_n, num_warps, elem_bytes):
    # BLOCK_K spans 64 bytes of a row, as gelu_ffn's (128 bytes spilled there at 128 x 128).
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64 // elem_bytes, GROUP_M=8,
                num_warps=num_warps, num_stages=4)


# Large / medium / small output tiles. "glu" keeps two accumulators, so its tiles are half as wide.
_TILES = ((128, 128, 8), (64, 128, 4), (64, 64, 4))
_DUAL_TILES = ((128, 64, 8), (64, 64, 4), (64, 32, 4))
CONFIGS_BY_KIND = {(dual, dtype): tuple(_make_config(*t, elem_bytes=4 if dtype == torch.float32 else 2)
                                        for t in (_DUAL_TILES if dual else _TILES))
                   for dual in (False, True) for dtype in (torch.float32, torch.bfloat16)}
# Every config _config can return; tests/test_triton_aot_glu.py compiles each of them.
CONFIGS = tuple(cfg for configs in CONFIGS_BY_KIND.values() for cfg in configs)

_WAVE = 132  # programs that fill an H100 (A100: 108) once; fewer leave SMs idle


def _config(M, N, dtype, dual, aligned=True):
    """The largest tile that still gives a full wave of programs (the smallest when none does).
    Unaligned operands (a size, stride or pointer the JIT cannot mark 16-divisible) take the
    smallest tile: element-wise loads and addresses made the larger ones spill on sm_80
    (tests/test_triton_aot_glu.py compiles both cases)."""
    configs = CONFIGS_BY_KIND[(dual, torch.float32 if dtype == torch.float32 else torch.bfloat16)]
    if not aligned:
        return configs[-1]
    for cfg in configs[:-1]:
        if triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]) >= _WAVE:
            return cfg
    return configs[-1]


def _aligned(sizes, tensors):
    """Whether the JIT sees every size and non-unit stride as 16-divisible and every pointer 16-byte aligned."""
    return (all(v % 16 == 0 for v in sizes if v != 1)
            and all(t.data_ptr() % 16 == 0 for t in tensors if t is not None))


def _matmul(a, b, c, epilogue="linear", b2=None, c2=None, c3=None, bias=None, bias2=None, gate=None, up=None,
            reduce_bias=False, reduce_bias2=False, accumulate=False, activation="silu"):
    """c = epilogue(a @ b) for (M, K) and (K, N) views of any strides (b2 with b's strides). Returns
    the fp32 column sums of c and c2 for reduce_bias / reduce_bias2 ("glu_grad" only), else None.
    "linear" ignores activation; its fixed default keeps one compiled kernel per layout."""
    M, K = a.shape
    N = b.shape[1]
    if b2 is not None:
        assert b2.shape == b.shape and b2.stride() == b.stride()
    aligned = _aligned((M, N, K, *a.stride(), *b.stride()), (a, b, b2, c, c2, c3, bias, bias2, gate, up))
    cfg = _config(M, N, a.dtype, epilogue == "glu", aligned)
    row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    partial = lambda wanted: torch.empty((row_blocks, N), dtype=torch.float32, device=a.device) if wanted else None
    db, db2 = partial(reduce_bias), partial(reduce_bias2)
    if c.numel():
        d = c
        or_dummy = lambda t: t if t is not None else d
        _glu_ffn_matmul_kernel[(row_blocks * triton.cdiv(N, cfg["BLOCK_N"]),)](
            a, b, or_dummy(b2), c, or_dummy(c2), or_dummy(c3), or_dummy(bias), or_dummy(bias2), or_dummy(gate),
            or_dummy(up), or_dummy(db), or_dummy(db2), M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            EPILOGUE=epilogue, HAS_BIAS=bias is not None or reduce_bias, HAS_BIAS2=bias2 is not None or reduce_bias2,
            ACTIVATION=activation, ACCUMULATE=accumulate, UPCAST_DOT=_INTERPRET and a.dtype == torch.bfloat16, **cfg)
    sums = lambda p: (p.sum(0) if M else torch.zeros(N, dtype=torch.float32, device=a.device)) if p is not None else None
    return sums(db), sums(db2)


def _check(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: dtype {x.dtype} is not float32, float16 or bfloat16")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous (M, D) tensor, got shape {tuple(x.shape)}, strides {x.stride()}")
    D = x.shape[1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        if w.dim() != 2 or w.shape != w_gate.shape or w.shape[1] != D or not w.is_contiguous():
            raise ValueError(f"{name}: shape {tuple(w.shape)}, expected a contiguous (H, {D}) for x of shape "
                             f"{tuple(x.shape)}, the same for w_gate and w_up")
    H = w_gate.shape[0]
    if w_down.dim() != 2 or w_down.shape[1] != H or not w_down.is_contiguous():
        raise ValueError(f"w_down: shape {tuple(w_down.shape)}, expected a contiguous (D2, {H})")
    for name, bias, n in (("b_gate", b_gate, H), ("b_up", b_up, H), ("b_down", b_down, w_down.shape[0])):
        if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
            raise ValueError(f"{name}: shape {tuple(bias.shape)}, expected a contiguous ({n},)")
    for name, t in (("w_gate", w_gate), ("b_gate", b_gate), ("w_up", w_up), ("b_up", b_up), ("w_down", w_down),
                    ("b_down", b_down)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected x's {x.dtype} on {x.device}")


def glu_ffn_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    """(out, gate, up): out = (act(gate) * up) @ w_down.T + b_down, gate and up the pre-activations."""
    _check(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation)
    M, H = x.shape[0], w_gate.shape[0]
    gate, up = x.new_empty((M, H)), x.new_empty((M, H))
    prod = x.new_empty((M, H))  # act(gate) * up: the down GEMM's operand, dropped afterwards
    _matmul(x, w_gate.t(), prod, "glu", b2=w_up.t(), c2=gate, c3=up, bias=b_gate, bias2=b_up, activation=activation)
    out = x.new_empty((M, w_down.shape[0]))
    _matmul(prod, w_down.t(), out, bias=b_down)
    return out, gate, up


def glu_ffn_backward(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation):
    """(grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up, grad_w_down, grad_b_down) in x's dtype;
    the bias grads are None without the bias. grad_out may have any strides."""
    _check(x, w_gate, None, w_up, None, w_down, None, activation)
    M, H, D2 = x.shape[0], w_gate.shape[0], w_down.shape[0]
    for name, t in (("gate", gate), ("up", up)):
        if t.shape != (M, H) or not t.is_contiguous() or t.dtype != x.dtype:
            raise ValueError(f"{name}: shape {tuple(t.shape)} {t.dtype}, expected a contiguous ({M}, {H}) {x.dtype}")
    if grad_out.shape != (M, D2) or grad_out.dtype != x.dtype:
        raise ValueError(f"grad_out: shape {tuple(grad_out.shape)} {grad_out.dtype}, expected ({M}, {D2}) {x.dtype}")
    grad_gate, grad_up, prod = (torch.empty_like(gate) for _ in range(3))
    grad_b_gate, grad_b_up = _matmul(grad_out, w_down, grad_gate, "glu_grad", c2=grad_up, c3=prod, gate=gate, up=up,
                                     reduce_bias=has_b_gate, reduce_bias2=has_b_up, activation=activation)
    grad_w_down = x.new_empty(w_down.shape)
    _matmul(grad_out.t(), prod, grad_w_down)
    del prod
    grad_w_gate, grad_w_up = x.new_empty(w_gate.shape), x.new_empty(w_up.shape)
    _matmul(grad_gate.t(), x, grad_w_gate)
    _matmul(grad_up.t(), x, grad_w_up)
    grad_x = torch.empty_like(x)
    _matmul(grad_gate, w_gate, grad_x)
    _matmul(grad_up, w_up, grad_x, accumulate=True)
    grad_b_down = grad_out.sum(0, dtype=torch.float32).to(x.dtype) if has_b_down else None
    cast = lambda t: t.to(x.dtype) if t is not None else None
    return grad_x, grad_w_gate, cast(grad_b_gate), grad_w_up, cast(grad_b_up), grad_w_down, grad_b_down
