"""`python -m fasttx generate`: sample text from a trained checkpoint.

The prompt is encoded as UTF-8 bytes (the model is byte-level); the output is the prompt followed by the
sampled bytes, decoded as UTF-8 with invalid sequences replaced. An empty prompt starts from byte 0, the
separator the corpus puts before every file, and that byte is not printed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fasttx.lm import args as argtypes
from fasttx.lm import checkpoint as ckpt_io
from fasttx.lm.data import SEPARATOR
from fasttx.models.gpt import GPT, KERNELS


def load_model(path, kernels: str | None = None, device=None) -> GPT:
    """The GPT of a checkpoint (ckpt.pt, or a model.safetensors written by --save-safetensors), in eval mode.

    kernels: "fused" | "eager"; None keeps the checkpoint's. Raises CheckpointError/ValueError naming the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        saved = ckpt_io.load_safetensors(path)
    else:
        saved = ckpt_io.load_checkpoint(path, map_location="cpu")
    return ckpt_io.build_model(saved, path, kernels=kernels, device=device)


def generate_text(model: GPT, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, use_cache: bool = True) -> str:
    prompt_ids = list(prompt.encode("utf-8"))
    start = prompt_ids or [SEPARATOR]
    device = model.tok_emb.weight.device
    idx = torch.tensor([start], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, use_cache=use_cache,
                         generator=generator)
    ids = out[0].tolist()[0 if prompt_ids else 1:]
    return bytes(ids).decode("utf-8", errors="replace")


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="OUT/ckpt.pt of a training run (or OUT/model.safetensors)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a file)")
    p.add_argument("--max-new-tokens", type=argtypes.integer(0), default=200, help="bytes to sample")
    p.add_argument("--temperature", type=argtypes.real(0.0), default=0.8,
                   help="finite, >= 0; 0: always the most likely byte")
    p.add_argument("--top-k", type=argtypes.integer(0), default=50, help="sample among the k most likely bytes "
                   "(0: all)")
    p.add_argument("--seed", type=argtypes.SEED, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (no KV cache)")
    p.add_argument("--kernels", choices=KERNELS, default=None, help="default: the checkpoint's")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def main(args) -> int:
    try:
        argtypes.check_device(args.device)
        model = load_model(args.ckpt, kernels=args.kernels, device=args.device)
        text = generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                             args.seed, use_cache=not args.no_cache)
    except (ckpt_io.CheckpointError, ValueError, OSError) as err:
        print(f"fasttx generate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasttx generate: interrupted", file=sys.stderr)
        return 130
    print(text)
    return 0
