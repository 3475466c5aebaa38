"""apply_rotary: rotary position embeddings (RoPE) on q and k, in one pass each.

Hugging Face's ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin``:
``rotate_half`` writes a concatenated copy of q, and the two products and their
sum each write another (B, H, T, D) tensor, so forward moves about six times
the bytes of q and k, and autograd keeps q, k and the rotated copies for
backward. The fused op reads each row of q and k once (through its strides, so
a view of a packed QKV projection is not copied) and writes the rotated row
once. Its backward is the transposed rotation of the incoming gradient,
``cos * g - rotate_half(sin * g)``: it needs cos and sin only, so nothing of
q or k is kept (unless cos or sin themselves require grad).

Conventions: rotate-half (Llama, Mistral, Qwen) pairs element i with
i + Dr/2, interleaved (GPT-J) pairs 2i with 2i + 1; cos and sin are used per
element exactly as given, their last dimension Dr <= D rotates the first Dr
features and the rest pass through (partial rotary: Phi, GPT-NeoX).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttx import backends
from fasttx.ops._checks import check_bool, check_float, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

_OP = "apply_rotary"


# ---- reference: plain PyTorch, the truth every backend is tested against ------

def _rotate_half(x: Tensor, interleaved: bool) -> Tensor:
    """R x with R the rotation by 90 degrees of each pair: (a, b) -> (-b, a). R^T = -R."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _broadcast_tables(cos: Tensor, sin: Tensor, position_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """cos and sin as (B or 1, 1, T, Dr), broadcasting against (B, H, T, D)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    if cos.dim() == 2:
        return cos[None, None], sin[None, None]
    if cos.dim() == 3:
        return cos[:, None], sin[:, None]
    return cos, sin


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    # In fp32 (fp64 for fp64) from the tables as given, rounded once to x's dtype.
    acc = _acc_dtype(x.dtype)
    dr = cos.shape[-1]
    xr = x[..., :dr].to(acc)
    out = (xr * cos.to(acc) + _rotate_half(xr, interleaved) * sin.to(acc)).to(x.dtype)
    return torch.cat((out, x[..., dr:]), dim=-1) if dr < x.shape[-1] else out


