"""fasttx.nn.LinearCrossEntropy: an LM head and its loss, ``F.cross_entropy(lm_head(hidden), target)``, fused.

It holds ``weight`` (out_features, in_features) and an optional ``bias`` exactly as nn.Linear does,
so an lm_head's state_dict loads into it (and a tied embedding can be assigned to ``weight``);
forward(hidden, target) returns the loss without ever holding the (tokens, vocab) logits
(fasttx.linear_cross_entropy).
"""
import math
from typing import Optional

import torch

from fasttx.nn._arguments import positive_int
from fasttx.ops._checks import check_int, check_real
from fasttx.ops.linear_cross_entropy import REDUCTIONS, linear_cross_entropy

_NAME = "LinearCrossEntropy"


class LinearCrossEntropy(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, softcap: Optional[float] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = positive_int(_NAME, "in_features", in_features)
        self.out_features = positive_int(_NAME, "out_features", out_features)
        if reduction not in REDUCTIONS:
            raise ValueError(f"fasttx.nn.{_NAME}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_int(f"nn.{_NAME}", "ignore_index", ignore_index)
        check_real(f"nn.{_NAME}", "label_smoothing", label_smoothing, 0.0, 1.0)
        if softcap is not None:
            check_real(f"nn.{_NAME}", "softcap", softcap)
            if softcap <= 0:
                raise ValueError(f"fasttx.nn.{_NAME}: softcap must be None or > 0, got {softcap!r}")
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.softcap = label_smoothing, softcap
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization."""
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.weight, target, self.bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, self.softcap)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}")
