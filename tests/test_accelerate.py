"""fasttx.accelerate(): routed calls give torch's answers on fasttx's ops; everything else is torch's own."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fasttx
from bench.accelerate_nanogpt import GPT, GPTConfig
from fasttx import backends
from fasttx.patching import accelerate as accelerate_module
from tests.tolerance import assert_within_torch_error, rounding_atol

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16]


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU test (rung e): no CUDA device on this machine")
    if device == "cpu" and backends.machine_reasons()["cpu"] is not None:
        pytest.fail(f"the cpu backend is unavailable: {backends.machine_reasons()['cpu']}")


def _stack_depth():
    return torch._C._len_torch_function_stack()


def _gemm_routed(device, dtype):
    """Whether F.linear goes to fasttx's GEMM here: CPU float32, where the extension enables it."""
    ext = backends.extension()
    return device == "cpu" and dtype == torch.float32 and ext is not None and ext.onednn_fp32_gemm_enabled()


# ---- each routed function: torch's answer, values and gradients ---------------------------

def _cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    target = torch.randint(0, 29, (11,), generator=g)
    target[3] = -1
    target = target.to(device)
    mask = (torch.rand(7, 7, generator=g) > 0.3).to(device)
    mask[:, 0] = True
    return {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, (17,), w, b, 1e-5), (r(3, 5, 17), r(17), r(17))),
        "layer_norm_module": (None, (r(3, 5, 17),)),  # torch.nn.LayerNorm, which calls F.layer_norm
        "rms_norm": (lambda x, w: F.rms_norm(x, (17,), w), (r(3, 5, 17), r(17))),
        "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        (r(2, 3, 7, 16), r(2, 3, 7, 16), r(2, 3, 7, 16))),
        "sdpa_mask_scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
                            (r(2, 3, 7, 16), r(2, 3, 7, 16), r(2, 3, 7, 16))),
        "sdpa_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                     (r(2, 4, 7, 16), r(2, 2, 7, 16), r(2, 2, 7, 16))),
        "cross_entropy": (lambda x: F.cross_entropy(x, target, ignore_index=-1), (r(11, 29),)),
        "cross_entropy_sum": (lambda x: F.cross_entropy(x, target.clamp(min=0), reduction="sum"), (r(11, 29),)),
        "linear": (lambda x, w, b: F.linear(x, w, b), (r(3, 5, 17), r(13, 17), r(13))),
    }


_ROUTE_OF = {"layer_norm": "layer_norm", "layer_norm_module": "layer_norm", "rms_norm": "rms_norm",
             "sdpa_causal": "scaled_dot_product_attention", "sdpa_mask_scale": "scaled_dot_product_attention",
             "sdpa_gqa": "scaled_dot_product_attention", "cross_entropy": "cross_entropy",
             "cross_entropy_sum": "cross_entropy", "linear": "linear"}


def _run(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_ROUTE_OF))
def test_routed_call_gives_torchs_answer(case, dtype, device):
    _skip_without(device)
    fn, inputs = _cases(device, dtype)[case]
    if fn is None:
        module = torch.nn.LayerNorm(17, device=device, dtype=dtype)
        with torch.no_grad():
            module.weight.normal_(), module.bias.normal_()
        fn = module  # its parameters' gradients add up over the runs: the input's gradient is compared
    name = _ROUTE_OF[case]
    expect_routed = _gemm_routed(device, dtype) if name == "linear" else True
    torch_out, torch_grads = _run(fn, inputs)
    with fasttx.accelerate() as acc:
        out, grads = _run(fn, inputs)
    assert acc.routed[name] == (1 if expect_routed else 0), acc.report()
    assert acc.passed[name] == (0 if expect_routed else 1), acc.report()
    truth_out, truth_grads = _run(_in_double(fn), [t.double() for t in inputs])
    assert_within_torch_error(out, truth_out, torch_out, atol=rounding_atol(truth_out, dtype))
    for i, (grad, torch_grad, truth) in enumerate(zip(grads, torch_grads, truth_grads)):
        assert_within_torch_error(grad, truth, torch_grad, factor=3.0, atol=rounding_atol(truth, dtype),
                                  what=f"grad of input {i}")


