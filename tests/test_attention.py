"""scaled_dot_product_attention and MultiheadSelfAttention against PyTorch: every backend, dtype,
mask kind and awkward shape; dropout reproducibility; determinism; what backward keeps."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.attention import scaled_dot_product_attention_ref
from fasttx.ops.philox import dropout_keep_mask

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

# (B, Hq, Hk, Tq, Tk, D): T in {1, 7, 77, 128, 1000}, Tq != Tk (Tq = 1 too), D in {16, 64, 80, 128}, GQA;
# and the other ends of the head-dim range the API promises: 96 (not a power of two) and 256.
SHAPES = [(2, 3, 3, 1, 1, 16), (2, 3, 3, 7, 7, 64), (1, 2, 2, 77, 77, 80), (1, 2, 2, 128, 128, 128),
          (1, 2, 2, 1000, 1000, 64), (2, 4, 2, 77, 128, 64), (2, 4, 1, 1, 77, 16), (1, 2, 2, 128, 7, 80),
          (1, 2, 1, 33, 45, 96), (1, 1, 1, 17, 17, 256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("out", "grad_q", "grad_k", "grad_v")


def _qkv(B, Hq, Hk, Tq, Tk, D, device, dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(B, Hq, Tq, D, device=device, dtype=dtype), torch.randn(B, Hk, Tk, D, device=device, dtype=dtype),
            torch.randn(B, Hk, Tk, D, device=device, dtype=dtype))


def _run(fn, q, k, v, grad, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad for t in leaves)


def check_against_reference(backend, q, k, v, mask=None, **kw):
    """fasttx vs the float64 truth, with PyTorch's own error in q's dtype as the yardstick:
    2x for the output, 3x for gradients (the issue's rule)."""
    kw.setdefault("enable_gqa", q.shape[-3] != k.shape[-3])
    grad = torch.randn(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    as_dtype = lambda t, dt: t.to(dt) if t is not None and t.dtype != torch.bool else t
    run = lambda fn, dt: _run(fn, q.to(dt), k.to(dt), v.to(dt), grad.to(dt), attn_mask=as_dtype(mask, dt), **kw)
    with fasttx.use_backend(backend):
        out = run(fasttx.scaled_dot_product_attention, q.dtype)
    truth = run(scaled_dot_product_attention_ref, torch.float64)
    torch_out = run(scaled_dot_product_attention_ref, q.dtype)
    for name, o, t, p in zip(NAMES, out, truth, torch_out):
        assert torch.isfinite(o).all(), f"{backend} {name} has non-finite values"
        assert_within_torch_error(o, t, p, factor=2 if name == "out" else 3, what=f"{backend} {q.dtype} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, is_causal, shape):
    skip_unless_runnable(device, backend)
    if shape[3] == 1000 and dtype != torch.float32:
        pytest.skip("T = 1000 runs in fp32 only, to keep the suite fast; bf16/fp16 are covered at T <= 128")
    check_against_reference(backend, *_qkv(*shape, device, dtype), is_causal=is_causal)


def _cpu_has_avx512_bf16():
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read().split()


def _cpu_has_amx_bf16():
    with open("/proc/cpuinfo") as f:
        return "amx_bf16" in f.read().split()


def _cpu_is_intel():
    with open("/proc/cpuinfo") as f:
        return "GenuineIntel" in f.read()


def test_cpu_takes_our_block_gemms_where_they_beat_blas():
    """Our block GEMMs by default where the machine has the instructions and the CPU is not Intel's (whose
    MKL was faster); FASTTX_ATTENTION_GEMM decides instead. test_cpu_both_gemm_paths runs both anyway."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    setting = os.environ.get("FASTTX_ATTENTION_GEMM", "")
    wanted = {"block": True, "blas": False}.get(setting, not _cpu_is_intel())
    assert _C.block_gemm_available() == (avx512 and wanted)
    assert _C.bf16_block_gemm_available() == (avx512 and wanted and _cpu_has_avx512_bf16())
    # brgemm serves bf16 unless block or blas was asked for, and only where the packing's AVX512-BF16 runs
    if setting in ("block", "blas") or not (avx512 and _cpu_has_avx512_bf16()):
        assert not _C.bf16_brgemm_available()


@pytest.mark.skipif(not _cpu_has_amx_bf16(), reason="brgemm's default needs a CPU that ATen runs it natively on")
def test_cpu_takes_brgemm_for_bf16_where_the_cpu_has_amx():
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("ATEN_CPU_CAPABILITY is below AVX-512")
    assert _C.bf16_brgemm_available() == (os.environ.get("FASTTX_ATTENTION_GEMM", "") in ("", "brgemm"))


@pytest.mark.parametrize("setting,enabled", [("block", True), ("blas", False), ("brgemm", None), ("bogus", None)])
def test_attention_gemm_environment_switch(setting, enabled):
    skip_unless_runnable("cpu", "cpu")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the block GEMMs need AVX-512")
    code = "from fasttx import _C; print(_C.block_gemm_available(), _C.bf16_brgemm_available())"
    env = dict(os.environ, FASTTX_ATTENTION_GEMM=setting)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if setting == "bogus":
        assert done.returncode != 0 and "FASTTX_ATTENTION_GEMM must be 'block', 'blas' or 'brgemm'" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    block, brgemm = done.stdout.split()
    if enabled is not None:
        assert (block, brgemm) == (str(enabled), "False")
    else:  # brgemm: fp32 keeps its default; bf16 takes brgemm where oneDNN runs it natively: surely with
        # AMX, never without AVX512-BF16 (our packing needs it), either way in between (ATen decides)
        assert block == str(not _cpu_is_intel())
        if _cpu_has_amx_bf16() or not _cpu_has_avx512_bf16():
            assert brgemm == str(_cpu_has_amx_bf16())


@pytest.fixture(params=["brgemm", "block", "blas"])
def gemm_path(request):
    """The CPU GEMM paths: oneDNN's brgemm for bf16 (where ATen runs it natively; the others then run BLAS),
    our block GEMMs (where the machine has them) and BLAS on fp32 copies."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    previous = (_C.set_block_gemm_enabled(request.param == "block"),
                _C.set_bf16_brgemm_enabled(request.param == "brgemm"))
    yield request.param
    _C.set_block_gemm_enabled(previous[0])
    _C.set_bf16_brgemm_enabled(previous[1])


# Several key blocks in the forward (512 keys) and backward (128), odd lengths, Tq != Tk, GQA, and an odd
# head dim, which the bf16 GEMMs leave to the BLAS path.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 300, 1100, 64), (1, 2, 2, 1000, 1000, 80), (2, 2, 2, 77, 77, 33),
                                   (1, 3, 3, 129, 257, 16)], ids=str)
