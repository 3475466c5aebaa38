"""What recognisers are given (Options: fasttx.patch's keyword arguments) and what they answer (Patch)."""
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Options:
    layer_norm: bool = True
    attention: bool = True
    ffn: bool = True
    loss: bool = True


@dataclass
class Patch:
    """Methods the patched class overrides (usually just forward), what now computes the module, and
    instance attributes to set while patched (unpatch puts the old values back)."""
    methods: dict
    what: str
    attributes: dict = field(default_factory=dict)

    @staticmethod
    def forward(fn: Callable, what: str) -> "Patch":
        return Patch({"forward": fn}, what)
