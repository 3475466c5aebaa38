"""apply_rotary against transformers and a float64 reference: every backend, both conventions,
partial rotary, GQA, packed-QKV views, broadcast tables, position ids, and bad input."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import fasttx
from fasttx import backends
from fasttx.ops.apply_rotary import IMPLEMENTATIONS, apply_rotary_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, Hq, Hk, T, D, Dr): one pair, odd and prime sizes, GQA, D = 128, partial rotary (Phi: 80 of
# which 32 rotate; Dr/2 = 24 leaves a vector tail), T = 1, and T = 601 at D = 64: the CPU
# kernel's token blocks are 64 KiB per head (256 fp32 tokens here), so three blocks, the last ragged.
SHAPES = [(1, 1, 1, 1, 2, 2), (2, 3, 1, 7, 6, 6), (1, 5, 5, 13, 64, 64), (2, 7, 3, 11, 128, 128),
          (3, 2, 1, 5, 80, 32), (1, 4, 2, 17, 64, 48), (2, 3, 2, 601, 64, 64)]


def tables(b, t, dr, interleaved=False, dtype=torch.float32, device="cpu", offset=0):
    """cos, sin of shape (B, T, Dr) as transformers builds them (GPT-J's repeated per pair)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))
    pos = torch.arange(offset, offset + t, dtype=torch.float32)[None].expand(b, t) + \
        torch.arange(b, dtype=torch.float32)[:, None]  # each batch row its own positions
    angles = pos[..., None] * inv_freq
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def hf_apply_rotary(q, k, cos, sin):
    """transformers' Llama apply_rotary_pos_emb, in q's dtype (test_hf_formulas_are_transformers' checks it)."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def gptj_apply_rotary(x, sin, cos):
    """transformers' GPT-J apply_rotary_pos_emb: x (B, T, H, D), tables of Dr/2 repeated per pair."""
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def hf_formula(q, k, cos, sin, interleaved=False, llama=hf_apply_rotary, gptj=gptj_apply_rotary):
    """transformers' functions: Llama's rotate-half, GPT-J's rotate_every_two, partial as Phi splits."""
    dr = cos.shape[-1]
    if interleaved:  # GPT-J takes (B, T, H, D) and tables of Dr/2 it repeats per pair
        rot = [gptj(x[..., :dr].transpose(1, 2), sin[..., ::2], cos[..., ::2]).transpose(1, 2) for x in (q, k)]
    else:
        rot = list(llama(q[..., :dr], k[..., :dr], cos, sin))
    return tuple(torch.cat((r, x[..., dr:]), -1) for r, x in zip(rot, (q, k)))


def _run(fn, q, k, grads):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    out = fn(q, k)
    torch.autograd.backward(out, grads)
    return [o.detach() for o in out] + [q.grad, k.grad]


def check_against_reference(backend, q, k, cos, sin, interleaved=False, position_ids=None):
    """fasttx vs the float64 truth, with transformers' own error in q's dtype as the yardstick."""
    torch.manual_seed(1)
    grads = (torch.randn(q.shape, dtype=q.dtype, device=q.device), torch.randn(k.shape, dtype=k.dtype, device=k.device))
    with fasttx.use_backend(backend):
        out = _run(lambda a, b: fasttx.apply_rotary(a, b, cos, sin, interleaved=interleaved,
                                                    position_ids=position_ids), q, k, grads)
    gathered = (cos, sin) if position_ids is None else (cos[position_ids], sin[position_ids])
    gathered = [g if g.dim() == 3 else g.reshape(-1, *g.shape[-2:]) for g in gathered]  # (T, Dr) -> (1, T, Dr)
    truth = _run(lambda a, b: apply_rotary_ref(a, b, cos.double(), sin.double(), interleaved, position_ids),
                 q.double(), k.double(), [g.double() for g in grads])
    c, s = (t.to(q.dtype) for t in gathered)  # transformers casts its tables to q's dtype
    theirs = _run(lambda a, b: hf_formula(a, b, c, s, interleaved), q, k, grads)
    assert out[0].is_contiguous() and out[1].is_contiguous()
    for name, o, t, p, factor in zip(("q", "k", "grad_q", "grad_k"), out, truth, theirs, (2, 2, 3, 3)):
        assert_within_torch_error(o, t, p, factor=factor, what=f"{backend} {q.dtype} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, backend, dtype, interleaved, shape):
    skip_unless_runnable(device, backend)
    b, hq, hk, t, d, dr = shape
    torch.manual_seed(0)
    q = torch.randn(b, hq, t, d, device=device, dtype=dtype)
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype)
    cos, sin = tables(b, t, dr, interleaved, dtype, device)
    check_against_reference(backend, q, k, cos, sin, interleaved)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float32_tables_with_half_precision_q(device, backend, dtype):
    # transformers rounds its tables to q's dtype; fasttx uses the float32 values as given.
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 64, device=device, dtype=dtype), torch.randn(2, 2, 9, 64, device=device, dtype=dtype)
    cos, sin = tables(2, 9, 64, device=device, offset=1000)
    check_against_reference(backend, q, k, cos, sin)
    with fasttx.use_backend(backend):
        assert fasttx.apply_rotary(q, k, cos, sin)[0].dtype == dtype


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_packed_qkv_views_are_read_in_place(device, backend, interleaved):
    """q, k as views of one (B, T, 3 * H * D) projection: results right, and no copy of them made."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    b, t, h, d = 2, 7, 3, 64
    qkv = torch.randn(b, t, 3 * h * d, device=device).view(b, t, 3, h, d)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous()
    cos, sin = tables(b, t, d, interleaved, device=device)
    check_against_reference(backend, q, k, cos, sin, interleaved)
    if device == "cpu":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
                fasttx.use_backend(backend):
            fasttx.apply_rotary(q, k, cos, sin, interleaved=interleaved)
        copies = [e.name for e in prof.events() if e.name in ("aten::contiguous", "aten::clone", "aten::copy_")]
        if backend == "cpu":  # the kernel reads the strides: nothing is copied
            assert not copies, copies


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_other_strides(device, backend):
    # Heads and tokens strided, a unit stride the kernels do not get (transposed last dims), and
    # tables sliced out of wider ones.
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    q = torch.randn(3, 10, 6, 32, device=device)[:, ::3, ::2]
    k = torch.randn(3, 1, 32, 3, device=device).transpose(2, 3)
    cos, sin = tables(3, 3, 64, device=device)
    check_against_reference(backend, q, k, cos[..., :32], sin[..., :32])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["T,Dr", "1,T,Dr", "B,T,Dr expanded", "B,1,T,Dr", "1,1,T,Dr"])
def test_table_shapes(device, backend, layout):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    b, t = 3, 5
    q, k = torch.randn(b, 4, t, 16, device=device), torch.randn(b, 2, t, 16, device=device)
    cos, sin = tables(1, t, 16, device=device)
    cos, sin = {"T,Dr": (cos[0], sin[0]), "1,T,Dr": (cos, sin),
                "B,T,Dr expanded": (cos.expand(b, t, 16), sin.expand(b, t, 16)),
                "B,1,T,Dr": (cos.expand(b, t, 16)[:, None], sin.expand(b, t, 16)[:, None]),
                "1,1,T,Dr": (cos[:, None], sin[:, None])}[layout]
    with fasttx.use_backend(backend):
        got = fasttx.apply_rotary(q, k, cos, sin)
    want = hf_apply_rotary(q, k, cos.reshape(-1, t, 16), sin.reshape(-1, t, 16))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("ids_shape", ["B,T", "1,T", "T"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_position_ids_gather_table_rows(device, backend, ids_shape, interleaved):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    b, t, positions = 2, 9, 50
    cos, sin = tables(1, positions, 32, interleaved, device=device)
    cos, sin = cos[0], sin[0]
    ids = torch.randint(0, positions, {"B,T": (b, t), "1,T": (1, t), "T": (t,)}[ids_shape], device=device)
    q, k = torch.randn(b, 3, t, 40, device=device), torch.randn(b, 1, t, 40, device=device)
    check_against_reference(backend, q, k, cos, sin, interleaved, ids)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("bad", [-1, 50])
def test_position_ids_out_of_range_raise(device, backend, bad):
    skip_unless_runnable(device, backend)
    cos, sin = tables(1, 50, 8, device=device)
    ids = torch.tensor([[0, bad, 3]], device=device)
    q = torch.randn(1, 2, 3, 8, device=device)
    with fasttx.use_backend(backend), pytest.raises(IndexError, match=r"position_ids must lie in \[0, 50\)"):
        fasttx.apply_rotary(q, q, cos[0], sin[0], position_ids=ids)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", [(0, 2, 1, 5, 8), (2, 2, 1, 0, 8), (2, 0, 0, 3, 8), (2, 3, 0, 4, 8)], ids=str)
def test_empty(device, backend, shape):
    skip_unless_runnable(device, backend)
    b, hq, hk, t, d = shape
    q = torch.randn(b, hq, t, d, device=device, requires_grad=True)
    k = torch.randn(b, hk, t, d, device=device, requires_grad=True)
    cos, sin = tables(1, t, d, device=device)
    with fasttx.use_backend(backend):
        oq, ok = fasttx.apply_rotary(q, k, cos, sin)
        (oq.sum() + ok.sum()).backward()
    assert oq.shape == q.shape and ok.shape == k.shape and q.grad.shape == q.shape and k.grad.shape == k.shape
    if hq:
        torch.testing.assert_close(oq, hf_apply_rotary(q, k, cos, sin)[0])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("with_ids", [False, True], ids=["tables", "position_ids"])
def test_gradients_of_cos_and_sin(device, backend, with_ids):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    b, t = 2, 6
    q, k = torch.randn(b, 3, t, 20, device=device), torch.randn(b, 1, t, 20, device=device)
    if with_ids:
        cos, sin = (x[0] for x in tables(1, 10, 12, device=device))
        ids = torch.tensor([1, 1, 4, 9, 0, 2], device=device)
    else:
        cos, sin = tables(1, t, 12, device=device)
        ids = None
    grads = (torch.randn_like(q), torch.randn_like(k))

    def run(fn, dtype):
        c, s = (x.detach().to(dtype).clone().requires_grad_() for x in (cos, sin))
        out = fn(q.to(dtype), k.to(dtype), c, s)
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        return c.grad, s.grad

    with fasttx.use_backend(backend):
        got = run(lambda a, b_, c, s: fasttx.apply_rotary(a, b_, c, s, position_ids=ids), torch.float32)
    truth = run(lambda a, b_, c, s: apply_rotary_ref(a, b_, c, s, position_ids=ids), torch.float64)
    hf = run(lambda a, b_, c, s: hf_formula(a, b_, *((c[ids][None], s[ids][None]) if with_ids else (c, s))),
             torch.float32)
    for what, g, tr, h in zip(("grad_cos", "grad_sin"), got, truth, hf):
        assert_within_torch_error(g, tr, h, factor=3, what=what)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_gradcheck_float64(backend, interleaved):
    skip_unless_runnable("cpu", backend)
    torch.manual_seed(0)
    leaf = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, cos, sin = leaf(2, 2, 3, 6), leaf(2, 1, 3, 6), leaf(3, 4), leaf(3, 4)
    table_c, table_s, ids = leaf(5, 4), leaf(5, 4), torch.tensor([[4, 0, 2], [1, 3, 3]])
    with fasttx.use_backend(backend):
        f = lambda a, b, c, s: fasttx.apply_rotary(a, b, c, s, interleaved=interleaved)  # noqa: E731
        g = lambda a, b, c, s: fasttx.apply_rotary(a, b, c, s, interleaved=interleaved, position_ids=ids)  # noqa
        assert torch.autograd.gradcheck(f, (q, k, cos, sin))
        assert torch.autograd.gradcheck(g, (q, k, table_c, table_s))
        if backend == "cpu":  # a recorded backward runs torch ops whatever the backend: once is enough
            assert torch.autograd.gradgradcheck(f, (q, k, cos, sin))  # through graphed_backward()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_tables_are_used_per_element(device, backend, interleaved):
    """Tables with every element its own value (transformers' repeat theirs per pair): a kernel that
    takes the partner's cos or sin for its own fails here, forward or backward."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 40, device=device), torch.randn(2, 1, 5, 40, device=device)
    cos, sin = torch.randn(2, 5, 36, device=device), torch.randn(2, 5, 36, device=device)
    grads = (torch.randn_like(q), torch.randn_like(k))
    with fasttx.use_backend(backend):
        out = _run(lambda a, b: fasttx.apply_rotary(a, b, cos, sin, interleaved=interleaved), q, k, grads)
    want = _run(lambda a, b: apply_rotary_ref(a.double(), b.double(), cos.double(), sin.double(), interleaved),
                q, k, grads)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w.float(), rtol=1e-5, atol=1e-5)


