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
    dtype).
  - the decoder layer (``<Family>DecoderLayer``): its middle residual add and the norm after it as one
    fasttx.add_rms_norm (the norm is then computed inside the layer: reported as fused); the layer's last add
    feeds the next layer across the model's loop and stays. Recognised by the submodules its forward reads
    and the arguments it passes on to self_attn, and checked on a probe input.
  - attention (``<Family>Attention``): transformers' own forward stays
    (projections, rotary, cache, GQA); the attention function is fasttx's,
    through AttentionInterface, as for GPT-2 (hf_transformers._attention). A
    sliding window (Mistral, Qwen2, Gemma 2's local layers, Phi-3) is in the
    masks transformers builds, which fasttx's attention takes as sdpa does.
    Gemma 2's attention logit softcapping is not computed by fasttx's
    attention: such a module is left alone and reported.
  - the rotary application: the attention forward is transformers' own code, rebuilt with its module's
    apply_rotary_pos_emb looked up as fasttx.apply_rotary (after a probe checks the model's function computes
    rotate-half rotary; partial rotary where that function has it); calls fasttx would compute differently
    run the model's function. Gemma 2's soft-capped attention gets this alone.
  - the gated MLP (``<Family>MLP``): fasttx.glu_ffn, the activation recognised by evaluating it (silu, gelu,
    gelu_tanh); Phi-3's fused gate_up_proj as two row views (gate, up) of its weight.
  - ``<Family>ForCausalLM``: in training with labels, lm_head + ForCausalLMLoss as one
    fasttx.linear_cross_entropy on the hidden states, logits=None (Options.keep_logits keeps them);
    otherwise transformers' forward with the loss as fasttx.cross_entropy (hf_transformers' loss patch).
Left alone and reported: the rotary embedding module (its cos/sin tables stay transformers' code).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.ops.apply_rotary import apply_rotary, apply_rotary_ref
from fasttx.ops.glu_ffn import glu_ffn
from fasttx.ops.layer_norm import add_rms_norm, rms_norm
from fasttx.patching import hf_transformers
from fasttx.patching.spec import Options, Patch, runs_hooks

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
    "RotaryEmbedding": "it computes the cos/sin tables (once per forward, shared by the layers), which stay "
                       "transformers' code; their application to q and k is fasttx.apply_rotary inside each patched "
                       "attention module",
}
MLPS = frozenset(f"{name}MLP" for name in FAMILY)
CAUSAL_LMS = frozenset(f"{name}ForCausalLM" for name in FAMILY)


def recognise(module: torch.nn.Module, options: Options):
    kind = type(module)
    if not kind.__module__.startswith("transformers."):
        return None
    name = kind.__name__
    if name in RMS_NORMS:
        return _rms_norm(module, options, *RMS_NORMS[name])
    if name in ATTENTIONS:
        return _attention(module, options)
    if name in MLPS:
        return _mlp(module, options)
    if name in CAUSAL_LMS:
        return _causal_lm(module, options)
    if name in DECODER_LAYERS:
        return _decoder_layer(module, options)
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


# ---- the gated MLP -----------------------------------------------------------------------

_GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _glu_activation(act) -> Optional[str]:
    """Which of glu_ffn's activations ``act`` computes, found by evaluating it on a probe, or None."""
    if not callable(act):
        return None
    probe = torch.linspace(-8, 8, 161, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = act(probe)
    except Exception:  # an activation that cannot take the probe is not one we know
        return None
    for name, ref in (("silu", F.silu(probe)), ("gelu", F.gelu(probe)),
                      ("gelu_tanh", F.gelu(probe, approximate="tanh"))):
        if isinstance(got, Tensor) and got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-9, atol=1e-12):
            return name
    return None


def _is_linear(m) -> bool:
    # torch.nn.Linear's own forward (a subclass with another forward, a quantized linear: not taken)
    return isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward


