"""The ops the suite knows, by name. One file per op (or kernel family); register it here."""
from bench.ops import (apply_rotary, attention, bias_gelu, cross_entropy, gelu_ffn, glu_ffn, layer_norm,
                       linear_cross_entropy, softmax)

OPS = {spec.name: spec for spec in (bias_gelu.SPEC, layer_norm.LAYER_NORM, layer_norm.ADD_LAYER_NORM,
                                    layer_norm.RMS_NORM, layer_norm.ADD_RMS_NORM, gelu_ffn.SPEC, attention.SPEC,
                                    softmax.SPEC, cross_entropy.SPEC, apply_rotary.SPEC, glu_ffn.SPEC,
                                    linear_cross_entropy.SPEC)}
