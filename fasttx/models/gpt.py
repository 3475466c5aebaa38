"""fasttx.models.GPT: a small decoder-only Transformer LM, the reference model of fasttx.

One set of parameters, two ways to compute with it, picked by
``GPTConfig.kernels``:

- ``"fused"``: fasttx's kernels, through ``fasttx.nn.TransformerBlock``
  (flash attention, the fused GELU FFN, residual adds fused into LayerNorm),
  and fasttx.cross_entropy for the loss; its linears are fasttx.ops.linear,
  which on some CPUs runs fp32 GEMMs on oneDNN rather than MKL;
- ``"eager"``: plain PyTorch as a careful user writes it today: F.layer_norm,
  F.linear with F.gelu, F.scaled_dot_product_attention.

Both read the same modules, so a checkpoint of one loads into the other and
the two compute the same function: that is what ``python -m fasttx compare``
measures.

Layout, GPT-2 style (pre-LN, ``arch="gpt"``, the default):

    x = tok_emb(idx) + position(idx)           learned or sinusoidal positions
    x = block(x)  for each of n_layer blocks   causal self-attention, then FFN
    logits = lm_head(ln_f(x))                  lm_head.weight is tok_emb.weight

or LLaMA style (``arch="llama"``): no biases, RMSNorm (eps 1e-5) instead of
LayerNorm, rotary position embeddings (rotate-half, ``rope_base``) on q and k
instead of added positions, grouped-query attention (``n_kv_head`` key/value
heads shared by groups of n_head / n_kv_head query heads), a SwiGLU FFN
(``down_proj(silu(gate_proj(h)) * up_proj(h))``, width ``d_hidden``) and an
untied LM head. Its blocks (``LlamaBlock``) carry transformers' LlamaDecoderLayer
names (input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj); the fused path runs fasttx.add_rms_norm (every residual add inside the norm
after it), fasttx.linear,
fasttx.apply_rotary, fasttx.scaled_dot_product_attention (GQA without copying
k and v), fasttx.glu_ffn and fasttx.cross_entropy; the eager path F.rms_norm,
F.linear, the rotate-half formula, F.scaled_dot_product_attention(enable_gqa=True),
F.silu and F.cross_entropy.

``generate`` decodes with a KV cache; ``use_cache=False`` recomputes the whole
context each step, and the two give the same tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx.nn import GLUFFN, LayerNorm, RMSNorm, RotaryEmbedding, TransformerBlock
from fasttx.nn.normalization import add_norm, normed_operand
from fasttx.nn.recompute import autocast_dtype, autocast_operand, recomputed_activations
from fasttx.ops.apply_rotary import apply_rotary
from fasttx.ops.attention import scaled_dot_product_attention
from fasttx.ops.cross_entropy import cross_entropy
from fasttx.ops.gelu_ffn import gelu_ffn
from fasttx.ops.glu_ffn import glu_ffn
from fasttx.ops.linear import linear

POSITION_ENCODINGS = ("learned", "sinusoidal", "rope")  # "rope": arch "llama" only, and the only one it takes
KERNELS = ("fused", "eager")
ARCHS = ("gpt", "llama")
RMS_NORM_EPS = 1e-5


def llama_hidden(d_model: int) -> int:
    """LLaMA's FFN width for d_model: 2/3 of 4 d_model (the parameters of a 4 d_model GELU FFN, spread over
    three matrices), rounded up to a multiple of 64 (LLaMA's ``multiple_of``; 256 in the 7B model)."""
    return -(-(8 * d_model // 3) // 64) * 64


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 256           # byte-level tokens
    block_size: int = 256           # longest context
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    dropout: float = 0.0
    # None: "learned" for arch "gpt" (or "sinusoidal", the original Transformer's formula), "rope" for "llama"
    pos_encoding: Optional[str] = None
    kernels: str = "fused"          # "fused" | "eager"
    # Added with the LLaMA architecture; a config (checkpoint) without them is a GPT-2 style model as before.
    arch: str = "gpt"               # "gpt" | "llama"
    n_kv_head: Optional[int] = None  # key/value heads (llama: n_head a multiple of it); None: n_head
    d_hidden: Optional[int] = None  # FFN width; None: 4 d_model (gpt), llama_hidden(d_model) (llama)
    rope_base: float = 10000.0      # llama: rotary frequencies base ** (-2i / head_dim)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"GPTConfig: arch must be one of {ARCHS}, got {self.arch!r}")
        llama = self.arch == "llama"
        if self.pos_encoding is None:
            self.pos_encoding = "rope" if llama else "learned"
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_hidden is None and isinstance(self.d_model, int):
            self.d_hidden = llama_hidden(self.d_model) if llama else 4 * self.d_model
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "n_kv_head", "d_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.pos_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"GPTConfig: pos_encoding must be one of {POSITION_ENCODINGS}, got {self.pos_encoding!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"GPTConfig: kernels must be one of {KERNELS}, got {self.kernels!r}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) \
                or not math.isfinite(self.rope_base) or self.rope_base <= 1:
            raise ValueError(f"GPTConfig: rope_base must be a finite number > 1, got {self.rope_base!r}")
        self.rope_base = float(self.rope_base)
        if llama:
            if self.pos_encoding != "rope":
                raise ValueError(f"GPTConfig: arch 'llama' takes pos_encoding 'rope' (rotary embeddings), got "
                                 f"{self.pos_encoding!r}")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head "
                                 f"({self.n_kv_head}): each key/value head serves a group of query heads")
            if (self.d_model // self.n_head) % 2:
                raise ValueError(f"GPTConfig: arch 'llama' needs an even head dim for rotary embeddings (features "
                                 f"rotate in pairs), got d_model {self.d_model} / n_head {self.n_head} = "
                                 f"{self.d_model // self.n_head}")
            if self.dropout:
                raise ValueError(f"GPTConfig: arch 'llama' has no dropout, got dropout {self.dropout}")
        else:
            if self.pos_encoding == "rope":
                raise ValueError("GPTConfig: pos_encoding 'rope' needs arch 'llama'; arch 'gpt' takes 'learned' or "
                                 "'sinusoidal'")
            if self.n_kv_head != self.n_head:
                raise ValueError(f"GPTConfig: arch 'gpt' has as many key/value heads as query heads (n_head "
                                 f"{self.n_head}), got n_kv_head {self.n_kv_head}; grouped-query attention needs "
                                 f"arch 'llama'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}; expected a subset of {sorted(fields)}")
        return cls(**data)


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)), in fp32."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return table.float()


class LlamaAttention(torch.nn.Module):
    """The projections of grouped-query self-attention, with LlamaAttention's names; GPT computes with them."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(bias=False, device=device, dtype=dtype)
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.q_proj = torch.nn.Linear(d_model, n_head * self.head_dim, **factory)
        self.k_proj = torch.nn.Linear(d_model, n_kv_head * self.head_dim, **factory)
        self.v_proj = torch.nn.Linear(d_model, n_kv_head * self.head_dim, **factory)
        self.o_proj = torch.nn.Linear(n_head * self.head_dim, d_model, **factory)


class LlamaBlock(torch.nn.Module):
    """A LLaMA decoder layer's parameters (LlamaDecoderLayer's names): x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, c: GPTConfig, device=None, dtype=None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(c.d_model, eps=RMS_NORM_EPS, **factory)
        self.self_attn = LlamaAttention(c.d_model, c.n_head, c.n_kv_head, **factory)
        self.post_attention_layernorm = RMSNorm(c.d_model, eps=RMS_NORM_EPS, **factory)
        self.mlp = GLUFFN(c.d_model, c.d_hidden, "silu", bias=False, **factory)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, eager: bool, cache: Optional["KVCache"] = None,
                layer: int = 0, pending: Optional[Tensor] = None):
        # The GPT calls its blocks through here, so that FSDP2 (fasttx.lm.fsdp) gathers a block's parameters
        # around it as it does around any module's forward.
        return _llama_block(self, x, cos, sin, eager, cache, layer, pending)