def _mlp(module, options: Options):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2/3, Gemma/2) or, with one fused
    ``gate_up_proj`` whose output is chunked into (gate, up) (Phi-3), ``down_proj(up * act(gate))``."""
    if not options.ffn:
        return "ffn=False"
    code = inspect.unwrap(type(module).forward).__code__
    if hasattr(module, "gate_up_proj"):
        layers, act_name, fused = ("gate_up_proj", "down_proj"), "activation_fn", True
        if "chunk" not in code.co_names:
            return "its forward does not chunk gate_up_proj's output as Phi3MLP's does"
    else:
        layers, act_name, fused = ("gate_proj", "up_proj", "down_proj"), "act_fn", False
    for name in layers:
        if not _is_linear(getattr(module, name, None)):
            return f"{name} is not a torch.nn.Linear"
    if fused and (module.gate_up_proj.out_features % 2 or module.gate_up_proj.bias is not None):
        return "gate_up_proj has an odd number of outputs or a bias"
    act = getattr(module, act_name, None)
    activation = _glu_activation(act)
    if activation is None:
        return (f"its activation {type(act).__name__} is not silu, gelu or gelu_tanh (glu_ffn's): "
                "transformers' code runs it")
    return Patch(_mlp_methods, (activation, fused), f"fasttx.glu_ffn ({activation})",
                 fuses=(*layers, act_name) if isinstance(act, torch.nn.Module) else layers)


def _mlp_methods(activation: str, fused: bool) -> dict:
    if fused:
        def forward(self, hidden_states: Tensor) -> Tensor:
            if runs_hooks(self.gate_up_proj, self.activation_fn, self.down_proj):
                return type(self)._fasttx_original_class.forward(self, hidden_states)
            w = self.gate_up_proj.weight  # (2h, d): chunk(2, -1) of its output is (gate, up) = (W[:h], W[h:])
            h = w.shape[0] // 2
            return glu_ffn(hidden_states, w[:h], w[h:], self.down_proj.weight, activation,
                           b_down=self.down_proj.bias)
    else:
        def forward(self, x: Tensor) -> Tensor:
            if runs_hooks(self.gate_proj, self.up_proj, self.act_fn, self.down_proj):
                return type(self)._fasttx_original_class.forward(self, x)
            return glu_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, activation,
                           self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias)
    return {"forward": forward}


# ---- attention and the rotary application ----------------------------------------------------

_ROTARY = "apply_rotary_pos_emb"


def _rotary_support(cls: type) -> tuple:
    """(whether the class's forward applies rotary through a module-level apply_rotary_pos_emb that computes
    what fasttx.apply_rotary does, whether that function also takes partial rotary (Dr < D), why not)."""
    forward = inspect.unwrap(cls.forward)
    original = forward.__globals__.get(_ROTARY)
    if _ROTARY not in forward.__code__.co_names or not callable(original):
        return False, False, f"its forward does not call a module-level {_ROTARY}"
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    ok = []
    for dr in (8, 4):
        angles = torch.randn(2, 5, dr // 2, generator=gen).repeat(1, 1, 2)
        cos, sin = angles.cos(), angles.sin()
        try:
            with torch.no_grad():
                got = original(q, k, cos, sin)
                want = apply_rotary_ref(q, k, cos, sin)  # the formula, not a kernel
            ok.append(all(isinstance(g, Tensor) and g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-6)
                          for g, w in zip(got, want)))
        except Exception:  # a function that cannot take the probe does not compute what apply_rotary does
            ok.append(False)
    if not ok[0]:
        return False, False, f"its {_ROTARY} does not compute what fasttx.apply_rotary does (rotate_half)"
    return True, ok[1], None


def _rotary_function(original, partial: bool):
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) as fasttx.apply_rotary where it computes the same
    thing; any other call (another layout, partial rotary where ``original`` has none, tables of a wider dtype
    than q outside autocast, which transformers' code promotes) runs ``original``.

    Under autocast, transformers' rotary takes bf16/fp16 q and k with fp32 tables and returns fp32, which
    every attention path (eager's matmuls, SDPA, fasttx's, flash-attention's) then casts back to the autocast
    dtype. fasttx.apply_rotary returns that dtype directly, rounded once from the same fp32 math: the values
    the attention sees, with half the bytes and no cast (a KV cache then holds them in the autocast dtype)."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (args or kwargs) and (len(args) + len(kwargs) != 1 or (args[0] if args else
                                                                   kwargs.get("unsqueeze_dim", None)) != 1):
            return original(q, k, cos, sin, *args, **kwargs)
        autocast_rounding = (cos.dtype == torch.float32 and q.dtype in (torch.bfloat16, torch.float16)
                             and torch.is_autocast_enabled(q.device.type)
                             and torch.get_autocast_dtype(q.device.type) == q.dtype)
        if (q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or k.dtype != q.dtype or sin.dtype != cos.dtype
                or (torch.promote_types(q.dtype, cos.dtype) != q.dtype and not autocast_rounding)
                or (cos.shape[-1] != q.shape[-1] and not partial)):
            return original(q, k, cos, sin)
        return apply_rotary(q, k, cos, sin)
    return apply_rotary_pos_emb


def _with_global(fn, name: str, value):
    """A copy of ``fn`` (through the functools.wraps chain of decorators it may have) whose innermost function
    looks ``name`` up as ``value``: the same code, the module's other globals as they were when patched."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        scope = dict(fn.__globals__)
        scope[name] = value
        new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        cells = fn.__closure__ or ()
        holding = [i for i, c in enumerate(cells) if c.cell_contents is inner]
        if len(holding) != 1:
            raise TypeError(f"cannot rebuild {fn.__qualname__}: its decorator does not hold the function it wraps")
        new_inner = _with_global(inner, name, value)
        closure = tuple(types.CellType(new_inner) if i == holding[0] else c for i, c in enumerate(cells))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    if inner is not None:
        new.__wrapped__ = new_inner
    new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
    return new


