"""fasttx.nn.LayerNorm and fasttx.nn.RMSNorm.

Subclasses of the torch modules: the constructor, the parameters, their
names and init, and extra_repr are torch's own, so state_dicts load both ways
and isinstance checks keep working. Only forward is fasttx's.
"""
import torch

from fasttx.ops.layer_norm import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