class GPT(torch.nn.Module):
    def __init__(self, config: GPTConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        c, factory = config, dict(device=device, dtype=dtype)
        self.tok_emb = torch.nn.Embedding(c.vocab_size, c.d_model, **factory)
        if c.arch == "llama":
            # inv_freq is a non-persistent buffer: the state_dict holds no position tensor at all
            self.rotary = RotaryEmbedding(c.d_model // c.n_head, c.rope_base, device=device)
            self.blocks = torch.nn.ModuleList(LlamaBlock(c, **factory) for _ in range(c.n_layer))
            self.ln_f = RMSNorm(c.d_model, eps=RMS_NORM_EPS, **factory)
            self.lm_head = torch.nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)  # untied
            self.reset_parameters()
            return
        if c.pos_encoding == "learned":
            self.pos_emb = torch.nn.Embedding(c.block_size, c.d_model, **factory)
        else:
            # Not persistent: it is a formula, and checkpoints of both encodings keep the same keys otherwise.
            self.register_buffer("pos_table", sinusoidal_positions(c.block_size, c.d_model).to(device),
                                 persistent=False)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(c.d_model, c.n_head, c.d_hidden, "gelu", c.dropout, norm_first=True, is_causal=True,
                             **factory)
            for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.d_model, **factory)
        self.lm_head = torch.nn.Linear(c.d_model, c.vocab_size, bias=False, **factory)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02), zero biases, and the two projections that write into the residual
        stream scaled by 1/sqrt(2 n_layer) so its variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                torch.nn.init.ones_(module.weight)
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        if self.config.arch == "llama":
            for block in self.blocks:
                torch.nn.init.normal_(block.self_attn.o_proj.weight, std=std)
                torch.nn.init.normal_(block.mlp.down_proj.weight, std=std)
            return
        for block in self.blocks:
            torch.nn.init.normal_(block.self_attn.in_proj_weight, std=0.02)
            torch.nn.init.zeros_(block.self_attn.in_proj_bias)
            for proj in (block.self_attn.out_proj.weight, block.linear2.weight):
                torch.nn.init.normal_(proj, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts the tied weight once

    # ---- forward -----------------------------------------------------------------

    def _embed(self, idx: Tensor, start: int = 0) -> Tensor:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"GPT: idx must be a (batch, seq_len) int64 tensor, got {tuple(idx.shape)} {idx.dtype}")
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"GPT: positions {start}..{start + idx.shape[1] - 1} exceed block_size "
                             f"{self.config.block_size}")
        x = self.tok_emb(idx)
        if self.config.arch == "llama":  # positions enter through q and k (rotary)
            return x
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb.weight[start:start + idx.shape[1]]
        else:
            x = x + self.pos_table[start:start + idx.shape[1]].to(x.dtype)
        return F.dropout(x, self.config.dropout, self.training) if self.config.dropout > 0 else x

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """idx (batch, seq_len) token ids. Returns (logits (batch, seq_len, vocab), mean cross-entropy or None)."""
        x = self._embed(idx)
        eager = self.config.kernels == "eager"
        if self.config.arch == "llama":
            logits = self._llama(x, None, eager)
        elif eager:
            for block in self.blocks:  # under FSDP2, fasttx.lm.fsdp gives blocks a forward_eager that gathers them
                x = block.forward_eager(x) if hasattr(block, "forward_eager") else _eager_block(block, x)
            logits = self.lm_head(_norm(self.ln_f, x, eager))
        else:
            with recomputed_activations():  # norm outputs are rebuilt in backward, not kept
                # Each block's last residual add runs in the next norm (TransformerBlock.forward_deferred).
                branch = None
                for block in self.blocks:
                    x, branch = block.forward_deferred(x, branch)
                # under autocast: ln_f writes the head's dtype; the weight's cast is rebuilt in backward
                normed = add_norm(self.ln_f, branch, x, autocast_dtype(x))[0] if branch is not None \
                    else normed_operand(self.ln_f, x)
                logits = linear(normed, autocast_operand(self.lm_head.weight))
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"GPT: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        loss_fn = F.cross_entropy if eager else cross_entropy
        return logits, loss_fn(logits.flatten(0, 1), targets.flatten())

    # ---- generation ------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (batch, seq_len) and return the whole sequence.

        temperature 0 picks the most likely token; top_k keeps the k most likely. The context is the
        last block_size tokens. With use_cache, keys and values of earlier positions are kept; once the
        context is full the window slides, every position moves, and each step recomputes the window
        (as use_cache=False does from the start), so both give the same tokens.
        """
        if max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"GPT.generate: temperature must be finite and >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"GPT.generate: top_k must be in [1, {self.config.vocab_size}], got {top_k}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"GPT.generate: idx must be (batch, seq_len) with seq_len >= 1, got {tuple(idx.shape)}")
        block_size = self.config.block_size
        cache = KVCache(self, idx.shape[0]) if use_cache and idx.shape[1] < block_size else None
        logits = self._decode(idx[:, -block_size:], cache)
        for _ in range(max_new_tokens):
            next_token = _sample(logits[:, -1].float(), temperature, top_k, generator)
            idx = torch.cat([idx, next_token], dim=1)
            if cache is not None and cache.length < block_size:
                logits = self._decode(next_token, cache)
            else:
                logits = self._decode(idx[:, -block_size:], None)
        return idx

    def _decode(self, idx: Tensor, cache: Optional["KVCache"]) -> Tensor:
        if cache is None:
            return self(idx)[0]
        x, eager = self._embed(idx, cache.length), self.config.kernels == "eager"
        if self.config.arch == "llama":
            logits = self._llama(x, cache, eager)
            cache.length += idx.shape[1]
            return logits
        for layer, block in enumerate(self.blocks):
            x = _cached_block(block, x, cache, layer, eager)
        cache.length += idx.shape[1]
        return self.lm_head(_norm(self.ln_f, x, eager))

    def _llama(self, x: Tensor, cache: Optional["KVCache"], eager: bool) -> Tensor:
        """The logits of arch "llama" for x (batch, t, d_model) at positions cache.length.. (0.. without one)."""
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = self.rotary(x, positions)  # (t, head_dim) in x's dtype, computed in fp32
        if eager:
            for layer, block in enumerate(self.blocks):
                x = block(x, cos, sin, True, cache, layer)
            return F.linear(_norm(self.ln_f, x, True), self.lm_head.weight)
        with recomputed_activations():  # norm outputs are rebuilt in backward, not kept
            # Each residual add runs in the norm after it (add_rms_norm), the blocks' last ones in the next norm.
            branch = None
            for layer, block in enumerate(self.blocks):
                x, branch = block(x, cos, sin, False, cache, layer, branch)
            normed = add_norm(self.ln_f, branch, x, autocast_dtype(x))[0] if branch is not None \
                else normed_operand(self.ln_f, x)
            return linear(normed, autocast_operand(self.lm_head.weight))


class KVCache:
    """Keys and values of the positions decoded so far: (batch, heads, block_size, head_dim) per layer."""

    def __init__(self, model: GPT, batch: int) -> None:
        c, weight = model.config, model.tok_emb.weight
        shape = (batch, c.n_kv_head, c.block_size, c.d_model // c.n_head)  # n_kv_head: GQA keeps fewer
        self.keys = [weight.new_empty(shape) for _ in range(c.n_layer)]
        self.values = [weight.new_empty(shape) for _ in range(c.n_layer)]
        self.length = 0


def _split_heads(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, seq, width = qkv.shape  # head_dim spelled out: with no tokens, view() cannot infer a -1
    return qkv.view(batch, seq, 3, n_head, width // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


def _norm(norm, x: Tensor, eager: bool) -> Tensor:
    if not eager:
        return norm(x)
    if isinstance(norm, RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _rotate_half(t: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _eager_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotate-half formula in fp32 (fp64 for fp64), rounded once to t's dtype (as fasttx.apply_rotary)."""
    acc = torch.promote_types(t.dtype, torch.float32)
    wide = t.to(acc)
    return (wide * cos.to(acc) + _rotate_half(wide) * sin.to(acc)).to(t.dtype)


