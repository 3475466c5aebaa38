"""FlashAttention's rule for comparing a kernel against PyTorch.

The truth is the reference computed in float64. PyTorch's own result in the
kernel's dtype shows how much error that dtype costs. A kernel may be off by at
most ``factor`` times PyTorch's own error, plus a small ``atol`` that keeps the
bound sensible when PyTorch happens to be exact.
"""
import torch

DEFAULT_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_within_torch_error(out, truth, torch_out, factor=2.0, atol=None, what="output"):
    """``out`` (kernel) vs ``truth`` (fp64) must be within factor x |torch_out - truth| + atol."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != expected {tuple(truth.shape)}"
    assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype} != torch's {torch_out.dtype}"
    atol = DEFAULT_ATOL[out.dtype] if atol is None else atol
    err = max_abs_err(out, truth)
    torch_err = max_abs_err(torch_out, truth)
    assert err <= factor * torch_err + atol, (
        f"{what}: max error {err:.3g} > {factor} x torch's {torch_err:.3g} + atol {atol:.1g}")



def rounding_atol(truth, dtype):
    """An atol of one ulp of the truth's largest magnitude in ``dtype`` (at least DEFAULT_ATOL),
    as FlashAttention's tests scale theirs (``2 * (ref + 0.3 - 0.3 - ref).abs().max()``), but
    deterministic on a handful of elements. For outputs far from 1, where a fixed atol is below
    one ulp: an rms_norm output of 459 in float32 has an ulp of 3e-5."""
    peak = truth.abs().max().item() if truth.numel() else 0.0
    return max(DEFAULT_ATOL[dtype], torch.finfo(dtype).eps * peak)