def test_cpu_both_gemm_paths(gemm_path, dtype, is_causal, shape):
    check_against_reference("cpu", *_qkv(*shape, "cpu", dtype), is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cpu_backward_is_deterministic_across_thread_counts(gemm_path, dtype, dropout_p):
    q, k, v = _qkv(2, 4, 2, 200, 300, 64, "cpu", dtype)
    grad = torch.randn_like(q)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            with fasttx.use_backend("cpu"):
                runs.append(_run(fasttx.scaled_dot_product_attention, q, k, v, grad, is_causal=True,
                                 dropout_p=dropout_p, enable_gqa=True))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), f"{name} differs between runs"


def _mask(kind, B, H, Tq, Tk, device, dtype):
    g = torch.Generator().manual_seed(3)
    if kind == "key_padding":  # (B, 1, 1, Tk), the last keys of batch 0 padded
        m = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        m[0, ..., Tk // 2:] = False
    elif kind == "bool_2d":
        m = torch.rand(Tq, Tk, generator=g) > 0.3
        m[:, 0] = True
    elif kind == "float_full":
        m = torch.randn(B, H, Tq, Tk, generator=g).to(dtype)
    elif kind == "float_heads":  # (H, 1, Tk): ALiBi-like, broadcast over batch and queries
        m = (-torch.arange(Tk).float() * torch.rand(H, 1, 1, generator=g)).to(dtype)
    elif kind == "fully_masked_row":  # query 2 attends to nothing: output and grads 0, never NaN
        m = torch.ones(Tq, Tk, dtype=torch.bool)
        m[2] = False
    elif kind == "float_minus_inf_row":
        m = torch.zeros(B, 1, Tq, Tk)
        m[:, :, 1] = float("-inf")
        m = m.to(dtype)
    return m.to(device)


MASKS = ["key_padding", "bool_2d", "float_full", "float_heads", "fully_masked_row", "float_minus_inf_row"]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", [(2, 3, 3, 7, 77, 16), (2, 4, 2, 128, 100, 64)], ids=str)
def test_masks(device, backend, dtype, kind, shape):
    skip_unless_runnable(device, backend)
    B, Hq, _, Tq, Tk, _ = shape
    check_against_reference(backend, *_qkv(*shape, device, dtype), mask=_mask(kind, B, Hq, Tq, Tk, device, dtype))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_fully_masked_rows_give_zero(device, backend):
    skip_unless_runnable(device, backend)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 5, 6, 16, device))
    mask = torch.ones(5, 6, dtype=torch.bool, device=device)
    mask[3] = False
    with fasttx.use_backend(backend):
        out = fasttx.scaled_dot_product_attention(q, k, v, mask)
    out.sum().backward()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_and_broadcast_inputs(device, backend, is_causal):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    qkv = torch.randn(2, 33, 3, 4, 32, device=device)  # (B, T, 3, H, D), as a fused QKV projection makes it
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    check_against_reference(backend, q, k, v, is_causal=is_causal)
    # one key/value head broadcast over the query heads, and batch dims that broadcast
    k1 = torch.randn(1, 1, 33, 32, device=device)
    check_against_reference(backend, q, k1.expand(2, 1, 33, 32), torch.randn(2, 1, 33, 32, device=device),
                            enable_gqa=False)
    q5 = torch.randn(3, 2, 4, 9, 16, device=device)
    check_against_reference(backend, q5, torch.randn(2, 4, 11, 16, device=device),
                            torch.randn(2, 4, 11, 16, device=device))


