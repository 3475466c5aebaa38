"""The ops the suite knows, by name. One file per op (or kernel family); register it here."""
from bench.ops import attention, bias_gelu, cross_entropy, gelu_ffn, layer_norm, softmax

OPS = {spec.name: spec for spec in (bias_gelu.SPEC, layer_norm.LAYER_NORM, layer_norm.ADD_LAYER_NORM,
                                    layer_norm.RMS_NORM, gelu_ffn.SPEC, attention.SPEC, softmax.SPEC,
                                    cross_entropy.SPEC)}
from bench.ops import linear_cross_entropy  # noqa: E402

OPS[linear_cross_entropy.SPEC.name] = linear_cross_entropy.SPEC
