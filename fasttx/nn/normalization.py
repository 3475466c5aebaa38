"""fasttx.nn.LayerNorm and fasttx.nn.RMSNorm.

Subclasses of the torch modules: the constructor, the parameters, their
names and init, and extra_repr are torch's own, so state_dicts load both ways
and isinstance checks keep working. Only forward is fasttx's.

Inside fasttx.nn.recompute.recomputed_activations() (as in TransformerBlock
and GPT), an output that a later op saves for backward is recomputed from the
input, which the norm saves anyway, instead of being kept.

``normed_operand(norm, x)`` is norm(x) for a linear to read: under autocast the
norm kernel writes it in autocast's dtype and reads its gradient so, where
norm(x) would be fp32 and cast twice (forward, and its gradient back).
"""
from typing import Optional, Union

import torch

from fasttx.nn.recompute import autocast_dtype, remember
from fasttx.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        shape, weight, bias, eps = self.normalized_shape, self.weight, self.bias, self.eps
        norm = lambda: layer_norm(input, shape, weight, bias, eps)
        return remember(norm(), norm, input, weight, bias)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, weight, eps = self.normalized_shape, self.weight, self.eps
        norm = lambda: rms_norm(x, shape, weight, eps)
        return remember(norm(), norm, x, weight)


def normed_operand(norm: Union[LayerNorm, RMSNorm], x: torch.Tensor) -> torch.Tensor:
    """norm(x) as a linear under autocast takes it, in autocast's dtype: bitwise norm(x).to(dtype), with no
    cast. Outside autocast, norm(x)."""
    dtype = autocast_dtype(x)
    if isinstance(norm, RMSNorm):
        shape, weight, eps = norm.normalized_shape, norm.weight, norm.eps
        run = lambda: rms_norm(x, shape, weight, eps, out_dtype=dtype)
        return remember(run(), run, x, weight)
    shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
    run = lambda: layer_norm(x, shape, weight, bias, eps, out_dtype=dtype)
    return remember(run(), run, x, weight, bias)



def add_norm(norm: Union[LayerNorm, RMSNorm], branch: torch.Tensor, residual: torch.Tensor,
             out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(branch + residual), branch + residual) in one pass (add_layer_norm, add_rms_norm), the first in
    out_dtype if given; inside recomputed_activations() it is rebuilt in backward from the sum, which its
    backward keeps."""
    # The same kernel on the saved sum rebuilds the normed output bit for bit.
    if isinstance(norm, RMSNorm):
        shape, weight, eps = norm.normalized_shape, norm.weight, norm.eps
        normed, total = add_rms_norm(branch, residual, shape, weight, eps, out_dtype=out_dtype)
        rebuild = lambda: rms_norm(total, shape, weight, eps, out_dtype=out_dtype)
        return remember(normed, rebuild, total, weight), total
    shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
    normed, total = add_layer_norm(branch, residual, shape, weight, bias, eps, out_dtype=out_dtype)
    rebuild = lambda: layer_norm(total, shape, weight, bias, eps, out_dtype=out_dtype)
    return remember(normed, rebuild, total, weight, bias), total
