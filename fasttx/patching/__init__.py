"""fasttx.patch(model) and fasttx.unpatch(model): swap the compute of known modules for fasttx's kernels.

A patch changes a module's class to a subclass that overrides ``forward``
(or one other method or property): the parameters, buffers, their names (so
the state_dict), hooks and ``isinstance`` checks stay as they were, and
``unpatch`` puts the original class back. A patched method that computes
submodules without calling them (a TransformerEncoderLayer's norms and
linears) runs the original code in any call where one of them has a hook
(spec.runs_hooks), so hooks fire as unpatched. A patched module pickles,
torch.saves and deepcopies: it is rebuilt, patched, from its original class
and the patch's methods (_reduce_ex). torch.jit.script refuses it with an
error that names fasttx.unpatch.

A module is recognised by its structure (its type and the submodules and
attributes its patched forward reads), never by a library's version number.
A module that looks like a candidate but is not recognised is left alone and
reported, never half-patched.

The recognisers live one file per source of modules:
    torch_modules.py   torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.TransformerEncoderLayer
    hf_transformers.py Hugging Face GPT-2 and BERT, and the causal LM loss (when transformers is installed)
    hf_llama.py        Hugging Face's LLaMA family: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fasttx.patching import hf_llama, hf_transformers, torch_modules
from fasttx.patching.hf_transformers import register_transformers_attention
from fasttx.patching.spec import Options, Patch

# Each recogniser: (module, Options) -> None (not a candidate), a str (a candidate left
# alone, and why), or a Patch. Checked in order; the first that answers decides.
# hf_llama before hf_transformers: it takes the LLaMA family's *ForCausalLM (the LM head and loss) first
RECOGNISERS = (torch_modules.recognise, hf_llama.recognise, hf_transformers.recognise)


@dataclass
class PatchReport:
    """What fasttx.patch did: ``replaced`` lists each module whose class it changed, and what now computes it;
    ``fused`` each candidate that a replaced parent's code computes itself (it is not patched: its own forward
    does not run while the parent's fasttx code does); ``left_alone`` each candidate it did not touch, and why.
    Modules fasttx has nothing for (a Linear, a Dropout) are not listed."""
    replaced: list = field(default_factory=list)    # (module path, what now computes it)
    left_alone: list = field(default_factory=list)  # (module path, why)
    fused: list = field(default_factory=list)       # (module path, the replaced module whose code computes it)
    model: str = ""                                 # the patched model's class name

    @property
    def found_nothing(self) -> bool:
        return not (self.replaced or self.left_alone or self.fused)

    def __str__(self) -> str:
        head = f"fasttx.patch: {len(self.replaced)} module(s) replaced, {len(self.left_alone)} left alone"
        if self.fused:
            head += f", {len(self.fused)} computed inside a replaced module"
        lines = [head]
        if self.found_nothing:
            lines.append(NOTHING_FOUND.format(model=self.model or "the model"))
        elif not self.replaced:
            lines.append("  nothing was replaced: the model runs as before (the reasons follow)")
        lines += [f"  replaced    {path or '<root>'}: {what}" for path, what in self.replaced]
        lines += [f"  fused       {path}: computed inside {parent or '<root>'}'s fasttx code"
                  for path, parent in self.fused]
        lines += [f"  left alone  {path or '<root>'}: {why}" for path, why in self.left_alone]
        return "\n".join(lines)


NOTHING_FOUND = (
    "  found nothing to patch in {model}: fasttx.patch recognises modules by their type (torch.nn.LayerNorm, "
    "torch.nn.RMSNorm, torch.nn.TransformerEncoderLayer, and Hugging Face GPT-2, BERT and LLaMA-family modules), "
    "and this model has none of them. A model whose own modules call torch.nn.functional (a LayerNorm class "
    "calling F.layer_norm, attention calling F.scaled_dot_product_attention inline, as nanoGPT's) is not "
    "patched: run it inside `with fasttx.accelerate():` instead, which routes those calls to fasttx's ops")


_PATCHED_CLASSES: dict = {}
_SAVED_ATTRIBUTES = "_fasttx_saved_attributes"


def _patched_class(original: type, methods: Callable[..., dict], args: tuple, fuses: tuple = ()) -> type:
    """One subclass per (class, methods, args), so identical modules share a class (and compiled code)."""
    key = (original, methods, args, fuses)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(original.__name__, (original,), {
            **methods(*args), "_fasttx_original_class": original, "_fasttx_methods": (methods, args, fuses),
            "_fasttx_fuses": fuses,
            "__reduce_ex__": _reduce_ex, "__prepare_scriptable__": _refuse_scripting,
            "__module__": original.__module__, "__qualname__": original.__qualname__})
    return _PATCHED_CLASSES[key]


def _reduce_ex(self, protocol):
    # pickle would store the class by its name, which finds the original class, not this one: store how
    # to rebuild it instead. The state is the module's own (__setstate__ puts it back), so references
    # between modules, and cycles, pickle as usual.
    cls = type(self)
    return _new_patched, (cls._fasttx_original_class, *cls._fasttx_methods), self.__getstate__()


def _new_patched(original: type, methods: Callable[..., dict], args: tuple, fuses: tuple = ()) -> torch.nn.Module:
    cls = _patched_class(original, methods, args, fuses)
    return cls.__new__(cls)


def _refuse_scripting(self):
    # torch.jit.script calls this on every module before it compiles any; the patched code calls fasttx's
    # Python ops, which TorchScript cannot compile.
    raise RuntimeError(
        f"fasttx: torch.jit.script cannot compile fasttx-patched modules (this model holds a patched "
        f"{type(self).__qualname__}, whose code calls fasttx's Python ops). Call fasttx.unpatch(model) first to "
        "script the original code, or use torch.compile, which compiles the patched code")


def _apply(module: torch.nn.Module, found: Patch) -> None:
    if found.attributes:
        module.__dict__[_SAVED_ATTRIBUTES] = {name: getattr(module, name) for name in found.attributes}
        for name, value in found.attributes.items():
            setattr(module, name, value)
    module.__class__ = _patched_class(type(module), found.methods, found.args, tuple(found.fuses))


def is_patched(module: torch.nn.Module) -> bool:
    return "_fasttx_original_class" in type(module).__dict__


def patch(model: torch.nn.Module, *, layer_norm: bool = True, attention: bool = True,
          ffn: bool = True, loss: bool = True, keep_logits: bool = False) -> PatchReport:
    """Patch ``model`` in place; returns what was replaced and what was left alone, with the reason.
    Each keyword turns one kind of patch off; ``loss`` is a causal LM's cross-entropy. A LLaMA-family causal
    LM in training mode given labels computes its LM head and loss as one fasttx.linear_cross_entropy and
    returns ``logits=None``; ``keep_logits=True`` keeps the logits (the LM head runs, the loss is
    fasttx.cross_entropy on them)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fasttx.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    options = Options(layer_norm, attention, ffn, loss, keep_logits)
    report = PatchReport(model=type(model).__name__)
    fused_into: dict = {}  # path of a submodule a replaced module's code computes -> that module's path
    for path, module in model.named_modules():
        if is_patched(module):
            report.left_alone.append((path, "already patched"))
            for name in type(module).__dict__["_fasttx_fuses"]:
                fused_into[f"{path}.{name}" if path else name] = path
            continue
        for recognise in RECOGNISERS:
            found = recognise(module, options)
            if found is None:
                continue
            if path in fused_into:
                report.fused.append((path, fused_into[path]))
            elif isinstance(found, str):
                report.left_alone.append((path, found))
            else:
                _apply(module, found)
                report.replaced.append((path, found.what))
                for name in found.fuses:
                    fused_into[f"{path}.{name}" if path else name] = path
            break
    return report


def unpatch(model: torch.nn.Module) -> int:
    """Put back the original class of every patched module in ``model``; returns how many."""
    restored = 0
    for module in model.modules():
        if is_patched(module):
            module.__class__ = type(module).__dict__["_fasttx_original_class"]
            for name, value in module.__dict__.pop(_SAVED_ATTRIBUTES, {}).items():
                setattr(module, name, value)
            restored += 1
    return restored


__all__ = ["PatchReport", "patch", "unpatch", "is_patched", "register_transformers_attention"]
