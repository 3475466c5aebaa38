"""NaN, +inf and -inf go through every op as they go through PyTorch: same pattern, outputs and gradients.

A kernel that clamps or max-es a NaN away turns it into a finite number, and the user's training run goes
on with a wrong loss instead of stopping at the first NaN (issue 24: the AVX-512 exp clamped NaN to -138, so
attention took a NaN key for a masked one). Each case puts one non-finite value at a chosen position of one
input (or of the output gradient), runs forward and backward on the cpu backend, and compares where the
results are NaN, +inf and -inf with where PyTorch's are, in the same dtype.

Where PyTorch's own pattern is an accident of how it arranges the arithmetic, the test says so and compares
what is not: an inf put into a norm or a GELU gives inf - inf or inf * 0 in some gradient entries, NaN or
+-inf depending on the order of operations (torch's own GELU gives NaN at +inf in fp32 and +inf in fp64), so
there only the places that are not finite must agree.
"""
import pytest
import torch
import torch.nn.functional as F

import fasttx

from backend_params import skip_unless_runnable

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _cpu_backend():
    skip_unless_runnable("cpu", "cpu")
    with fasttx.use_backend("cpu"):
        yield


def _run(fn, inputs, grad_out, differentiable):
    """Forward and backward of fn(*inputs); returns the output(s) and the gradients of the first
    `differentiable` inputs (the rest, masks and targets, take none)."""
    leaves = [t.detach().clone().requires_grad_(i < differentiable) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs[0], grad_out)
    return [o.detach() for o in outs] + [t.grad for t in leaves[:differentiable]]


EXACT = (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf))
NOT_FINITE = (("not finite", lambda t: ~torch.isfinite(t)),)


def _same_pattern(ours, theirs, what, kinds=EXACT, where=None):
    """where(i, t): the part of result i to compare (default all of it)."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        name = "output" if i == 0 else f"result {i}"
        if where is not None:
            a, b = where(i, a), where(i, b)
        for kind, test in kinds:
            mine, torchs = test(a), test(b)
            assert torch.equal(mine, torchs), (
                f"{what}: {name} is {kind} at {mine.nonzero().tolist()[:8]} ({int(mine.sum())} in all), "
                f"torch at {torchs.nonzero().tolist()[:8]} ({int(torchs.sum())} in all)")


def _compare(ours_fn, torch_fn, inputs, grad_out, what, differentiable=None, exact=True, where=None):
    n = len(inputs) if differentiable is None else differentiable
    _same_pattern(_run(ours_fn, inputs, grad_out, n), _run(torch_fn, inputs, grad_out, n), what,
                  EXACT if exact else NOT_FINITE, where)


def _poisoned(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- attention --------------------------------------------------------------------------

def _torch_math_sdpa(*args, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


def _attention(math=False, **kw):
    """fasttx's SDPA and torch's: its math backend, or its default (the CPU flash kernel). The math backend
    is the reference where it can be: torch's flash kernel returns a query row of NaN scores finite, and
    on AVX2 its exp turns NaN into a finite number (so a +inf score gives lse +inf, not NaN), the very
    fault of issue 24. The math backend adds the causal mask, though, so NaN + -inf spreads a NaN past the
    diagonal: causal cases take the flash kernel."""
    theirs = _torch_math_sdpa if math else F.scaled_dot_product_attention
    return (lambda q, k, v, *m: fasttx.scaled_dot_product_attention(q, k, v, *m, **kw),
            lambda q, k, v, *m: theirs(q, k, v, *m, **kw))


# (B, H, Tq, Tk, D): one key block, and several (the forward's are 512 keys, the backward's 128). Causal runs
# on the first only: past the diagonal P is 0, and 0 * NaN spreads a NaN into keys that the row cannot see,
# as far as the kernel's blocks reach (all of them in torch's math, one block in a flash kernel).
ATTENTION_SHAPES = [(1, 2, 8, 8, 16), (1, 1, 5, 600, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["q", "k", "v", "k_late", "grad_out"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_attention_inputs(dtype, value, where, is_causal, shape):
    B, H, Tq, Tk, D = shape
    if is_causal and Tk > 8:
        pytest.skip("causal runs on one key block (see ATTENTION_SHAPES)")
    if is_causal and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("no torch reference: its flash kernel's AVX2 exp turns NaN finite (this issue's fault)")
    if where == "q" and is_causal and dtype != torch.float64:
        pytest.skip("no torch reference: its flash kernel keeps a NaN query row finite, and its math backend "
                    "adds the causal mask, so NaN + -inf spreads past the diagonal")
    q, k, v = _randn(B, H, Tq, D, dtype=dtype, seed=1), _randn(B, H, Tk, D, dtype=dtype, seed=2), \
        _randn(B, H, Tk, D, dtype=dtype, seed=3)
    grad = _randn(B, H, Tq, D, dtype=dtype, seed=4)
    at = {"q": (0, H - 1, 2, 5), "k": (0, 0, 3, 5), "v": (0, H - 1, 4, 7), "k_late": (0, 0, Tk - 3, 1),
          "grad_out": (0, 0, 1, 2)}[where]
    x = VALUES[value]
    if where == "q":
        q = _poisoned(q, at, x)
    elif where in ("k", "k_late"):
        k = _poisoned(k, at, x)
    elif where == "v":
        v = _poisoned(v, at, x)
    else:
        grad = _poisoned(grad, at, x)
    ours, theirs = _attention(math=not is_causal, is_causal=is_causal)
    # +-inf: which gradient entries are NaN and which +-inf depends on how the sums are arranged (flash's
    # delta = dO . O against the math path's sum P dP): there the places that are not finite must agree.
    _compare(ours, theirs, (q, k, v), grad, f"attention {dtype} {value} in {where}", differentiable=3,
             exact=value == "nan")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["nan", "+inf", "-inf", "-inf_row", "nan_in_masked_row", "-inf_row_nan_v"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_attention_float_mask(dtype, case, shape):
    B, H, Tq, Tk, D = shape
    q, k, v = _randn(B, H, Tq, D, dtype=dtype, seed=1), _randn(B, H, Tk, D, dtype=dtype, seed=2), \
        _randn(B, H, Tk, D, dtype=dtype, seed=3)
    mask = _randn(Tq, Tk, dtype=dtype, seed=5)
    if case in VALUES:
        mask[2, 3] = VALUES[case]
    else:
        mask[2] = -INF  # row 2 attends to nothing: 0 in torch
        if case == "nan_in_masked_row":
            mask[2, Tk - 1] = NAN
        elif case == "-inf_row_nan_v":
            v = _poisoned(v, (0, 0, 1, 3), NAN)
    ours, theirs = _attention(math=True)
    _compare(ours, theirs, (q, k, v, mask), _randn(B, H, Tq, D, dtype=dtype, seed=4),
             f"attention {dtype} mask {case}", differentiable=3)


def test_the_issues_example_nan_key():
    """issue 24: q, k, v (1, 1, 8, 16) with k[0, 0, 3, 5] = nan gave no NaN; torch gives 128."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    k[0, 0, 3, 5] = NAN
    assert int(F.scaled_dot_product_attention(q, k, v).isnan().sum()) == 128
    assert int(fasttx.scaled_dot_product_attention(q, k, v).isnan().sum()) == 128


