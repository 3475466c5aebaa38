"""Rung (c) for the glu and glu_ffn Triton kernels: every config their dispatchers can pick compiles
for sm_80 and sm_90 (no GPU needed) without register spills and within shared memory.

glu's two elementwise kernels have one config: every activation in 4 (dtype, arch, alignment)
combinations. glu_ffn's matmul has 3 tiles per (epilogue kind, dtype class): every tile compiles
with its epilogue's heaviest variant (the gelu (erf) activation, biases on) in the dtype it is
picked for; the rest (the other arch, unaligned strides, fp16, silu without biases, the plain
"linear" GEMMs of each operand layout) run on the largest tile only, to keep the file's time small.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs the real Triton compiler; run without TRITON_INTERPRET",
                allow_module_level=True)

triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing

import torch  # noqa: E402

from fasttx.kernels import glu, glu_ffn  # noqa: E402

# ---- glu ---------------------------------------------------------------------------------

_GLU_KERNELS = {
    "glu_fwd": (glu._glu_fwd_kernel, {"GATE": "*{dtype}", "UP": "*{dtype}", "Y": "*{dtype}", "numel": "i32"}),
    "glu_bwd": (glu._glu_bwd_kernel, {"G": "*{dtype}", "GATE": "*{dtype}", "UP": "*{dtype}", "DGATE": "*{dtype}",
                                      "DUP": "*{dtype}", "numel": "i32"}),
}


def _glu_cases():
    """Every activation of both kernels in: bf16 aligned (16-byte vector accesses, the widest code) on
    sm_90, bf16 unaligned (scalar accesses) on sm_80, fp32 aligned on sm_80 and fp16 aligned on sm_90."""
    for name, (fn, arg_types) in _GLU_KERNELS.items():
        for cfg in glu.CONFIGS:
            for activation in glu.ACTIVATIONS:
                for dtype, arch, aligned in (("bf16", 90, True), ("bf16", 80, False), ("fp32", 80, True),
                                             ("fp16", 90, True)):
                    yield pytest.param(fn, arg_types, cfg, {"ACTIVATION": activation}, dtype, arch,
                                       triton_aot.divisible_args(arg_types) if aligned else (),
                                       id=f"{name}-{activation}-{dtype}-sm{arch}-{'aligned' if aligned else 'unaligned'}")


# ---- glu_ffn's matmul ----------------------------------------------------------------------
# Per operand layout, the strides of 1 the JIT pins (as constexprs) in the GEMMs glu_ffn.py launches:
# x @ w_gate.T / w_up.T, prod @ w_down.T ("nt"); grad_out @ w_down, grad_gate @ w_gate ("nn");
# grad_out.T @ prod, grad_gate.T @ x ("tn").
_PINNED = {"nt": dict(stride_ak=1, stride_bk=1), "nn": dict(stride_ak=1, stride_bn=1),
           "tn": dict(stride_am=1, stride_bn=1)}
_LINEAR = dict(EPILOGUE="linear", HAS_BIAS=False, HAS_BIAS2=False, ACTIVATION="silu", ACCUMULATE=False)
_FFN_HEAVY = {"glu": ("nt", dict(EPILOGUE="glu", HAS_BIAS=True, HAS_BIAS2=True, ACTIVATION="gelu", ACCUMULATE=False)),
              "glu_grad": ("nn", dict(EPILOGUE="glu_grad", HAS_BIAS=True, HAS_BIAS2=True, ACTIVATION="gelu",
                                      ACCUMULATE=False))}
# silu (LLaMA's) in the epilogues without biases; the "linear" GEMMs of each layout (bias and
# accumulate are supersets of the plain GEMM's code). gelu_tanh's epilogue is a subset of the
# heavy gelu one's work (one exp and a reciprocal, as silu's), so it is left to the interpreter.
_FFN_LIGHT = [("nt", dict(_FFN_HEAVY["glu"][1], ACTIVATION="silu", HAS_BIAS=False, HAS_BIAS2=False)),
              ("nn", dict(_FFN_HEAVY["glu_grad"][1], ACTIVATION="silu", HAS_BIAS=False, HAS_BIAS2=False)),
              ("nt", dict(_LINEAR, HAS_BIAS=True)), ("nn", dict(_LINEAR, ACCUMULATE=True)), ("tn", _LINEAR)]


def _ffn_arg_types(layout):
    strides = {s: "i32" for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn") if s not in _PINNED[layout]}
    ptrs = ("A", "B", "B2", "C", "C2", "C3", "BIAS", "BIAS2", "GATE", "UP")
    return {**{p: "*{dtype}" for p in ptrs}, "DB_PARTIAL": "*fp32", "DB2_PARTIAL": "*fp32", "M": "i32", "N": "i32",
            "K": "i32", **strides}


def _ffn_param(cfg, layout, variant, dtype, arch, aligned):
    arg_types = _ffn_arg_types(layout)
    cfg_id = "-".join(f"{k}{v}" for k, v in cfg.items())
    return pytest.param(glu_ffn._glu_ffn_matmul_kernel, arg_types, cfg,
                        dict(variant, UPCAST_DOT=False, **_PINNED[layout]), dtype, arch,
                        triton_aot.divisible_args(arg_types) if aligned else (),
                        id=f"glu_ffn-{layout}-{variant['EPILOGUE']}-{variant['ACTIVATION']}"
                           f"{'-bias' if variant['HAS_BIAS'] else ''}{'-acc' if variant['ACCUMULATE'] else ''}-{cfg_id}-{dtype}-sm{arch}-"
                           f"{'aligned' if aligned else 'unaligned'}")


def _ffn_cases():
    """Each tile of each (kind, dtype class) with its kind's heavy variant, in the dtype it is picked for, on
    the arch that matters most for it (16-bit: sm_90's wgmma; fp32: sm_80's mma), the largest tile on both
    archs and (16-bit) in fp16 too; unaligned operands, for which the dispatcher picks the smallest tile
    only (the larger ones spilled there), on sm_80; the light variants on the largest tile."""
    for dual in (False, True):
        for torch_dtype, dtype in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            configs = glu_ffn.CONFIGS_BY_KIND[(dual, torch_dtype)]
            layout, variant = _FFN_HEAVY["glu" if dual else "glu_grad"]
            arch = 90 if dtype == "bf16" else 80
            for cfg in configs:
                yield _ffn_param(cfg, layout, variant, dtype, arch, aligned=True)
            yield _ffn_param(configs[0], layout, variant, dtype, 170 - arch, aligned=True)  # the other arch
            yield _ffn_param(configs[-1], layout, variant, dtype, 80, aligned=False)  # unaligned: the smallest only
            if dtype == "bf16":
                yield _ffn_param(configs[0], layout, variant, "fp16", 90, aligned=True)
            for light_layout, light in _FFN_LIGHT:
                if (light["EPILOGUE"] == "glu") == dual:
                    yield _ffn_param(configs[0], light_layout, light, dtype, arch, aligned=True)


@pytest.mark.parametrize("fn, arg_types, cfg, variant, dtype, arch, aligned_args",
                         list(_glu_cases()) + list(_ffn_cases()))
def test_compiles_without_spills(fn, arg_types, cfg, variant, dtype, arch, aligned_args):
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)}  # 3: compile_kernel's default
    constexprs = {k: v for k, v in cfg.items() if k not in launch} | variant
    k = triton_aot.compile_kernel(fn, triton_aot.signature(arg_types, dtype, constexprs), constexprs, arch,
                                  **launch, aligned=aligned_args)
    assert not k.problems(), f"{k.name} sm_{arch}: " + "; ".join(k.problems())


def test_every_config_the_dispatchers_pick_is_listed():
    # The compile tests cover CONFIGS; the dispatchers must never return anything else.
    for dual in (False, True):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            configs = glu_ffn.CONFIGS_BY_KIND[(dual, torch.float32 if dtype == torch.float32 else torch.bfloat16)]
            for M in (1, 63, 64, 65, 200, 1000, 4096, 1 << 20):
                for N in (1, 64, 200, 2048, 5632, 14336):
                    assert glu_ffn._config(M, N, dtype, dual) in configs, (M, N, dtype, dual)
                    assert glu_ffn._config(M, N, dtype, dual, aligned=False) == configs[-1], (M, N, dtype, dual)
