"""fasttx.nn.MultiheadSelfAttention: fused QKV projection, flash attention, output projection.

The parameters carry torch.nn.MultiheadAttention's names for self-attention
(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias) and its
initialization, so a state_dict loads both ways with
``torch.nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True)``.
Inputs are batch-first, (batch, seq_len, d_model), as in most LMs.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.ops.attention import scaled_dot_product_attention


class MultiheadSelfAttention(torch.nn.Module):
    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0, is_causal: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"MultiheadSelfAttention: d_model ({d_model}) must be a positive multiple of n_heads "
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
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, seq, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        out = scaled_dot_product_attention(q, k, v, attn_mask, self.dropout if self.training else 0.0,
                                           self.is_causal and attn_mask is None)
        # q is a view of (batch, seq_len, heads, head_dim) memory, so the attention lays out its
        # output the same way: merging the heads is a view, which out_proj saves at no cost.
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, self.d_model))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, bias={self.in_proj_bias is not None}, "
                f"dropout={self.dropout}, is_causal={self.is_causal}")
