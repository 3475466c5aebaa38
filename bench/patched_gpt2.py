"""A training step of Hugging Face GPT-2, fasttx-patched against unpatched, in one interleaved run.

    python -m bench.patched_gpt2 [--threads 1 --threads 2] [--rounds 12]

The model of issue 6's acceptance: GPT2LMHeadModel(GPT2Config(n_layer=6,
n_embd=384, n_head=6)), random weights (no download), batch 8 x T 256 of
random tokens, default dropout, train mode; a step is forward, the LM loss,
backward and AdamW. Unpatched runs transformers' default attention (sdpa).
Both models start from the same weights and each round times one step of
each, alternating which goes first; the ratio is per round (unpatched time /
patched time), reported as median [q20-q80]. Modes: fp32, and bf16 autocast
(torch.autocast("cpu", dtype=torch.bfloat16), fp32 weights and optimizer).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import fasttx
from bench import allocator


def _models(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    plain = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6))
    patched = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6))
    patched.load_state_dict(plain.state_dict())
    report = fasttx.patch(patched)
    return plain, patched, report


def _stepper(model, ids, autocast: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(threads: int, autocast: bool, rounds: int, batch: int = 8, seq: int = 256) -> dict:
    torch.set_num_threads(threads)
    plain, patched, _ = _models()
    ids = torch.randint(0, plain.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    steps = {"unpatched": _stepper(plain, ids, autocast), "fasttx": _stepper(patched, ids, autocast)}
    for step in steps.values():  # warm-up: first-call allocations, optimizer state
        step()
        step()
    times = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    ratio = np.array(times["unpatched"]) / np.array(times["fasttx"])
    q20, med, q80 = np.quantile(ratio, (0.2, 0.5, 0.8))
    return {"threads": threads, "mode": "bf16 autocast" if autocast else "fp32", "rounds": rounds,
            "allocator": allocator.current(),
            "unpatched_ms": 1e3 * float(np.median(times["unpatched"])),
            "fasttx_ms": 1e3 * float(np.median(times["fasttx"])),
            "speedup": float(med), "speedup_q20": float(q20), "speedup_q80": float(q80)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="CPU threads (repeatable); default 1 and 2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    print(f"allocator: {allocator.current()} ({allocator.WHY})")
    print(_models()[2])  # what fasttx.patch replaced in the model, and what it left alone
    rows = []
    for threads in args.threads or [1, 2]:
        for autocast in (False, True):
            row = measure(threads, autocast, args.rounds)
            rows.append(row)
            print(f"{row['threads']} thread(s), {row['mode']:>13}: unpatched {row['unpatched_ms']:.0f} ms, "
                  f"fasttx {row['fasttx_ms']:.0f} ms per step; speedup {row['speedup']:.3f}x "
                  f"[{row['speedup_q20']:.3f}-{row['speedup_q80']:.3f}] over {row['rounds']} rounds", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