def _llama_attention_methods(original: type, partial: bool, attention: bool) -> dict:
    """transformers' forward, the same code, with apply_rotary_pos_emb as fasttx.apply_rotary (and, with
    ``attention``, fasttx's attention function through AttentionInterface, as hf_transformers patches it)."""
    methods = hf_transformers._attention_methods(original) if attention else {}
    rotary = _rotary_function(inspect.unwrap(original.forward).__globals__[_ROTARY], partial)
    return {**methods, "forward": _with_global(original.forward, _ROTARY, rotary)}


def _attention(module, options: Options):
    found = hf_transformers._attention(module, options)
    if not options.attention:
        return found
    rotary, partial, why = _rotary_support(type(module))
    if not rotary:
        return found if isinstance(found, Patch) else f"{found}; rotary: {why}"
    try:
        _llama_attention_methods(type(module), partial, False)
    except Exception as err:  # a forward this cannot rebuild is left as it is
        return found if isinstance(found, Patch) else f"{found}; rotary: {err}"
    what = "rotary: fasttx.apply_rotary"
    if isinstance(found, Patch):
        return Patch(_llama_attention_methods, (type(module), partial, True), f"{found.what}; {what}",
                     found.attributes)
    return Patch(_llama_attention_methods, (type(module), partial, False),
                 f"{what}; attention left as transformers': {found}")


# ---- the decoder layer: its middle residual add fused into the norm after it -------------------

# The decoder layers' forwards, by the submodules they read in order: (the module between the attention and the
# residual add, the norm that takes the sum, the module after the MLP). Llama, Mistral, Qwen2/3 and Gemma share
# the first; Phi-3 drops out both branches; Gemma 2 norms both branches before their adds ("sandwich" norms).
_DECODER_FORMS = {
    ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"): (None, "post_attention_layernorm", None),
    ("input_layernorm", "self_attn", "resid_attn_dropout", "post_attention_layernorm", "mlp", "resid_mlp_dropout"):
        ("resid_attn_dropout", "post_attention_layernorm", "resid_mlp_dropout"),
    ("input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
     "post_feedforward_layernorm"): ("post_attention_layernorm", "pre_feedforward_layernorm",
                                     "post_feedforward_layernorm"),
}
DECODER_LAYERS = frozenset(f"{name}DecoderLayer" for name in FAMILY)


def _renamed_keywords(fn) -> frozenset:
    """Old keyword names that transformers' deprecate_kwarg decorators around ``fn`` rename (past_key_values):
    a call using one runs the original forward, whose decorator knows what to do with it."""
    names = set()
    while fn is not None:
        try:
            found = inspect.getclosurevars(fn).nonlocals
        except (TypeError, ValueError):
            found = {}
        if isinstance(found.get("old_name"), str):
            names.add(found["old_name"])
        fn = getattr(fn, "__wrapped__", None)
    return frozenset(names)


