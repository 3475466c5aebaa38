"""cross_entropy (an LM's loss over (tokens, vocab) logits) against PyTorch on every backend it has."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.cross_entropy import cross_entropy_float, cross_entropy_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

BACKENDS = device_backend_params()
SHAPES = [(1, 1), (7, 7), (77, 1000), (5, 1537), (3, 50257), (0, 11)]


def _run(fn, x, target, grad, **kw):
    x = x.detach().requires_grad_()
    loss = fn(x, target, **kw)
    loss.backward(grad)
    return loss.detach(), x.grad


def check_against_reference(backend, x, target, reduction="mean", ignore_index=-100):
    """fasttx.cross_entropy on ``backend`` against the float64 reference; returns (loss, grad)."""
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    grad = torch.rand(x.shape[0] if reduction == "none" else (), dtype=torch.float64, device=x.device) + 0.5
    run = lambda fn, dt: _run(fn, x.to(dt), target, grad.to(dt), **kw)
    with fasttx.use_backend(backend):
        got = run(fasttx.cross_entropy, x.dtype)
    truth, torch_out = run(cross_entropy_ref, torch.float64), run(cross_entropy_ref, x.dtype)
    for name, o, t, p in zip(("loss", "grad"), got, truth, torch_out):
        assert_within_torch_error(o, t, p, factor=2 if name == "loss" else 3, what=f"{backend} {x.dtype} {name}")
    return got


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, reduction, shape):
    skip_unless_runnable(device, backend)
    if shape[0] == 0 and reduction == "mean":
        pytest.skip("the mean over no targets is 0/0 = NaN in both; covered by test_all_ignored_is_nan")
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 4).to(dtype)
    target = torch.randint(0, shape[1], shape[:1], device=device)
    target[::3] = -100  # ignored rows
    if shape[0] and (target == -100).all():
        target[-1] = 0
    check_against_reference(backend, x, target, reduction)


@pytest.mark.parametrize("device,backend", device_backend_params(cuda_backends=("torch",)))  # the GPU kernels: fp32 down
def test_float64_gradcheck(device, backend):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(5, 13, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([3, -1, 0, 12, 7], device=device)
    with fasttx.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: fasttx.cross_entropy(t, target, ignore_index=-1), (x,))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_extreme_logits_and_other_ignore_index(device, backend):
    skip_unless_runnable(device, backend)
    x = torch.tensor([[1e4, 0.0, -1e4], [-30.0, 50.0, 80.0], [0.0, 0.0, 0.0]], device=device)
    target = torch.tensor([1, 2, 5], device=device)
    check_against_reference(backend, x, target, reduction="sum", ignore_index=5)


def test_all_ignored_is_nan_as_in_torch():
    x = torch.randn(3, 5)
    target = torch.full((3,), -100)
    assert torch.isnan(fasttx.cross_entropy(x, target)) and torch.isnan(F.cross_entropy(x, target))


def test_backward_is_deterministic_and_threads_do_not_matter():
    torch.manual_seed(0)
    x = torch.randn(64, 3001)
    target = torch.randint(0, 3001, (64,))
    grads = []
    for threads in (1, 2, 1):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            grads.append(_run(fasttx.cross_entropy, x, target, torch.tensor(1.0))[1])
        finally:
            torch.set_num_threads(old)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_dtypes_follow_torch_and_autocast():
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    target = torch.randint(0, 10, (4,))
    assert fasttx.cross_entropy(x, target).dtype == F.cross_entropy(x, target).dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        assert fasttx.cross_entropy(x, target).dtype == F.cross_entropy(x, target).dtype == torch.float32
    assert cross_entropy_float(x, target).dtype == torch.float32  # Hugging Face's logits.float() contract


def test_saves_no_vocab_sized_output():
    x = torch.randn(16, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (16,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fasttx.cross_entropy(x, target)
    big = [tuple(t.shape) for t in saved if t.numel() >= x.numel()]
    assert big == [tuple(x.shape)], f"only the logits themselves may be kept, got {big}"


def test_forced_gpu_backend_on_cpu_tensors_raises_and_says_why():
    for backend in ("triton", "cuda"):
        with fasttx.use_backend(backend), pytest.raises(fasttx.BackendUnavailableError, match=backend):
            fasttx.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 3), torch.tensor([0, 3])), ValueError, r"target\[1\] = 3 is not a class index in \[0, 3\)"),
    ((torch.randn(2, 3), torch.tensor([0, -5])), ValueError, r"target\[1\] = -5"),
    ((torch.randn(2, 3), torch.tensor([0.0, 1.0])), TypeError, "int64"),
    ((torch.randn(2, 3), torch.tensor([0, 1, 2])), ValueError, r"shape \(2,\)"),
    ((torch.randn(2, 3, 4), torch.tensor([0, 1])), ValueError, r"\(N, C\) logits"),
    ((torch.randn(2, 0), torch.tensor([0, 1])), ValueError, "at least one class"),
    ((torch.randint(0, 3, (2, 3)), torch.tensor([0, 1])), TypeError, "input must be float"),
    (([[0.0, 1.0]], torch.tensor([0])), TypeError, "input must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        fasttx.cross_entropy(*args)


def test_the_kernel_checks_targets_itself():
    # Under torch.compile the Python check is skipped (it would break the graph): the kernel's holds.
    with pytest.raises(RuntimeError, match=r"target\[1\] = 7 is not a class index in \[0, 3\)"):
        fasttx.backends.extension().cross_entropy_fwd_cpu(torch.randn(2, 3), torch.tensor([0, 7]), -100)


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fasttx.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="batchmean")


def test_compiles_fullgraph():
    x = torch.randn(6, 17, requires_grad=True)
    target = torch.randint(0, 17, (6,))
    fn = torch.compile(lambda a, t: fasttx.cross_entropy(a, t), fullgraph=True, backend="aot_eager")
    loss = fn(x, target)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(x, target))
    grad = x.grad.clone()
    x.grad = None
    F.cross_entropy(x, target).backward()
    torch.testing.assert_close(grad, x.grad)


def test_opcheck():
    x = torch.randn(4, 9)
    target = torch.tensor([1, -100, 8, 0])
    torch.library.opcheck(torch.ops.fasttx.cross_entropy_forward, (x, target, -100, "auto"))


def test_the_target_check_never_waits_for_a_gpu():
    """Off the CPU the check is a device-side assert: no bad.any() in Python, which would synchronise
    every GPU call and break CUDA-graph capture. Meta tensors have no data, so any Python-side look
    at the targets raises, as it would wait on a GPU."""
    from fasttx.ops.cross_entropy import _check

    logits = torch.empty(4, 10, device="meta")
    target = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError):
        bool(((target < 0) | (target >= 10)).any())  # what the check must not do
    _check(logits, target, -100, "mean")


@pytest.mark.gpu
def test_a_bad_target_on_a_gpu_fails_the_device_side_assert():
    if not torch.cuda.is_available():
        pytest.skip("GPU test (rung e): no CUDA device on this machine")
    # A device-side assert poisons the CUDA context, so it runs in its own process.
    script = ("import torch, fasttx\n"
              "loss = fasttx.cross_entropy(torch.randn(2, 3, device='cuda'), torch.tensor([0, 7], device='cuda'))\n"
              "torch.cuda.synchronize()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, "a target of 7 among 3 classes passed on the GPU"
    assert "neither a class index" in out.stderr or "device-side assert" in out.stderr, out.stderr[-2000:]