def _views(layout, dtype, B=2, T=37, H=3, D=16):
    """q, k, v as (B, H, T, D) views of one buffer, the way a model hands them over."""
    torch.manual_seed(0)
    if layout == "packed_qkv":  # (B, T, 3, H, D), as the fused QKV projection makes it
        return torch.randn(B, T, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "odd_row_stride":  # rows 3HD + 1 apart: bf16 rows that do not start on a pair
        ld = 3 * H * D + 1
        base = torch.randn(B * T * ld, dtype=dtype)
        return tuple(base.as_strided((B, H, T, D), (T * ld, D, ld, 1), i * H * D) for i in range(3))
    # every other value of the head dim: rows not contiguous, which the kernel copies
    return tuple(torch.randn(B, H, T, 2 * D, dtype=dtype)[..., ::2] for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["packed_qkv", "odd_row_stride", "strided_head_dim"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_cpu_reads_views_in_place(gemm_path, dtype, layout, is_causal):
    q, k, v = _views(layout, dtype)
    if dtype != torch.float64:
        check_against_reference("cpu", q, k, v, is_causal=is_causal)
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=dtype).transpose(1, 2)
    with fasttx.use_backend("cpu"):
        viewed = _run(fasttx.scaled_dot_product_attention, q, k, v, grad, is_causal=is_causal)
        copied = _run(fasttx.scaled_dot_product_attention, q.contiguous(), k.contiguous(), v.contiguous(),
                      grad.contiguous(), is_causal=is_causal)
    # out takes q's memory order, so that merging the heads of a packed projection is a view
    out = viewed[0]
    assert out.transpose(1, 2).is_contiguous() if layout != "strided_head_dim" else out.is_contiguous()
    assert copied[0].is_contiguous() and all(g.is_contiguous() for g in viewed[1:])
    from fasttx import _C
    ours = _C.block_gemm_available() if dtype == torch.float32 else \
        dtype == torch.bfloat16 and (_C.bf16_block_gemm_available() or _C.bf16_brgemm_available())
    for name, a, b in zip(NAMES, viewed, copied):
        if ours:  # our GEMMs and brgemm sum in an order that does not depend on the strides
            assert torch.equal(a, b), f"{name} differs between views and their contiguous copies"
        else:  # BLAS may pick other kernels for other leading dimensions
            torch.testing.assert_close(a, b, msg=f"{name} differs between views and their contiguous copies")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5, 16), (2, 2, 2, 0, 5, 16), (2, 2, 2, 5, 0, 16)], ids=str)
def test_empty(device, backend, shape):
    skip_unless_runnable(device, backend)
    q, k, v = (t.requires_grad_() for t in _qkv(*shape, device))
    with fasttx.use_backend(backend):
        out = fasttx.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    assert out.shape == q.shape
    assert not out.any() and not q.grad.any() and not k.grad.any() and not v.grad.any()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_backward_is_deterministic(device, backend, is_causal):
    skip_unless_runnable(device, backend)
    q, k, v = _qkv(2, 4, 2, 200, 333, 64, device)
    grad = torch.randn_like(q)
    with fasttx.use_backend(backend):
        first, second = (_run(fasttx.scaled_dot_product_attention, q, k, v, grad, is_causal=is_causal,
                              enable_gqa=True) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_gradcheck_float64_cpu():
    skip_unless_runnable("cpu", "cpu")
    q, k, v = (t.double().requires_grad_() for t in _qkv(1, 2, 1, 5, 7, 8, "cpu"))
    mask = torch.randn(5, 7, dtype=torch.float64)
    with fasttx.use_backend("cpu"):
        for kw in (dict(is_causal=True), dict(attn_mask=mask)):
            assert torch.autograd.gradcheck(
                lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw), (q, k, v))


