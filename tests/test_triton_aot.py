"""Rung (c) for the Triton kernels: every config the dispatchers can pick compiles for sm_80
and sm_90 (no GPU needed), without register spills and within shared memory.

Runs in the ordinary pytest process; the interpreter would replace the kernels by Python.
"""
import functools
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs the real Triton compiler; run without TRITON_INTERPRET",
                allow_module_level=True)

triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing

from fasttx.kernels import attention, bias_gelu, gelu_ffn, layer_norm, softmax  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")

# The norm kernels' flags, as the ops set them: layer_norm, add_layer_norm, rms_norm (weight only), no affine,
# add_rms_norm (weight only). The first variant, every flag on, is the register-heaviest.
_NORM_FWD_VARIANTS = [dict(RMS=False, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True),
                      dict(RMS=False, HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=True),
                      dict(RMS=True, HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=False),
                      dict(RMS=False, HAS_RESIDUAL=False, HAS_WEIGHT=False, HAS_BIAS=False),
                      dict(RMS=True, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=False)]
_NORM_BWD_VARIANTS = [{("HAS_GRAD_S" if k == "HAS_RESIDUAL" else k): v for k, v in variant.items()}
                      for variant in _NORM_FWD_VARIANTS]


def _norm_cases_kept(variant_index, dtype, arch, aligned):
    """The norm kernels' 5 variants x 10 configs in every dtype, arch and alignment would be 600 cases,
    so: the first variant aligned (vectorized, the widest code) in fp32 and bf16 on both archs and
    in fp16 (whose code is bf16's) on sm_90, unaligned (scalar loads, more address registers) in
    bf16 on sm_80; the later variants, which only drop code from the first, aligned, in bf16 on sm_90
    and fp32 on sm_80."""
    if variant_index:
        return aligned and (dtype, arch) in (("bf16", 90), ("fp32", 80))
    if not aligned:
        return dtype == "bf16" and arch == 80
    return dtype != "fp16" or arch == 90


# gelu_ffn's matmul, per operand layout: the strides of 1 the JIT pins (as constexprs) in the GEMMs
# gelu_ffn.py launches -- x @ w1.T, hidden @ w2.T ("nt"); grad_out @ w2, grad_h @ w1 ("nn");
# grad_out.T @ hidden, grad_h.T @ x ("tn") -- and the epilogues each layout runs. The first
# variant of "nn", activation_grad with the tanh GELU and the bias reduction, is the heaviest.
_FFN_LAYOUTS = {
    "nt": (dict(stride_ak=1, stride_bk=1),
           [dict(EPILOGUE="activation", HAS_BIAS=True, ACTIVATION="gelu_tanh"),
            dict(EPILOGUE="activation", HAS_BIAS=True, ACTIVATION="gelu"),
            dict(EPILOGUE="activation", HAS_BIAS=False, ACTIVATION="relu"),
            dict(EPILOGUE="linear", HAS_BIAS=True, ACTIVATION="relu")]),
    "nn": (dict(stride_ak=1, stride_bn=1),
           [dict(EPILOGUE="activation_grad", HAS_BIAS=True, ACTIVATION="gelu_tanh"),
            dict(EPILOGUE="activation_grad", HAS_BIAS=True, ACTIVATION="gelu"),
            dict(EPILOGUE="activation_grad", HAS_BIAS=False, ACTIVATION="relu"),
            dict(EPILOGUE="linear", HAS_BIAS=False, ACTIVATION="relu")]),
    "tn": (dict(stride_am=1, stride_bn=1), [dict(EPILOGUE="linear", HAS_BIAS=False, ACTIVATION="relu")]),
}


