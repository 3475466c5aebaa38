"""fasttx: hand-written Triton, CUDA and C++ kernels for Transformers."""
from fasttx.backends import BACKENDS, BackendUnavailableError, use_backend
from fasttx import nn
from fasttx.ops import add_layer_norm, bias_gelu, cross_entropy, gelu_ffn, layer_norm, rms_norm, scaled_dot_product_attention, softmax
from fasttx.patching import PatchReport, patch, unpatch

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailableError", "use_backend", "bias_gelu", "cross_entropy", "gelu_ffn", "layer_norm",
           "add_layer_norm", "rms_norm", "scaled_dot_product_attention", "softmax", "nn", "patch", "unpatch",
           "PatchReport", "__version__"]
