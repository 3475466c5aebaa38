"""A training step of a nanoGPT-structured model inside ``fasttx.accelerate()`` against outside it.

    python -m bench.accelerate_nanogpt [--threads 2] [--rounds 12] [--dtype fp32|bf16|both] [--compile]
    python -m bench.accelerate_nanogpt --overhead      # the per-call cost of the context, in µs

The model has nanoGPT's structure, written here (``GPT`` below): its own
LayerNorm module calling ``F.layer_norm`` (optional bias), attention calling
``F.scaled_dot_product_attention(..., is_causal=True)`` inline, an MLP
c_fc -> nn.GELU -> c_proj, a weight-tied lm_head and the loss
``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)``.
``fasttx.patch`` recognises none of it; ``fasttx.accelerate`` routes its calls.
Default size: 6 layers, d 384, 6 heads, T 256, batch 8, vocab 50304, no
dropout, random weights and tokens. A step is forward, loss, backward and
AdamW, all inside the context for the accelerated model. Two copies of the
model start from the same weights; each round times one step of each,
alternating which goes first; the ratio is per round (plain / accelerated),
reported as median [q20-q80]. Modes: fp32, and bf16 autocast
(``torch.autocast("cpu", dtype=torch.bfloat16)``, fp32 weights and optimizer).
``--compile`` adds ``torch.compile`` of the plain model to the interleave.
``--ops layer_norm,cross_entropy`` routes only those (to see what each brings).
``--model-file path/to/nanoGPT/model.py`` runs nanoGPT's own model.py instead,
unmodified (its ``GPT`` and ``GPTConfig``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fasttx
from bench import allocator
from bench.harness import _busy_warning
from fasttx import info


# ---- the model: nanoGPT's structure ------------------------------------------------

@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """A LayerNorm whose bias can be left out, calling F.layer_norm itself."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        _, t = idx.shape
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ---- the benchmark -------------------------------------------------------------------

def _stepper(model, idx, targets, autocast: bool, context=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if context is None:
        return step

    def step_inside():
        with context:
            step()
    return step_inside


def load_model_file(path: str):
    """(GPT, GPTConfig) of a nanoGPT-style model.py, imported as it is."""
    spec = importlib.util.spec_from_file_location("nanogpt_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT, module.GPTConfig


def measure(threads: int, autocast: bool, rounds: int, config, batch: int, compile_plain: bool,
            model_class=GPT, ops=None) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain = model_class(config)
    accelerated = model_class(config)
    accelerated.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)
    targets = torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)
    acc = fasttx.accelerate(ops)
    steps = {"torch": _stepper(plain, idx, targets, autocast), "accelerate": _stepper(accelerated, idx, targets,
                                                                                       autocast, acc)}
    if compile_plain:
        compiled = model_class(config)
        compiled.load_state_dict(plain.state_dict())
        steps["compile"] = _stepper(torch.compile(compiled), idx, targets, autocast)
    for step in steps.values():  # warm-up: first-call allocations, optimizer state, compilation
        step()
        step()
    routed = acc.report()
    times = {name: [] for name in steps}
    load_before = os.getloadavg()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    row = {"threads": threads, "mode": "bf16 autocast" if autocast else "fp32", "rounds": rounds,
           "allocator": allocator.current(), "routed": routed,
           "busy_warning": _busy_warning((load_before[0], os.getloadavg()[0]))}
    for name in steps:
        row[f"{name}_ms"] = 1e3 * float(np.median(times[name]))
        if name != "torch":
            ratio = np.array(times["torch"]) / np.array(times[name])
            q20, med, q80 = np.quantile(ratio, (0.2, 0.5, 0.8))
            row[f"{name}_speedup"] = [float(med), float(q20), float(q80)]
    return row


def overhead(rounds: int = 30, calls: int = 2000) -> dict:
    """µs per call of a tiny F.layer_norm (4 x 8) and of x + x, inside the context and outside it,
    interleaved; medians over rounds of ``calls`` calls each. A bare mode that sends F.layer_norm
    to fasttx with no check at all shows the part of the cost that is torch's own dispatch."""
    torch.set_num_threads(1)
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)

    class Bare(TorchFunctionMode):  # the least a mode can do: torch's own share of the overhead
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.layer_norm:
                return fasttx.layer_norm(*args, **kwargs)
            return func(*args, **(kwargs or {}))

    cases = {
        "F.layer_norm outside": (None, lambda: F.layer_norm(x, (8,), w, b)),
        "fasttx.layer_norm outside": (None, lambda: fasttx.layer_norm(x, (8,), w, b)),
        "F.layer_norm inside (routed)": (fasttx.accelerate(), lambda: F.layer_norm(x, (8,), w, b)),
        "F.layer_norm inside a bare mode": (Bare(), lambda: F.layer_norm(x, (8,), w, b)),
        "x + x outside": (None, lambda: x + x),
        "x + x inside (passed through)": (fasttx.accelerate(), lambda: x + x),
    }

    def run(context, fn):
        if context is None:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return time.perf_counter() - start
        with context:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return time.perf_counter() - start

    for context, fn in cases.values():
        run(context, fn)
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (context, fn) in cases.items():
            samples[name].append(1e6 * run(context, fn) / calls)
    return {name: float(np.median(v)) for name, v in samples.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="CPU threads (repeatable); default 2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the plain model")
    parser.add_argument("--overhead", action="store_true", help="only measure the per-call overhead")
    parser.add_argument("--model-file", help="a nanoGPT model.py to time instead of this file's model")
    parser.add_argument("--ops", help="comma-separated functions to route (fasttx.accelerate's ops); default all")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    cpu, flags = info._cpu_model_and_flags()
    print(f"machine: {cpu} ({os.cpu_count()} CPUs; {' '.join(flags) or 'no flags listed'}); torch {torch.__version__}")
    print(f"allocator: {allocator.current()} ({allocator.WHY})")
    if args.overhead:
        for name, us in overhead().items():
            print(f"  {name:34s} {us:6.2f} µs per call (1 thread, median)")
        return
    model_class, config_class = load_model_file(args.model_file) if args.model_file else (GPT, GPTConfig)
    config = config_class(block_size=args.seq, vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                          n_embd=args.d, dropout=0.0, bias=True)
    print(f"model: {args.model_file or 'bench/accelerate_nanogpt.py'}: {config}, batch {args.batch}")
    modes = {"fp32": (False,), "bf16": (True,), "both": (False, True)}[args.dtype]
    rows = []
    for threads in args.threads or [2]:
        for autocast in modes:
            ops = args.ops.split(",") if args.ops else None
            row = measure(threads, autocast, args.rounds, config, args.batch, args.compile, model_class, ops)
            rows.append(row)
            if len(rows) == 1:
                print(row["routed"])
            line = (f"{row['threads']} thread(s), {row['mode']:>13}: torch {row['torch_ms']:.0f} ms, "
                    f"accelerate {row['accelerate_ms']:.0f} ms per step; speedup "
                    f"{row['accelerate_speedup'][0]:.3f}x [{row['accelerate_speedup'][1]:.3f}-"
                    f"{row['accelerate_speedup'][2]:.3f}]")
            if "compile_ms" in row:
                line += (f"; torch.compile {row['compile_ms']:.0f} ms, {row['compile_speedup'][0]:.3f}x "
                         f"[{row['compile_speedup'][1]:.3f}-{row['compile_speedup'][2]:.3f}]")
            print(line + f" over {row['rounds']} rounds", flush=True)
            if row["busy_warning"]:
                print(row["busy_warning"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