def test_torch_func_transforms_run_the_reference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, dtype=torch.float64), torch.randn(1, 1, 3, 8, dtype=torch.float64)
    cos, sin = (x.double() for x in tables(1, 3, 8))
    grad = torch.func.grad(lambda a: fasttx.apply_rotary(a, k, cos, sin)[0].square().sum())(q)
    want = torch.func.grad(lambda a: apply_rotary_ref(a, k, cos, sin)[0].square().sum())(q)
    torch.testing.assert_close(grad, want)


def test_reference_is_transformers_formula_in_float64():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 80, dtype=torch.float64), torch.randn(2, 1, 5, 80, dtype=torch.float64)
    for interleaved in (False, True):
        cos, sin = (x.double() for x in tables(2, 5, 32, interleaved))
        for a, b in zip(apply_rotary_ref(q, k, cos, sin, interleaved), hf_formula(q, k, cos, sin, interleaved)):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hf_formulas_are_transformers(dtype):
    """The yardstick above is transformers' own functions, bit for bit, in every dtype."""
    pytest.importorskip("transformers")
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 80, dtype=dtype), torch.randn(2, 1, 5, 80, dtype=dtype)
    for interleaved in (False, True):
        cos, sin = tables(2, 5, 32, interleaved, dtype)
        for a, b in zip(hf_formula(q, k, cos, sin, interleaved),
                        hf_formula(q, k, cos, sin, interleaved, llama=llama, gptj=gptj)):
            assert torch.equal(a, b)


