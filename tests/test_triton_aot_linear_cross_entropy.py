"""Rung (c) for linear_cross_entropy's Triton row kernel: every config kernels/linear_cross_entropy.py's
dispatcher can pick compiles for sm_80 and sm_90 (no GPU needed) in fp32, fp16 and bf16, in each of
its gradient / label-smoothing / softcap variants, without register spills and within shared memory.

On a GPU the chunk loop hands the kernel the GEMM's fp32 logits, so fp32 is compiled aligned and
unaligned (odd V: scalar accesses); bf16 (the contract's, fp16 being the same code) aligned only:
2 configs x 2 archs x 3 variants x 3 = 36 compiles of a fraction of a second.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("AOT compilation needs the real Triton compiler; run without TRITON_INTERPRET",
                allow_module_level=True)

triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing

from fasttx.kernels import linear_cross_entropy  # noqa: E402

# The kernel's non-constexpr arguments, in order (the chunk's logits are the GEMM's fp32 output on a GPU,
# but the contract takes fp16/bf16 too). ignore_index is an i32 as the JIT types -100.
ARG_TYPES = {"X": "*{dtype}", "TARGET": "*i64", "GRAD_ROWS": "*fp32", "LOSS": "*fp32", "LSE": "*fp32", "V": "i32",
             "ignore_index": "i32", "eps": "fp32", "cap": "fp32"}
# (HAS_GRAD, SMOOTH, SOFTCAP): forward only, the usual training step, and everything on.
VARIANTS = ((False, False, False), (True, False, False), (True, True, True))
ALIGNED = tuple(name for name, t in ARG_TYPES.items() if t.startswith("*")) + ("V",)


def _cases():
    for cfg in linear_cross_entropy.CONFIGS:
        for dtype, alignments in (("fp32", (True, False)), ("bf16", (True,))):
            for arch in triton_aot.ARCHS:
                for has_grad, smooth, softcap in VARIANTS:
                    for aligned in alignments:
                        cfg_id = "-".join(f"{k}{v}" for k, v in cfg.items())
                        flags = dict(HAS_GRAD=has_grad, SMOOTH=smooth, SOFTCAP=softcap)
                        yield pytest.param(cfg, dtype, arch, flags, ALIGNED if aligned else (),
                                           id=f"{cfg_id}-{dtype}-sm{arch}-g{int(has_grad)}s{int(smooth)}"
                                              f"c{int(softcap)}-{'aligned' if aligned else 'unaligned'}")


@pytest.mark.parametrize("cfg, dtype, arch, flags, aligned_args", list(_cases()))
def test_compiles_without_spills(cfg, dtype, arch, flags, aligned_args):
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)}
    constexprs = {**flags, **{k: v for k, v in cfg.items() if k not in launch}}
    k = triton_aot.compile_kernel(linear_cross_entropy._lce_rows_kernel,
                                  triton_aot.signature(ARG_TYPES, dtype, constexprs), constexprs, arch, **launch,
                                  aligned=aligned_args)
    assert not k.problems(), f"{k.name} sm_{arch}: " + "; ".join(k.problems())


def test_config_is_listed():
    for V in list(range(1, 5000)) + [32000, 50257, 128256, 256000, (1 << 31) - 1]:
        assert linear_cross_entropy._config(V) in linear_cross_entropy.CONFIGS, V
