"""fasttx: hand-written Triton, CUDA and C++ kernels for Transformers."""
from fasttx.backends import BACKENDS, BackendUnavailableError, use_backend
from fasttx.ops import bias_gelu

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailableError", "use_backend", "bias_gelu", "__version__"]
