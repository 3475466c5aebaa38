"""fasttx.nn.TransformerBlock against torch.nn.TransformerEncoderLayer with the same weights: outputs,
every parameter's gradient, masks, state_dicts both ways, torch.compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.nn import TransformerBlock

D_MODEL, N_HEADS, D_HIDDEN = 64, 4, 96


def _pair(norm_first, activation, dtype=torch.float32):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HIDDEN, dropout=0.0, activation=activation,
                                           batch_first=True, norm_first=norm_first, dtype=dtype)
    ours = TransformerBlock(D_MODEL, N_HEADS, D_HIDDEN, activation=activation, norm_first=norm_first, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(module, x, grad, run):
    x = x.detach().requires_grad_()
    module.zero_grad()
    out = run(module, x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _assert_same(ref_run, our_run, ref, ours, x, rtol=1e-5, atol=2e-5):
    grad = torch.randn_like(x)
    want_out, want_dx, want = _grads(ref, x, grad, ref_run)
    got_out, got_dx, got = _grads(ours, x, grad, our_run)
    torch.testing.assert_close(got_out, want_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_dx, want_dx, rtol=rtol, atol=atol)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_matches_torch_encoder_layer(backend, norm_first, activation):
    ref, ours = _pair(norm_first, activation)
    x = torch.randn(3, 37, D_MODEL)
    with fasttx.use_backend(backend):
        _assert_same(lambda m, t: m(t), lambda m, t: m(t), ref, ours, x)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_causal_matches_a_causal_src_mask(norm_first):
    ref, ours = _pair(norm_first, "gelu")
    ours.self_attn.is_causal = True
    t = 29
    causal = torch.nn.Transformer.generate_square_subsequent_mask(t)
    x = torch.randn(2, t, D_MODEL)
    _assert_same(lambda m, s: m(s, src_mask=causal, is_causal=True), lambda m, s: m(s), ref, ours, x)


def test_key_padding_mask_matches():
    ref, ours = _pair(False, "gelu")  # BERT's layout: post-LN, padded batch
    x = torch.randn(3, 21, D_MODEL)
    lengths = torch.tensor([21, 13, 5])
    padded = torch.arange(21)[None, :] >= lengths[:, None]  # torch: True = ignore
    keep = (~padded)[:, None, None, :]                      # ours: True = attend, (B, 1, 1, T)

    def only_real_rows(out):  # torch leaves the padded query rows' values unspecified-ish; compare the real ones
        return out.masked_fill(padded[..., None], 0.0)
    _assert_same(lambda m, s: only_real_rows(m(s, src_key_padding_mask=padded)),
                 lambda m, s: only_real_rows(m(s, keep)), ref, ours, x)


def test_state_dict_loads_both_ways():
    ref, ours = _pair(True, "gelu")
    assert list(ours.state_dict()) == list(ref.state_dict())
    torch.manual_seed(1)
    fresh = TransformerBlock(D_MODEL, N_HEADS, D_HIDDEN)
    fresh.load_state_dict(ref.state_dict())
    back = torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HIDDEN, batch_first=True)
    back.load_state_dict(fresh.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_default_hidden_is_four_times_d_model():
    block = TransformerBlock(32, 2)
    assert block.linear1.weight.shape == (128, 32) and block.linear2.weight.shape == (32, 128)


def test_bf16_close_to_fp32():
    ref, ours = _pair(True, "gelu")
    x = torch.randn(2, 40, D_MODEL)
    want = ours(x)
    got = ours.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    block = TransformerBlock(D_MODEL, N_HEADS, D_HIDDEN, dropout=0.3)
    x = torch.randn(2, 16, D_MODEL)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    torch.manual_seed(1)
    a = block(x)
    torch.manual_seed(2)
    b = block(x)
    assert not torch.equal(a, b)


# Inductor (the default) once; aot_eager, which traces the same graph without generating code, for the other.
@pytest.mark.parametrize("norm_first,compiler", [(True, "inductor"), (False, "aot_eager")], ids=["pre_ln", "post_ln"])
def test_torch_compile_fullgraph_matches_eager(norm_first, compiler):
    _, ours = _pair(norm_first, "gelu")
    x = torch.randn(2, 24, D_MODEL)
    compiled = torch.compile(ours, fullgraph=True, backend=compiler)  # raises on any graph break
    _assert_same(lambda m, t: m(t), lambda m, t: compiled(t), ours, ours, x)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(activation="swish"), ValueError, "activation must be one of"),
    (dict(dropout=1.5), ValueError, "dropout must be in"),
    (dict(d_hidden=0), ValueError, "d_hidden must be positive"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        TransformerBlock(D_MODEL, N_HEADS, **kwargs)


def test_bad_input_shape_is_named():
    block = TransformerBlock(D_MODEL, N_HEADS)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq_len, 64\), got \(2, 5, 32\)"):
        block(torch.randn(2, 5, 32))


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_deferred_chains_blocks_as_forward_does(autocast):
    """Blocks chained through forward_deferred (each residual add made by the next block's norm) give
    forward's outputs and gradients bit for bit: the norm kernel makes the same fp32 add."""
    torch.manual_seed(0)
    blocks = [TransformerBlock(32, 4, 64, norm_first=True, is_causal=True) for _ in range(3)]
    params = [p for b in blocks for p in b.parameters()]
    x = torch.randn(2, 7, 32, requires_grad=True)

    def run(deferred):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if deferred:
                h, branch = x, None
                for b in blocks:
                    h, branch = b.forward_deferred(h, branch)
                out = h + branch
            else:
                out = x
                for b in blocks:
                    out = b(out)
        return out, torch.autograd.grad(out.float().square().sum(), [x] + params)

    (out, grads), (want, want_grads) = run(True), run(False)
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w)


def test_forward_deferred_checks_its_inputs():
    block, x = TransformerBlock(16, 2, norm_first=True), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"pending must have x's shape \(2, 5, 16\), got \(2, 4, 16\)"):
        block.forward_deferred(x, torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"pending must have shape \(batch, seq_len, 16\), got \(5, 16\)"):
        block.forward_deferred(x, torch.randn(5, 16))
    with pytest.raises(RuntimeError, match="only pre-LN blocks"):
        TransformerBlock(16, 2, norm_first=False).forward_deferred(x, None)
