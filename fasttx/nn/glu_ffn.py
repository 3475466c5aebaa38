"""GLUFFN: the gated feed-forward of LLaMA-family models, with LlamaMLP's parameter names."""
from __future__ import annotations

import torch

from fasttx.nn._arguments import positive_int
from fasttx.ops.glu_ffn import ACTIVATIONS, glu_ffn


class GLUFFN(torch.nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` through fasttx.glu_ffn.

    ``gate_proj``, ``up_proj`` and ``down_proj`` are nn.Linear, so the state_dict keys are those
    of transformers' LlamaMLP (and Mistral's, Qwen2's, Gemma's): a checkpoint loads as it is.
    ``activation`` is ``"silu"`` (SwiGLU, LLaMA), ``"gelu_tanh"`` (GeGLU, Gemma) or ``"gelu"``.
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"GLUFFN: activation must be one of {ACTIVATIONS}, got {activation!r}")
        d_model = positive_int("GLUFFN", "d_model", d_model)
        d_hidden = positive_int("GLUFFN", "d_hidden", d_hidden)
        self.activation = activation
        self.gate_proj = torch.nn.Linear(d_model, d_hidden, bias=bias, device=device, dtype=dtype)
        self.up_proj = torch.nn.Linear(d_model, d_hidden, bias=bias, device=device, dtype=dtype)
        self.down_proj = torch.nn.Linear(d_hidden, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return glu_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.activation,
                       self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
