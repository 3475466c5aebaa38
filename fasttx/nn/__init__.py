"""Drop-in modules with the exact constructors and parameter names of the torch modules they replace."""
from fasttx.nn.attention import MultiheadSelfAttention
from fasttx.nn.feed_forward import GELUFFN
from fasttx.nn.normalization import LayerNorm, RMSNorm
from fasttx.nn.transformer import TransformerBlock

__all__ = ["GELUFFN", "LayerNorm", "MultiheadSelfAttention", "RMSNorm", "TransformerBlock"]
from fasttx.nn.linear_cross_entropy import LinearCrossEntropy  # noqa: E402
__all__ += ["LinearCrossEntropy"]
