"""Rung (c) for the apply_rotary Triton kernel: every config kernels/apply_rotary.py's dispatcher can
pick compiles for sm_80 and sm_90 (no GPU needed) without register spills.

Each config in fp32 (the widest values in registers) in the code variants that differ in what they
load: rotate-half or interleaved, with or without position ids, and the transposed rotation (which
only flips signs and swaps which sin an element takes); then in bfloat16 with tables of its own
dtype and float32 tables (float16 compiles to the same code but for the conversions).
2 archs x 4 configs x 8 variants = 64 compiles of about a second each.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs the real Triton compiler; run without TRITON_INTERPRET",
                allow_module_level=True)

triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing

from fasttx.kernels import apply_rotary  # noqa: E402

# The kernel's non-constexpr arguments, in order; {dtype} is x's and y's, {table} cos's and sin's.
ARG_TYPES = {"X": "*{dtype}", "Y": "*{dtype}", "COS": "*{table}", "SIN": "*{table}", "POS": "*i64",
             **{name: "i32" for name in ("rows", "heads", "tokens", "dim", "half", "stride_xb", "stride_xh",
                                         "stride_xt", "stride_cb", "stride_ct", "stride_sb", "stride_st",
                                         "stride_pb", "stride_pt")}}
FLAGS = ("INTERLEAVED", "TRANSPOSE", "HAS_POS")
# (x dtype, table dtype, (INTERLEAVED, TRANSPOSE, HAS_POS)).
VARIANTS = [("fp32", "fp32", (il, False, pos)) for il in (False, True) for pos in (False, True)] + \
           [("fp32", "fp32", (False, True, False)), ("fp32", "fp32", (True, True, True)),
            ("bf16", "bf16", (False, False, False)), ("bf16", "fp32", (False, False, False))]


def _cases():
    for cfg in apply_rotary.CONFIGS:
        for dtype, table, flags in VARIANTS:
            for arch in triton_aot.ARCHS:
                flag_id = "".join(f[0] if v else "-" for f, v in zip(FLAGS, flags))
                yield pytest.param(cfg, dtype, table, dict(zip(FLAGS, flags)), arch,
                                   id=f"C{cfg['BLOCK_C']}-{dtype}-{table}-{flag_id}-sm{arch}")


@pytest.mark.parametrize("cfg, dtype, table, flags, arch", list(_cases()))
def test_compiles_without_spills(cfg, dtype, table, flags, arch):
    constexprs = {**flags, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]}
    arg_types = {k: v.replace("{table}", table) for k, v in ARG_TYPES.items()}
    # Aligned pointers and 16-divisible sizes and strides: the vectorized, register-heaviest code.
    k = triton_aot.compile_kernel(apply_rotary._rotary_kernel, triton_aot.signature(arg_types, dtype, constexprs),
                                  constexprs, arch, num_warps=cfg["num_warps"],
                                  aligned=triton_aot.divisible_args(arg_types))
    assert not k.problems(), f"{k.name} sm_{arch}: " + "; ".join(k.problems())


def test_config_is_listed():
    # The compile test above covers CONFIGS; the dispatcher must never return anything else.
    for half in list(range(1, 1100)) + [1 << 16]:
        assert apply_rotary._config(half) in apply_rotary.CONFIGS, half
