"""fasttx.nn.RotaryEmbedding: the cos and sin tables of rotary position embeddings.

The module of transformers' Llama family (LlamaRotaryEmbedding): ``inv_freq``
is a non-persistent buffer, so the state_dict holds nothing and a model's
checkpoint loads unchanged; ``forward(x, position_ids)`` returns the (B, T,
dim) cos and sin in x's dtype, the two halves of each row equal (rotate-half
layout), ready for ``fasttx.apply_rotary``. Frequency scaling: None (RoPE's
``base ** (-2i / dim)``), ``{"rope_type": "linear", "factor": f}`` (positions
divided by f) and Llama 3.1's ``{"rope_type": "llama3", "factor",
"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``
(long wavelengths divided by factor, short ones kept, a smooth blend between).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fasttx.nn._arguments import positive_int

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"fasttx.nn.RotaryEmbedding: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def rope_inv_freq(dim: int, base: float = 10000.0, scaling: Optional[dict] = None, device=None) -> Tensor:
    """The (dim / 2,) float32 inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / _positive_number("scaling['factor']", scaling.get("factor"))
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_KEYS if key not in scaling]
        if missing:
            raise ValueError(f"fasttx.nn.RotaryEmbedding: llama3 scaling needs {_LLAMA3_KEYS}, missing {missing}")
        factor, low, high, context = (_positive_number(f"scaling[{key!r}]", scaling[key]) for key in _LLAMA3_KEYS)
        if high <= low:
            raise ValueError(f"fasttx.nn.RotaryEmbedding: llama3 scaling needs high_freq_factor > low_freq_factor, "
                             f"got {high} and {low}")
        wavelength = 2 * math.pi / inv_freq
        # Wavelengths beyond context / low are slowed down by factor, those below context / high kept;
        # between them the frequency blends linearly in context / wavelength.
        slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        blend = (context / wavelength - low) / (high - low)
        blended = (1 - blend) * slowed / factor + blend * slowed
        in_between = (wavelength >= context / high) & (wavelength <= context / low)
        return torch.where(in_between, blended, slowed)
    raise ValueError(f"fasttx.nn.RotaryEmbedding: scaling['rope_type'] must be 'default', 'linear' or 'llama3', "
                     f"got {rope_type!r}")


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, dim: int, base: float = 10000.0, scaling: Optional[dict] = None, device=None) -> None:
        super().__init__()
        dim = positive_int("RotaryEmbedding", "dim", dim)
        if dim % 2:
            raise ValueError(f"fasttx.nn.RotaryEmbedding: dim must be even (features rotate in pairs), got {dim}")
        if scaling is not None and not isinstance(scaling, dict):
            raise TypeError(f"fasttx.nn.RotaryEmbedding: scaling must be None or a dict, got "
                            f"{type(scaling).__name__}")
        self.dim, self.base, self.scaling = dim, _positive_number("base", base), scaling
        self.register_buffer("inv_freq", rope_inv_freq(dim, self.base, scaling, device), persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape position_ids.shape + (dim,), in x's dtype (computed in float32)."""
        angles = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}" + (f", scaling={self.scaling}" if self.scaling else "")
