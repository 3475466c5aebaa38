"""fasttx: hand-written Triton, CUDA and C++ kernels for Transformers."""
import re as _re

import torch as _torch

TORCH_FLOOR = (2, 9)  # pyproject.toml's torch>=2.9; `make test-floor` runs the CPU tests on it
_torch_release = tuple(int(v) for v in _re.match(r"(\d+)\.(\d+)", _torch.__version__).groups())
if _torch_release < TORCH_FLOOR:
    raise ImportError(f"fasttx needs torch >= {'.'.join(map(str, TORCH_FLOOR))}, but torch {_torch.__version__} is installed")

from fasttx.backends import BACKENDS, BackendUnavailableError, use_backend  # noqa: E402
from fasttx import nn  # noqa: E402
from fasttx.ops import (add_layer_norm, add_rms_norm, apply_rotary, bias_gelu, cross_entropy, gelu_ffn,  # noqa: E402
                        glu, glu_ffn, layer_norm, linear_cross_entropy, rms_norm, scaled_dot_product_attention,
                        softmax)
from fasttx.patching import PatchReport, patch, unpatch  # noqa: E402
from fasttx.patching.accelerate import accelerate  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailableError", "use_backend", "add_layer_norm", "add_rms_norm", "apply_rotary",
           "bias_gelu", "cross_entropy", "gelu_ffn", "glu", "glu_ffn", "layer_norm", "linear_cross_entropy", "rms_norm",
           "scaled_dot_product_attention", "softmax", "nn", "patch", "unpatch", "accelerate", "PatchReport",
           "__version__", "TORCH_FLOOR"]
