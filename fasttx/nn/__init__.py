"""Drop-in modules with the exact constructors and parameter names of the torch modules they replace."""
from fasttx.nn.attention import MultiheadSelfAttention
from fasttx.nn.feed_forward import GELUFFN
from fasttx.nn.glu_ffn import GLUFFN
from fasttx.nn.linear_cross_entropy import LinearCrossEntropy
from fasttx.nn.normalization import LayerNorm, RMSNorm
from fasttx.nn.rotary import RotaryEmbedding
from fasttx.nn.transformer import TransformerBlock

__all__ = ["GELUFFN", "GLUFFN", "LayerNorm", "LinearCrossEntropy", "MultiheadSelfAttention", "RMSNorm",
           "RotaryEmbedding", "TransformerBlock"]