def _decoder_layer(module, options: Options):
    """``residual + attention`` and the norm after it as one fasttx.add_rms_norm; the other residual add stays
    (it feeds the next layer's norm, across the model's own loop over layers)."""
    if not options.layer_norm:
        return "layer_norm=False"
    forward = inspect.unwrap(type(module).forward)
    form = _DECODER_FORMS.get(forward.__code__.co_names)
    if form is None:
        return (f"its forward reads {forward.__code__.co_names}, not the submodules of a LLaMA-family decoder "
                "layer this patch knows: its residual adds stay as they are")
    params = list(inspect.signature(forward).parameters.values())
    named = tuple(p.name for p in params[2:] if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if (params[1].name != "hidden_states" or params[-1].kind != inspect.Parameter.VAR_KEYWORD
            or any(p.default is inspect.Parameter.empty for p in params[2:-1])
            or ("hidden_states", *named) not in forward.__code__.co_consts):
        return "its forward does not pass its own arguments on to self_attn as transformers 5's decoder layers do"
    norm_name = form[1]
    norm = getattr(module, norm_name, None)
    if type(norm).__name__ not in RMS_NORMS:
        return f"its {norm_name} is not an RMSNorm of the family"
    norm_form, eps_attribute = RMS_NORMS[type(norm).__name__]
    found = _rms_norm(norm, options, norm_form, eps_attribute)
    if not isinstance(found, Patch):
        return f"its {norm_name} is left alone ({found})"
    defaults = tuple((p.name, p.default) for p in params[2:-1])
    args = (type(module), form, norm_form, eps_attribute, defaults, _renamed_keywords(type(module).forward))
    why = _probe_decoder_layer(module, args)
    if why is not None:
        return why
    return Patch(_decoder_layer_methods, args, f"residual add + {norm_name}: fasttx.add_rms_norm"
                 + (" with (1 + weight)" if norm_form == _ONE_PLUS_WEIGHT else ""), fuses=(norm_name,))


def _add_rms_norm(norm, form: str, eps_attribute: str, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(residual + x), residual + x), as the family's RMSNorm module computes the norm (see _rms_norm_methods)."""
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    eps = getattr(norm, eps_attribute)
    if form == _ONE_PLUS_WEIGHT:
        w = 1.0 + norm.weight.float()
        return add_rms_norm(x, residual, w.shape, w, eps, out_dtype=sum_dtype)
    w = norm.weight
    return add_rms_norm(x, residual, w.shape, w, eps, out_dtype=torch.promote_types(sum_dtype, w.dtype))


def _decoder_layer_methods(original: type, form: tuple, norm_form: str, eps_attribute: str, defaults: tuple,
                           renamed: frozenset) -> dict:
    before_name, norm_name, after_name = form

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        norm = getattr(self, norm_name)
        if args or runs_hooks(norm) or not renamed.isdisjoint(kwargs):
            return original.forward(self, hidden_states, *args, **kwargs)
        attention_kwargs = dict(defaults)
        attention_kwargs.update(kwargs)  # as transformers' forward passes its arguments on
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **attention_kwargs)
        if before_name is not None:
            hidden_states = getattr(self, before_name)(hidden_states)
        hidden_states, residual = _add_rms_norm(norm, norm_form, eps_attribute, hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        if after_name is not None:
            hidden_states = getattr(self, after_name)(hidden_states)
        return residual + hidden_states
    return {"forward": forward}


def _probe_decoder_layer(module, args: tuple) -> Optional[str]:
    """None when the patched forward gives the layer's own output on a probe input (in eval mode: no dropout),
    else why not. A layer whose weights are on the meta device is taken on its structure."""
    weight = getattr(getattr(module, args[1][1]), "weight")
    head_dim = getattr(getattr(module, "self_attn", None), "head_dim", None)
    if weight.device.type == "meta":
        return None
    if not isinstance(head_dim, int):
        return "its self_attn has no head_dim to build a probe's rotary tables with"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, weight.shape[0], generator=gen).to(device=weight.device, dtype=weight.dtype)
    angles = torch.randn(1, 5, head_dim // 2, generator=gen).repeat(1, 1, 2).to(device=weight.device)
    tables = (angles.cos().to(weight.dtype), angles.sin().to(weight.dtype))
    patched = _decoder_layer_methods(*args)["forward"]
    training = module.training
    try:
        module.train(False)
        with torch.no_grad():
            want = args[0].forward(module, x, position_embeddings=tables)
            got = patched(module, x, position_embeddings=tables)
    except Exception as err:  # a forward that cannot take the probe is not one we know
        return f"its forward could not be checked against the fused residual add ({type(err).__name__}: {err})"
    finally:
        module.train(training)
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    if not (isinstance(want, Tensor) and isinstance(got, Tensor) and got.shape == want.shape
            and got.dtype == want.dtype and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)):
        return "its forward does not compute what the fused residual add + norm computes"
    return None


# ---- the LM head and its loss ----------------------------------------------------------------

