"""linear_cross_entropy (an LM head's linear + cross-entropy, in chunks of tokens) against PyTorch."""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.linear_cross_entropy import linear_cross_entropy_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import DEFAULT_ATOL, assert_within_torch_error

# the module: fasttx.ops.linear_cross_entropy is the function
lce_module = importlib.import_module("fasttx.ops.linear_cross_entropy")

BACKENDS = device_backend_params()
# (tokens, d, vocab): odd and prime sizes, V = 1, GPT-2's vocabulary; N = 0.
SHAPES = [(13, 9, 1), (29, 17, 1009), (6, 5, 50257), (0, 7, 11)]


@contextlib.contextmanager
def chunk_rows(rows):
    """Force the rows per chunk, so that a few tokens cross several chunk edges."""
    old, lce_module._CHUNK_ROWS = lce_module._CHUNK_ROWS, rows
    try:
        yield
    finally:
        lce_module._CHUNK_ROWS = old


def _inputs(n, d, v, dtype, device, bias=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(device)
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 2).to(device)
    b = (torch.randn(v, generator=g, dtype=torch.float64)).to(device) if bias else None
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::4] = -100
    return hidden, weight, b, target


def _run(fn, tensors, target, grad, **kw):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    loss = fn(leaves[0], leaves[1], target, leaves[2], **kw)
    loss.backward(grad)
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def check_against_reference(backend, hidden, weight, bias, target, dtype, **kw):
    """fasttx.linear_cross_entropy on ``backend`` in ``dtype`` against the float64 reference and torch's own
    error in ``dtype``: FlashAttention's rule (2x for the loss, 3x for the gradients)."""
    n = target.numel()
    grad = torch.rand(n if kw.get("reduction") == "none" else (), dtype=torch.float64, device=hidden.device) + 0.5
    tensors = (hidden, weight, bias)
    run = lambda fn, dt: _run(fn, [t.to(dt) if t is not None else None for t in tensors], target, grad.to(dt), **kw)
    with fasttx.use_backend(backend):
        got = run(fasttx.linear_cross_entropy, dtype)
    truth, torch_out = run(linear_cross_entropy_ref, torch.float64), run(linear_cross_entropy_ref, dtype)
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    # The cpu kernel's vectorized exp is within an ulp, not exact at 0: at V = 1 torch's loss is exactly 0
    # and ours is a few 1e-7 a row, summed over the rows; so the loss's atol grows by an fp32 ulp a row.
    loss_atol = DEFAULT_ATOL[dtype] + n * torch.finfo(torch.float32).eps
    for name, o, t, p in zip(names, got, truth, torch_out):
        assert_within_torch_error(o, t, p, factor=2 if name == "loss" else 3, what=f"{backend} {dtype} {name}",
                                  atol=loss_atol if name == "loss" else None)
    return got


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, reduction, shape):
    skip_unless_runnable(device, backend)
    if shape[0] == 0 and reduction == "mean":
        pytest.skip("the mean over no targets is NaN in both; see test_all_ignored_is_nan")
    hidden, weight, _, target = _inputs(*shape, torch.float64, device)
    with chunk_rows(4):  # several chunks, a short last one
        check_against_reference(backend, hidden, weight, None, target, dtype, reduction=reduction)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_chunk_matches_reference(device, backend, dtype):
    """All tokens in one chunk (the default size here): grad_weight is one GEMM in the weight's dtype,
    with no fp32 accumulator."""
    skip_unless_runnable(device, backend)
    hidden, weight, bias, target = _inputs(29, 17, 1009, torch.float64, device, bias=True)
    assert lce_module.chunk_rows(29, 1009) >= 29
    check_against_reference(backend, hidden, weight, bias, target, dtype, reduction="mean")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bias_label_smoothing_softcap(device, backend, dtype, reduction):
    skip_unless_runnable(device, backend)
    hidden, weight, bias, target = _inputs(23, 11, 307, torch.float64, device, bias=True, scale=3.0)
    with chunk_rows(5):
        for kw in (dict(label_smoothing=0.1), dict(softcap=2.5), dict(label_smoothing=0.3, softcap=4.0)):
            check_against_reference(backend, hidden, weight, bias, target, dtype, reduction=reduction, **kw)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_large_offsets_and_other_ignore_index(device, backend):
    """Logits ~1e4 sharing a large offset: m - z_t cancels it, where lse - z_t would round log_sum away."""
    skip_unless_runnable(device, backend)
    hidden, weight, bias, target = _inputs(9, 6, 37, torch.float64, device, bias=True)
    bias = bias + 1e4
    target[target == -100] = 5
    target[2] = 7
    check_against_reference(backend, hidden, weight, bias, target, torch.float32, reduction="sum", ignore_index=7)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_and_batched_hidden(device, backend):
    """hidden as a transposed view of (B, T, d), and a column-sliced one; target of hidden's leading shape."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    base = torch.randn(7, 3, 10, device=device)
    hidden = base.transpose(0, 1)[..., :9]  # (3, 7, 9), neither contiguous nor row-strided by d
    weight = torch.randn(31, 9, device=device)
    target = torch.randint(0, 31, (3, 7), device=device)
    with fasttx.use_backend(backend), chunk_rows(4):
        for reduction in ("mean", "none"):
            h = hidden.detach().requires_grad_()
            got = fasttx.linear_cross_entropy(h, weight, target, reduction=reduction)
            got.sum().backward()
            h_ref = hidden.detach().requires_grad_()
            want = linear_cross_entropy_ref(h_ref, weight, target, reduction=reduction)
            want.sum().backward()
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(h.grad, h_ref.grad)


def test_all_ignored_is_nan_as_in_torch():
    hidden, weight, _, _ = _inputs(5, 4, 9, torch.float32, "cpu")
    target = torch.full((5,), -100)
    h = hidden.float().requires_grad_()
    loss = fasttx.linear_cross_entropy(h, weight.float(), target)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(hidden, weight, target))
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))  # as torch's: no target, no gradient


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_float64_gradcheck_and_gradgradcheck(backend):
    torch.manual_seed(0)
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3, -1, 0, 6, 2])
    with fasttx.use_backend(backend), chunk_rows(2):
        for reduction in ("mean", "none"):
            fn = lambda h, w, b: fasttx.linear_cross_entropy(h, w, target, b, ignore_index=-1, reduction=reduction,
                                                             label_smoothing=0.1, softcap=2.0)
            assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
            assert torch.autograd.gradgradcheck(fn, (hidden, weight, bias))


def test_torch_func_grad_is_the_reference():
    hidden, weight, _, target = _inputs(6, 4, 11, torch.float64, "cpu")
    got = torch.func.grad(lambda w: fasttx.linear_cross_entropy(hidden, w, target))(weight)
    want = torch.func.grad(lambda w: linear_cross_entropy_ref(hidden, w, target))(weight)
    torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph():
    hidden, weight, bias, target = _inputs(10, 8, 33, torch.float64, "cpu", bias=True)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()

    def fn(h, w, b):
        return fasttx.linear_cross_entropy(h, w, target, b, label_smoothing=0.1) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _run(lambda h, w, t, b: compiled(h, w, b), (hidden, weight, bias), target, torch.tensor(1.0))
    want = _run(lambda h, w, t, b: fn(h, w, b), (hidden, weight, bias), target, torch.tensor(1.0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_autocast_runs_the_linear_in_bf16_and_the_loss_in_fp32():
    hidden, weight, bias, target = _inputs(12, 16, 41, torch.float32, "cpu", bias=True)
    tensors = [t.float() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(fasttx.linear_cross_entropy, tensors, target, torch.tensor(1.0))
        want = _run(lambda h, w, t, b: F.cross_entropy(F.linear(h, w, b), t), tensors, target, torch.tensor(1.0))
    one = torch.tensor(1.0, dtype=torch.float64)
    truth = _run(linear_cross_entropy_ref, [t.double() for t in tensors], target, one)
    for name, g, w, t in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want, truth):
        assert g.dtype == w.dtype, name  # the loss fp32, the fp32 leaves' gradients fp32
        assert_within_torch_error(g, t, w, factor=2 if name == "loss" else 3, what=f"autocast {name}")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_deterministic(backend):
    hidden, weight, bias, target = _inputs(37, 19, 257, torch.float32, "cpu", bias=True)
    tensors = [t.float() for t in (hidden, weight, bias)]
    with fasttx.use_backend(backend), chunk_rows(8):
        first = _run(fasttx.linear_cross_entropy, tensors, target, torch.tensor(1.0))
        second = _run(fasttx.linear_cross_entropy, tensors, target, torch.tensor(1.0))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_onednn_gemm_path(dtype, monkeypatch):
    """The cpu backend's optional fp32 GEMMs on cpu/matmul.h's oneDNN path (off by default)."""
    monkeypatch.setattr(lce_module, "_CPU_ONEDNN_GEMM", True)
    hidden, weight, bias, target = _inputs(29, 17, 1009, torch.float64, "cpu", bias=True)
    with chunk_rows(4):
        check_against_reference("cpu", hidden, weight, bias, target, dtype, reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backward_twice_through_a_retained_graph(backend):
    """The first backward scales the gradients stored by the forward in place; a second one through the same
    graph (retain_graph=True) must recompute them, not scale them again."""
    hidden, weight, bias, target = _inputs(11, 6, 23, torch.float64, "cpu", bias=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with fasttx.use_backend(backend), chunk_rows(4):
        loss = fasttx.linear_cross_entropy(*leaves[:2], target, leaves[2], label_smoothing=0.1)
        loss.backward(torch.tensor(3.0, dtype=torch.float64), retain_graph=True)
        loss.backward(torch.tensor(-0.5, dtype=torch.float64))
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = linear_cross_entropy_ref(*ref_leaves[:2], target, ref_leaves[2], label_smoothing=0.1)
    ref.backward(torch.tensor(2.5, dtype=torch.float64))
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad (or with no input requiring a gradient) the chunks run their logits GEMM only."""
    hidden, weight, _, target = _inputs(9, 5, 13, torch.float32, "cpu")
    calls = []
    real = lce_module._chunks
    monkeypatch.setattr(lce_module, "_chunks", lambda *a: calls.append(a[7]) or real(*a))
    h, w = hidden.float().requires_grad_(), weight.float()
    with torch.no_grad():
        fasttx.linear_cross_entropy(h, w, target)
    fasttx.linear_cross_entropy(h.detach(), w, target)
    assert calls == [None, None]  # grad_rows: no gradient computed
    fasttx.linear_cross_entropy(h, w, target)
    assert calls[-1] is not None


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_never_allocates_the_logits(backend):
    """No (tokens, vocab) tensor, nor any as large, is allocated: torch's profiler records every CPU
    allocation (the C++ kernels' included) with its size; the peak of live bytes during forward+backward,
    above the inputs and the gradients, stays within a few chunk buffers, where eager allocates 3+ N x V."""
    n, d, v, rows = 256, 8, 1009, 16
    hidden, weight, _, target = _inputs(n, d, v, torch.float32, "cpu")
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()

    def peak_bytes(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(h, w, target).backward()
        h.grad = w.grad = None
        live = peak = 0
        allocations = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        for e in sorted(allocations, key=lambda e: e.start_ns()):
            live += e.nbytes()  # negative for a free
            peak = max(peak, live)
        return peak

    with fasttx.use_backend(backend), chunk_rows(rows):
        ours = peak_bytes(fasttx.linear_cross_entropy)
    eager = peak_bytes(lambda h, w, t: F.cross_entropy(h @ w.t(), t))
    grads = (n * d + v * d) * 4
    logits = n * v * 4
    assert eager - grads >= 2 * logits  # the measure sees eager's logits
    # the chunk's logits buffer and, in the torch reference's row pass, a few fp32 temporaries of its size
    assert ours - grads <= (2 if backend == "cpu" else 4) * rows * v * 4 + 64 * 1024, (ours, grads, rows * v * 4)
    assert ours - grads <= 0.1 * (eager - grads)


def test_module_matches_linear_then_cross_entropy_and_loads_lm_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 29, bias=False)
    module = fasttx.nn.LinearCrossEntropy(12, 29, label_smoothing=0.05)
    module.load_state_dict(head.state_dict())
    hidden, target = torch.randn(2, 5, 12), torch.randint(0, 29, (2, 5))
    torch.testing.assert_close(module(hidden, target),
                               F.cross_entropy(head(hidden).flatten(0, 1), target.flatten(), label_smoothing=0.05))
    assert "out_features=29" in repr(module)
    with pytest.raises(ValueError, match="reduction"):
        fasttx.nn.LinearCrossEntropy(12, 29, reduction="avg")
    with pytest.raises(ValueError, match="out_features"):
        fasttx.nn.LinearCrossEntropy(12, 0)


