"""Extra memory of linear_cross_entropy's forward+backward on the CPU, where bench's peak_memory (CUDA's
allocator statistics) cannot tell.

    python -m bench.lce_memory [--tokens 8192 --d 2048 --vocab 32000 --dtype float32 --provider eager ...]

Each provider runs one forward+backward in a child process of its own under torch's profiler with
profile_memory=True, which records every CPU allocation and free (the C++ kernels' included) with its
size; the peak of the live bytes, less the gradients (grad_hidden, grad_weight: every provider must
produce them), is the provider's extra memory above its inputs and gradients. The child's ru_maxrss
growth is printed beside it (it includes the allocator's and the profiler's own overheads). Eager at
V = 128256 in fp32 needs ~13 GB: run such cases on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource

import torch

PROVIDERS = ("eager", "fasttx", "three_gemms")


def _measure(case: dict, provider: str, fp32_weight_grad: bool, queue) -> None:
    from bench.ops import linear_cross_entropy as spec_module
    from bench.spec import dtype_of

    spec_module._lce._FP32_WEIGHT_GRAD = fp32_weight_grad

    torch.manual_seed(0)
    hidden, weight, target = spec_module.make_inputs(case, torch.device("cpu"))
    hidden.requires_grad_()
    weight.requires_grad_()
    makers = {"eager": spec_module.eager, "fasttx": spec_module.fasttx_fn, "three_gemms": spec_module.three_gemms}
    fn = makers[provider](case)
    fn(hidden[:8], weight, target[:8]).backward()  # load the kernels, warm the GEMMs
    hidden.grad = weight.grad = None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(hidden, weight, target).backward()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    live = peak = 0
    allocations = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(allocations, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    size = torch.empty((), dtype=dtype_of(case["dtype"])).element_size()
    grads = (hidden.numel() + weight.numel()) * size
    queue.put({"provider": provider, **case, "peak_bytes": peak, "extra_bytes": peak - grads,
               "maxrss_growth_bytes": (rss1 - rss0) * 1024})


def measure(case: dict, provider: str, fp32_weight_grad: bool = True) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure, args=(case, provider, fp32_weight_grad, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lce_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--provider", action="append", choices=PROVIDERS)
    parser.add_argument("--bf16-weight-grad", action="store_true",
                        help="accumulate a bf16/fp16 grad_weight in its dtype (_FP32_WEIGHT_GRAD = False)")
    args = parser.parse_args(argv)
    case = {"tokens": args.tokens, "d": args.d, "vocab": args.vocab, "dtype": args.dtype}
    results = [measure(case, p, not args.bf16_weight_grad) for p in args.provider or PROVIDERS]
    eager = next((r["extra_bytes"] for r in results if r["provider"] == "eager"), None)
    for r in results:
        ratio = f"  {r['extra_bytes'] / eager:.3f}x eager's" if eager else ""
        print(f"{r['provider']:>12}: extra {r['extra_bytes'] / 2**20:9.1f} MiB "
              f"(peak {r['peak_bytes'] / 2**20:.1f} MiB, "
              f"maxrss +{r['maxrss_growth_bytes'] / 2**20:.1f} MiB){ratio}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