def _in_double(fn):
    if isinstance(fn, torch.nn.Module):
        return copy.deepcopy(fn).double()

    def run(*inputs):
        return fn(*inputs).double()
    return run


def test_routed_call_runs_fasttxs_op_without_a_mode(monkeypatch):
    """The routed op is fasttx's, and sees no function mode (so it keeps its eager fast path),
    also inside nested contexts."""
    seen = []
    real = accelerate_module._fasttx_layer_norm

    def probe(*args):
        seen.append(torch._C._is_torch_function_mode_enabled())
        return real(*args)
    monkeypatch.setattr(accelerate_module, "_fasttx_layer_norm", probe)
    x = torch.randn(4, 8)
    with fasttx.accelerate():
        F.layer_norm(x, (8,))
        with fasttx.accelerate():
            F.layer_norm(x, (8,))
    assert seen == [False, False]


# ---- autocast, no_grad, torch.func, torch.compile -------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_autocast_gives_torchs_dtypes_and_values(device):
    _skip_without(device)
    dtype = torch.bfloat16
    for case in ("layer_norm", "rms_norm", "sdpa_causal", "cross_entropy", "linear"):
        fn, inputs = _cases(device, torch.float32)[case]
        with torch.autocast(device, dtype=dtype):
            torch_out, torch_grads = _run(fn, inputs)
            with fasttx.accelerate() as acc:
                out, grads = _run(fn, inputs)
        name = _ROUTE_OF[case]
        assert acc.routed[name] == (0 if name == "linear" else 1), (case, acc.report())  # linear: ATen's bf16
        assert out.dtype == torch_out.dtype, case
        torch.testing.assert_close(out, torch_out, atol=2e-2, rtol=2e-2, msg=case)
        for grad, torch_grad in zip(grads, torch_grads):
            assert grad.dtype == torch_grad.dtype, case
            torch.testing.assert_close(grad, torch_grad, atol=3e-2, rtol=3e-2, msg=case)


def test_no_grad_and_torch_func():
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    with torch.no_grad(), fasttx.accelerate() as acc:
        y = F.layer_norm(x, (8,), w)
    assert not y.requires_grad and acc.routed["layer_norm"] == 1

    def f(x):
        return F.layer_norm(x, (8,), w).pow(3).sum()
    with fasttx.accelerate() as acc:
        g = torch.func.grad(f)(x)
    assert acc.routed["layer_norm"] == 1
    torch.testing.assert_close(g, torch.func.grad(f)(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_inside_the_context():
    """Under torch.compile the calls are the compiler's: the context does not break the compile
    (fullgraph) and the compiled code gives torch's answer."""
    x, w = torch.randn(3, 8), torch.randn(8)

    def f(x):
        return F.layer_norm(x, (8,), w).sin()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with fasttx.accelerate():
        out = compiled(x)
    torch.testing.assert_close(out, f(x))
    assert _stack_depth() == 0


# ---- what passes through to torch ------------------------------------------------------

class _Sub(torch.Tensor):
    pass


def _pass_through_cases():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 9, generator=g), torch.randint(0, 9, (6,), generator=g)
    q, weight = torch.randn(1, 2, 5, 8, generator=g), torch.rand(9, generator=g)
    return {
        "cross_entropy weight": ("cross_entropy", lambda: F.cross_entropy(x, t, weight=weight)),
        "cross_entropy label_smoothing": ("cross_entropy", lambda: F.cross_entropy(x, t, label_smoothing=0.1)),
        "cross_entropy probabilities": ("cross_entropy", lambda: F.cross_entropy(x, x.softmax(-1))),
        "cross_entropy 3-D": ("cross_entropy", lambda: F.cross_entropy(x.view(2, 9, 3), t.view(2, 3) % 3)),
        "cross_entropy legacy reduce": ("cross_entropy", lambda: F.cross_entropy(x, t, reduce=False)),
        "sdpa float32 mask, bfloat16 query": ("scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(
            q.bfloat16(), q.bfloat16(), q.bfloat16(), torch.zeros(5, 5))),
        "sdpa mask that requires grad": ("scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(
            q, q, q, torch.zeros(5, 5, requires_grad=True))),
        "layer_norm of a subclass": ("layer_norm", lambda: F.layer_norm(x.as_subclass(_Sub), (9,))),
        "layer_norm meta": ("layer_norm", lambda: F.layer_norm(x.to("meta"), (9,))),
        "linear float64": ("linear", lambda: F.linear(x.double(), x.double())),
        "linear bfloat16": ("linear", lambda: F.linear(x.bfloat16(), x.bfloat16())),
    }