# What the *ForCausalLM forward this patch rebuilds reads (transformers 5.x): its model, the hidden states
# sliced by logits_to_keep, lm_head, loss_function, the output class; Gemma 2's final logit softcapping.
_CAUSAL_LM_NAMES = frozenset({"CausalLMOutputWithPast", "attentions", "cache", "past_key_values", "config",
                              "hidden_states", "last_hidden_state", "lm_head", "loss_function", "model",
                              "slice_logits_to_keep", "vocab_size", "final_logit_softcapping", "tanh", "torch"})
_SOFTCAP = "final_logit_softcapping"


def causal_lm_linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          softcap: Optional[float] = None, num_items_in_batch: Optional[Tensor] = None,
                          ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss of ``softcap(hidden @ weight.T + bias)`` without the logits: token t
    predicts label t + 1 (or ``shift_labels``); the mean over labels that are not ignore_index, or the sum
    over num_items_in_batch when given; float32, as ForCausalLMLoss upcasts its logits."""
    from fasttx.ops.linear_cross_entropy import linear_cross_entropy
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                shift_labels.reshape(-1).to(hidden.device), bias, ignore_index, reduction,
                                softcap=softcap).float()
    if reduction == "sum":
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


def _causal_lm(module, options: Options):
    found = hf_transformers._causal_lm_loss(module, options)
    if not isinstance(found, Patch):
        return found
    if options.keep_logits:
        return Patch(found.methods, found.args, f"{found.what}; the LM head runs (keep_logits=True)")
    why = _causal_lm_forward_unknown(module)
    if why is not None:
        return Patch(found.methods, found.args, f"{found.what}; the LM head runs: {why}")
    return Patch(_causal_lm_methods, (type(module),),
                 "lm_head + loss: fasttx.linear_cross_entropy in training with labels (logits=None; "
                 "keep_logits=True keeps them); otherwise loss_function: fasttx.cross_entropy "
                 "(ForCausalLMLoss's contract)")


def _causal_lm_forward_unknown(module) -> Optional[str]:
    forward = inspect.unwrap(type(module).forward)
    params = list(inspect.signature(forward).parameters.values())
    names = [p.name for p in params]
    if "labels" not in names or "logits_to_keep" not in names or params[-1].kind != inspect.Parameter.VAR_KEYWORD:
        return "its forward does not take (..., labels, ..., logits_to_keep, **kwargs) as transformers 5's does"
    unknown = set(forward.__code__.co_names) - _CAUSAL_LM_NAMES
    if unknown:
        return f"its forward reads {sorted(unknown)}, which the fused LM head + loss does not compute"
    if "slice_logits_to_keep" not in forward.__globals__ or not _is_linear(getattr(module, "lm_head", None)):
        return "it has no slice_logits_to_keep or no torch.nn.Linear lm_head"
    if not isinstance(getattr(module, "model", None), torch.nn.Module):
        return "it has no base model in .model"
    return None


def _causal_lm_methods(original: type) -> dict:
    forward = inspect.unwrap(original.forward)
    names = tuple(p.name for p in inspect.signature(forward).parameters.values()
                  if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD)[1:]  # without self
    slice_logits_to_keep = forward.__globals__["slice_logits_to_keep"]
    output_class = forward.__globals__.get("CausalLMOutputWithPast")
    softcapped = _SOFTCAP in forward.__code__.co_names
    output_fields = frozenset(f.name for f in dataclasses.fields(output_class)) - {"loss", "logits"} \
        if dataclasses.is_dataclass(output_class) else frozenset()

    def patched_forward(self, *args, **kwargs):
        call = dict(zip(names, args), **kwargs)
        if (call.get("labels") is None or not self.training or len(args) > len(names) or output_class is None
                or "return_dict" in call or "_loss_function" in self.__dict__ or runs_hooks(self.lm_head)):
            return original.forward(self, *args, **kwargs)  # the logits as unpatched; the loss is patched
        labels, logits_to_keep = call.pop("labels"), call.pop("logits_to_keep", 0)
        outputs = self.model(**call)
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        loss_kwargs = {k: v for k, v in call.items() if k not in names}  # what **kwargs held
        loss = causal_lm_linear_loss(hidden, self.lm_head.weight, self.lm_head.bias, labels,
                                     getattr(self.config, _SOFTCAP, None) if softcapped else None, **loss_kwargs)
        rest = {k: v for k, v in outputs.items() if k in output_fields}
        return output_class(loss=loss, logits=None, **rest)
    return {**hf_transformers._loss_methods(), "forward": patched_forward}
