"""What fasttx.patch was asked to swap: its keyword arguments, handed to every recogniser."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    layer_norm: bool = True
    attention: bool = True
    ffn: bool = True