@pytest.mark.parametrize("case", list(_pass_through_cases()))
def test_unsupported_arguments_pass_through(case):
    name, call = _pass_through_cases()[case]
    expected = call()
    with fasttx.accelerate() as acc:
        out = call()
    assert type(out) is type(expected) and out.dtype == expected.dtype and out.shape == expected.shape
    if out.device.type != "meta":
        assert torch.equal(out, expected), case  # torch's own function ran: the very same result
    assert acc.routed[name] == 0 and acc.passed[name] == 1, acc.report()
    assert sum(acc.reasons[name].values()) == 1


def test_errors_are_torchs():
    x = torch.randn(4, 8)
    bad_target = torch.tensor([0, 1, 2, 40])
    calls = {  # the call, and whether it reaches the mode (a bad keyword fails in F's own Python first)
        "normalized_shape": (lambda: F.layer_norm(x, (7,)), 1),
        "target out of range": (lambda: F.cross_entropy(x, bad_target), 1),
        "key of another head_dim": (lambda: F.scaled_dot_product_attention(x[None], x[None, :, :4], x[None]), 1),
        "weight of another dtype": (lambda: F.layer_norm(x, (8,), torch.ones(8, dtype=torch.float64)), 1),
        "unknown keyword": (lambda: F.layer_norm(x, (8,), bogus=1), 0),
    }
    for case, (call, seen) in calls.items():
        with pytest.raises(Exception) as outside:
            call()
        with fasttx.accelerate() as acc, pytest.raises(Exception) as inside:
            call()
        assert type(inside.value) is type(outside.value) and str(inside.value) == str(outside.value), case
        assert sum(acc.routed.values()) == 0 and sum(acc.passed.values()) == seen, (case, acc.report())
        assert not seen or "fasttx refused it" in acc.report(), (case, acc.report())


# ---- the context itself: options, nesting, exceptions, decorator, report --------------------

def test_ops_option():
    x, t = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    for ops in (["cross_entropy"], [F.cross_entropy], "cross_entropy"):
        with fasttx.accelerate(ops=ops) as acc:
            F.layer_norm(x, (8,))
            F.cross_entropy(x, t)
        assert acc.ops == ("cross_entropy",)
        assert dict(acc.routed) == {"cross_entropy": 1} and not acc.passed
    with pytest.raises(ValueError, match="ops must name"):
        fasttx.accelerate(ops=["gelu"])
    assert fasttx.accelerate(F.rms_norm).ops == ("rms_norm",)
    with pytest.raises(TypeError, match="with the parentheses"):
        @fasttx.accelerate
        def forgot(x):
            return x
    assert fasttx.accelerate().ops == tuple(accelerate_module.ROUTES)


def test_nested_contexts():
    x, t = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with fasttx.accelerate() as outer:
        with fasttx.accelerate(ops=["cross_entropy"]) as inner:
            assert _stack_depth() == 2
            F.layer_norm(x, (8,))   # not inner's: passes on to outer, which routes it
            F.cross_entropy(x, t)   # inner's; fasttx's own calls inside it reach neither
        F.layer_norm(x, (8,))
        assert _stack_depth() == 1
    assert _stack_depth() == 0
    assert dict(inner.routed) == {"cross_entropy": 1} and not inner.passed
    assert dict(outer.routed) == {"layer_norm": 2} and not outer.passed


