"""fasttx.kernels.attention's host functions, run by the Triton interpreter on CPU.

Checked against a float64 PyTorch reference written here (k/v heads repeated for GQA, fully
masked rows -> 0) with tests/tolerance.py's rule: the kernels may be off by at most 2x (outputs)
or 3x (gradients) PyTorch's own error in the same dtype, plus atol. The dropout bits are checked
against a pure-torch Philox4x32-10 of csrc/common/philox.h's definition, also written here.
"""
import pytest
import torch

from fasttx.kernels import attention as kernels
from fasttx.kernels import philox as kphilox
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRADS = ("grad_q", "grad_k", "grad_v")


# ---- the reference ----

_U32 = 0xFFFFFFFF


def _mulhilo(a, m):
    """(hi, lo) 32-bit halves of a * m for int64 tensors a < 2^32 and an int m < 2^32, without
    overflowing int64: m is split into 16-bit halves."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    a_lo_prod = a * m_lo
    t = a * m_hi + (a_lo_prod >> 16)  # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (a_lo_prod & 0xFFFF)


def philox_reference(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (csrc/common/philox.h)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0) & _U32, lo1, (hi0 ^ c3 ^ k1) & _U32, lo0
        k0 = (k0 + 0x9E3779B9) & _U32
        k1 = (k1 + 0xBB67AE85) & _U32
    return c0, c1, c2, c3


def keep_reference(seed, offset, dropout_p, B, H, Tq, Tk):
    """The (B, H, Tq, Tk) bool keep mask of the definition: counter (j // 4, i, b * H + h, offset)."""
    seed &= (1 << 64) - 1
    bh = torch.arange(B * H, dtype=torch.int64).view(B, H, 1, 1)
    i = torch.arange(Tq, dtype=torch.int64).view(1, 1, Tq, 1)
    j = torch.arange(Tk, dtype=torch.int64).view(1, 1, 1, Tk)
    shape = (B, H, Tq, Tk)
    words = philox_reference((j // 4).expand(shape), i.expand(shape), bh.expand(shape),
                             torch.full(shape, offset & _U32, dtype=torch.int64), seed & _U32, seed >> 32)
    bits = torch.where(j % 4 == 0, words[0], torch.where(j % 4 == 1, words[1],
                                                        torch.where(j % 4 == 2, words[2], words[3])))
    return bits >= int(dropout_p * 2 ** 32)


def _torch_attention(q, k, v, mask, is_causal, scale, keep, dropout_p, grad_out, dtype):
    """(out, lse, (grad_q, grad_k, grad_v)) through plain PyTorch in ``dtype``; lse is returned in
    fp32 at least, +inf for a fully masked row (the contract's)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = scale * (q @ kr.transpose(-1, -2))
    if mask is not None:
        s = s + mask.to(dtype)
    if is_causal:
        Tq, Tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(1), float("-inf"))
    live = torch.isfinite(s).any(-1, keepdim=True)  # a row with a visible score
    p = torch.softmax(torch.where(live, s, 0.0), -1) * live  # fully masked rows -> 0, zero grads
    if keep is not None:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    out = p @ vr
    out.backward(grad_out.to(dtype))
    lse = torch.logsumexp(s.detach().to(torch.promote_types(dtype, torch.float32)), -1)
    lse = torch.where(live.squeeze(-1), lse, float("inf"))
    return out.detach(), lse, (q.grad, k.grad, v.grad)


def _make_mask(kind, B, H, Tq, Tk, g):
    """None, or the fp32 additive mask as the ops pass it: (B, H, Tq, Tk), broadcast dims stride 0."""
    if kind is None:
        return None
    if kind == "keypad":  # (B, 1, 1, Tk) key padding, expanded: strides (Tk, 0, 0, 1)
        lengths = torch.randint(1, Tk + 1, (B,), generator=g)
        pad = torch.where(torch.arange(Tk)[None, :] < lengths[:, None], 0.0, float("-inf"))
        return pad.view(B, 1, 1, Tk).expand(B, H, Tq, Tk)
    if kind == "2d":  # a (Tq, Tk) float mask, finite values and some -inf
        m = torch.randn(Tq, Tk, generator=g)
        m = m.masked_fill(torch.rand(Tq, Tk, generator=g) < 0.2, float("-inf"))
        return m.expand(B, H, Tq, Tk)
    if kind == "fullrow":  # a per-head (B, H, Tq, Tk) mask with one fully masked row per head
        m = torch.randn(B, H, Tq, Tk, generator=g)
        m[:, :, Tq // 2, :] = float("-inf")
        return m
    raise ValueError(kind)


def _inputs(B, Hq, Hk, Tq, Tk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, Tk, D, generator=g).to(dtype)
    grad_out = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    return q, k, v, grad_out, g


def _atol(truth, dtype):
    """tolerance.py's atol, plus for bfloat16 one ulp of the largest |truth|: the interpreter casts
    fp32 -> bf16 by truncation (a GPU rounds to nearest), so its outputs can be a full ulp off
    where torch's are at most half an ulp off."""
    atol = DEFAULT_ATOL[dtype]
    if dtype == torch.bfloat16 and truth.numel() and truth.abs().max() > 0:
        atol += torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(truth.abs().max())).item()
    return atol


def _check_lse(lse, truth, torch_lse):
    assert lse.dtype == torch.float32 and lse.shape == truth.shape
    empty = torch.isinf(truth)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty), "lse must be +inf exactly on fully masked rows"
    assert_within_torch_error(lse[~empty], truth[~empty].to(torch.float64), torch_lse[~empty].float(),
                              factor=2.0, atol=1e-5, what="lse")