def test_autocast_keeps_dtypes():
    # No GEMM: autocast casts nothing, and the output keeps q's dtype (not transformers' promotion to
    # the float32 of its tables, which the attention after it casts back anyway).
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16), torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
    cos, sin = tables(2, 5, 16)
    plain = fasttx.apply_rotary(q, k, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fasttx.apply_rotary(q, k, cos, sin)
        auto32 = fasttx.apply_rotary(q.float(), k.float(), cos, sin)
    assert [a.dtype for a in auto] == [torch.bfloat16] * 2 and [a.dtype for a in auto32] == [torch.float32] * 2
    for a, p in zip(auto, plain):
        assert torch.equal(a, p)


# ---- the CPU kernel sets of other machines, and streaming stores -----------------------------

CHILD = textwrap.dedent("""
    import sys, torch, fasttx
    from fasttx.ops.apply_rotary import apply_rotary_ref
    assert torch.backends.cpu.get_cpu_capability() == sys.argv[1], torch.backends.cpu.get_cpu_capability()
    torch.manual_seed(0)
    with fasttx.use_backend("cpu"):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for d, dr, interleaved in ((128, 128, False), (80, 48, False), (6, 6, True), (64, 40, True)):
                q = torch.randn(2, 3, 7, d, dtype=dtype, requires_grad=True)
                k = torch.randn(2, 1, 7, d, dtype=dtype, requires_grad=True)
                cos, sin = torch.randn(7, dr, dtype=dtype), torch.randn(7, dr, dtype=dtype)
                g = (torch.randn_like(q), torch.randn_like(k))
                for fn in (fasttx.apply_rotary, lambda *a, **kw: apply_rotary_ref(*a, kw["interleaved"])):
                    out = fn(q, k, cos, sin, interleaved=interleaved)
                    grads = torch.autograd.grad(out, (q, k), g)
                    if fn is fasttx.apply_rotary:
                        ours = out + grads
                for a, b in zip(ours, out + grads):
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    print("rotary ok")
""")


# This machine's own set runs in the tests above, with plain stores (their outputs are small); the AVX2
# child streams every output (cpu/vec/io.h, the same store path as the AVX-512 set's).
@pytest.mark.parametrize("capability,stream", [("avx2", "0"), ("default", "")], ids=["avx2-streamed", "portable"])
def test_other_cpu_kernel_sets(capability, stream):
    skip_unless_runnable("cpu", "cpu")
    machine = torch.backends.cpu.get_cpu_capability()
    if machine not in ("AVX512", "AVX2"):
        pytest.skip(f"ATen reports {machine}: only the portable kernels exist here, and the tests above run them")
    if capability == "avx2" and machine != "AVX512":
        pytest.skip("AVX2 is this machine's own set: the tests above run it")
    env = dict(os.environ, FASTTX_STREAM_BYTES=stream or str(1 << 62), ATEN_CPU_CAPABILITY=capability)
    expect = {"avx2": "AVX2", "default": "DEFAULT"}[capability]
    done = subprocess.run([sys.executable, "-c", CHILD, expect], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rotary ok" in done.stdout


# ---- bad input -------------------------------------------------------------------

def _qk(d=8, dtype=torch.float32):
    return torch.randn(2, 4, 5, d, dtype=dtype), torch.randn(2, 2, 5, d, dtype=dtype)


@pytest.mark.parametrize("call,error,message", [
    (lambda q, k, c, s: fasttx.apply_rotary(q[0], k, c, s), ValueError,
     r"fasttx.apply_rotary: q must be 4-D \(batch, heads, tokens, head_dim\), got shape \(4, 5, 8\)"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k[:, :, :3], c, s), ValueError,
     r"k must have shape \(2, heads, 5, 8\) to match q \(2, 4, 5, 8\), got \(2, 2, 3, 8\)"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k.half(), c, s), TypeError,
     "k has dtype torch.float16 but q has torch.float32"),
    (lambda q, k, c, s: fasttx.apply_rotary(q.long(), k.long(), c, s), TypeError,
     "q must be float16, bfloat16, float32 or float64, got torch.int64"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c[:4], s[:4]), ValueError,
     r"cos and sin must have shape \(5, Dr\), \(2 or 1, 5, Dr\) or \(2 or 1, 1, 5, Dr\) .* got \(4, 8\)"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, s[:, :6]), ValueError,
     r"sin must have the shape of cos \(5, 8\), got \(5, 6\)"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c[:, :5], s[:, :5]), ValueError,
     r"rotary dimension .* must be even and in \[2, 8\] .* got 5"),
    (lambda q, k, c, s: fasttx.apply_rotary(q[..., :4], k[..., :4], c, s), ValueError,
     r"must be even and in \[2, 4\] \(q's head dimension\), got 8"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, s.double()), TypeError,
     "sin has dtype torch.float64 but cos has torch.float32"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, s.to("meta")), ValueError, "sin is on meta but cos is on cpu"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, [1.0]), TypeError, "sin must be a torch.Tensor, got list"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, s, interleaved=1), TypeError,
     "interleaved must be a bool, got int 1"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, s, position_ids=torch.zeros(3, dtype=torch.long)), ValueError,
     r"position_ids must have shape \(2 or 1, 5\) or \(5,\) for q of shape \(2, 4, 5, 8\), got \(3,\)"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c, s, position_ids=torch.zeros(5)), TypeError,
     "position_ids must be int64 or int32, got torch.float32"),
    (lambda q, k, c, s: fasttx.apply_rotary(q, k, c[None], s[None], position_ids=torch.zeros(5, dtype=torch.long)),
     ValueError, r"with position_ids, cos and sin must be \(positions, rotary_dim\) tables, got shape \(1, 5, 8\)"),
], ids=["q-3d", "k-tokens", "k-dtype", "int-q", "cos-tokens", "sin-shape", "odd-dr", "dr-too-big", "sin-dtype",
        "sin-device", "sin-list", "interleaved-int", "ids-shape", "ids-dtype", "ids-3d-table"])