def test_exception_inside_restores_state():
    x = torch.randn(4, 8)
    acc = fasttx.accelerate()
    with pytest.raises(KeyError):
        with acc:
            F.layer_norm(x, (8,))
            raise KeyError("boom")
    assert _stack_depth() == 0
    F.layer_norm(x, (8,))  # outside again: not seen
    assert acc.routed["layer_norm"] == 1
    with acc:  # and the same object works again
        F.layer_norm(x, (8,))
    assert acc.routed["layer_norm"] == 2 and _stack_depth() == 0


def test_decorator_and_report():
    acc = fasttx.accelerate()

    @acc
    def norm(x, depth=0):
        y = F.layer_norm(x, (8,))
        return norm(y, depth + 1) if depth < 2 else y  # re-entered while active: fine

    x = torch.randn(4, 8)
    torch.testing.assert_close(norm(x), F.layer_norm(F.layer_norm(F.layer_norm(x, (8,)), (8,)), (8,)))
    norm(x)
    assert acc.routed["layer_norm"] == 6 and _stack_depth() == 0
    with acc:
        F.cross_entropy(x, torch.tensor([0, 1, 2, 3]), label_smoothing=0.2)
    text = acc.report()
    assert "6 call(s) routed" in text and "layer_norm: 6 routed" in text
    assert "cross_entropy: 0 routed, 1 passed to torch" in text and "label_smoothing" in text
    assert "no call" in fasttx.accelerate().report()


# ---- a model with nanoGPT's structure trains the same inside the context ------------------

@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_nanogpt_structure_trains_the_same(autocast):
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)
    torch.manual_seed(0)
    models = [GPT(config), GPT(config)]
    models[1].load_state_dict(models[0].state_dict())
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1  # ignore_index, as nanoGPT's padding
    acc = fasttx.accelerate()
    losses = []
    for model, context in zip(models, (None, acc)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for _ in range(4):
            with acc if context else torch.enable_grad():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    _, loss = model(idx, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            run.append(loss.item())
        losses.append(run)
    steps = 4
    assert acc.routed["layer_norm"] == steps * (2 * config.n_layer + 1)
    assert acc.routed["scaled_dot_product_attention"] == steps * config.n_layer
    assert acc.routed["cross_entropy"] == steps
    if not autocast:
        assert acc.routed["linear"] == (steps * (4 * config.n_layer + 1) if _gemm_routed("cpu", torch.float32) else 0)
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=tol, atol=tol)
    assert losses[0][-1] < losses[0][0]  # it trains


def test_under_another_function_mode():
    """A mode of another kind below (torch.device is one) stays on and sees fasttx's calls; the op then
    takes its registered path and still gives torch's answer."""
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    want = F.layer_norm(x, (8,), w)
    with torch.device("cpu"), fasttx.accelerate() as acc:
        assert _stack_depth() == 2
        got = F.layer_norm(x, (8,), w)
        got.sum().backward()
    assert acc.routed["layer_norm"] == 1 and _stack_depth() == 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w.grad, torch.autograd.grad(want.sum(), w)[0])


def test_without_a_kernel_here_calls_pass_through(monkeypatch):
    """Where only fasttx's torch reference could serve (no extension, no GPU), torch's own function is
    the faster one: the call passes, and says why. A backend the user forces is still honoured."""
    x = torch.randn(4, 8)
    no_kernels = {"cpu": "not built", "cuda": "not built", "triton": "not installed", "torch": None}
    accelerate_module._no_kernel_reason.cache_clear()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(backends, "machine_reasons", lambda: dict(no_kernels))
            with fasttx.accelerate() as acc:
                F.layer_norm(x, (8,))
            with fasttx.use_backend("torch"), fasttx.accelerate() as forced:
                F.layer_norm(x, (8,))
    finally:
        accelerate_module._no_kernel_reason.cache_clear()
    assert acc.passed["layer_norm"] == 1 and "no fasttx CPU kernel on this machine (not built)" in acc.report()
    assert forced.routed["layer_norm"] == 1
