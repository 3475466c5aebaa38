"""Recognisers for Hugging Face transformers' LLaMA family: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3.

transformers is optional: nothing here imports it. A module is recognised by
its class name, the attributes its patched code reads, and (for the norms) a
probe that checks its forward computes the formula the patch replaces it
with, never by a version number.

What each patch swaps:
  - every RMSNorm (``<Family>RMSNorm``, Qwen3's q_norm / k_norm included):
    fasttx.rms_norm. Two forms: ``weight * normalized`` (Llama, Mistral, Qwen2,
    Qwen3, Phi-3: the result in the promoted dtype of input and weight, as
    ``weight * hidden.to(input_dtype)`` gives it) and ``normalized * (1 +
    weight)`` (Gemma, Gemma 2: computed in float32, returned in the input's
    dtype). The residual adds stay in the decoder layer's forward, which
    carries the cache plumbing.
  - attention (``<Family>Attention``): transformers' own forward stays
    (projections, rotary, cache, GQA); the attention function is fasttx's,
    through AttentionInterface, as for GPT-2 (hf_transformers._attention). A
    sliding window (Mistral, Qwen2, Gemma 2's local layers, Phi-3) is in the
    masks transformers builds, which fasttx's attention takes as sdpa does.
    Gemma 2's attention logit softcapping is not computed by fasttx's
    attention: such a module is left alone and reported.
  - the causal LM loss: hf_transformers' ForCausalLMLoss patch, as for any
    ``*ForCausalLM``.
Left alone and reported, until the patch routes them to the ops written for
them (PENDING below: replace an entry with a recogniser when its op lands):
the gated MLP (glu_ffn), the rotary embedding's application (apply_rotary),
and the LM head with its loss as one fused linear + cross-entropy
(linear_cross_entropy).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fasttx.ops.layer_norm import rms_norm
from fasttx.patching import hf_transformers
from fasttx.patching.spec import Options, Patch

FAMILY = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Phi3")

# How each family's RMSNorm scales the normalized row, and the attribute its eps is in.
_WEIGHT, _ONE_PLUS_WEIGHT = "weight", "1 + weight"
RMS_NORMS = {
    **{f"{name}RMSNorm": (_WEIGHT, "variance_epsilon") for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3")},
    **{f"{name}RMSNorm": (_ONE_PLUS_WEIGHT, "eps") for name in ("Gemma", "Gemma2")},
}
ATTENTIONS = frozenset(f"{name}Attention" for name in FAMILY)

# Modules of the family that fasttx has no op for yet, by class-name suffix, and what the report says. Each is
# a place for the recogniser that the op brings (issue 26): the MLP as glu_ffn, the rotary application inside
# the attention forward, the LM head and its loss as linear_cross_entropy (the loss alone is patched already).
PENDING = {
    "MLP": "its gated MLP (act(gate_proj(x)) * up_proj(x), then down_proj) runs as transformers' code: fasttx.patch "
           "does not route it to a fused gated FFN (glu_ffn) yet",
    "RotaryEmbedding": "rotary embeddings stay transformers' (cos/sin here, applied to q and k inside the attention "
                       "forward): fasttx.patch does not route them to apply_rotary yet",
}


def recognise(module: torch.nn.Module, options: Options):
    kind = type(module)
    if not kind.__module__.startswith("transformers."):
        return None
    name = kind.__name__
    if name in RMS_NORMS:
        return _rms_norm(module, options, *RMS_NORMS[name])
    if name in ATTENTIONS:
        return hf_transformers._attention(module, options)
    for prefix in FAMILY:
        if name.startswith(prefix) and name[len(prefix):] in PENDING:
            return PENDING[name[len(prefix):]]
    if name.endswith("RMSNorm"):
        return (f"fasttx.patch knows the RMSNorms of {', '.join(FAMILY)}; {name}'s forward may differ "
                "(dtype handling, an offset on the weight), so it is not replaced unchecked")
    return None


# ---- RMSNorm -----------------------------------------------------------------------------

def _rms_norm(module, options: Options, form: str, eps_attribute: str):
    if not options.layer_norm:
        return "layer_norm=False"
    weight = getattr(module, "weight", None)
    eps = getattr(module, eps_attribute, None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or not weight.is_floating_point():
        return "its weight is not a 1-D floating parameter"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return f"it has no numeric {eps_attribute}"
    why = _probe(module, form, eps_attribute)
    if why is not None:
        return why
    what = "fasttx.rms_norm" + (" with (1 + weight)" if form == _ONE_PLUS_WEIGHT else "")
    return Patch(_rms_norm_methods, (form, eps_attribute), what)


def _rms_norm_methods(form: str, eps_attribute: str) -> dict:
    if form == _ONE_PLUS_WEIGHT:
        def forward(self, x: Tensor) -> Tensor:
            # Gemma: (x * rstd * (1 + w)) in float32, rounded once to x's dtype
            w = 1.0 + self.weight.float()
            return rms_norm(x, w.shape, w, getattr(self, eps_attribute), out_dtype=x.dtype)
    else:
        def forward(self, hidden_states: Tensor) -> Tensor:
            # Llama: weight * normalized.to(input dtype), so the promoted dtype of the two
            w = self.weight
            return rms_norm(hidden_states, w.shape, w, getattr(self, eps_attribute),
                            out_dtype=torch.promote_types(hidden_states.dtype, w.dtype))
    return {"forward": forward}


def _probe(module, form: str, eps_attribute: str) -> Optional[str]:
    """None when the module's own forward computes ``form`` on a probe input, else why not. A module whose
    weight is not on a device that computes (meta) is taken on its class name."""
    weight = module.weight
    if weight.device.type == "meta":
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(device=weight.device, dtype=weight.dtype) * 3
    try:
        with torch.no_grad():
            got = type(module).forward(module, x)
            want = _rms_norm_methods(form, eps_attribute)["forward"](module, x)
    except Exception as err:  # a forward that cannot take the probe is not the one we know
        return f"its forward could not be checked against fasttx.rms_norm ({type(err).__name__}: {err})"
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    if not (isinstance(got, Tensor) and got.shape == want.shape and got.dtype == want.dtype
            and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)):
        return f"its forward does not compute RMSNorm with {form} as {type(module).__name__} is known to"
    return None