def apply_rotary_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                     position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The truth in plain PyTorch: ``x * cos + rotate_half(x) * sin`` on the first Dr features."""
    cos, sin = _broadcast_tables(cos, sin, position_ids)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


# The torch backend, on the op's normalised inputs: q (B, Hq, T, D), k (B, Hk, T, D); cos, sin
# (B, T, Dr) (any strides, a batch stride of 0 included), or with position_ids (B, T) the
# (positions, Dr) tables whose rows it gathers. The kernels share this contract (csrc/ops.h).

def _torch_forward(q, k, cos, sin, position_ids, interleaved):
    return tuple(t.contiguous() for t in apply_rotary_ref(q, k, cos, sin, interleaved, position_ids))


def _transposed(g: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    # d/dx of x*c + R(x)*s is c*g + R^T(s*g) = c*g - R(s*g): cos and sin only, no x.
    acc = _acc_dtype(g.dtype)
    dr = cos.shape[-1]
    gr = g[..., :dr].to(acc)
    out = (gr * cos.to(acc) - _rotate_half(gr * sin.to(acc), interleaved)).to(g.dtype)
    return torch.cat((out, g[..., dr:]), dim=-1) if dr < g.shape[-1] else out


def _torch_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    # Differentiable torch ops: also the backward that autograd records (create_graph=True).
    cos, sin = _broadcast_tables(cos, sin, position_ids)
    return (_transposed(grad_q, cos, sin, interleaved).contiguous(),
            _transposed(grad_k, cos, sin, interleaved).contiguous())


def _table_grads(grad_q, grad_k, q, k, cos, sin, position_ids, interleaved):
    """Gradients of cos and sin (torch ops): sums over heads of g * x and g * R(x), per (b, t),
    scattered into the table rows when position_ids gathered them."""
    acc = _acc_dtype(q.dtype)
    dr = cos.shape[-1]
    grad_cos = grad_sin = 0
    for g, x in ((grad_q, q), (grad_k, k)):
        g, x = g[..., :dr].to(acc), x[..., :dr].to(acc)
        grad_cos = grad_cos + (g * x).sum(1)
        grad_sin = grad_sin + (g * _rotate_half(x, interleaved)).sum(1)
    if position_ids is not None:
        rows = position_ids.reshape(-1)
        grad_cos = cos.new_zeros(cos.shape, dtype=acc).index_add(0, rows, grad_cos.reshape(-1, dr))
        grad_sin = sin.new_zeros(sin.shape, dtype=acc).index_add(0, rows, grad_sin.reshape(-1, dr))
    return grad_cos.to(cos.dtype), grad_sin.to(sin.dtype)


# ---- the other backends ---------------------------------------------------------

def _cpu_forward(q, k, cos, sin, position_ids, interleaved):
    return tuple(backends.extension().apply_rotary_fwd_cpu(q, k, cos, sin, position_ids, interleaved))


def _cpu_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    return tuple(backends.extension().apply_rotary_bwd_cpu(grad_q, grad_k, cos, sin, position_ids, interleaved))


def _cuda_forward(q, k, cos, sin, position_ids, interleaved):
    return tuple(backends.extension().apply_rotary_fwd_cuda(q, k, cos, sin, position_ids, interleaved))


def _cuda_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    return tuple(backends.extension().apply_rotary_bwd_cuda(grad_q, grad_k, cos, sin, position_ids, interleaved))


def _triton_forward(q, k, cos, sin, position_ids, interleaved):
    from fasttx.kernels import apply_rotary as kr
    return kr.apply_rotary_forward(q, k, cos, sin, position_ids, interleaved)


def _triton_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    from fasttx.kernels import apply_rotary as kr
    return kr.apply_rotary_backward(grad_q, grad_k, cos, sin, position_ids, interleaved)


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.device_only("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


# ---- forward and backward: the bodies of the custom ops -----------------------------

def _rows_contiguous(t: Tensor) -> Tensor:
    # The kernels read every dimension but the last through its stride.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_positions(position_ids: Tensor, rows: int) -> None:
    # One min/max, here rather than a bounds check per element in every kernel.
    if position_ids.numel() == 0 or position_ids.device.type == "meta":
        return
    low, high = (v.item() for v in torch.aminmax(position_ids))
    if low < 0 or high >= rows:
        raise IndexError(f"fasttx.{_OP}: position_ids must lie in [0, {rows}) to index the {rows} rows of cos "
                         f"and sin, got values in [{low}, {high}]")


def _forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor], interleaved: bool,
             backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, q, k, cos, sin)
    if position_ids is not None:
        _check_positions(position_ids, cos.shape[0])
    if q.numel() == 0 and k.numel() == 0:
        return q.new_empty(q.shape), k.new_empty(k.shape)
    return impl.forward(_rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(cos), _rows_contiguous(sin),
                        position_ids, interleaved)


def _backward(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
              interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, grad_q, grad_k, cos, sin)
    if grad_q.numel() == 0 and grad_k.numel() == 0:
        return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)
    return impl.backward(_rows_contiguous(grad_q), _rows_contiguous(grad_k), _rows_contiguous(cos),
                         _rows_contiguous(sin), position_ids, interleaved)


# ---- torch.library registration: opaque to torch.compile, with autograd -----------

@torch.library.custom_op("fasttx::apply_rotary", mutates_args=())
def _apply_rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
                     interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _forward(q, k, cos, sin, position_ids, interleaved, backend)


@_apply_rotary_op.register_fake
def _(q, k, cos, sin, position_ids, interleaved, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fasttx::apply_rotary_backward", mutates_args=())
def _apply_rotary_backward_op(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor,
                              position_ids: Optional[Tensor], interleaved: bool,
                              backend: str) -> tuple[Tensor, Tensor]:
    return _backward(grad_q, grad_k, cos, sin, position_ids, interleaved, backend)


@_apply_rotary_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, position_ids, interleaved, backend):
    return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, interleaved, backend = inputs
    # q and k are kept only for the gradients of cos and sin; the rotation's own needs the tables alone.
    ctx.table_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    kept = (q, k) if ctx.table_grads else (None, None)
    ctx.save_for_backward(cos, sin, position_ids, *kept)
    ctx.interleaved, ctx.backend = interleaved, backend


def _autograd_backward(backward):
    def run(ctx, grad_q, grad_k):
        cos, sin, position_ids, q, k = ctx.saved_tensors
        if graphed_backward():
            gq, gk = _torch_backward(grad_q, grad_k, cos, sin, position_ids, ctx.interleaved)
        else:
            gq, gk = backward(grad_q, grad_k, cos, sin, position_ids, ctx.interleaved, ctx.backend)
        gcos = gsin = None
        if ctx.table_grads:
            gcos, gsin = _table_grads(grad_q, grad_k, q, k, cos, sin, position_ids, ctx.interleaved)
        return gq, gk, gcos, gsin, None, None, None
    return run


_apply_rotary_op.register_autograd(_autograd_backward(_apply_rotary_backward_op), setup_context=_setup_context)
_ApplyRotaryFunction = eager_function("_ApplyRotaryFunction", _forward, _setup_context, _autograd_backward(_backward))


# ---- public API ---------------------------------------------------------------

def _check_tables(q: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor]) -> None:
    b, _, t, d = q.shape
    check_float(_OP, "cos", cos)
    if sin.dtype != cos.dtype or sin.device != cos.device:
        check_same(_OP, "sin", sin, "cos", cos)
    if cos.device != q.device:
        check_same(_OP, "cos", cos, "q", q)
    if sin.shape != cos.shape:
        raise ValueError(f"fasttx.{_OP}: sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    dr = cos.shape[-1] if cos.dim() else 0
    if position_ids is not None:
        check_tensor(_OP, "position_ids", position_ids)
        if position_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"fasttx.{_OP}: position_ids must be int64 or int32, got {position_ids.dtype}")
        if position_ids.device != q.device:
            raise ValueError(f"fasttx.{_OP}: position_ids is on {position_ids.device} but q is on {q.device}; "
                             "they must match")
        if tuple(position_ids.shape) not in ((b, t), (1, t), (t,)):
            raise ValueError(f"fasttx.{_OP}: position_ids must have shape ({b} or 1, {t}) or ({t},) for q of shape "
                             f"{tuple(q.shape)}, got {tuple(position_ids.shape)}")
        if cos.dim() != 2:
            raise ValueError(f"fasttx.{_OP}: with position_ids, cos and sin must be (positions, rotary_dim) tables, "
                             f"got shape {tuple(cos.shape)}")
    else:
        lead = tuple(cos.shape[:-1])
        allowed = ((t,), (b, t), (1, t), (b, 1, t), (1, 1, t))
        if lead not in allowed:
            raise ValueError(f"fasttx.{_OP}: cos and sin must have shape ({t}, Dr), ({b} or 1, {t}, Dr) or "
                             f"({b} or 1, 1, {t}, Dr) for q of shape {tuple(q.shape)}, got {tuple(cos.shape)}")
    if dr % 2 or not 2 <= dr <= d:
        raise ValueError(f"fasttx.{_OP}: the rotary dimension (the last of cos and sin) must be even and in "
                         f"[2, {d}] (q's head dimension), got {dr}")


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
                 position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rotary position embeddings: ``(rotate(q), rotate(k))``, Hugging Face's ``apply_rotary_pos_emb``.

    q is (B, Hq, T, D) and k (B, Hk, T, D) (Hq != Hk for grouped-query attention), any strides
    but a unit stride on the last dimension (a view of a packed QKV projection is read in place).
    cos and sin are (T, Dr), (B or 1, T, Dr) or (B or 1, 1, T, Dr), as transformers' rotary
    embeddings return them; or, with ``position_ids`` of shape (B, T), (1, T) or (T,), (positions,
    Dr) tables whose rows are gathered. The first Dr <= D features of each head rotate and the rest
    pass through. ``interleaved=False`` pairs feature i with i + Dr/2 (rotate_half, Llama);
    ``interleaved=True`` pairs 2i with 2i + 1 (GPT-J). The results are new contiguous tensors
    in q's dtype, computed in float32 (float64 for float64) and rounded once; cos and sin may
    be float32 for half-precision q and k. Under autocast nothing changes: no GEMM is involved.
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(_OP, name, t)
    check_float(_OP, "q", q)
    check_same(_OP, "k", k, "q", q)
    check_bool(_OP, "interleaved", interleaved)
    if q.dim() != 4 or k.dim() != 4:
        bad, t = ("q", q) if q.dim() != 4 else ("k", k)
        raise ValueError(f"fasttx.{_OP}: {bad} must be 4-D (batch, heads, tokens, head_dim), got shape "
                         f"{tuple(t.shape)}")
    b, _, t, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
        raise ValueError(f"fasttx.{_OP}: k must have shape ({b}, heads, {t}, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    _check_tables(q, cos, sin, position_ids)
    # Normalise: cos and sin to (B, T, Dr) (a broadcast batch as stride 0), or (positions, Dr)
    # tables with position_ids (B, T); the tables at q's dtype or float32 (the kernels' two).
    if position_ids is not None:
        position_ids = position_ids.to(torch.int64).expand(b, t)
    else:
        if cos.dim() == 4:
            cos, sin = cos.squeeze(1), sin.squeeze(1)
        elif cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        cos, sin = cos.expand(b, t, -1), sin.expand(b, t, -1)
    if cos.dtype != q.dtype and (cos.dtype != torch.float32 or q.dtype == torch.float64):
        table_dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        cos, sin = cos.to(table_dtype), sin.to(table_dtype)
    args = (q, k, cos, sin, position_ids, interleaved, backends.requested_backend())
    if plain_eager(q, k, cos, sin, position_ids):
        return _ApplyRotaryFunction.apply(*args)
    if under_transform():
        return _torch_forward(*args[:-1])
    return _apply_rotary_op(*args)
