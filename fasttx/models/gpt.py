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

Layout, GPT-2 style (pre-LN):

    x = tok_emb(idx) + position(idx)           learned or sinusoidal positions
    x = block(x)  for each of n_layer blocks   causal self-attention, then FFN
    logits = lm_head(ln_f(x))                  lm_head.weight is tok_emb.weight

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

from fasttx.nn import LayerNorm, TransformerBlock
from fasttx.nn.normalization import add_norm, normed_operand
from fasttx.nn.recompute import autocast_dtype, autocast_operand, recomputed_activations
from fasttx.ops.attention import scaled_dot_product_attention
from fasttx.ops.cross_entropy import cross_entropy
from fasttx.ops.gelu_ffn import gelu_ffn
from fasttx.ops.linear import linear

POSITION_ENCODINGS = ("learned", "sinusoidal")
KERNELS = ("fused", "eager")


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 256           # byte-level tokens
    block_size: int = 256           # longest context
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    dropout: float = 0.0
    pos_encoding: str = "learned"   # "learned" | "sinusoidal" (the original Transformer's formula)
    kernels: str = "fused"          # "fused" | "eager"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
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


class GPT(torch.nn.Module):
    def __init__(self, config: GPTConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        c, factory = config, dict(device=device, dtype=dtype)
        self.tok_emb = torch.nn.Embedding(c.vocab_size, c.d_model, **factory)
        if c.pos_encoding == "learned":
            self.pos_emb = torch.nn.Embedding(c.block_size, c.d_model, **factory)
        else:
            # Not persistent: it is a formula, and checkpoints of both encodings keep the same keys otherwise.
            self.register_buffer("pos_table", sinusoidal_positions(c.block_size, c.d_model).to(device),
                                 persistent=False)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(c.d_model, c.n_head, 4 * c.d_model, "gelu", c.dropout, norm_first=True, is_causal=True,
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
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb.weight[start:start + idx.shape[1]]
        else:
            x = x + self.pos_table[start:start + idx.shape[1]].to(x.dtype)
        return F.dropout(x, self.config.dropout, self.training) if self.config.dropout > 0 else x

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """idx (batch, seq_len) token ids. Returns (logits (batch, seq_len, vocab), mean cross-entropy or None)."""
        x = self._embed(idx)
        eager = self.config.kernels == "eager"
        if eager:
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
        for layer, block in enumerate(self.blocks):
            x = _cached_block(block, x, cache, layer, eager)
        cache.length += idx.shape[1]
        return self.lm_head(_norm(self.ln_f, x, eager))


class KVCache:
    """Keys and values of the positions decoded so far: (batch, heads, block_size, head_dim) per layer."""

    def __init__(self, model: GPT, batch: int) -> None:
        c, weight = model.config, model.tok_emb.weight
        shape = (batch, c.n_head, c.block_size, c.d_model // c.n_head)
        self.keys = [weight.new_empty(shape) for _ in range(c.n_layer)]
        self.values = [weight.new_empty(shape) for _ in range(c.n_layer)]
        self.length = 0


def _split_heads(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, seq, width = qkv.shape  # head_dim spelled out: with no tokens, view() cannot infer a -1
    return qkv.view(batch, seq, 3, n_head, width // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


def _norm(norm: LayerNorm, x: Tensor, eager: bool) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps) if eager else norm(x)


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
