"""Recognisers for Hugging Face transformers' GPT-2 and BERT modules.

transformers is optional: nothing here imports it. Modules are recognised by
their class name and the structure their patched code relies on (submodules,
weight shapes, what the activation computes), never by a version number.

What each patch swaps:
  - attention (GPT2Attention, BertSelfAttention): transformers' own forward
    stays (projections, cache, cross-attention); it picks its attention
    function through AttentionInterface by ``config._attn_implementation``, so
    the patched module's config is a FollowingConfig: the model's own, read
    live, where the implementation the model ran when patched reads "fasttx",
    a function that calls fasttx.scaled_dot_product_attention (so
    set_attn_implementation after patching is followed). Masks are the
    ones transformers builds for the model's own implementation (sdpa or
    eager: bool or additive, 4-D); other implementations are left alone. A
    call that records attention weights (output_attentions=True) runs
    transformers' eager attention, which forms them.
  - GPT2MLP: c_fc, the activation and c_proj as one gelu_ffn (Conv1D keeps
    its weights as (in, out): they are passed transposed, as views).
  - BertSelfOutput, BertOutput: dense, dropout, then LayerNorm(h + input)
    with the residual add fused (add_layer_norm).
  - BertLayer.feed_forward_chunk: BertIntermediate and BertOutput as one
    gelu_ffn, then the fused add + LayerNorm.
  - causal LM heads (GPT2LMHeadModel, *ForCausalLM) whose loss_function is
    transformers' ForCausalLMLoss: that property returns a function with its
    contract (shifted labels, ignore_index, num_items_in_batch) computed by
    fasttx.cross_entropy, which reads bf16 logits without their fp32 copy and
    keeps no (tokens, vocab) log-softmax. The logits are still returned.
GPT-2's residual adds stay in GPT2Block, whose forward carries the cache
plumbing that changes between versions. A patched forward that computes
submodules without calling them (GPT2MLP's c_fc, act and c_proj; BERT's
LayerNorm, intermediate and output.dense) runs transformers' own code in any
call where one of them has a hook, so hooks fire as unpatched.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.ops.attention import scaled_dot_product_attention
from fasttx.ops.cross_entropy import cross_entropy_float
from fasttx.ops.gelu_ffn import gelu_ffn
from fasttx.ops.layer_norm import add_layer_norm
from fasttx.patching.spec import Options, Patch, runs_hooks
from fasttx.patching.torch_modules import computes_layer_norm

ATTENTION_NAME = "fasttx"
_MASK_FORMATS = ("sdpa", "eager")  # implementations whose masks fasttx's attention takes as they are
# Keyword arguments that change what attention computes; fasttx's function has none of them.
# (A sliding_window is not among them: sdpa and eager masks carry the window, and sdpa ignores the keyword too.)
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")


def recognise(module: torch.nn.Module, options: Options):
    name = type(module).__name__
    if not type(module).__module__.startswith("transformers."):
        return None
    if name in ("GPT2Attention", "BertSelfAttention"):
        return _attention(module, options)
    if name == "GPT2MLP":
        return _gpt2_mlp(module, options)
    if name in ("BertSelfOutput", "BertOutput"):
        return _bert_add_norm(module, options)
    if name == "BertLayer":
        return _bert_layer(module, options)
    if name.endswith(("LMHeadModel", "ForCausalLM")):
        return _causal_lm_loss(module, options)
    return None


# ---- attention ---------------------------------------------------------------------

def register_transformers_attention() -> str:
    """Register fasttx's attention in transformers as ``attn_implementation="fasttx"``, with the masks sdpa
    gets (a 4-D bool mask, or None for plain causal attention), so that a model can also be built with it:
    ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="fasttx")``. Returns "fasttx". Safe to call
    more than once; fasttx.patch calls it when it patches an attention module."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    if AttentionInterface._global_mapping.get(ATTENTION_NAME) is not fasttx_attention_forward:
        AttentionInterface.register(ATTENTION_NAME, fasttx_attention_forward)
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping:
        # without a mask function of its own, transformers builds no mask at all for the name: padding ignored
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


_COLLECTOR: list = []  # found once: [transformers' output collector, or None]


def _output_collector():
    """transformers' record of which outputs (attentions, hidden states) the running forward collects through
    hooks (transformers 5: output_attentions no longer reaches the attention function), or None."""
    if not _COLLECTOR:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:  # a transformers that still passes output_attentions down
            _active_collector = None
        _COLLECTOR.append(_active_collector)
    return _COLLECTOR[0]


