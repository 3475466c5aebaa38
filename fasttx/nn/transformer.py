"""fasttx.nn.TransformerBlock: self-attention and a feed-forward block, each with a residual and a LayerNorm.

Built from fasttx's ops: flash attention (MultiheadSelfAttention), the fused
FFN (gelu_ffn) and LayerNorm, with the residual adds fused into the norms
that follow them (add_layer_norm):

    norm_first=True (pre-LN, GPT-2):       h = x + attn(norm1(x))
                                         out = h + ffn(norm2(h))
    norm_first=False (post-LN, the original Transformer and BERT):
                                           h = norm1(x + attn(x))
                                         out = norm2(h + ffn(h))

The submodules carry torch.nn.TransformerEncoderLayer's names (self_attn,
linear1, linear2, norm1, norm2), so its state_dict loads both ways with
``torch.nn.TransformerEncoderLayer(d_model, n_heads, d_hidden, dropout,
activation, batch_first=True, norm_first=norm_first)``; with dropout 0 the
two compute the same function. Inputs are batch-first, (batch, seq, d_model).

A stack of pre-LN blocks can also chain through ``forward_deferred(x,
pending)``, which returns (h, branch) and leaves the last add, h + branch, to
the next block's first norm (GPT does): then every residual add runs inside a
norm. Under autocast each pre-LN norm writes its output in autocast's dtype,
for the linear that reads it (fasttx.nn.normalization.normed_operand).

In training, the norm outputs are not kept for backward but rebuilt there
from tensors kept anyway (fasttx/nn/recompute.py): two (batch, seq, d_model)
tensors fewer per block, gradients bitwise the same. out_proj's input is a
view of the attention's output, which the attention keeps anyway.

Dropout applies to the attention probabilities and to both residual
branches, as in TransformerEncoderLayer, but not inside the FFN: the fused
FFN never materializes its activation. TransformerEncoderLayer drops that
activation too, so in training with dropout > 0 the two differ there.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.nn._arguments import positive_int
from fasttx.nn.attention import MultiheadSelfAttention
from fasttx.nn.normalization import LayerNorm, add_norm, normed_operand
from fasttx.nn.recompute import autocast_dtype, autocast_operand, recomputed_activations
from fasttx.ops.gelu_ffn import ACTIVATIONS, gelu_ffn


class TransformerBlock(torch.nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_hidden: Optional[int] = None, activation: str = "gelu",
                 dropout: float = 0.0, norm_first: bool = True, is_causal: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"TransformerBlock: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"TransformerBlock: dropout must be in [0, 1], got {dropout}")
        d_model = positive_int("TransformerBlock", "d_model", d_model)
        n_heads = positive_int("TransformerBlock", "n_heads", n_heads)
        d_hidden = positive_int("TransformerBlock", "d_hidden", 4 * d_model if d_hidden is None else d_hidden)
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.dropout, self.norm_first = dropout, norm_first
        self.self_attn = MultiheadSelfAttention(d_model, n_heads, dropout=dropout, is_causal=is_causal, **factory)
        self.linear1 = torch.nn.Linear(d_model, d_hidden, **factory)
        self.linear2 = torch.nn.Linear(d_hidden, d_model, **factory)
        self.norm1 = LayerNorm(d_model, **factory)
        self.norm2 = LayerNorm(d_model, **factory)

    def _branch_dropout(self, t: Tensor) -> Tensor:
        return F.dropout(t, self.dropout, self.training) if self.dropout > 0 else t

    def _ffn(self, x: Tensor) -> Tensor:
        operand = autocast_operand  # under autocast, casts that recomputed_activations() can rebuild
        return self._branch_dropout(gelu_ffn(operand(x), operand(self.linear1.weight), operand(self.linear1.bias),
                                             operand(self.linear2.weight), operand(self.linear2.bias),
                                             self.activation))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x (batch, seq_len, d_model). attn_mask as for MultiheadSelfAttention: bool (True = attend) or
        additive, broadcasting to (batch, n_heads, seq_len, seq_len)."""
        self._check_input("x", x)
        if self.norm_first:
            h, branch = self.forward_deferred(x, None, attn_mask)
            return h + branch
        with recomputed_activations():
            return self._forward_post_ln(x, attn_mask)

    def _check_input(self, name: str, t: Optional[Tensor]) -> None:
        if t is not None and (t.dim() != 3 or t.shape[-1] != self.d_model):
            raise ValueError(f"TransformerBlock: {name} must have shape (batch, seq_len, {self.d_model}), "
                             f"got {tuple(t.shape)}")

    def forward_deferred(self, x: Tensor, pending: Optional[Tensor],
                         attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Pre-LN only: the block's output as (h, branch), to be added by the next norm, where
        forward(x + pending) = h + branch. The last residual add of one block then runs inside the
        next block's first norm (add_layer_norm): one pass fewer over the residual stream per block,
        and under autocast no cast of the bf16 branch or of its gradient. GPT chains its blocks so."""
        if not self.norm_first:
            raise RuntimeError("TransformerBlock.forward_deferred: only pre-LN blocks (norm_first=True) defer "
                               "their residual add")
        self._check_input("x", x)
        self._check_input("pending", pending)
        if pending is not None and pending.shape != x.shape:
            raise ValueError(f"TransformerBlock.forward_deferred: pending must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(pending.shape)}")
        with recomputed_activations():
            # The norms' outputs feed only linears: under autocast they come out in its dtype.
            if pending is None:
                normed = normed_operand(self.norm1, x)
            else:
                normed, x = add_norm(self.norm1, pending, x, autocast_dtype(x))
            attended = self._branch_dropout(self.self_attn(normed, attn_mask))
            ffn_in, h = add_norm(self.norm2, attended, x, autocast_dtype(x))
            return h, self._ffn(ffn_in)

    def _forward_post_ln(self, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        h, _ = add_norm(self.norm1, self._branch_dropout(self.self_attn(x, attn_mask)), x)
        out, _ = add_norm(self.norm2, self._ffn(h), h)
        return out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, "
                f"dropout={self.dropout}, norm_first={self.norm_first}")