def _bf16_grad_weight(backend, rows, tokens, d, vocab, seed=0):
    """(fasttx's, the float64 truth's, torch's own bf16) grad_weight over chunks of ``rows`` tokens."""
    hidden, weight, bias, target = _inputs(tokens, d, vocab, torch.float64, "cpu", bias=True, seed=seed)
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    with fasttx.use_backend(backend), chunk_rows(rows):
        got = _run(fasttx.linear_cross_entropy, [t.bfloat16() for t in (hidden, weight, bias)], target, one)
    truth = _run(linear_cross_entropy_ref, (hidden, weight, bias), target, torch.tensor(1.0, dtype=torch.float64))
    own = _run(linear_cross_entropy_ref, [t.bfloat16() for t in (hidden, weight, bias)], target, one)
    return got[2], truth[2], own[2]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_weight_grad_accumulated_in_bf16(backend, monkeypatch):
    """_FP32_WEIGHT_GRAD = False (no fp32 V x d accumulator): one bf16 rounding per chunk, so within
    sqrt(chunks) x the rule's 3x of torch's error."""
    monkeypatch.setattr(lce_module, "_FP32_WEIGHT_GRAD", False)
    got, truth, own = _bf16_grad_weight(backend, rows=4, tokens=29, d=17, vocab=1009)
    assert_within_torch_error(got, truth, own, factor=3 * 8 ** 0.5, what="grad_weight")  # 8 chunks


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bf16_weight_grad_in_bf16_slices_summed_in_fp32(backend, monkeypatch):
    """The CPU's bf16 grad_weight: each chunk's share a bf16 GEMM in slices of the vocabulary, summed in
    fp32 across 16 chunks, stays within the rule's 3x of eager's single bf16 GEMM."""
    monkeypatch.setattr(lce_module, "_CPU_BF16_SLICE_ELEMENTS", 40 * 64)  # 40-row slices: 26 of them, one short
    got, truth, own = _bf16_grad_weight(backend, rows=16, tokens=256, d=64, vocab=1009, seed=3)
    assert_within_torch_error(got, truth, own, factor=3, what="grad_weight")