def _llama_block(block: LlamaBlock, x: Tensor, cos: Tensor, sin: Tensor, eager: bool,
                 cache: Optional["KVCache"] = None, layer: int = 0, pending: Optional[Tensor] = None):
    """One LLaMA decoder layer over positions start..start+t-1 (start = cache.length, 0 without a cache).

    eager: plain PyTorch, returns the layer's output. Else fasttx's ops, norm outputs and autocast casts made
    where recomputed_activations() rebuilds them in backward, and each residual add made by the norm after it:
    the input is x + pending (pending: the previous layer's MLP branch, or None), and it returns (h, branch)
    with the layer's output h + branch, for the next norm to add.
    """
    attn, (batch, t, d_model) = block.self_attn, x.shape
    hd = attn.head_dim
    if eager:
        if pending is not None:
            raise ValueError("LlamaBlock: pending is the fused path's deferred residual add; eager takes none")
        h = _norm(block.input_layernorm, x, True)
        proj = lambda w: F.linear(h, w)
    else:
        if pending is None:
            h = normed_operand(block.input_layernorm, x)
        else:
            h, x = add_norm(block.input_layernorm, pending, x, autocast_dtype(x))
        proj = lambda w: linear(h, autocast_operand(w))
    q = proj(attn.q_proj.weight).view(batch, t, attn.n_head, hd).transpose(1, 2)
    k = proj(attn.k_proj.weight).view(batch, t, attn.n_kv_head, hd).transpose(1, 2)
    v = proj(attn.v_proj.weight).view(batch, t, attn.n_kv_head, hd).transpose(1, 2)
    if eager:
        q, k = _eager_rotary(q, cos, sin), _eager_rotary(k, cos, sin)
    else:
        q, k = apply_rotary(q, k, cos, sin)
    mask, causal = None, t > 1
    if cache is not None:
        start = cache.length
        cache.keys[layer][:, :, start:start + t] = k
        cache.values[layer][:, :, start:start + t] = v
        k, v = cache.keys[layer][:, :, :start + t], cache.values[layer][:, :, :start + t]
        # as in _cached_block: is_causal aligns top-left, right only when nothing is cached yet
        if start > 0 and t > 1:
            mask, causal = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start), False
    sdpa = F.scaled_dot_product_attention if eager else scaled_dot_product_attention
    y = sdpa(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=attn.n_kv_head != attn.n_head)
    y = y.transpose(1, 2).reshape(batch, t, attn.n_head * hd)
    mlp = block.mlp
    if eager:
        x = x + F.linear(y, attn.o_proj.weight)
        h = _norm(block.post_attention_layernorm, x, True)
        return x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                            mlp.down_proj.weight)
    op = autocast_operand
    h, x = add_norm(block.post_attention_layernorm, linear(y, op(attn.o_proj.weight)), x, autocast_dtype(x))
    return x, glu_ffn(h, op(mlp.gate_proj.weight), op(mlp.up_proj.weight), op(mlp.down_proj.weight), "silu")


