"""One module per op: its reference, autograd, torch.library registration and backend list."""
from fasttx.ops.bias_gelu import bias_gelu, bias_gelu_ref

__all__ = ["bias_gelu", "bias_gelu_ref"]
