"""fasttx.nn.GELUFFN: the Transformer feed-forward block, fc2(act(fc1(x))), as one fused op.

The parameters live in two nn.Linear submodules, fc1 and fc2, so that the
state_dict reads fc1.weight, fc1.bias, fc2.weight, fc2.bias: the layout of
GPT-2 style MLPs, loadable from and into a torch.nn.Sequential-free model
with the same names. The Linears are only parameter holders; forward never
calls them.
"""
import torch

from fasttx.nn._arguments import positive_int
from fasttx.ops.gelu_ffn import ACTIVATIONS, gelu_ffn


class GELUFFN(torch.nn.Module):
    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu", bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"GELUFFN: activation must be one of {ACTIVATIONS}, got {activation!r}")
        d_model = positive_int("GELUFFN", "d_model", d_model)
        d_hidden = positive_int("GELUFFN", "d_hidden", d_hidden)
        self.activation = activation
        self.fc1 = torch.nn.Linear(d_model, d_hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(d_hidden, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
