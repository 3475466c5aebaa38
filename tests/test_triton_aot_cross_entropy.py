"""Rung (c) for the cross-entropy Triton kernels: every config kernels/cross_entropy.py's dispatcher
can pick compiles for sm_80 and sm_90 (no GPU needed) in fp32, fp16 and bf16, without register
spills and within shared memory.

Kept apart from tests/test_triton_aot.py (which CI runs in its own process) because it is quick:
2 kernels x 3 configs x 3 dtypes x 2 archs x 2 alignments = 72 compiles of a fraction of a second.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs the real Triton compiler; run without TRITON_INTERPRET",
                allow_module_level=True)

triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing

from fasttx.kernels import cross_entropy  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")

# The kernels' non-constexpr arguments, in order. ignore_index is an i32 as the JIT types -100.
KERNELS = {
    "cross_entropy_fwd": (cross_entropy._ce_fwd_kernel,
                          {"X": "*{dtype}", "TARGET": "*i64", "LOSS": "*fp32", "MAX": "*fp32", "LOG_SUM": "*fp32",
                           "V": "i32", "ignore_index": "i32"}),
    "cross_entropy_bwd": (cross_entropy._ce_bwd_kernel,
                          {"GRAD": "*fp32", "X": "*{dtype}", "TARGET": "*i64", "MAX": "*fp32", "LOG_SUM": "*fp32",
                           "DX": "*{dtype}", "V": "i32", "ignore_index": "i32"}),
}


def _aligned_args(arg_types):
    """What the JIT marks 16-divisible when the pointers are aligned and V % 16 == 0 (vectorized
    loads and stores, the widest code); ignore_index, a negative class id, never is."""
    return tuple(name for name, t in arg_types.items() if t.startswith("*")) + ("V",)


def _cases():
    for name, (fn, arg_types) in KERNELS.items():
        for cfg in cross_entropy.CONFIGS:
            for dtype in DTYPES:
                for arch in triton_aot.ARCHS:
                    # Unaligned: nothing 16-divisible, as for GPT-2's 50257 columns (scalar accesses).
                    for aligned in (True, False):
                        cfg_id = "-".join(f"{k}{v}" for k, v in cfg.items())
                        yield pytest.param(fn, arg_types, cfg, dtype, arch,
                                           _aligned_args(arg_types) if aligned else (),
                                           id=f"{name}-{cfg_id}-{dtype}-sm{arch}-{'aligned' if aligned else 'unaligned'}")


@pytest.mark.parametrize("fn, arg_types, cfg, dtype, arch, aligned_args", list(_cases()))
def test_compiles_without_spills(fn, arg_types, cfg, dtype, arch, aligned_args):
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)}  # 3: compile_kernel's default
    constexprs = {k: v for k, v in cfg.items() if k not in launch}
    k = triton_aot.compile_kernel(fn, triton_aot.signature(arg_types, dtype, constexprs), constexprs, arch,
                                  **launch, aligned=aligned_args)
    assert not k.problems(), f"{k.name} sm_{arch}: " + "; ".join(k.problems())


def test_cross_entropy_config_is_listed():
    # The compile test above covers CONFIGS; the dispatcher must never return anything else.
    for V in list(range(1, 9000)) + [32000, 50257, 128256, 1 << 20, (1 << 31) - 1]:
        assert cross_entropy._config(V) in cross_entropy.CONFIGS, V
