"""Rung (c) for the Triton kernels: every config the dispatchers can pick compiles for sm_80
and sm_90 (no GPU needed), without register spills and within shared memory.

Runs in the ordinary pytest process; the interpreter would replace the kernels by Python.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs the real Triton compiler; run without TRITON_INTERPRET",
                allow_module_level=True)

triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing

from fasttx.kernels import bias_gelu  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")

# kernel name -> (jit function, its non-constexpr arguments, the config list its dispatcher draws from,
#                 constexpr variants beyond the config)
KERNELS = {
    "bias_gelu_fwd": (bias_gelu._bias_gelu_fwd_kernel,
                      {"X": "*{dtype}", "B": "*{dtype}", "Y": "*{dtype}", "M": "i32", "N": "i32"},
                      bias_gelu.CONFIGS, [{"APPROX_TANH": False}, {"APPROX_TANH": True}]),
    "bias_gelu_bwd": (bias_gelu._bias_gelu_bwd_kernel,
                      {"G": "*{dtype}", "X": "*{dtype}", "B": "*{dtype}", "DX": "*{dtype}",
                       "DB_PARTIAL": "*fp32", "M": "i32", "N": "i32", "rows_per_prog": "i32"},
                      bias_gelu.CONFIGS, [{"APPROX_TANH": False}, {"APPROX_TANH": True}]),
}


def _cases():
    for name, (fn, arg_types, configs, variants) in KERNELS.items():
        for cfg in configs:
            for variant in variants:
                for dtype in DTYPES:
                    for arch in triton_aot.ARCHS:
                        for aligned in (True, False):
                            cfg_id = "-".join(f"{k}{v}" for k, v in {**cfg, **variant}.items())
                            yield pytest.param(fn, arg_types, cfg, variant, dtype, arch, aligned,
                                               id=f"{name}-{cfg_id}-{dtype}-sm{arch}-{'aligned' if aligned else 'unaligned'}")


@pytest.mark.parametrize("fn, arg_types, cfg, variant, dtype, arch, aligned", list(_cases()))
def test_compiles_without_spills(fn, arg_types, cfg, variant, dtype, arch, aligned):
    constexprs = {k: v for k, v in cfg.items() if k != "num_warps"} | variant
    k = triton_aot.compile_kernel(fn, triton_aot.signature(arg_types, dtype, constexprs), constexprs, arch,
                                  num_warps=cfg["num_warps"],
                                  aligned=triton_aot.divisible_args(arg_types) if aligned else ())
    assert not k.problems(), f"{k.name} sm_{arch}: " + "; ".join(k.problems())


@pytest.mark.parametrize("M", (1, 3, 77, 4096, 1 << 20))
def test_bias_gelu_config_is_listed(M):
    # The compile test above covers CONFIGS; the dispatcher must never return anything else.
    for N in list(range(1, 4100)) + [5120, 12288, 65536, 1 << 20]:
        assert bias_gelu._config(M, N) in bias_gelu.CONFIGS, (M, N)