def _ffn_arg_types(layout):
    """The matmul's non-constexpr arguments: the strides the layout does not pin to 1 (a pinned one
    is a constexpr, which compile_kernel must not mark 16-divisible)."""
    pinned = _FFN_LAYOUTS[layout][0]
    strides = {s: "i32" for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn") if s not in pinned}
    return {"A": "*{dtype}", "B": "*{dtype}", "C": "*{dtype}", "BIAS": "*{dtype}", "PREACT": "*{dtype}",
            "ACT": "*{dtype}", "DBIAS_PARTIAL": "*fp32", "M": "i32", "N": "i32", "K": "i32", **strides}


def _ffn_variants(layout):
    pinned, epilogues = _FFN_LAYOUTS[layout]
    return [dict(epilogue, UPCAST_DOT=False, **pinned) for epilogue in epilogues]


def _ffn_cases_kept(cfg, layout, variant_index, dtype, arch, aligned):
    """6 configs x 9 variants x 3 dtypes x 2 archs x 2 alignments would be 648 cases (a few seconds
    each), so: each config compiles in the dtype it is picked for (bf16 for HALF_CONFIGS, fp32
    for FP32_CONFIGS). The heaviest variant runs every config on both archs, aligned, and the
    largest config of each list also unaligned and, for 16-bit, in fp16. The other variants run
    the largest config once: 16-bit on sm_90 (wgmma, which reads both operands from shared
    memory), fp32 on sm_80; "tn" (MN-major operands) on both archs."""
    ref_dtype = "fp32" if cfg in gelu_ffn.FP32_CONFIGS else "bf16"
    largest = cfg in (gelu_ffn.HALF_CONFIGS[0], gelu_ffn.FP32_CONFIGS[0])
    if (layout, variant_index) == ("nn", 0):
        if dtype == "fp16":
            return largest and ref_dtype == "bf16" and aligned
        return dtype == ref_dtype and (aligned or largest)
    if not (largest and aligned and dtype == ref_dtype):
        return False
    return layout == "tn" or arch == (90 if ref_dtype == "bf16" else 80)


# The attention kernels' arguments (in order), per kernel of attention.KERNELS.
_ATTN_SIZES = {"stride_mb": "i32", "stride_mh": "i32", "stride_mm": "i32", "Hq": "i32", "Tq": "i32", "Tk": "i32",
               "D": "i32", "group": "i32", "qk_scale": "fp32"}
_ATTN_DROPOUT = {"seed_lo": "i32", "seed_hi": "i32", "offset": "i32", "threshold": "i32"}
_ATTN_ARGS = {
    "fwd": (attention._attn_fwd_kernel,
            {"Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "MASK": "*fp32", "OUT": "*{dtype}", "LSE": "*fp32",
             **_ATTN_SIZES, **_ATTN_DROPOUT, "out_scale": "fp32"}),
    "bwd_dkdv": (attention._attn_bwd_dkdv_kernel,
                 {"Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "MASK": "*fp32", "DO": "*{dtype}", "LSE": "*fp32",
                  "DELTA": "*fp32", "DK": "*{dtype}", "DV": "*{dtype}", **_ATTN_SIZES, "sm_scale": "fp32",
                  **_ATTN_DROPOUT, "drop_scale": "fp32"}),
    "bwd_dq": (attention._attn_bwd_dq_kernel,
               {"Q": "*{dtype}", "K": "*{dtype}", "V": "*{dtype}", "MASK": "*fp32", "DO": "*{dtype}", "LSE": "*fp32",
                "DELTA": "*fp32", "DQ": "*{dtype}", **_ATTN_SIZES, "sm_scale": "fp32", **_ATTN_DROPOUT,
                "drop_scale": "fp32"}),
}


def _attn_host_aligned(arg_types):
    """What attention.py's host functions make 16-divisible in every call: the pointers (operands
    copied when misaligned), D (zero-padded to a multiple of 16) and the mask strides (the mask
    re-laid when they are not, _aligned_mask). The sequence lengths, head counts and dropout words
    may be anything: the "unaligned" case."""
    return tuple(name for name, t in arg_types.items() if t.startswith("*")) + ("D", "stride_mb", "stride_mh",
                                                                                "stride_mm")


def _attn_entries():
    """One KERNELS entry per distinct (kernel, arch, dtype width, BLOCK_D, config) of attention.CONFIGS.

    Each compiles, only on the arch its table is for, in the heaviest variant it can be picked
    for: causal, with a mask, a padded head dim (EVEN_D=False: masked loads) and dropout when
    the config is picked with dropout. A config picked both with and without dropout compiles
    with dropout only: the dropout-free variant only drops code (the Philox rounds, the keep
    mask). 120 table entries x 3 dtypes x 2 alignments x the lighter variants would be over a
    thousand compiles of 2-25 s, so each entry compiles aligned in the dtype it is picked for
    (bf16 for 16-bit entries, fp32); the 16-bit entries also unaligned (Tq, Tk not 16-divisible;
    see _attn_host_aligned), and only the common head-dim bucket (BLOCK_D = 128: head dims
    65..128) adds fp16 (whose code is bf16's but for the mma type) and EVEN_D=True cases. fp32
    entries (a correctness path: FMA dots, small tiles) compile aligned only.
    """
    entries = {}
    for kernel, arch, width, dropout, block_d, cfg in attention.CONFIGS:
        key = (kernel, arch, width, block_d, tuple(cfg.items()))
        entries[key] = entries.get(key, False) or dropout
    out = {}
    for (kernel, arch, width, block_d, cfg), dropout in entries.items():
        fn, arg_types = _ATTN_ARGS[kernel]
        cfg = dict(cfg, BLOCK_D=block_d)
        heavy = dict(IS_CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=dropout, EVEN_D=False, UPCAST_DOT=False)
        variants = [heavy, dict(heavy, EVEN_D=True)]
        ref_dtype = "fp32" if width == 4 else "bf16"

        def kept(variant_index, dtype, case_arch, aligned, arch=arch, ref_dtype=ref_dtype, block_d=block_d):
            if case_arch != arch:
                return False
            if variant_index == 0 and dtype == ref_dtype:
                return aligned or ref_dtype == "bf16"  # unaligned: every 16-bit entry
            # BLOCK_D = 128 16-bit entries only: fp16, and EVEN_D=True in bf16.
            return block_d == 128 and ref_dtype == "bf16" and aligned and (
                (dtype, variant_index) in (("fp16", 0), ("bf16", 1)))

        name = f"attention_{kernel}_sm{arch}_w{width}_d{block_d}_" + "x".join(str(v) for v in cfg.values())
        out[name] = (fn, arg_types, [cfg], variants, kept, _attn_host_aligned(arg_types))
    return out


_ATTN_DELTA_CONFIGS = [dict(BLOCK_M=attention._DELTA_BLOCK_M, BLOCK_D=block_d, num_warps=4)
                       for block_d in attention.BLOCK_DS]


def _delta_cases_kept(variant_index, dtype, arch, aligned):
    """A plain row reduction, light at every size: bf16 and fp32 on both archs, aligned."""
    return dtype != "fp16" and aligned


_SOFTMAX_FWD_VARIANTS = [dict(IS_CAUSAL=True, HAS_MASK=True), dict(IS_CAUSAL=False, HAS_MASK=False)]


# kernel name -> (jit function, its non-constexpr arguments, the config list its dispatcher draws from,
#                 constexpr variants beyond the config[, which (variant index, dtype, arch, aligned) cases to
#                 compile, when not all])
KERNELS = {
    "bias_gelu_fwd": (bias_gelu._bias_gelu_fwd_kernel,
                      {"X": "*{dtype}", "B": "*{dtype}", "Y": "*{dtype}", "M": "i32", "N": "i32"},
                      bias_gelu.CONFIGS, [{"APPROX_TANH": False}, {"APPROX_TANH": True}]),
    "bias_gelu_bwd": (bias_gelu._bias_gelu_bwd_kernel,
                      {"G": "*{dtype}", "X": "*{dtype}", "B": "*{dtype}", "DX": "*{dtype}",
                       "DB_PARTIAL": "*fp32", "M": "i32", "N": "i32", "rows_per_prog": "i32"},
                      bias_gelu.CONFIGS, [{"APPROX_TANH": False}, {"APPROX_TANH": True}]),
    "norm_fwd": (layer_norm._norm_fwd_kernel,
                 {"X": "*{dtype}", "R": "*{dtype}", "W": "*{dtype}", "B": "*{dtype}", "Y": "*{dtype}",
                  "S": "*{dtype}", "MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "N": "i32", "eps": "fp32"},
                 layer_norm.CONFIGS, _NORM_FWD_VARIANTS, _norm_cases_kept),
    "norm_bwd": (layer_norm._norm_bwd_kernel,
                 {"GY": "*{dtype}", "GS": "*{dtype}", "S": "*{dtype}", "MEAN": "*fp32", "RSTD": "*fp32",
                  "W": "*{dtype}", "DX": "*{dtype}", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32",
                  "M": "i32", "N": "i32", "rows_per_prog": "i32"},
                 layer_norm.CONFIGS, _NORM_BWD_VARIANTS, _norm_cases_kept),
    # One entry per config and layout, so that _ffn_cases_kept sees both.
    **{f"gelu_ffn_matmul_{layout}_{i}": (gelu_ffn._ffn_matmul_kernel, _ffn_arg_types(layout), [cfg],
                                         _ffn_variants(layout), functools.partial(_ffn_cases_kept, cfg, layout))
       for i, cfg in enumerate(gelu_ffn.CONFIGS) for layout in _FFN_LAYOUTS},
    # Softmax: the norm kernels' sampling (_norm_cases_kept), for the same reasons; the backward
    # has one variant.
    "softmax_fwd": (softmax._softmax_fwd_kernel,
                    {"X": "*{dtype}", "MASK": "*fp32", "Y": "*{dtype}", "stride_mb": "i32", "stride_mh": "i32",
                     "stride_mm": "i32", "H": "i32", "Tq": "i32", "Tk": "i32", "n_rows": "i32", "scale": "fp32"},
                    softmax.CONFIGS, _SOFTMAX_FWD_VARIANTS, _norm_cases_kept),
    "softmax_bwd": (softmax._softmax_bwd_kernel,
                    {"GY": "*{dtype}", "Y": "*{dtype}", "DX": "*{dtype}", "n_rows": "i32", "Tk": "i32", "scale": "fp32"},
                    softmax.CONFIGS, [{}], _norm_cases_kept),
    "attention_bwd_delta": (attention._attn_bwd_delta_kernel,
                            {"OUT": "*{dtype}", "DO": "*{dtype}", "DELTA": "*fp32", "Tq": "i32", "D": "i32"},
                            _ATTN_DELTA_CONFIGS, [{}], _delta_cases_kept),
    **_attn_entries(),
}


def _cases():
    for name, (fn, arg_types, configs, variants, *extra) in KERNELS.items():
        kept = extra[0] if extra else lambda *case: True
        # The "unaligned" case: no argument 16-divisible, but those the host guarantees (extra[1]).
        unaligned_args = extra[1] if len(extra) > 1 else ()
        for cfg in configs:
            for i, variant in enumerate(variants):
                for dtype in DTYPES:
                    for arch in triton_aot.ARCHS:
                        for aligned in (True, False):
                            if not kept(i, dtype, arch, aligned):
                                continue
                            cfg_id = "-".join(f"{k}{v}" for k, v in {**cfg, **variant}.items())
                            aligned_args = triton_aot.divisible_args(arg_types) if aligned else unaligned_args
                            yield pytest.param(fn, arg_types, cfg, variant, dtype, arch, aligned_args,
                                               id=f"{name}-{cfg_id}-{dtype}-sm{arch}-{'aligned' if aligned else 'unaligned'}")


@pytest.mark.parametrize("fn, arg_types, cfg, variant, dtype, arch, aligned_args", list(_cases()))
def test_compiles_without_spills(fn, arg_types, cfg, variant, dtype, arch, aligned_args):
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)}  # 3: compile_kernel's default
    constexprs = {k: v for k, v in cfg.items() if k not in launch} | variant
    k = triton_aot.compile_kernel(fn, triton_aot.signature(arg_types, dtype, constexprs), constexprs, arch,
                                  **launch, aligned=aligned_args)
    assert not k.problems(), f"{k.name} sm_{arch}: " + "; ".join(k.problems())


