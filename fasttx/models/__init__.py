"""Reference models built from fasttx's modules."""
from fasttx.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