# ---- dropout: a pure function of (seed, offset, batch*head, row, column) ----------------

def _dropout_truth(q, k, v, dropout_p, seed, grad, **kw):
    """The float64 math with the Philox keep mask applied, and its gradients."""
    B, Hq, Tq, _ = q.shape
    keep = dropout_keep_mask(seed, 0, B, Hq, Tq, k.shape[2], dropout_p, q.device)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    qd, kd, vd = leaves
    group = Hq // kd.shape[1]
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if kw.get("is_causal"):
        s = s.masked_fill(~torch.ones(Tq, k.shape[2], dtype=torch.bool, device=q.device).tril(), float("-inf"))
    out = (torch.softmax(s, -1) * keep / (1 - dropout_p)) @ vd
    out.backward(grad.double())
    return (out.detach(),) + tuple(t.grad for t in leaves)


def _seed_of_next_call(device):
    """The seed the next scaled_dot_product_attention call with dropout on ``device`` will draw:
    from that device's generator."""
    cuda = torch.device(device).type == "cuda"
    get, put = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if cuda else (torch.get_rng_state, torch.set_rng_state)
    state = get()
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device=device))
    put(state)
    return seed


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dropout_applies_the_philox_mask(device, backend, is_causal):
    skip_unless_runnable(device, backend)
    q, k, v = _qkv(2, 4, 2, 37, 70, 16, device)
    grad = torch.randn_like(q)
    torch.manual_seed(1234)
    seed = _seed_of_next_call(device)
    with fasttx.use_backend(backend):
        got = _run(fasttx.scaled_dot_product_attention, q, k, v, grad, dropout_p=0.3, is_causal=is_causal,
                   enable_gqa=True)
    truth = _dropout_truth(q, k, v, 0.3, seed, grad, is_causal=is_causal)
    for name, o, t in zip(NAMES, got, truth):
        torch.testing.assert_close(o.double(), t, rtol=1e-5, atol=1e-5, msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dropout_is_the_same_in_every_backend(device):
    """Same torch.manual_seed, same output, whichever backend runs."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU test (rung e): no CUDA device on this machine")
    q, k, v = _qkv(2, 2, 2, 19, 23, 16, device)
    outs = {}
    for backend in fasttx.BACKENDS:
        if fasttx.backends.machine_reasons()[backend] or backend in {"cpu": ("cuda",), "cuda": ("cpu",)}[device]:
            continue  # the cpu backend takes CPU tensors only, the cuda backend CUDA ones
        torch.manual_seed(7)
        with fasttx.use_backend(backend):
            outs[backend] = fasttx.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert len(outs) >= 2, f"needs two backends on {device}, have {list(outs)}"
    first = next(iter(outs.values()))
    for backend, out in outs.items():
        torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_dropout_mask_statistics():
    keep = dropout_keep_mask(123, 0, 2, 3, 64, 100, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(keep, dropout_keep_mask(124, 0, 2, 3, 64, 100, 0.25)), "the seed must matter"
    assert not torch.equal(keep, dropout_keep_mask(123, 1, 2, 3, 64, 100, 0.25)), "the offset must matter"
    assert torch.equal(keep[1, 2, :10, :7], dropout_keep_mask(123, 0, 2, 3, 10, 7, 0.25)[1, 2]), \
        "the mask must not depend on the tensor's extent"


def test_dropout_one_gives_zeros():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 5, 6, 16, "cpu"))
    out = fasttx.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    out.sum().backward()
    assert not out.any() and not q.grad.any()


# ---- what backward keeps, torch.compile, bad input --------------------------------------

def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_backward_keeps_linear_memory():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 512, 512, 16, "cpu"))
    inputs_and_output = 4 * q.numel() * 4
    kept = _saved_bytes(lambda: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert kept <= inputs_and_output + 2 * 512 * 4 * 2 + 64, f"kept {kept} bytes: more than q, k, v, out and lse"


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = _qkv(2, 4, 2, 17, 17, 16, "cpu")
    grad = torch.randn_like(q)
    fn = lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    eager = _run(fn, q, k, v, grad)
    compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v, grad)
    for name, a, b in zip(NAMES, eager, compiled):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("args,kw,error,match", [
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 5)), {}, ValueError, "head_dim"),
    ((torch.randn(2, 4, 3, 8), torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8)), {}, ValueError, "enable_gqa"),
    ((torch.randn(2, 4, 3, 8), torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8)), dict(enable_gqa=True),
     ValueError, "multiple"),
    ((torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8).double(), torch.randn(2, 2, 3, 8)), {}, TypeError, "dtype"),
    ((torch.randint(0, 5, (2, 2, 3, 8)),) * 3, {}, TypeError, "float"),
    ((torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)), {}, ValueError, "at least 3"),
    ((torch.randn(2, 2, 3, 8),) * 3, dict(attn_mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, "broadcast"),
    ((torch.randn(2, 2, 3, 8),) * 3, dict(attn_mask=torch.ones(3, 3, dtype=torch.int32)), TypeError, "attn_mask"),
    ((torch.randn(2, 2, 3, 8),) * 3, dict(attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True),
     ValueError, "not both"),
    ((torch.randn(2, 2, 3, 8),) * 3, dict(dropout_p=1.5), ValueError, "dropout_p"),
    ((torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 4, 8)), {}, ValueError, "value"),
])
def test_bad_input_names_the_argument(args, kw, error, match):
    with pytest.raises(error, match=match):
        fasttx.scaled_dot_product_attention(*args, **kw)


def test_forced_backend_that_cannot_serve_raises():
    q = torch.randn(1, 1, 4, 8)
    with fasttx.use_backend("cuda"), pytest.raises(fasttx.BackendUnavailableError, match="cuda"):
        fasttx.scaled_dot_product_attention(q, q, q)


def test_cpu_backend_refuses_a_different_value_head_dim():
    skip_unless_runnable("cpu", "cpu")
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    with fasttx.use_backend("cpu"), pytest.raises(fasttx.BackendUnavailableError, match="head dim"):
        fasttx.scaled_dot_product_attention(q, k, torch.randn(1, 1, 4, 12))
    out = fasttx.scaled_dot_product_attention(q, k, torch.randn(1, 1, 4, 12))  # auto: torch serves it
    assert out.shape == (1, 1, 4, 12)


# ---- the module -------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_multihead_self_attention_matches_torch_module(bias, is_causal):
    torch.manual_seed(0)
    ours = fasttx.nn.MultiheadSelfAttention(64, 4, bias=bias, is_causal=is_causal)
    theirs = torch.nn.MultiheadAttention(64, 4, bias=bias, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 21, 64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(21) if is_causal else None
    ref = theirs(x, x, x, need_weights=False, attn_mask=mask, is_causal=is_causal)[0]
    torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)


def test_multihead_self_attention_dropout_only_in_training():
    m = fasttx.nn.MultiheadSelfAttention(32, 2, dropout=0.5)
    x = torch.randn(2, 9, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(0)
    assert torch.equal(a, m(x)) and not torch.equal(a, m(x))


def test_multihead_self_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        fasttx.nn.MultiheadSelfAttention(30, 4)
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 32\)"):
        fasttx.nn.MultiheadSelfAttention(32, 4)(torch.randn(2, 3, 31))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multihead_self_attention_gradients_match_torch_module(device, backend, dtype):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    ours = fasttx.nn.MultiheadSelfAttention(64, 4, is_causal=True, device=device, dtype=dtype)
    theirs = torch.nn.MultiheadAttention(64, 4, batch_first=True, device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 21, 64, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(21, device=device, dtype=dtype)
    with fasttx.use_backend(backend):
        ours(x).backward(grad)
    theirs(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0].backward(grad)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=4e-2, atol=4e-2)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs.get_parameter(name).grad, **tol, msg=name)


def test_split_heads_takes_the_cpu_kernels_packed_gradients_in_place():
    """The CPU backward writes grad_q, grad_k, grad_v of a split QKV tensor as the parts of one packed
    tensor, which split_heads' backward hands on as the QKV gradient; any other gradients are copied
    into that layout. Both give autograd's own split gradient."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx.nn.attention import _packed, split_heads
    torch.manual_seed(0)
    b, t, h, d = 2, 9, 3, 16
    qkv = torch.randn(b, t, 3 * h * d)
    q, k, v = split_heads(qkv, h)
    out, lse = fasttx.backends.extension().attention_fwd_cpu(q, k, v, None, True, 0.25, 0.0, 0, 0)
    grads = fasttx.backends.extension().attention_bwd_cpu(torch.randn_like(out), q, k, v, out, lse, None, True, 0.25, 0.0, 0, 0)
    packed = _packed(grads, b, t, h, d)
    assert packed is not None and packed.data_ptr() == grads[0].data_ptr()
    assert _packed(tuple(g.contiguous() for g in grads), b, t, h, d) is None
    for given in (grads, tuple(g.contiguous() for g in grads), (grads[0], None, grads[2])):
        leaf = qkv.clone().requires_grad_()
        theirs = qkv.clone().requires_grad_()
        ours_qkv = split_heads(leaf, h)
        theirs_qkv = theirs.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        for views in (ours_qkv, theirs_qkv):
            torch.autograd.backward([x for x, g in zip(views, given) if g is not None],
                                    [g for g in given if g is not None])
        assert torch.equal(leaf.grad, theirs.grad)


def test_triton_refuses_a_mask_head_past_2_31_elements():
    """The Triton kernels offset a head's mask rows in int32: past 2^31 elements they say so, and auto
    mode moves on. Meta tensors: no memory, checked on a CPU."""
    from types import SimpleNamespace

    from fasttx.ops.attention import IMPLEMENTATIONS
    triton_impl = {impl.backend: impl for impl in IMPLEMENTATIONS}["triton"]
    q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 1, 46400, 64))
    big = torch.empty(1, 1, 46400, 46400, device="meta")
    assert "2^31 or more" in triton_impl.why_not(q, q, q, big)
    assert triton_impl.why_not(q, q, q, big[..., :46000, :]) is None  # 46000 rows of 46400: under 2^31
    assert triton_impl.why_not(q, q, q, torch.empty(1, 1, 1, 46400, device="meta").expand(1, 1, 46400, 46400)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float_mask_past_2_31_elements_per_head(backend):
    """A (Tq, Tk) float mask of one head with more than 2^31 elements: the triton backend refuses it
    (its offsets are int32), the cuda backend must get it right, and so must auto mode. Only the
    rows past 2^31 are checked, against their own float64 reference, so that no (Tq, Tk) float64
    scores are ever held."""
    skip_unless_runnable("cuda", backend)
    T, D, tail = 46400, 64, 128  # rows past 2^31 / T = 46282 hold offsets beyond int32
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.zeros(T, T, device="cuda")
    mask[-tail:, : T // 2] = float("-inf")  # the last rows may only see the second half of the keys
    if backend == "triton":
        with fasttx.use_backend("triton"), pytest.raises(fasttx.BackendUnavailableError, match="2\\^31 or more"):
            fasttx.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        backend = "auto"
    with fasttx.use_backend(backend):
        out = fasttx.scaled_dot_product_attention(q, k, v, attn_mask=mask)[..., -tail:, :]
    tail_mask = mask[-tail:]
    del mask
    truth = F.scaled_dot_product_attention(q[..., -tail:, :].double(), k.double(), v.double(), attn_mask=tail_mask.double())
    same_dtype = F.scaled_dot_product_attention(q[..., -tail:, :], k, v, attn_mask=tail_mask.to(q.dtype))
    assert_within_torch_error(out, truth, same_dtype, factor=2, what=f"{backend} rows past 2^31 mask elements")


@pytest.mark.gpu
def test_cuda_dropout_follows_the_cuda_generator():
    """torch.cuda.manual_seed governs CUDA dropout, as it governs torch's own; the CPU generator does not."""
    if not torch.cuda.is_available():
        pytest.skip("GPU test (rung e): no CUDA device on this machine")
    q, k, v = _qkv(1, 2, 2, 33, 33, 16, "cuda")
    outs = []
    for cpu_seed in (1, 2):
        torch.manual_seed(cpu_seed)
        torch.cuda.manual_seed(5)
        outs.append(fasttx.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    torch.cuda.manual_seed(6)
    outs.append(fasttx.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.gpu
def test_dropout_refuses_cuda_graph_capture():
    """A capture would fix one seed, and every replay would drop the same scores: refused, clearly."""
    if not torch.cuda.is_available():
        pytest.skip("GPU test (rung e): no CUDA device on this machine")
    q, k, v = _qkv(1, 2, 2, 33, 33, 16, "cuda")
    fasttx.scaled_dot_product_attention(q, k, v)  # warm up outside the capture
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(graph):
                fasttx.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
