"""A training step of Hugging Face LlamaForCausalLM, fasttx-patched against unpatched (and torch.compile of
the unpatched model), in one interleaved run.

    python -m bench.patched_llama [--threads 2] [--rounds 12] [--no-compile] [--memory] [--small]

The model of issue 26's acceptance: LlamaForCausalLM(hidden 512, intermediate 1408, 8 layers, 8 heads,
2 key/value heads, vocab 32000), random weights (no download), batch 4 x T 512 of random tokens, train
mode; a step is forward, the LM loss (labels = the tokens), backward and AdamW. Unpatched runs
transformers' default attention (sdpa). fasttx.patch's defaults: in training with labels the LM head and
loss are one linear_cross_entropy (no logits). Every provider starts from the same weights and each round
times one step of each, in an order that rotates; the ratio is per round (unpatched time / provider
time), reported as median [q20-q80]. Modes: fp32, and bf16 autocast (torch.autocast("cpu",
dtype=torch.bfloat16), fp32 weights and optimizer). --memory adds each provider's step peak: the peak of
live CPU bytes allocated during one step (torch's profiler with profile_memory=True, as bench.lce_memory),
above what was live before it (weights, gradients and optimizer state are then already allocated).
--small runs a 2-layer, vocab-4096, T-128 model: a smoke test of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import fasttx
from bench import allocator
from bench.patched_gpt2 import _stepper

FULL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=32000, batch=4, seq=512)
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, batch=2, seq=128)


def _models(shape: dict, compile_: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = {k: v for k, v in shape.items() if k not in ("batch", "seq")}
    config = LlamaConfig(**cfg, max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=False)
    torch.manual_seed(seed)
    plain = LlamaForCausalLM(config)
    models = {"unpatched": plain}
    patched = LlamaForCausalLM(config)
    patched.load_state_dict(plain.state_dict())
    report = fasttx.patch(patched)
    models["fasttx"] = patched
    if compile_:
        other = LlamaForCausalLM(config)
        other.load_state_dict(plain.state_dict())
        models["torch.compile"] = torch.compile(other)
    return models, report


def _step_peak_bytes(step) -> int:
    """Peak of the live CPU bytes one step allocates above what was live before it."""
    live = peak = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(threads: int, autocast: bool, rounds: int, shape: dict, compile_: bool, memory: bool) -> dict:
    torch.set_num_threads(threads)
    models, _ = _models(shape, compile_)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(1))
    steps = {name: _stepper(model, ids, autocast) for name, model in models.items()}
    for step in steps.values():  # warm-up: first-call allocations, optimizer state, compilation
        step()
        step()
    peaks = {name: _step_peak_bytes(step) for name, step in steps.items()} if memory else {}
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    row = {"threads": threads, "mode": "bf16 autocast" if autocast else "fp32", "rounds": rounds,
           "allocator": allocator.current(), "shape": shape}
    for name in names:
        row[f"{name}_ms"] = 1e3 * float(np.median(times[name]))
        if name != "unpatched":
            ratio = np.array(times["unpatched"]) / np.array(times[name])
            q20, med, q80 = np.quantile(ratio, (0.2, 0.5, 0.8))
            row[f"{name}_speedup"] = [float(med), float(q20), float(q80)]
        if memory:
            row[f"{name}_peak_mib"] = peaks[name] / 2**20
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="CPU threads (repeatable); default 2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the unpatched model")
    parser.add_argument("--memory", action="store_true", help="also each provider's step peak (CPU profiler)")
    parser.add_argument("--small", action="store_true", help="a tiny model: a smoke test, not a measurement")
    parser.add_argument("--bf16-only", action="store_true")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else FULL
    print(f"allocator: {allocator.current()} ({allocator.WHY})")
    print(_models(shape, False)[1])  # what fasttx.patch replaced in the model, and what it left alone
    rows = []
    for threads in args.threads or [2]:
        for autocast in ((True,) if args.bf16_only else (False, True)):
            row = measure(threads, autocast, args.rounds, shape, not args.no_compile, args.memory)
            rows.append(row)
            line = f"{row['threads']} thread(s), {row['mode']:>13}: unpatched {row['unpatched_ms']:.0f} ms"
            for name in [k[:-3] for k in row if k.endswith("_ms") and k != "unpatched_ms"]:
                med, q20, q80 = row[f"{name}_speedup"]
                line += f"; {name} {row[f'{name}_ms']:.0f} ms, {med:.3f}x [{q20:.3f}-{q80:.3f}]"
            if args.memory:
                line += "; step peak MiB " + ", ".join(f"{k[:-9]} {v:.0f}" for k, v in row.items()
                                                      if k.endswith("_peak_mib"))
            print(line + f" over {row['rounds']} rounds", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