# ---- softmax ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["x", "mask", "grad_out"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("cols", [7, 100], ids=str)
def test_softmax(dtype, value, where, is_causal, cols):
    if where == "mask" and is_causal:
        pytest.skip("a mask and is_causal together are refused (as torch's SDPA refuses them)")
    x = _randn(2, 2, 6, cols, dtype=dtype)
    grad = _randn(2, 2, 6, cols, dtype=dtype, seed=1)
    mask = None if where != "mask" else _randn(6, cols, dtype=dtype, seed=2)
    at = (1, 0, 4, 3)
    if where == "x":
        x = _poisoned(x, at, VALUES[value])
    elif where == "mask":
        mask = _poisoned(mask, at[2:], VALUES[value])
    else:
        grad = _poisoned(grad, at, VALUES[value])
    extra = () if mask is None else (mask,)
    ours = lambda x, *m: fasttx.softmax(x, 0.5, *m, is_causal=is_causal)
    theirs = lambda x, *m: fasttx.ops.softmax_ref(x, 0.5, *m, is_causal=is_causal)
    # Past the causal diagonal the gradient of x is 0 in torch (masked_fill's backward), and NaN here in a
    # row holding a NaN (the kernel is not told where the diagonal is; p = 0 times a NaN): the scores there
    # were never read, so the gradient is compared on and below the diagonal.
    below = torch.ones(6, cols, dtype=torch.bool).tril()
    _compare(ours, theirs, (x, *extra), grad, f"softmax {dtype} {value} in {where}", differentiable=1,
             where=(lambda i, t: t if i == 0 else t[..., below]) if is_causal else None)


# ---- cross_entropy ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["other", "target", "ignored_row"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("vocab", [10, 1000], ids=str)
def test_cross_entropy(dtype, value, where, reduction, vocab):
    logits = _randn(6, vocab, dtype=dtype)
    target = torch.tensor([3, 1, -100, 7, 0, 9])
    row = 2 if where == "ignored_row" else 4
    col = int(target[row]) if where == "target" else 5
    logits = _poisoned(logits, (row, col), VALUES[value])
    grad = torch.ones((), dtype=dtype) if reduction == "mean" else _randn(6, dtype=dtype, seed=1)
    ours = lambda x, t: fasttx.cross_entropy(x, t, reduction=reduction)
    theirs = lambda x, t: F.cross_entropy(x, t, reduction=reduction)
    _compare(ours, theirs, (logits, target), grad, f"cross_entropy {dtype} {value} at {where}", differentiable=1)


