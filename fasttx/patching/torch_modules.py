"""Recognisers for torch's own modules: torch.nn.LayerNorm, torch.nn.RMSNorm and torch.nn.TransformerEncoderLayer.

A patched TransformerEncoderLayer computes what torch's does, with the QKV
projection feeding fasttx's flash attention, the FFN as one gelu_ffn, and the
residual adds fused into the LayerNorms that follow them (add_layer_norm).
Where torch's layer behaves in a way fasttx's ops do not cover, the patched
forward runs that part with torch's own code, decided per call:
  - dropout inside the FFN in training (the fused FFN never materializes the
    activation it would drop);
  - nested-tensor inputs (TransformerEncoder's inference fast path), which go
    to torch's forward whole;
  - any call where a submodule torch's forward calls (norm1, self_attn,
    linear1, dropout, ...) has a hook, or a global module hook is set: torch's
    forward whole, so that every hook fires with what it gets unpatched.
Masks follow torch.nn.MultiheadAttention: a bool src_mask or
src_key_padding_mask is True where attention is *not* allowed; float masks
are added. A query row with no key to attend to gives 0, where torch gives NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.ops.attention import scaled_dot_product_attention
from fasttx.ops.gelu_ffn import gelu_ffn
from fasttx.ops.layer_norm import add_layer_norm, layer_norm, rms_norm
from fasttx.patching.spec import Options, Patch, runs_hooks

_RELU, _GELU = 1, 2  # TransformerEncoderLayer.activation_relu_or_gelu


def recognise(module: torch.nn.Module, options: Options):
    kind = type(module)
    if isinstance(module, torch.nn.LayerNorm):
        if kind.forward is not torch.nn.LayerNorm.forward:
            from fasttx.nn import LayerNorm
            if issubclass(kind, LayerNorm):
                return None  # already fasttx's
            return f"{kind.__qualname__} subclasses torch.nn.LayerNorm with its own forward"
        if not options.layer_norm:
            return "layer_norm=False"
        return Patch(_layer_norm_methods, (), "fasttx.layer_norm")
    if isinstance(module, torch.nn.RMSNorm):
        if kind.forward is not torch.nn.RMSNorm.forward:
            return f"{kind.__qualname__} subclasses torch.nn.RMSNorm with its own forward"
        if not options.layer_norm:
            return "layer_norm=False"
        return Patch(_rms_norm_methods, (), "fasttx.rms_norm")
    if isinstance(module, torch.nn.TransformerEncoderLayer):
        if kind.forward is not torch.nn.TransformerEncoderLayer.forward:
            return f"{kind.__qualname__} subclasses torch.nn.TransformerEncoderLayer with its own forward"
        why = _encoder_layer_why_not(module, options)
        if why is not None:
            return why
        parts = [name for name, on in (("flash attention", options.attention), ("fused FFN", options.ffn),
                                       ("add_layer_norm", options.layer_norm)) if on]
        return Patch(_encoder_layer_methods, (options,), "fasttx " + ", ".join(parts),
                     fuses=("norm1", "norm2") if options.layer_norm else ())
    return None


# ---- LayerNorm -------------------------------------------------------------------

def computes_layer_norm(norm) -> bool:
    """Whether ``norm`` computes F.layer_norm with its own parameters: torch's LayerNorm or fasttx's, not a
    subclass with a forward of its own (which a parent computing the norm itself would skip)."""
    from fasttx.nn import LayerNorm
    return isinstance(norm, torch.nn.LayerNorm) and (type(norm).forward is torch.nn.LayerNorm.forward
                                                     or isinstance(norm, LayerNorm))


def _layer_norm_forward(self, input: Tensor) -> Tensor:
    return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def _layer_norm_methods() -> dict:
    return {"forward": _layer_norm_forward}


def _rms_norm_forward(self, x: Tensor) -> Tensor:
    return rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _rms_norm_methods() -> dict:
    return {"forward": _rms_norm_forward}


# ---- TransformerEncoderLayer -----------------------------------------------------

def _encoder_layer_why_not(layer, options: Options) -> Optional[str]:
    if not (options.attention or options.ffn or options.layer_norm):
        return "attention, ffn and layer_norm are all off"
    if getattr(layer, "activation_relu_or_gelu", 0) not in (_RELU, _GELU):
        return "its activation is neither relu nor gelu (fasttx's FFN has no custom activations)"
    attn = getattr(layer, "self_attn", None)
    if type(attn) is not torch.nn.MultiheadAttention:
        return f"self_attn is {type(attn).__name__}, not torch.nn.MultiheadAttention"
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        return "self_attn has separate q/k/v projection weights (kdim/vdim differ from embed_dim)"
    if attn.bias_k is not None or attn.add_zero_attn:
        return "self_attn has add_bias_kv or add_zero_attn"
    for name in ("norm1", "norm2"):
        norm = getattr(layer, name, None)
        if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
            return f"{name} is not a LayerNorm over the last dim"
        if not computes_layer_norm(norm):
            return f"{name} is a {type(norm).__name__} with its own forward"
    for name in ("linear1", "linear2"):
        if not isinstance(getattr(layer, name, None), torch.nn.Linear):
            return f"{name} is not a torch.nn.Linear"
    return None


def _mha_mask(src_mask: Optional[Tensor], key_padding: Optional[Tensor], batch: int, heads: int,
              length: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn.MultiheadAttention's masks (bool True = not allowed; float added) as one SDPA mask
    (bool True = attend, or additive) that broadcasts to (batch, heads, length, length)."""
    masks = []
    if src_mask is not None:
        m = src_mask.view(batch, heads, length, length) if src_mask.dim() == 3 else src_mask
        masks.append(m)
    if key_padding is not None:
        masks.append(key_padding.view(batch, 1, 1, length))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep
    total = None
    for m in masks:
        add = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        total = add if total is None else total + add
    return total