def _run_case(B, Hq, Hk, Tq, Tk, D, dtype, is_causal, mask_kind, dropout_p=0.0, seed=0):
    q, k, v, grad_out, g = _inputs(B, Hq, Hk, Tq, Tk, D, dtype, seed)
    mask = _make_mask(mask_kind, B, Hq, Tq, Tk, g)
    scale = D ** -0.5
    dseed, doffset = 0x0123456789ABCDEF + seed, 7 + seed
    keep = keep_reference(dseed, doffset, dropout_p, B, Hq, Tq, Tk) if dropout_p > 0 else None

    out, lse = kernels.attention_forward(q, k, v, mask, is_causal, scale, dropout_p, dseed, doffset)
    grads = kernels.attention_backward(grad_out, q, k, v, out, lse, mask, is_causal, scale, dropout_p, dseed, doffset)

    t_out, t_lse, t_grads = _torch_attention(q, k, v, mask, is_causal, scale, keep, dropout_p, grad_out, torch.float64)
    o_out, o_lse, o_grads = _torch_attention(q, k, v, mask, is_causal, scale, keep, dropout_p, grad_out, dtype)

    assert not out.isnan().any() and not any(gr.isnan().any() for gr in grads)
    assert_within_torch_error(out, t_out, o_out, factor=2.0, atol=_atol(t_out, dtype), what="out")
    _check_lse(lse, t_lse, o_lse)
    for name, gr, truth, own in zip(GRADS, grads, t_grads, o_grads):
        assert_within_torch_error(gr, truth, own, factor=3.0, atol=_atol(truth, dtype), what=name)
    return out, lse, grads


# (B, Hq, Hk, Tq, Tk, D, dtype, is_causal, mask kind)
CASES = [
    (1, 1, 1, 1, 1, 16, "fp32", True, None),          # T = 1
    (1, 2, 2, 7, 7, 16, "fp32", False, None),
    (1, 2, 2, 77, 77, 64, "fp32", True, None),        # two query and key blocks, causal
    (2, 2, 2, 1, 77, 80, "fp32", False, "keypad"),    # Tq = 1, D = 80 (padded to 128)
    (1, 2, 2, 1, 7, 16, "fp16", True, None),          # Tq = 1 causal: sees key 0 only
    (1, 2, 2, 77, 7, 80, "fp32", True, "2d"),         # Tq > Tk, causal
    (1, 2, 2, 7, 77, 16, "fp32", True, "2d"),         # Tq < Tk, causal
    (1, 2, 2, 7, 77, 40, "fp16", True, "keypad"),     # D = 40: zero-padded to 48 by the host
    (1, 2, 1, 77, 7, 20, "fp32", False, None),        # D = 20: padded to 32
    (2, 4, 2, 77, 77, 64, "fp32", True, "keypad"),    # GQA
    (2, 4, 2, 77, 77, 64, "fp16", True, "keypad"),
    (2, 4, 2, 77, 77, 64, "bf16", False, "keypad"),
    (1, 2, 2, 77, 77, 80, "fp16", False, "2d"),
    (1, 2, 1, 77, 7, 80, "bf16", True, "2d"),
    (1, 2, 2, 7, 7, 16, "fp32", False, "fullrow"),    # a fully masked row: out 0, lse +inf, zero grads
    (1, 2, 2, 7, 32, 16, "fp32", True, "fullrow"),    # a 16-aligned mask: passed as is, not re-laid
    (1, 2, 2, 7, 77, 64, "fp16", True, "fullrow"),
    (1, 2, 2, 7, 7, 16, "bf16", False, "fullrow"),
]