def _ffn(block: TransformerBlock, h: Tensor, eager: bool) -> Tensor:
    if not eager:
        return gelu_ffn(h, block.linear1.weight, block.linear1.bias, block.linear2.weight, block.linear2.bias)
    return F.linear(F.gelu(F.linear(h, block.linear1.weight, block.linear1.bias)), block.linear2.weight,
                    block.linear2.bias)


def _eager_block(block: TransformerBlock, x: Tensor) -> Tensor:
    """TransformerBlock's pre-LN function written in plain PyTorch, over the block's own parameters."""
    attn, batch, seq, d_model = block.self_attn, *x.shape
    q, k, v = _split_heads(F.linear(_norm(block.norm1, x, True), attn.in_proj_weight, attn.in_proj_bias),
                           attn.n_heads)
    dropout = attn.dropout if block.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    y = F.linear(y.transpose(1, 2).reshape(batch, seq, d_model), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block._branch_dropout(y)
    return x + block._branch_dropout(_ffn(block, _norm(block.norm2, x, True), True))


def _cached_block(block: TransformerBlock, x: Tensor, cache: KVCache, layer: int, eager: bool) -> Tensor:
    """One block over new positions start..start+t-1, attending to the cached keys and values before them."""
    attn, batch, t, d_model = block.self_attn, *x.shape
    start = cache.length
    q, k, v = _split_heads(F.linear(_norm(block.norm1, x, eager), attn.in_proj_weight, attn.in_proj_bias),
                           attn.n_heads)
    cache.keys[layer][:, :, start:start + t] = k
    cache.values[layer][:, :, start:start + t] = v
    k, v = cache.keys[layer][:, :, :start + t], cache.values[layer][:, :, :start + t]
    # New query i sits at position start + i and sees keys 0..start + i. is_causal aligns top-left,
    # which is that only when nothing is cached yet; one new token sees everything.
    mask = None if t == 1 or start == 0 else torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
    sdpa = F.scaled_dot_product_attention if eager else scaled_dot_product_attention
    y = sdpa(q, k, v, attn_mask=mask, is_causal=start == 0 and t > 1)
    x = x + attn.out_proj(y.transpose(1, 2).reshape(batch, t, d_model))
    return x + _ffn(block, _norm(block.norm2, x, eager), eager)


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # In float64 after subtracting the max, any positive temperature works: a tiny one (1e-45) sends the
    # others to -inf and keeps the max at 0, where float32 logits / 1e-45 overflow to inf and give NaN.
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