def _encoder_layer_methods(options: Options) -> dict:
    """The patched TransformerEncoderLayer.forward for one set of options."""

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        original = type(self).__dict__["_fasttx_original_class"]
        if src.is_nested or runs_hooks(self.self_attn, self.norm1, self.norm2, self.linear1, self.linear2,
                                       self.activation, self.dropout, self.dropout1, self.dropout2):
            return original.forward(self, src, src_mask, src_key_padding_mask, is_causal)
        if is_causal and src_mask is None:
            raise RuntimeError("TransformerEncoderLayer (fasttx-patched): is_causal=True is a hint that src_mask is "
                               "the causal mask, as in torch; pass src_mask too")
        batch_first = self.self_attn.batch_first
        x = src if batch_first else src.transpose(0, 1)  # (batch, seq, d_model) from here on

        def attention(h: Tensor) -> Tensor:
            if not options.attention:
                native = h if batch_first else h.transpose(0, 1)
                out = self._sa_block(native, src_mask, src_key_padding_mask, is_causal=is_causal)
                return out if batch_first else out.transpose(0, 1)
            attn = self.self_attn
            batch, seq, d_model = h.shape
            heads = attn.num_heads
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(batch, seq, 3, heads, d_model // heads).permute(2, 0, 3, 1, 4)
            causal = is_causal and src_key_padding_mask is None  # the hint: src_mask is the causal mask
            mask = None if causal else _mha_mask(src_mask, src_key_padding_mask, batch, heads, seq, h.dtype)
            o = scaled_dot_product_attention(q, k, v, mask, attn.dropout if self.training else 0.0, causal)
            o = F.linear(o.transpose(1, 2).reshape(batch, seq, d_model), attn.out_proj.weight, attn.out_proj.bias)
            return self.dropout1(o)

        def ffn(h: Tensor) -> Tensor:
            if options.ffn and not (self.training and self.dropout.p > 0):
                activation = "relu" if self.activation_relu_or_gelu == _RELU else "gelu"
                out = gelu_ffn(h, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                               activation)
            else:
                out = self.linear2(self.dropout(self.activation(self.linear1(h))))
            return self.dropout2(out)

        def add_norm(norm, branch: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
            if options.layer_norm:
                return add_layer_norm(branch, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            s = branch + residual
            return norm(s), s

        def norm(module, h: Tensor) -> Tensor:
            if options.layer_norm:
                return layer_norm(h, module.normalized_shape, module.weight, module.bias, module.eps)
            return module(h)

        if self.norm_first:
            y, h = add_norm(self.norm2, attention(norm(self.norm1, x)), x)
            out = h + ffn(y)
        else:
            h, _ = add_norm(self.norm1, attention(x), x)
            out, _ = add_norm(self.norm2, ffn(h), h)
        return out if batch_first else out.transpose(0, 1)

    return {"forward": forward}