@pytest.mark.parametrize("B, Hq, Hk, Tq, Tk, D, dtype, is_causal, mask_kind", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_attention_matches_reference(B, Hq, Hk, Tq, Tk, D, dtype, is_causal, mask_kind):
    out, lse, grads = _run_case(B, Hq, Hk, Tq, Tk, D, DTYPES[dtype], is_causal, mask_kind)
    if mask_kind == "fullrow":
        row = Tq // 2
        assert (out[:, :, row] == 0).all() and torch.isinf(lse[:, :, row]).all()
        assert (grads[0][:, :, row] == 0).all()


# Small tiles, so that T = 77 spans many blocks: several causal diagonal blocks per program, a
# partial last block, BLOCK_M != BLOCK_N both ways, and the GQA loop over more than one block.
SMALL_TILES = [dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
               dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("tile", SMALL_TILES, ids=["16x32", "32x16"])
@pytest.mark.parametrize("Tq, Tk, is_causal, mask_kind", [(77, 77, True, "keypad"), (45, 77, True, None),
                                                          (77, 40, False, "2d")])
def test_attention_small_tiles(monkeypatch, tile, Tq, Tk, is_causal, mask_kind):
    monkeypatch.setattr(kernels, "_config", lambda kernel, head_dim, dtype, arch=80, dropout=False: dict(tile))
    _run_case(1, 4, 2, Tq, Tk, 16, torch.float32, is_causal, mask_kind)


# ---- dropout ----

def test_philox_reference_matches_random123():
    # Random123's known-answer vectors for philox4x32_10 (kat_vectors): counter and key all zero,
    # and counter = pi digits with key = more pi digits.
    z = torch.zeros(1, dtype=torch.int64)
    got = [int(w) for w in philox_reference(z, z, z, z, 0, 0)]
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    c = [torch.tensor([x], dtype=torch.int64) for x in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    got = [int(w) for w in philox_reference(*c, 0xA4093822, 0x299F31D0)]
    assert got == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed, offset", [(0, 0), (-0x7EDCBA9876543211, 0xFFFFFFF3), ((1 << 32) + 5, 12345)])
def test_dropout_mask_matches_definition(seed, offset):
    # q = 0 gives p = 1 / Tk everywhere, and v = I (D >= Tk) makes out[i, j] = Z_ij / Tk: the mask itself.
    B, H, Tq, Tk, D, p = 2, 2, 7, 77, 80, 0.3
    q = torch.zeros(B, H, Tq, D)
    v = torch.eye(Tk, D).expand(B, H, Tk, D).contiguous()
    out, _ = kernels.attention_forward(q, torch.randn(B, H, Tk, D), v, None, False, 1.0, p, seed, offset)
    keep = keep_reference(seed, offset, p, B, H, Tq, Tk)
    assert torch.equal(out[..., :Tk] != 0, keep)
    torch.testing.assert_close(out[..., :Tk], keep / (Tk * (1 - p)), rtol=1e-6, atol=0)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    assert (out[..., Tk:] == 0).all()


@pytest.mark.parametrize("B, Hq, Hk, Tq, Tk, D, dtype, is_causal, mask_kind",
                         [(1, 4, 2, 77, 77, 64, "fp32", True, "keypad"),
                          (1, 2, 2, 7, 77, 80, "fp16", False, "2d"),
                          (1, 2, 1, 77, 7, 16, "bf16", True, None)])
def test_dropout_gradients_match_reference(B, Hq, Hk, Tq, Tk, D, dtype, is_causal, mask_kind):
    # The reference applies keep_reference's mask: the backward must regenerate the forward's bits.
    _run_case(B, Hq, Hk, Tq, Tk, D, DTYPES[dtype], is_causal, mask_kind, dropout_p=0.25, seed=3)


def test_dropout_and_backward_are_deterministic(monkeypatch):
    monkeypatch.setattr(kernels, "_config", lambda kernel, head_dim, dtype, arch=80, dropout=False: dict(SMALL_TILES[0]))
    q, k, v, grad_out, _ = _inputs(1, 4, 2, 45, 40, 16, torch.float32, seed=5)
    args = (None, True, 0.25, 0.2, 99, 3)
    out1, lse1 = kernels.attention_forward(q, k, v, *args)
    out2, lse2 = kernels.attention_forward(q, k, v, *args)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    g1 = kernels.attention_backward(grad_out, q, k, v, out1, lse1, *args)
    g2 = kernels.attention_backward(grad_out, q, k, v, out1, lse1, *args)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    out3, _ = kernels.attention_forward(q, k, v, None, True, 0.25, 0.2, 100, 3)  # another seed, another mask
    assert not torch.equal(out1, out3)


def test_attention_config_is_listed():
    # tests/test_triton_aot.py compiles CONFIGS; the dispatcher must never return anything else.
    listed = {(kernel, arch, width, dropout, block_d): cfg for kernel, arch, width, dropout, block_d, cfg in kernels.CONFIGS}
    for kernel in kernels.KERNELS:
        for arch in kernels.ARCHS:
            for dtype in DTYPES.values():
                for dropout in (False, True):
                    for D in range(1, 257):
                        key = (kernel, arch, 4 if dtype == torch.float32 else 2, dropout, kernels._block_d(D))
                        assert kernels._config(kernel, D, dtype, arch, dropout) == listed[key], key
