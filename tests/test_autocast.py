"""Under torch.autocast("cpu", dtype=torch.bfloat16) every fasttx op takes and returns the dtypes
that the torch code it replaces does, with close values, and fp32 leaves get fp32 gradients."""
import pytest
import torch
import torch.nn.functional as F

import fasttx

torch.manual_seed(0)
N = 64


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


# (name, inputs, fasttx op, the torch code it replaces); the ops return one tensor or the first of a tuple.
CASES = [
    ("layer_norm fp32 x", lambda: (_leaf(5, N), _leaf(N), _leaf(N)),
     lambda x, w, b: fasttx.layer_norm(x, (N,), w, b), lambda x, w, b: F.layer_norm(x, (N,), w, b)),
    ("layer_norm bf16 x, fp32 params", lambda: (_leaf(5, N, dtype=torch.bfloat16), _leaf(N), _leaf(N)),
     lambda x, w, b: fasttx.layer_norm(x, (N,), w, b), lambda x, w, b: F.layer_norm(x, (N,), w, b)),
    ("add_layer_norm bf16 branch, fp32 residual", lambda: (_leaf(5, N, dtype=torch.bfloat16), _leaf(5, N), _leaf(N)),
     lambda x, r, w: fasttx.add_layer_norm(x, r, (N,), w)[0], lambda x, r, w: F.layer_norm(x + r, (N,), w)),
    ("rms_norm bf16 x, fp32 weight", lambda: (_leaf(5, N, dtype=torch.bfloat16), _leaf(N)),
     lambda x, w: fasttx.rms_norm(x, (N,), w), lambda x, w: F.rms_norm(x, (N,), w)),
    ("add_rms_norm bf16 branch, fp32 residual", lambda: (_leaf(5, N, dtype=torch.bfloat16), _leaf(5, N), _leaf(N)),
     lambda x, r, w: fasttx.add_rms_norm(x, r, (N,), w)[0], lambda x, r, w: F.rms_norm(x + r, (N,), w)),
    ("bias_gelu bf16 x, fp32 bias", lambda: (_leaf(5, N, dtype=torch.bfloat16), _leaf(N)),
     lambda x, b: fasttx.bias_gelu(x, b), lambda x, b: F.gelu(x + b)),
    ("gelu_ffn fp32", lambda: (_leaf(5, N), _leaf(96, N), _leaf(96), _leaf(N, 96), _leaf(N)),
     lambda x, w1, b1, w2, b2: fasttx.gelu_ffn(x, w1, b1, w2, b2),
     lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)),
    ("scaled_dot_product_attention fp32", lambda: (_leaf(2, 3, 17, 16), _leaf(2, 3, 17, 16), _leaf(2, 3, 17, 16)),
     lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name,make,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_autocast_dtypes_values_and_gradients(backend, name, make, ours, theirs):
    inputs = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = theirs(*inputs)
        with fasttx.use_backend(backend):
            got = ours(*inputs)
    assert got.dtype == want.dtype, f"{name}: fasttx returns {got.dtype}, torch {want.dtype}"
    torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)
    grad = torch.randn(want.shape, dtype=want.dtype)
    want_grads = torch.autograd.grad(want, inputs, grad)
    got_grads = torch.autograd.grad(got, inputs, grad)
    for i, (g, w, x) in enumerate(zip(got_grads, want_grads, inputs)):
        assert g.dtype == x.dtype == w.dtype, f"{name}: grad {i} is {g.dtype}, input {x.dtype}"
        torch.testing.assert_close(g.float(), w.float(), rtol=0.05, atol=0.05 * w.abs().max().item())


def test_outside_autocast_mismatched_dtypes_still_raise():
    # What torch refuses (a bfloat16 weight for an fp32 x; a residual in another dtype); a bf16 x with
    # fp32 weights torch takes, and so does fasttx (tests/test_norm_param_dtypes.py).
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16 but x has torch.float32"):
        fasttx.layer_norm(torch.randn(2, N), (N,), torch.ones(N, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="must match"):
        fasttx.add_layer_norm(torch.randn(2, N, dtype=torch.bfloat16), torch.randn(2, N), (N,))
    with pytest.raises(TypeError, match="add_rms_norm: residual has dtype torch.float32 but x has torch.bfloat16"):
        fasttx.add_rms_norm(torch.randn(2, N, dtype=torch.bfloat16), torch.randn(2, N), (N,))


# ---- the norms' mixed-precision CPU kernels -------------------------------------------------------

def _count_casts(fn):
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::_to_copy", "aten::copy_"))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("order", ["branch first", "residual first"])
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_reads_a_narrow_branch_beside_an_fp32_residual_without_casts(op, low, order):
    """Under autocast, add_layer_norm / add_rms_norm(bf16 branch, fp32 residual, out_dtype=bf16) is the
    promoted computation (the same sum, y rounded once), made with no cast: the kernel reads the branch
    as it is, writes y in bf16, reads y's bf16 gradient and writes the branch's gradient in bf16."""
    torch.manual_seed(0)
    branch, residual = _leaf(4, 3, 77, dtype=low), _leaf(4, 3, 77)
    w, b = _leaf(77), _leaf(77)
    leaves = (branch, residual, w, b) if op == "add_layer_norm" else (branch, residual, w)
    norm = (lambda x, r, **kw: fasttx.add_layer_norm(x, r, (77,), w, b, **kw)) if op == "add_layer_norm" else \
        (lambda x, r, **kw: fasttx.add_rms_norm(x, r, (77,), w, **kw))
    grad_y, grad_s = torch.randn(4, 3, 77).to(low), torch.randn(4, 3, 77)
    pair = (branch, residual) if order == "branch first" else (residual, branch)

    def fused():
        with torch.autocast("cpu", dtype=low):
            y, s = norm(*pair, out_dtype=low)
        return (y, s), torch.autograd.grad((y, s), leaves, (grad_y, grad_s))

    def promoted():  # what it replaces: promote, norm in fp32, cast y
        y, s = norm(branch.float(), residual)
        y = y.to(low)
        return (y, s), torch.autograd.grad((y, s), leaves, (grad_y, grad_s))

    (outs, grads), (want, want_grads) = fused(), promoted()
    assert outs[0].dtype == low and outs[1].dtype == torch.float32
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[1], want[1])
    for g, e, leaf in zip(grads, want_grads, leaves):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-5, atol=1e-5)
    assert _count_casts(fused) == 0


def test_layer_norm_out_dtype_under_autocast_makes_no_cast():
    x, w, b = _leaf(2, 9, N), _leaf(N), _leaf(N)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fasttx.layer_norm(x, (N,), w, b, out_dtype=torch.bfloat16)
        y.backward(torch.ones_like(y))
    assert _count_casts(step) == 0 and x.grad.dtype == torch.float32