def _records_attentions(kwargs) -> bool:
    """Whether the caller asked for this call's attention weights (output_attentions=True)."""
    if kwargs.get("output_attentions"):
        return True
    collector = _output_collector()
    if collector is None:
        return False
    if torch.compiler.is_compiling():  # transformers then keeps the record in a plain attribute
        found = collector.global_var if getattr(collector, "compiling", False) else None
    else:
        found = collector.get()
    return isinstance(found, dict) and ("attentions" in found or "cross_attentions" in found)


def _eager_attention(module, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], causal: bool,
                     dropout: float, scaling: Optional[float], kwargs):
    """This call through the module's own eager attention (transformers' eager_attention_forward from its
    modeling file), which forms the weights: the masks it expects are additive, so a bool or implicit causal
    mask is turned into one first."""
    if mask is None and causal:
        q_len, kv_len = query.shape[2], key.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    eager = inspect.unwrap(type(module).forward).__globals__.get("eager_attention_forward")
    if eager is None:
        raise NotImplementedError(f"fasttx attention for {type(module).__name__}: output_attentions=True needs "
                                  "transformers' eager attention, which its modeling file does not define; "
                                  "fasttx.unpatch(model) or model.set_attn_implementation('eager')")
    rest = {k: v for k, v in kwargs.items() if k not in ("output_attentions", "is_causal")}
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **rest)


def fasttx_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs):
    """transformers' attention-function contract: (B, H, T, D) q, k, v in (k, v with H / groups heads for GQA);
    (B, T, H, D) out, and the weights only when the caller records them (output_attentions=True), which runs
    that call through transformers' eager attention. Masks are sdpa's (bool, True = attend, or None for plain
    causal attention) or eager's (additive); a sliding window is in the mask, as sdpa takes it."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fasttx attention for {type(module).__name__}: {name} is not supported; "
                                      "fasttx.unpatch(model) to run transformers' own attention")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    if causal and key.shape[2] > query.shape[2]:
        # prefill into an empty static cache: the keys past the queries are empty slots, as sdpa slices them
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)  # eager-format masks come in the model's dtype, q may be autocast's
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
    if _records_attentions(kwargs):
        return _eager_attention(module, query, key, value, mask, causal, dropout, scaling, kwargs)
    out = scaled_dot_product_attention(query, key, value, mask, dropout, causal, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


class FollowingConfig:
    """The model's config as a patched attention module sees it: every attribute is the model's own, read
    live, except that the attention implementation the model ran when patched reads as "fasttx". So
    ``model.set_attn_implementation("eager")`` after patching runs transformers' eager attention, and setting
    back the implementation the model was patched over runs fasttx's again."""

    def __init__(self, live, patched_over: str):
        self.__dict__["_fasttx_live"] = live
        self.__dict__["_fasttx_patched_over"] = patched_over

    @property
    def _attn_implementation(self):
        live = self._fasttx_live._attn_implementation
        return ATTENTION_NAME if live == self._fasttx_patched_over else live

    def __getattr__(self, name):  # only for what is not found above: the model's config answers
        if name.startswith("__") or name.startswith("_fasttx_"):
            raise AttributeError(name)
        return getattr(self._fasttx_live, name)

    def __setattr__(self, name, value):
        setattr(self._fasttx_live, name, value)

    def __repr__(self):
        return f"FollowingConfig({self._fasttx_patched_over!r} -> {ATTENTION_NAME!r}, {self._fasttx_live!r})"


def _attention_methods(original: type) -> dict:
    """transformers' own forward stays (no methods): the patch is the config naming fasttx's function,
    registered here, when the class is made, so that a patched model unpickled in a fresh process finds it."""
    register_transformers_attention()
    return {}


def _dispatches_through_attention_interface(cls: type) -> Optional[object]:
    """The AttentionInterface the class's forward looks its function up in, or None."""
    forward = inspect.unwrap(cls.forward)
    if "ALL_ATTENTION_FUNCTIONS" not in forward.__code__.co_names:
        return None
    return forward.__globals__.get("ALL_ATTENTION_FUNCTIONS")