def test_bad_input_is_named(call, error, message):
    q, k = _qk()
    cos, sin = (x[0] for x in tables(1, 5, 8))
    with pytest.raises(error, match=message):
        call(q, k, cos, sin)


# ---- torch.library and torch.compile ------------------------------------------------

def test_opcheck():
    """Schema, fake implementation and autograd registration agree with the real op."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 16, requires_grad=True)
    k = torch.randn(2, 1, 5, 16, requires_grad=True)
    cos, sin = tables(2, 5, 12)
    ids = torch.tensor([[0, 1, 2, 3, 4], [4, 4, 0, 1, 2]])
    torch.library.opcheck(torch.ops.fasttx.apply_rotary.default, (q, k, cos, sin, None, False, "auto"))
    torch.library.opcheck(torch.ops.fasttx.apply_rotary.default, (q, k, cos[0], sin[0], ids, True, "auto"))


def test_torch_compile_fullgraph_matches_eager():
    def block(q, k, cos, sin, table, ids):
        a, b = fasttx.apply_rotary(q * 2, k, cos, sin)
        c, d = fasttx.apply_rotary(a, b, table, table, position_ids=ids, interleaved=True)
        return (c.sum(1, keepdim=True) * d).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # raises on any graph break
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 32, requires_grad=True)
    k = torch.randn(2, 1, 7, 32, requires_grad=True)
    table = torch.randn(20, 16, requires_grad=True)  # its gradient too
    cos, sin = tables(1, 7, 32)
    ids = torch.tensor([19, 0, 3, 3, 8, 1, 2])
    leaves = (q, k, table)
    out = compiled(q, k, cos, sin, table, ids)
    out.backward()
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    expected = block(q, k, cos, sin, table, ids)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, [t.grad for t in leaves])
    with pytest.raises(IndexError, match=r"position_ids must lie in \[0, 20\)"):
        compiled(q, k, cos, sin, table, ids + 1)


def test_auto_prefers_the_cpu_kernel_on_cpu_tensors():
    skip_unless_runnable("cpu", "cpu")
    q = torch.randn(1, 1, 2, 4)
    assert backends.choose("apply_rotary", IMPLEMENTATIONS, "auto", q, q, q, q).backend == "cpu"


def test_backward_keeps_only_the_tables():
    # Nothing of q or k is saved unless cos or sin need a gradient.
    q, k = (x.requires_grad_() for x in _qk(16))
    cos, sin = tables(2, 5, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fasttx.apply_rotary(q, k, cos, sin)
    assert all(t.data_ptr() not in (q.data_ptr(), k.data_ptr()) for t in saved) and len(saved) == 2


# ---- fasttx.nn.RotaryEmbedding -------------------------------------------------------

ROPE_PARAMETERS = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
]


@pytest.mark.parametrize("rope", ROPE_PARAMETERS, ids=lambda r: r["rope_type"])
def test_rotary_embedding_matches_transformers(rope):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=dict(rope),
                         max_position_embeddings=131072)
    theirs = LlamaRotaryEmbedding(config)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
    ours = fasttx.nn.RotaryEmbedding(128, base=rope["rope_theta"], scaling=scaling)
    assert torch.equal(ours.inv_freq, theirs.inv_freq)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == set()  # inv_freq is not persistent
    torch.manual_seed(0)
    pos = torch.randint(0, 100000, (2, 7))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 8, dtype=dtype)
        for a, b in zip(ours(x, pos), theirs(x, pos)):
            assert a.dtype == dtype and torch.equal(a, b)
    # End to end: the module's tables through fasttx.apply_rotary, against transformers' whole path.
    q, k = torch.randn(2, 2, 7, 128), torch.randn(2, 1, 7, 128)
    cos, sin = ours(q, pos)
    for a, b in zip(fasttx.apply_rotary(q, k, cos, sin), hf_apply_rotary(q, k, *theirs(q, pos))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"dim": 7}, ValueError, "dim must be even"),
    ({"dim": 0}, ValueError, r"dim must be positive \(an int >= 1\), got 0"),
    ({"dim": 8, "base": -1.0}, ValueError, "base must be a finite number > 0, got -1.0"),
    ({"dim": 8, "scaling": {"rope_type": "yarn"}}, ValueError, r"rope_type'\] must be 'default', 'linear' or 'llama3'"),
    ({"dim": 8, "scaling": {"rope_type": "linear"}}, ValueError, r"scaling\['factor'\] must be a finite number > 0"),
    ({"dim": 8, "scaling": {"rope_type": "llama3", "factor": 8.0}}, ValueError, "llama3 scaling needs"),
    ({"dim": 8, "scaling": 2.0}, TypeError, "scaling must be None or a dict, got float"),
], ids=["odd", "zero", "base", "yarn", "no-factor", "llama3-keys", "not-dict"])
def test_rotary_embedding_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=f"fasttx.nn.RotaryEmbedding: .*{message}"):
        fasttx.nn.RotaryEmbedding(**kwargs)


def test_bench_runs_the_op_and_its_hf_provider(tmp_path):
    """bench/ops/apply_rotary.py in the harness (two outputs, both with gradients), smoke size."""
    import bench
    skip_unless_runnable("cpu", "cpu")
    docs = bench.run(ops=["apply_rotary"], level="smoke", threads=[1], reps=3, out_dir=str(tmp_path), echo=False,
                     device="cpu", providers=["eager", "hf_rotate_half", "fasttx-cpu"])
    rows = docs["apply_rotary"]["runs"][0]["rows"]
    assert {(r["provider"], r["mode"]) for r in rows if r["status"] == "ok"} == \
        {(p, m) for p in ("eager", "hf_rotate_half", "fasttx-cpu") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["max_abs_err"] < 1e-5 and r["vs_hf_rotate_half_q20"] <= r["vs_hf_rotate_half"]