def test_module_compiles_fullgraph():
    torch.manual_seed(0)
    module = fasttx.nn.LinearCrossEntropy(16, 37, bias=True, softcap=5.0)
    hidden, target = torch.randn(3, 5, 16), torch.randint(0, 37, (3, 5))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (module, compiled):
        module.zero_grad()
        leaf = hidden.clone().requires_grad_()
        loss = fn(leaf, target)
        loss.backward()
        results.append([loss.detach(), leaf.grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w[:, :3], t), ValueError, r"weight must have shape \(vocab, 4\)"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, t, torch.zeros(5)), ValueError, r"bias must have shape \(7,\)"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, t.int()), TypeError, "target must hold int64"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, t[:2]), ValueError, r"target must have shape \(3,\)"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w.double(), t), TypeError, "weight has dtype torch.float64"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, t, softcap=-1.0), ValueError, "softcap must be"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w, torch.tensor([0, 7, 1])), ValueError,
     r"target\[1\] = 7 is not a class index in \[0, 7\)"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h.long(), w, t), TypeError, "hidden must be float"),
    (lambda h, w, t: fasttx.linear_cross_entropy(h, w[:0], t), ValueError, "at least one class"),
])
def test_bad_input_is_named(call, error, match):
    h, w, t = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 6, -100])
    with pytest.raises(error, match=match) as info:
        call(h, w, t)
    assert "linear_cross_entropy" in str(info.value)