def _attention(module, options: Options):
    if not options.attention:
        return "attention=False"
    interface = _dispatches_through_attention_interface(type(module))
    config = getattr(module, "config", None)
    if interface is None or not hasattr(interface, "register") or config is None:
        return ("its forward does not pick its attention through transformers' AttentionInterface "
                "(transformers older than 4.48?)")
    if getattr(module, "attn_logit_softcapping", None) is not None \
            or getattr(config, "attn_logit_softcapping", None) is not None:
        return ("its attention logits are soft-capped (attn_logit_softcapping), which fasttx's attention does not "
                "compute; transformers' own attention runs it")
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == ATTENTION_NAME:
        return "the model already runs attn_implementation='fasttx'"
    if implementation not in _MASK_FORMATS:
        return f"the model runs attn_implementation={implementation!r}; fasttx takes the masks of {_MASK_FORMATS}"
    if getattr(module, "reorder_and_upcast_attn", False) and implementation == "eager":
        return "reorder_and_upcast_attn with eager attention runs its own upcast path"
    return Patch(_attention_methods, (type(module),),
                 "fasttx.scaled_dot_product_attention (through AttentionInterface)",
                 {"config": FollowingConfig(config, implementation)})


# ---- feed-forward and add + norm ------------------------------------------------------

def _activation_name(act) -> Optional[str]:
    """Which of gelu_ffn's activations ``act`` computes, found by evaluating it, or None."""
    if not callable(act):
        return None
    probe = torch.linspace(-6, 6, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = act(probe)
    except Exception:  # an activation that cannot take this probe is not one we know
        return None
    for name, ref in (("gelu", F.gelu(probe)), ("gelu_tanh", F.gelu(probe, approximate="tanh")),
                      ("relu", F.relu(probe))):
        if isinstance(got, Tensor) and got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-9, atol=1e-12):
            return name
    return None


