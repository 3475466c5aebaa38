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

from fasttx.nn.attention import MultiheadSelfAttention
from fasttx.nn.normalization import LayerNorm, normed_operand
from fasttx.nn.recompute import autocast_dtype, autocast_operand, recomputed_activations, remember
from fasttx.ops.gelu_ffn import ACTIVATIONS, gelu_ffn
from fasttx.ops.layer_norm import add_layer_norm, layer_norm


class TransformerBlock(torch.nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_hidden: Optional[int] = None, activation: str = "gelu",
                 dropout: float = 0.0, norm_first: bool = True, is_causal: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"TransformerBlock: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"TransformerBlock: dropout must be in [0, 1], got {dropout}")
        d_hidden = 4 * d_model if d_hidden is None else d_hidden
        if d_hidden <= 0:
            raise ValueError(f"TransformerBlock: d_hidden must be positive, got {d_hidden}")
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

    def _add_norm(self, norm: LayerNorm, branch: Tensor, residual: Tensor,
                  out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(norm(branch + residual), branch + residual) in one pass, the first in out_dtype if given."""
        shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        normed, total = add_layer_norm(branch, residual, shape, weight, bias, eps, out_dtype=out_dtype)
        # The same kernel on the saved sum rebuilds the normed output bit for bit.
        rebuild = lambda: layer_norm(total, shape, weight, bias, eps, out_dtype=out_dtype)
        return remember(normed, rebuild, total, weight, bias), total

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """x (batch, seq_len, d_model). attn_mask as for MultiheadSelfAttention: bool (True = attend) or
        additive, broadcasting to (batch, n_heads, seq_len, seq_len)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"TransformerBlock: x must have shape (batch, seq_len, {self.d_model}), "
                             f"got {tuple(x.shape)}")
        with recomputed_activations():
            return self._forward(x, attn_mask)

    def _forward(self, x: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        if self.norm_first:
            # The norms' outputs feed only linears: under autocast they come out in its dtype.
            attended = self._branch_dropout(self.self_attn(normed_operand(self.norm1, x), attn_mask))
            ffn_in, h = self._add_norm(self.norm2, attended, x, autocast_dtype(x))
            return h + self._ffn(ffn_in)
        h, _ = self._add_norm(self.norm1, self._branch_dropout(self.self_attn(x, attn_mask)), x)
        out, _ = self._add_norm(self.norm2, self._ffn(h), h)
        return out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, "
                f"dropout={self.dropout}, norm_first={self.norm_first}")
