"""scaled_dot_product_attention: softmax(q k^T * scale + mask) v, flash style.

Eager attention writes the whole Tq x Tk score matrix, reads it back for the
softmax, writes the probabilities and keeps them for backward: O(T^2) memory
and several passes over it. The flash algorithm walks key blocks with an
online softmax, keeps only the log-sum-exp of each row (lse), and the backward
recomputes the probabilities from q, k and lse: O(T) extra memory.

Backends: triton (FlashAttention-2 forward and backward), cuda (cuBLAS batched
GEMMs around the fused scaled-masked softmax of csrc/cuda/softmax.cuh), cpu (a
blocked flash algorithm in C++) and torch, the reference. Their shared
contract is stated once, above attention_fwd_cpu in csrc/ops.h: q (B, Hq, Tq,
D), k and v (B, Hk, Tk, D), an additive fp32 mask with broadcast strides, lse
+inf for a row with nothing to attend to, dropout from the Philox bits of
csrc/common/philox.h.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops._autocast import lower_precision
from fasttx.ops._checks import check_bool, check_float, check_real, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform
from fasttx.ops.philox import dropout_keep_mask

_OP = "scaled_dot_product_attention"


# ---- reference: plain PyTorch ---------------------------------------------------

def scaled_dot_product_attention_ref(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False):
    """PyTorch's own SDPA (the math it dispatches to on this input)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(tq: int, tk: int, device=None) -> Tensor:
    """True where query i may see key j: j <= i, top-left aligned as torch aligns is_causal."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril()


# ---- the torch backend: the kernels' contract in PyTorch --------------------------
# (B, Hq, Tq, D) q against (B, Hk, Tk, D) k/v. The Hq // Hk query heads of a group are
# adjacent, so q viewed as (B, Hk, G * Tq, D) meets its k/v head without copying k/v.

def _scores(q, k, mask, is_causal, scale):
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    acc = _acc_dtype(q.dtype)
    s = (_grouped(q.to(acc), Hk) @ k.to(acc).transpose(-1, -2)).mul_(scale).view(B, Hq, Tq, Tk)
    if mask is not None:
        s = s + mask
    if is_causal:
        s = s.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    return s


def _probabilities(s, lse):
    return torch.exp(s - lse.unsqueeze(-1))  # lse = +inf (nothing to attend to) gives 0, not NaN


def _dropped(p, dropout_p, seed, offset):
    if dropout_p == 0.0:
        return p
    B, H, Tq, Tk = p.shape
    keep = dropout_keep_mask(seed, offset, B, H, Tq, Tk, dropout_p, p.device)
    return p * keep / (1.0 - dropout_p)


def _grouped(t, Hk):  # (B, Hq, T, X) -> (B, Hk, G * T, X); Hk = 0 only with Hq = 0
    B, Hq, T, X = t.shape
    return t.reshape(B, Hk, Hq // Hk * T if Hk else 0, X)


def _torch_forward(q, k, v, mask, is_causal, scale, dropout_p, seed, offset):
    B, Hq, Tq, _ = q.shape
    Hk = k.shape[1]
    s = _scores(q, k, mask, is_causal, scale)
    lse = torch.logsumexp(s, -1)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    p = _dropped(_probabilities(s, lse), dropout_p, seed, offset)
    out = (_grouped(p, Hk) @ v.to(p.dtype)).view(B, Hq, Tq, v.shape[-1])
    return out.to(q.dtype), lse


def _torch_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, offset):
    # Differentiable torch ops: with out and lse recomputed, also the backward that autograd records.
    Hk = k.shape[1]
    s = _scores(q, k, mask, is_causal, scale)
    acc = s.dtype
    p = _probabilities(s, lse)
    do = grad_out.to(acc)
    grad_v = _grouped(_dropped(p, dropout_p, seed, offset), Hk).transpose(-1, -2) @ _grouped(do, Hk)
    grad_p = _dropped((_grouped(do, Hk) @ v.to(acc).transpose(-1, -2)).view(s.shape), dropout_p, seed, offset)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)  # sum_j p_ij dP_ij, dropout included
    grad_s = (p * (grad_p - delta)).mul_(scale)
    grad_q = (_grouped(grad_s, Hk) @ k.to(acc)).view(q.shape)
    grad_k = _grouped(grad_s, Hk).transpose(-1, -2) @ _grouped(q.to(acc), Hk)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


# ---- the other backends ---------------------------------------------------------
# The CPU kernels read q, k, v (and out, grad_out) through their strides: views of a
# packed QKV projection cost no copy. The GPU kernels take them contiguous.

def _contiguous_first(n, fn):
    return lambda *args: fn(*(t.contiguous() for t in args[:n]), *args[n:])


def _cpu_forward(*args):
    return backends.extension().attention_fwd_cpu(*args)


def _cpu_backward(*args):
    return backends.extension().attention_bwd_cpu(*args)


@functools.partial(_contiguous_first, 3)
def _cuda_forward(*args):
    return backends.extension().attention_fwd_cuda(*args)


@functools.partial(_contiguous_first, 5)
def _cuda_backward(*args):
    return backends.extension().attention_bwd_cuda(*args)


@functools.partial(_contiguous_first, 3)
def _triton_forward(*args):
    from fasttx.kernels import attention as k
    return k.attention_forward(*args)


@functools.partial(_contiguous_first, 5)
def _triton_backward(*args):
    from fasttx.kernels import attention as k
    return k.attention_backward(*args)


def _same_head_dim(q, k, v, *rest) -> Optional[str]:
    if v.shape[-1] != q.shape[-1]:
        return f"the kernels need v's head dim equal to q's, got {v.shape[-1]} and {q.shape[-1]}"
    return None


def _kernel_why_not(device_rule):
    return lambda q, k, v, *rest: device_rule(q) or _same_head_dim(q, k, v)


def _triton_why_not(q, k, v, mask=None, *rest) -> Optional[str]:
    why = backends.triton_why_not(q) or _same_head_dim(q, k, v)
    if why is None and not 16 <= q.shape[-1] <= 256:
        why = f"the triton kernels take head dims 16 to 256, got {q.shape[-1]}"
    if why is None and mask is not None and mask.shape[-2] > 1 and mask.stride(-2) != 0:
        # The kernels offset a head's mask rows in int32 (64-bit offsets there spilled registers);
        # the host pads mask rows to a multiple of 16.
        row = max(abs(mask.stride(-2)), -(-mask.shape[-1] // 16) * 16)
        if mask.shape[-2] * row >= 2**31:
            why = (f"the triton kernels index one head's mask in int32, and this mask's head spans "
                   f"{mask.shape[-2]} rows of {row} elements (2^31 or more)")
    return why


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, _triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, _kernel_why_not(backends.device_only("cuda"))),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, _kernel_why_not(backends.device_only("cpu"))),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


# ---- forward and backward on (B, H, T, D): the bodies of the custom ops ----------------
# seed is a 0-d int64 tensor so that torch.compile traces the draw instead of baking one in.

def _nothing_to_compute(q, k, v):
    """Zero-size problems (no batch, heads, queries, keys or head dim) never reach a kernel: the torch
    backend gives torch's answer for them (empty, zeros, or for head dim 0 the mean of v), on any device."""
    return q.numel() == 0 or k.numel() == 0 or v.numel() == 0