def _is_conv1d(m) -> bool:
    """transformers' Conv1D: y = x @ weight + bias, weight (in, out)."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2 and isinstance(b, Tensor)
            and b.shape == (w.shape[1],))


def _gpt2_mlp(module, options: Options):
    if not options.ffn:
        return "ffn=False"
    if not (_is_conv1d(getattr(module, "c_fc", None)) and _is_conv1d(getattr(module, "c_proj", None))):
        return "c_fc / c_proj are not Conv1D layers of the expected shape"
    if not isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
        return "it has no dropout module where GPT2MLP has one"
    activation = _activation_name(getattr(module, "act", None))
    if activation is None:
        return f"its activation {type(getattr(module, 'act', None)).__name__} is not gelu, gelu_tanh or relu"
    return Patch(_gpt2_mlp_methods, (activation,), f"fasttx.gelu_ffn ({activation})")


def _gpt2_mlp_methods(activation: str) -> dict:
    def forward(self, hidden_states: Tensor) -> Tensor:
        if runs_hooks(self.c_fc, self.act, self.c_proj):
            return type(self)._fasttx_original_class.forward(self, hidden_states)
        out = gelu_ffn(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias,
                       activation)
        return self.dropout(out)
    return {"forward": forward}


def _is_dense_dropout_norm(module) -> Optional[str]:
    if not isinstance(getattr(module, "dense", None), torch.nn.Linear):
        return "dense is not a torch.nn.Linear"
    if not isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
        return "dropout is not a torch.nn.Dropout"
    norm = getattr(module, "LayerNorm", None)
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return "LayerNorm is not a torch.nn.LayerNorm over the last dim"
    if not computes_layer_norm(norm):
        return f"LayerNorm is a {type(norm).__name__} with its own forward"
    return None


def _bert_add_norm(module, options: Options):
    if not options.layer_norm:
        return "layer_norm=False"
    why = _is_dense_dropout_norm(module)
    if why is not None:
        return why
    return Patch(_bert_add_norm_methods, (), "dense, then fasttx.add_layer_norm (residual add fused)",
                 fuses=("LayerNorm",))


def _bert_add_norm_forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    norm = self.LayerNorm
    if runs_hooks(norm):
        return type(self)._fasttx_original_class.forward(self, hidden_states, input_tensor)
    branch = self.dropout(self.dense(hidden_states))
    return add_layer_norm(branch, input_tensor, norm.normalized_shape, norm.weight, norm.bias, norm.eps)[0]


def _bert_add_norm_methods() -> dict:
    return {"forward": _bert_add_norm_forward}


def _bert_layer(module, options: Options):
    if not options.ffn:
        return "ffn=False"
    intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
    if not callable(getattr(type(module), "feed_forward_chunk", None)):
        return "it has no feed_forward_chunk method"
    if intermediate is None or not isinstance(getattr(intermediate, "dense", None), torch.nn.Linear):
        return "intermediate.dense is not a torch.nn.Linear"
    if output is None or _is_dense_dropout_norm(output) is not None:
        return f"output: {_is_dense_dropout_norm(output) if output is not None else 'missing'}"
    activation = _activation_name(getattr(intermediate, "intermediate_act_fn", None))
    if activation is None:
        return "its intermediate activation is not gelu, gelu_tanh or relu"
    return Patch(_bert_layer_methods, (activation, options.layer_norm),
                 f"feed_forward_chunk: fasttx.gelu_ffn ({activation})"
                 + (" + fasttx.add_layer_norm" if options.layer_norm else ""),
                 fuses=("output", "output.LayerNorm") if options.layer_norm else ("output",))


def _bert_layer_methods(activation: str, fuse_norm: bool) -> dict:
    def feed_forward_chunk(self, attention_output: Tensor) -> Tensor:
        inner, out = self.intermediate.dense, self.output
        if runs_hooks(self.intermediate, inner, self.intermediate.intermediate_act_fn, out, out.dense,
                      out.LayerNorm):
            return type(self)._fasttx_original_class.feed_forward_chunk(self, attention_output)
        branch = out.dropout(gelu_ffn(attention_output, inner.weight, inner.bias, out.dense.weight, out.dense.bias,
                                      activation))
        norm = out.LayerNorm
        if fuse_norm:
            return add_layer_norm(branch, attention_output, norm.normalized_shape, norm.weight, norm.bias,
                                  norm.eps)[0]
        return norm(branch + attention_output)
    return {"feed_forward_chunk": feed_forward_chunk}


# ---- the causal LM loss ------------------------------------------------------------------

def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: Optional[Tensor] = None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss, computed by fasttx.cross_entropy: token t predicts label t + 1;
    the mean over labels that are not ignore_index, or the sum over num_items_in_batch when given."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy_float(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                               ignore_index, reduction)
    if reduction == "sum":
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


def _patched_loss_function(self):
    # A loss the user sets afterwards (model.loss_function = f) wins, as in transformers.
    return self.__dict__.get("_loss_function", causal_lm_loss)


def _set_loss_function(self, value):
    self._loss_function = value


def _loss_methods() -> dict:
    return {"loss_function": property(_patched_loss_function, _set_loss_function)}


def _current_loss(module):
    """What ``module.loss_function`` returns, found without calling transformers' property where it is the
    one that looks ``loss_type`` up in LOSS_MAPPING: that property warns (once per process) when a model such
    as GPT2LMHeadModel has no loss_type, which patching would print, and then no longer print when the
    unpatched model computes a loss."""
    prop = getattr(type(module), "loss_function")
    fget = getattr(prop, "fget", None)
    code = getattr(fget, "__code__", None)
    mapping = getattr(fget, "__globals__", {}).get("LOSS_MAPPING")
    if code is None or "LOSS_MAPPING" not in code.co_names or not isinstance(mapping, dict) \
            or "ForCausalLM" not in mapping:
        return module.loss_function  # another version's property: ask it
    own = module.__dict__.get("_loss_function")
    if own is not None:
        return own
    loss_type = getattr(module, "loss_type", None)
    return mapping[loss_type] if loss_type in mapping else mapping["ForCausalLM"]  # the property's fallback


def _causal_lm_loss(module, options: Options):
    if not options.loss:
        return "loss=False"
    if not isinstance(getattr(type(module), "loss_function", None), property):
        return "it has no loss_function property (transformers older than 4.46?)"
    if "_loss_function" in module.__dict__:
        return "it has a loss_function of its own"
    try:
        current = _current_loss(module)
    except Exception as err:  # a loss_type this version cannot resolve is not ours to replace
        return f"its loss_function cannot be resolved ({err})"
    if getattr(current, "__name__", None) != "ForCausalLMLoss":
        return f"its loss is {getattr(current, '__name__', current)!r}, not ForCausalLMLoss"
    return Patch(_loss_methods, (), "loss_function: fasttx.cross_entropy (ForCausalLMLoss's contract)")
