"""One module per op: its reference, autograd, torch.library registration and backend list."""
from fasttx.ops.apply_rotary import apply_rotary, apply_rotary_ref
from fasttx.ops.attention import scaled_dot_product_attention, scaled_dot_product_attention_ref
from fasttx.ops.bias_gelu import bias_gelu, bias_gelu_ref
from fasttx.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fasttx.ops.gelu_ffn import gelu_ffn, gelu_ffn_ref
from fasttx.ops.glu import glu, glu_ref
from fasttx.ops.glu_ffn import glu_ffn, glu_ffn_ref
from fasttx.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from fasttx.ops.softmax import softmax, softmax_ref
from fasttx.ops.layer_norm import (add_layer_norm, add_layer_norm_ref, add_rms_norm, add_rms_norm_ref, layer_norm,
                                   layer_norm_ref, rms_norm, rms_norm_ref)

__all__ = ["add_layer_norm", "add_layer_norm_ref", "add_rms_norm", "add_rms_norm_ref", "apply_rotary", "apply_rotary_ref", "bias_gelu", "bias_gelu_ref",
           "cross_entropy", "cross_entropy_ref", "gelu_ffn", "gelu_ffn_ref", "glu", "glu_ref", "glu_ffn", "glu_ffn_ref",
           "layer_norm", "layer_norm_ref", "linear_cross_entropy", "linear_cross_entropy_ref", "rms_norm",
           "rms_norm_ref", "scaled_dot_product_attention", "scaled_dot_product_attention_ref", "softmax",
           "softmax_ref"]
