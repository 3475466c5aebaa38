"""What recognisers are given (Options: fasttx.patch's keyword arguments) and what they answer (Patch),
and the check every patched method that skips calling a submodule makes first (runs_hooks)."""
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.modules import module as _torch_module


@dataclass(frozen=True)
class Options:
    layer_norm: bool = True
    attention: bool = True
    ffn: bool = True
    loss: bool = True
    keep_logits: bool = False  # a causal LM's logits also in training with labels (no fused LM head + loss)


@dataclass
class Patch:
    """``methods(*args)`` builds the methods the patched class overrides (usually just forward); ``what``
    says what now computes the module; ``attributes`` are instance attributes set while patched (unpatch
    puts the old values back). ``methods`` is a module-level function and ``args`` plain values because a
    pickled patched module stores them, not its class: a class made at run time has no importable name."""
    methods: Callable[..., dict]
    args: tuple
    what: str
    attributes: dict = field(default_factory=dict)
    # Submodules (paths relative to this module) that the patched code computes itself, never calling them
    # (but in a call that runs the original code, as when one has a hook): they are not patched, and the
    # report lists them as computed inside this one, not as replaced.
    fuses: tuple = ()


def runs_hooks(*modules) -> bool:
    """Whether calling any of ``modules`` would run a hook: its own forward (pre-)hooks or backward
    (pre-)hooks, or a global one. A patched method that computes these modules without calling them
    must then run the original code, so that every hook fires as it does unpatched. Checked per call
    (a few dict checks), so hooks registered after patching count too. Non-modules (a plain activation
    function) have no hooks."""
    if (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks):
        return True
    for m in modules:
        if isinstance(m, torch.nn.Module) and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                               or m._backward_pre_hooks):
            return True
    return False