@pytest.mark.parametrize("kernel", list(_ATTN_ARGS))
def test_philox_words_are_never_specialised(kernel):
    """Triton's launcher turns an int argument equal to 1 into a constant and compiles a variant for it:
    a seed half, offset or threshold of 1 would then hand philox's _u32 a constant it cannot bitcast,
    and fail to compile on the GPU only. The kernels list those words in do_not_specialize."""
    fn, _ = _ATTN_ARGS[kernel]
    unspecialised = {p.name for p in fn.params if p.do_not_specialize}
    assert set(_ATTN_DROPOUT) <= unspecialised, f"{fn.__name__} specialises {set(_ATTN_DROPOUT) - unspecialised}"


@pytest.mark.parametrize("M", (1, 3, 77, 4096, 1 << 20))
def test_bias_gelu_config_is_listed(M):
    # The compile test above covers CONFIGS; the dispatcher must never return anything else.
    for N in list(range(1, 4100)) + [5120, 12288, 65536, 1 << 20]:
        assert bias_gelu._config(M, N) in bias_gelu.CONFIGS, (M, N)


@pytest.mark.parametrize("M", (1, 3, 77, 4096, 1 << 20))
def test_layer_norm_config_is_listed(M):
    # The compile test above covers CONFIGS; the dispatcher must never return anything else.
    for N in list(range(1, 8300)) + [12288, 65536, 1 << 20]:
        assert layer_norm._config(M, N) in layer_norm.CONFIGS, (M, N)


def test_softmax_config_is_listed():
    # The compile test above covers CONFIGS; the dispatcher must never return anything else.
    for n in list(range(1, 9000)) + [16384, 65536, 1 << 20]:
        assert softmax._config(n) in softmax.CONFIGS, n


def test_attention_config_is_listed():
    # Every (kernel, arch, dtype, dropout, head dim) the dispatcher serves maps to a CONFIGS entry.
    import torch
    listed = {(kernel, arch, width, dropout, block_d): cfg
              for kernel, arch, width, dropout, block_d, cfg in attention.CONFIGS}
    for kernel in attention.KERNELS:
        for arch in attention.ARCHS:
            for dtype, width in ((torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)):
                for dropout in (False, True):
                    for head_dim in range(1, 257):
                        key = (kernel, arch, width, dropout, attention._block_d(head_dim))
                        assert attention._config(kernel, head_dim, dtype, arch, dropout) == listed[key], key
