"""fasttx.nn.MultiheadSelfAttention: fused QKV projection, flash attention, output projection.

The parameters carry torch.nn.MultiheadAttention's names for self-attention
(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias) and its
initialization, so a state_dict loads both ways with
``torch.nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True)``.
Inputs are batch-first, (batch, seq_len, d_model), as in most LMs.
"""
from typing import Optional

import torch
from torch import Tensor

from fasttx.nn._arguments import positive_int
from fasttx.nn.recompute import autocast_operand
from fasttx.ops._eager import under_transform
from fasttx.ops.attention import scaled_dot_product_attention
from fasttx.ops.linear import linear


def _packed(grads, b: int, t: int, n_heads: int, head_dim: int) -> Optional[Tensor]:
    """grad_q, grad_k, grad_v as one (b, t, 3 * d) tensor when they are the three parts of one
    contiguous (b, t, 3, heads, head_dim) tensor, as the CPU kernel writes them; else None."""
    if any(g is None for g in grads):
        return None
    row = 3 * n_heads * head_dim
    first = grads[0].storage_offset()
    for i, g in enumerate(grads):
        if (g.untyped_storage().data_ptr() != grads[0].untyped_storage().data_ptr()
                or g.stride() != (t * row, head_dim, row, 1) or g.storage_offset() != first + i * n_heads * head_dim):
            return None
    return grads[0].as_strided((b, t, row), (t * row, row, 1), first)


def _heads(qkv: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, t, three_d = qkv.shape  # head_dim spelled out: with no tokens, view() cannot infer a -1
    return qkv.view(b, t, 3, n_heads, three_d // (3 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class _SplitHeads(torch.autograd.Function):
    """The packed QKV projection (batch, seq_len, 3 * d_model) as q, k, v (batch, heads, seq_len,
    head_dim) views. Autograd's own split (view, permute, unbind) stacks the three gradients in
    backward and then copies the stack into the projection's layout; here the attention's CPU
    kernel has already written them there, and otherwise they are copied there once."""

    @staticmethod
    def forward(ctx, qkv: Tensor, n_heads: int):
        b, t, three_d = qkv.shape
        ctx.dims = (b, t, n_heads, three_d // (3 * n_heads))
        return _heads(qkv, n_heads)

    @staticmethod
    def backward(ctx, *grads):
        b, t, n_heads, head_dim = ctx.dims
        packed = _packed(grads, b, t, n_heads, head_dim)
        if packed is None:
            like = next(g for g in grads if g is not None)
            packed = like.new_empty(b, t, 3, n_heads, head_dim)
            for i, g in enumerate(grads):
                packed[:, :, i] = 0 if g is None else g.transpose(1, 2)
            packed = packed.view(b, t, 3 * n_heads * head_dim)
        return packed, None


def split_heads(qkv: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (batch, heads, seq_len, head_dim) as views of qkv (batch, seq_len, 3 * d_model)."""
    # Inductor plans the gradient's layout itself; torch.jit.trace would record the Function as a PythonOp;
    # torch.func transforms and forward-mode AD need the views' own derivatives.
    if (torch.compiler.is_compiling() or torch._C._is_tracing() or under_transform()
            or not (torch.is_grad_enabled() and qkv.requires_grad)):
        return _heads(qkv, n_heads)
    return _SplitHeads.apply(qkv, n_heads)


class MultiheadSelfAttention(torch.nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0, is_causal: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        d_model = positive_int("MultiheadSelfAttention", "d_model", d_model)
        n_heads = positive_int("MultiheadSelfAttention", "n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"fasttx.nn.MultiheadSelfAttention: d_model ({d_model}) must be a multiple of n_heads "
                             f"({n_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MultiheadSelfAttention: dropout must be in [0, 1], got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.n_heads, self.dropout, self.is_causal = d_model, n_heads, dropout, is_causal
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * d_model, d_model, **factory))
        if bias:
            self.in_proj_bias = torch.nn.Parameter(torch.empty(3 * d_model, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = torch.nn.Linear(d_model, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialization.
        torch.nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            torch.nn.init.zeros_(self.in_proj_bias)
            torch.nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x (batch, seq_len, d_model). attn_mask: bool (True = attend) or additive, broadcasting to
        (batch, n_heads, seq_len, seq_len); not together with is_causal."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiheadSelfAttention: x must have shape (batch, seq_len, {self.d_model}), "
                             f"got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        # Under autocast the casts are made here, where recomputed_activations() can rebuild them.
        operand = autocast_operand
        qkv = linear(operand(x), operand(self.in_proj_weight), operand(self.in_proj_bias))
        q, k, v = split_heads(qkv, self.n_heads)
        out = scaled_dot_product_attention(q, k, v, attn_mask, self.dropout if self.training else 0.0,
                                           self.is_causal and attn_mask is None)
        # q is a view of (batch, seq_len, heads, head_dim) memory, so the attention lays out its
        # output the same way: merging the heads is a view, which out_proj saves at no cost.
        merged = out.transpose(1, 2).reshape(batch, seq, self.d_model)
        return linear(merged, operand(self.out_proj.weight), operand(self.out_proj.bias))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, bias={self.in_proj_bias is not None}, "
                f"dropout={self.dropout}, is_causal={self.is_causal}")
