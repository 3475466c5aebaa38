"""Under torch.autocast, give each fasttx op the dtypes that autocast gives the torch ops it replaces.

Autocast casts the inputs of torch's own ops as they are dispatched; fasttx's
ops are custom ops it knows nothing of, so their Python entry points do the
same casts before calling them:
  - ops that replace GEMM-based torch ops autocast runs in lower precision
    (linear, scaled_dot_product_attention): every floating input but float64
    goes to the autocast dtype, as autocast's lower-precision list does;
  - ops that replace type-promoting torch code (x + residual, x + bias, then
    a norm or GELU): mixed inputs meet at the promoted dtype, and a norm's
    weight and bias follow its input, as torch's mixed-dtype norms return
    the input's dtype.
Outside autocast nothing changes, and mismatched dtypes still raise.
The casts are ordinary differentiable .to() calls, so fp32 parameters get fp32
gradients, as under autocast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _enabled(t: Tensor) -> bool:
    return t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)


def lower_precision(*tensors: Optional[Tensor]) -> tuple:
    """Inputs of a linear/SDPA-like op, as autocast would cast them (None passes through)."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or not _enabled(first):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def promoted(*tensors: Tensor) -> tuple:
    """Under autocast, mixed floating inputs at their promoted dtype, as x + y would give them."""
    if not all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors) or not _enabled(tensors[0]) \
            or len({t.dtype for t in tensors}) == 1:
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def params_like(x: Tensor, *params: Optional[Tensor]) -> tuple:
    """Under autocast, a norm's weight and bias in x's dtype (torch's norms return x's dtype)."""
    if not isinstance(x, Tensor) or not _enabled(x):
        return params
    return tuple(p.to(x.dtype) if isinstance(p, Tensor) and p.is_floating_point() and p.dtype != x.dtype else p
                 for p in params)