def _output_in_bthd(q: Tensor) -> bool:
    """Whether out is laid out as (B, T, H, D) memory: when q is a view of such memory, as the
    packed QKV projection of fasttx.nn.MultiheadSelfAttention gives. The output projection then
    reads out as (B, T, H * D) without a copy. csrc/cpu/attention.cpp allocates by the same rule."""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def _output_like(out: Tensor, q: Tensor) -> Tensor:
    """out in the layout _output_in_bthd picks for q, copied only when a backend gave another."""
    if not _output_in_bthd(q):
        return out.contiguous()
    bthd = out.transpose(1, 2)
    return out if bthd.is_contiguous() else bthd.contiguous().transpose(1, 2)


def _empty_output_like(q: Tensor, head_dim: int) -> Tensor:
    B, H, T, _ = q.shape
    if _output_in_bthd(q):
        return q.new_empty(B, T, H, head_dim).transpose(1, 2)
    return q.new_empty(B, H, T, head_dim)


def _dropout_seed(device: torch.device) -> Tensor:
    """The dropout mask's seed, drawn from the generator of the tensors' device, so that
    torch.cuda.manual_seed governs CUDA dropout as it governs torch's own.

    The kernels take the seed as a host integer, so on a GPU reading it back waits for the
    device: one synchronisation per call with dropout. Inside a CUDA-graph capture that read
    cannot happen, and a seed fixed at capture would give every replay the same mask; so
    dropout refuses capture instead of silently repeating itself.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fasttx.scaled_dot_product_attention: dropout_p > 0 cannot be captured in a CUDA graph "
                           "(every replay would reuse one dropout mask); capture with dropout_p=0")
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
             dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if _nothing_to_compute(q, k, v):  # no kernel launch; the contract (zeros, lse +inf) still holds
        impl = IMPLEMENTATIONS[-1]
    else:
        impl = backends.choose(_OP, IMPLEMENTATIONS, backend, q, k, v, mask)
    out, lse = impl.forward(q, k, v, mask, is_causal, scale, dropout_p, int(seed), 0)
    return _output_like(out, q), lse


def _backward_any_layout(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         mask: Optional[Tensor], is_causal: bool, scale: float, dropout_p: float, seed: Tensor,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients as the backend lays them out: the CPU's for q, k, v split from one packed
    (B, T, 3, H, D) QKV tensor are the three parts of one such tensor (see split_heads)."""
    if _nothing_to_compute(q, k, v):
        impl = IMPLEMENTATIONS[-1]
    else:
        impl = backends.choose(_OP, IMPLEMENTATIONS, backend, q, k, v, mask)
    return tuple(impl.backward(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, int(seed), 0))


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
              is_causal: bool, scale: float, dropout_p: float, seed: Tensor,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward_any_layout(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, backend)
    return tuple(g.contiguous() for g in grads)  # the layout the fake implementation promises