# ---- the norms --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["x", "residual", "weight", "bias", "grad_out"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("n", [24, 1000], ids=str)
def test_norms(dtype, value, where, op, n):
    if where == "residual" and not op.startswith("add_") or where == "bias" and "rms" in op:
        pytest.skip(f"{op} has no {where}")
    tensors = {"x": _randn(5, n, dtype=dtype), "residual": _randn(5, n, dtype=dtype, seed=1),
               "weight": _randn(n, dtype=dtype, seed=2), "bias": _randn(n, dtype=dtype, seed=3)}
    grad = _randn(5, n, dtype=dtype, seed=4)
    at = (3, 7) if where in ("x", "residual", "grad_out") else (7,)
    if where == "grad_out":
        grad = _poisoned(grad, at, VALUES[value])
    else:
        tensors[where] = _poisoned(tensors[where], at, VALUES[value])
    x, r, w, b = tensors["x"], tensors["residual"], tensors["weight"], tensors["bias"]
    if op == "layer_norm":
        ours, theirs = (lambda x, w, b: fn(x, (n,), w, b) for fn in (fasttx.layer_norm, F.layer_norm))
        inputs = (x, w, b)
    elif op == "add_layer_norm":
        ours = lambda x, r, w, b: fasttx.add_layer_norm(x, r, (n,), w, b)
        theirs = lambda x, r, w, b: fasttx.ops.add_layer_norm_ref(x, r, (n,), w, b)
        inputs = (x, r, w, b)
    elif op == "add_rms_norm":
        ours = lambda x, r, w: fasttx.add_rms_norm(x, r, (n,), w)
        theirs = lambda x, r, w: fasttx.ops.add_rms_norm_ref(x, r, (n,), w)
        inputs = (x, r, w)
    else:
        ours, theirs = (lambda x, w: fn(x, (n,), w) for fn in (fasttx.rms_norm, F.rms_norm))
        inputs = (x, w)
    _compare(ours, theirs, inputs, grad, f"{op} {dtype} {value} in {where}", exact=value == "nan")


# ---- GELU -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["x", "bias", "grad_out"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(dtype, value, where, approximate):
    x, bias, grad = _randn(4, 40, dtype=dtype), _randn(40, dtype=dtype, seed=1), _randn(4, 40, dtype=dtype, seed=2)
    if where == "x":
        x = _poisoned(x, (2, 33), VALUES[value])
    elif where == "bias":
        bias = _poisoned(bias, (5,), VALUES[value])
    else:
        grad = _poisoned(grad, (1, 3), VALUES[value])
    ours = lambda x, b: fasttx.bias_gelu(x, b, approximate)
    theirs = lambda x, b: F.gelu(x + b, approximate=approximate)
    _compare(ours, theirs, (x, bias), grad, f"bias_gelu {approximate} {dtype} {value} in {where}",
             exact=where == "grad_out" or value == "nan")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("where", ["x", "w1", "b1", "w2", "b2", "grad_out"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_gelu_ffn(dtype, value, where, activation):
    t = {"x": _randn(6, 16, dtype=dtype), "w1": _randn(40, 16, dtype=dtype, seed=1) / 4,
         "b1": _randn(40, dtype=dtype, seed=2), "w2": _randn(16, 40, dtype=dtype, seed=3) / 6,
         "b2": _randn(16, dtype=dtype, seed=4)}
    grad = _randn(6, 16, dtype=dtype, seed=5)
    at = {"x": (2, 5), "w1": (7, 3), "b1": (9,), "w2": (4, 11), "b2": (3,), "grad_out": (1, 2)}[where]
    if where == "grad_out":
        grad = _poisoned(grad, at, VALUES[value])
    else:
        t[where] = _poisoned(t[where], at, VALUES[value])
    ours = lambda x, w1, b1, w2, b2: fasttx.gelu_ffn(x, w1, b1, w2, b2, activation)
    theirs = lambda x, w1, b1, w2, b2: fasttx.ops.gelu_ffn_ref(x, w1, b1, w2, b2, activation)
    exact = value == "nan" or where in ("w2", "b2", "grad_out") or activation == "relu"
    _compare(ours, theirs, tuple(t.values()), grad, f"gelu_ffn {activation} {dtype} {value} in {where}",
             exact=exact)


# ---- a whole model ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("param", ["blocks.0.self_attn.in_proj_weight", "blocks.1.linear1.bias", "blocks.0.norm1.weight"])
def test_gpt_with_one_nan_weight_has_the_eager_models_nan_loss(dtype, param):
    """issue 24: a fused GPT with one NaN weight reported a finite loss where the eager one reported NaN."""
    from fasttx.models import GPT, GPTConfig
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=4, d_model=64, block_size=32)
    fused = GPT(GPTConfig(**config, kernels="fused")).to(dtype)
    eager = GPT(GPTConfig(**config, kernels="eager")).to(dtype)
    with torch.no_grad():
        dict(fused.named_parameters())[param].view(-1)[3] = NAN
    eager.load_state_dict(fused.state_dict())
    idx, targets = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    (logits_f, loss_f), (logits_e, loss_e) = fused(idx, targets), eager(idx, targets)
    assert torch.equal(logits_f.isnan(), logits_e.isnan())
    assert loss_f.isnan() and loss_e.isnan()
    loss_f.backward()
    loss_e.backward()
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        assert torch.equal(a.grad.isnan(), b.grad.isnan()), f"{name}.grad: NaN pattern differs from eager's"
