"""apply_rotary Triton kernel: rotary position embeddings on the rows of q or k.

One kernel serves forward and backward: the backward is the transposed
rotation of the gradient (TRANSPOSE), which reads the tables alone. Each
program takes BLOCK_R rows of (B, H, T) and walks the pairs of their rotary
dims in BLOCK_C steps, then copies the pass-through dims (partial rotary).
Rows are read through the tensor's (b, h, t) strides (a packed-QKV view is
not copied) and written contiguous; the tables' rows are found through
their (b, t) strides or gathered through position ids. Math in fp32, one
rounding at the store.
"""
import triton
import triton.language as tl
import torch


@triton.jit
def _rotary_kernel(X, Y, COS, SIN, POS, rows, heads, tokens, dim, half,
                   stride_xb, stride_xh, stride_xt, stride_cb, stride_ct, stride_sb, stride_st,
                   stride_pb, stride_pt,
                   INTERLEAVED: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_POS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: rows * dim may pass 2^31
    row_ok = r < rows
    t = r % tokens
    h = (r // tokens) % heads
    b = r // (tokens * heads)
    x_row = b * stride_xb + h * stride_xh + t * stride_xt
    y_row = r * dim
    if HAS_POS:
        p = tl.load(POS + b * stride_pb + t * stride_pt, mask=row_ok, other=0)
        c_row = p * stride_cb
        s_row = p * stride_sb
    else:
        c_row = b * stride_cb + t * stride_ct
        s_row = b * stride_sb + t * stride_st
    for j0 in range(0, half, BLOCK_C):
        j = j0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (j < half)[None, :]
        if INTERLEAVED:  # pair (2j, 2j + 1)
            ia = 2 * j
            ib = 2 * j + 1
        else:  # rotate-half: pair (j, j + Dr/2)
            ia = j
            ib = j + half
        xa = tl.load(X + x_row[:, None] + ia[None, :], mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(X + x_row[:, None] + ib[None, :], mask=mask, other=0.0).to(tl.float32)
        ca = tl.load(COS + c_row[:, None] + ia[None, :], mask=mask, other=0.0).to(tl.float32)
        cb = tl.load(COS + c_row[:, None] + ib[None, :], mask=mask, other=0.0).to(tl.float32)
        sa = tl.load(SIN + s_row[:, None] + ia[None, :], mask=mask, other=0.0).to(tl.float32)
        sb = tl.load(SIN + s_row[:, None] + ib[None, :], mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSE:  # R^T (g_a, g_b) = (g_b, -g_a), with each sin at its own position
            ya = xa * ca + xb * sb
            yb = xb * cb - xa * sa
        else:  # x c + R(x) s, R (x_a, x_b) = (-x_b, x_a)
            ya = xa * ca - xb * sa
            yb = xb * cb + xa * sb
        tl.store(Y + y_row[:, None] + ia[None, :], ya.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + y_row[:, None] + ib[None, :], yb.to(Y.dtype.element_ty), mask=mask)
    for c0 in range(2 * half, dim, BLOCK_C):  # partial rotary: the rest passes through
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (c < dim)[None, :]
        v = tl.load(X + x_row[:, None] + c[None, :], mask=mask, other=0.0)
        tl.store(Y + y_row[:, None] + c[None, :], v, mask=mask)


# ---- dispatcher: a deterministic heuristic (the autotuner needs a GPU to time configs) ----

_PAIRS_PER_PROGRAM = 1024  # BLOCK_R x BLOCK_C: 2048 elements of x per program, 8 per thread at 4 warps
_BLOCK_CS = (16, 32, 64, 128)
_NUM_WARPS = 4


def _make_config(block_c):
    return dict(BLOCK_R=_PAIRS_PER_PROGRAM // block_c, BLOCK_C=block_c, num_warps=_NUM_WARPS)


# Every config _config can return; tests/test_triton_aot_apply_rotary.py compiles each of them.
CONFIGS = tuple(_make_config(bc) for bc in _BLOCK_CS)


def _config(half):
    """Tile for Dr/2 pairs per row: one column step up to 128 pairs (head dims to 256), then loops."""
    return _make_config(min(max(16, triton.next_power_of_2(half)), _BLOCK_CS[-1]))


def _check(x, cos, sin, position_ids):
    assert x.dim() == 4 and (x.shape[-1] <= 1 or x.numel() == 0 or x.stride(-1) == 1), \
        "x must be (B, H, T, D) with a unit last stride"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert cos.dtype == sin.dtype and cos.dtype in (x.dtype, torch.float32), (cos.dtype, x.dtype)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.shape == sin.shape
    assert (position_ids is None) == (cos.dim() == 3)


def _rotate(x, cos, sin, position_ids, interleaved, transpose):
    _check(x, cos, sin, position_ids)
    b, h, t, d = x.shape
    y = torch.empty((b, h, t, d), dtype=x.dtype, device=x.device)
    rows = b * h * t
    if rows == 0:
        return y
    half = cos.shape[-1] // 2
    cfg = _config(half)
    if position_ids is None:
        cos_strides, sin_strides, pos, pos_strides = cos.stride()[:2], sin.stride()[:2], cos, (0, 0)
    else:  # a table's row stride stands for the batch stride; the ids give the row
        cos_strides, sin_strides = (cos.stride(0), 0), (sin.stride(0), 0)
        pos, pos_strides = position_ids, position_ids.stride()
    _rotary_kernel[(triton.cdiv(rows, cfg["BLOCK_R"]),)](
        x, y, cos, sin, pos, rows, h, t, d, half, *x.stride()[:3], *cos_strides, *sin_strides, *pos_strides,
        INTERLEAVED=interleaved, TRANSPOSE=transpose, HAS_POS=position_ids is not None,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return y


def apply_rotary_forward(q, k, cos, sin, position_ids, interleaved):
    """(rotated q, rotated k): the torch backend's contract (fasttx/ops/apply_rotary.py)."""
    return (_rotate(q, cos, sin, position_ids, interleaved, False),
            _rotate(k, cos, sin, position_ids, interleaved, False))


def apply_rotary_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    """(grad_q, grad_k): the transposed rotation of the outputs' gradients."""
    return (_rotate(grad_q, cos, sin, position_ids, interleaved, True),
            _rotate(grad_k, cos, sin, position_ids, interleaved, True))