@torch.library.custom_op("fasttx::attention_forward", mutates_args=())
def _attention_forward_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                          dropout_p: float, seed: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, mask, is_causal, scale, dropout_p, seed, backend)


@_attention_forward_op.register_fake
def _(q, k, v, mask, is_causal, scale, dropout_p, seed, backend):
    return _empty_output_like(q, v.shape[-1]), q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("fasttx::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           mask: Optional[Tensor], is_causal: bool, scale: float, dropout_p: float, seed: Tensor,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, backend)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)  # O(T) beyond the inputs: never the probabilities
    ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.backend = is_causal, scale, dropout_p, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse never has a gradient: don't allocate zeros for it


def _autograd_backward(backward):
    def run(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output did not reach the loss
            return None, None, None, None, None, None, None, None, None
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        if graphed_backward():  # create_graph=True: out and lse recomputed, as the saved lse carries no graph
            args = (mask, ctx.is_causal, ctx.scale, ctx.dropout_p, int(seed), 0)
            grads = _torch_backward(grad_out, q, k, v, *_torch_forward(q, k, v, *args), *args)
        else:
            grads = backward(grad_out, q, k, v, out, lse, mask, ctx.is_causal, ctx.scale, ctx.dropout_p, seed,
                             ctx.backend)
        return (*grads, None, None, None, None, None, None)
    return run


_attention_forward_op.register_autograd(_autograd_backward(_attention_backward_op), setup_context=_setup_context)
_AttentionFunction = eager_function("_AttentionFunction", _forward, _setup_context,
                                    _autograd_backward(_backward_any_layout))


# ---- public API: torch's SDPA signature and semantics --------------------------------

def _additive_mask(attn_mask: Tensor, q: Tensor) -> Tensor:
    """A bool mask (True = attend) or a float one, as the kernels' additive fp32 (fp64) mask."""
    acc = _acc_dtype(q.dtype)
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=acc, device=attn_mask.device).masked_fill_(~attn_mask,
                                                                                             float("-inf"))
    return attn_mask.to(acc)


def _check(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    check_real(_OP, "dropout_p", dropout_p, low=0.0, high=1.0)
    check_real(_OP, "scale", scale, none_ok=True)
    check_bool(_OP, "is_causal", is_causal)
    check_bool(_OP, "enable_gqa", enable_gqa)
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(_OP, name, t)
        if t.dim() < 3:
            raise ValueError(f"fasttx.{_OP}: {name} must have shape (..., heads, seq_len, head_dim) with at "
                             f"least 3 dims, got {tuple(t.shape)}")
    check_float(_OP, "query", q)
    for name, t in (("key", k), ("value", v)):
        check_same(_OP, name, t, "query", q)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fasttx.{_OP}: query and key must have the same head_dim (last dim), got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"fasttx.{_OP}: key and value must agree in every dim but the last, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    hq, hk = q.shape[-3], k.shape[-3]
    if enable_gqa:
        if (hq % hk if hk else hq) != 0:
            raise ValueError(f"fasttx.{_OP}: with enable_gqa the number of query heads ({hq}, dim -3 of query "
                             f"{tuple(q.shape)}) must be a multiple of the key/value heads ({hk})")
    elif hk not in (hq, 1):
        raise ValueError(f"fasttx.{_OP}: query has {hq} heads and key/value {hk} (dim -3); they must match, "
                         "or pass enable_gqa=True for grouped key/value heads")
    if attn_mask is None:
        return
    check_tensor(_OP, "attn_mask", attn_mask)
    if is_causal:
        raise ValueError(f"fasttx.{_OP}: pass either attn_mask or is_causal=True, not both (as torch requires)")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise TypeError(f"fasttx.{_OP}: attn_mask must be bool or have query's dtype {q.dtype}, got "
                        f"{attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"fasttx.{_OP}: attn_mask is on {attn_mask.device} but query is on {q.device}")
    if attn_mask.requires_grad:
        raise ValueError(f"fasttx.{_OP}: attn_mask requires grad; fasttx computes no gradient for the mask "
                         "(detach it, or use torch.nn.functional.scaled_dot_product_attention)")
    target = (*_batch_shape(q, k), q.shape[-3], q.shape[-2], k.shape[-2])
    try:
        fits = torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"fasttx.{_OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(..., heads, Tq, Tk) = {target}")


def _batch_shape(q, k):
    try:
        return torch.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    except RuntimeError:
        raise ValueError(f"fasttx.{_OP}: the batch dims of query {tuple(q.shape)} and key {tuple(k.shape)} "
                         "(all but the last three) do not broadcast") from None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, same signature and semantics.

    Layout ``(..., heads, seq_len, head_dim)``. ``is_causal`` is top-left aligned
    as in torch; a row with nothing to attend to gives 0. Saves O(T) for
    backward: the inputs, the output and one float per query row.
    """
    query, key, value, attn_mask = lower_precision(query, key, value, attn_mask)  # as autocast runs SDPA
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    q, k, v = query, key, value
    batch = _batch_shape(q, k)
    hq, hk, tq, tk, d = q.shape[-3], k.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1]
    # One key/value head broadcast over the query heads (without enable_gqa) is a group of hq:
    # the kernels serve it without copying k and v. Views stay views (see _contiguous_first).
    b = math.prod(batch)
    q = q.expand(*batch, *q.shape[-3:]).reshape(b, hq, tq, d)
    k = k.expand(*batch, *k.shape[-3:]).reshape(b, hk, tk, d)
    v = v.expand(*batch, *v.shape[-3:]).reshape(b, hk, tk, v.shape[-1])
    mask = None
    if attn_mask is not None:
        mask = _additive_mask(attn_mask, q).expand(*batch, hq, tq, tk)
        if mask.stride(-1) != 1 and tk > 1:
            mask = mask.contiguous()
        mask = mask.reshape(b, hq, tq, tk)  # a view unless several batch dims broadcast differently
    if scale is None:  # head dim 0: every score is an empty sum, 0 at any scale (torch: the mean of v)
        scale = 1.0 / math.sqrt(d) if d else 1.0
    scale = float(scale)
    drop = float(dropout_p)
    if drop >= 1.0:  # every probability dropped: zeros, still attached to the graph
        drop, zero_out = 0.0, True
    else:
        zero_out = False
    seed = _dropout_seed(q.device) if drop > 0 else torch.zeros((), dtype=torch.int64)
    args = (q, k, v, mask, bool(is_causal), scale, drop, seed, backends.requested_backend())
    if plain_eager(q, k, v, mask):
        out, _ = _AttentionFunction.apply(*args)
    elif under_transform():
        out, _ = _torch_forward(q, k, v, mask, bool(is_causal), scale, drop, int(seed), 0)
    else:
        out, _ = _attention_forward_op(*args)
    if zero_out:
        out = out * 0.0
    return out.view(*batch, hq, tq, value.shape[-1])
