"""fasttx.nn's attention and Transformer modules, and GPT, with no batch or no tokens; and sizes <= 0.

torch.nn.MultiheadAttention and TransformerEncoderLayer take a batch of 0
or a sequence of 0 and return an empty output, with zero gradients for their
parameters; fasttx's modules must give the same. A size of 0 or less at
construction is refused with a ValueError that names the argument.
"""
import pytest
import torch

from fasttx.models.gpt import GPT, GPTConfig
from fasttx.nn import GELUFFN, MultiheadSelfAttention, TransformerBlock

D_MODEL, HEADS, VOCAB, BLOCK = 16, 2, 32, 8
EMPTY_SHAPES = [(0, 3), (2, 0), (0, 0)]
SHAPE_IDS = ["batch 0", "seq 0", "both 0"]


def _attention_pair(is_causal):
    torch.manual_seed(0)
    ours = MultiheadSelfAttention(D_MODEL, HEADS, is_causal=is_causal)
    ref = torch.nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _block_pair(norm_first, is_causal):
    torch.manual_seed(0)
    ours = TransformerBlock(D_MODEL, HEADS, 4 * D_MODEL, "gelu", 0.0, norm_first=norm_first, is_causal=is_causal)
    ref = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, 0.0, activation="gelu", batch_first=True,
                                           norm_first=norm_first)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _run(module, x, forward):
    """forward's output and the gradients of x and of every parameter, through a backward."""
    x = x.detach().requires_grad_()
    out = forward(module, x)
    out.backward(torch.ones_like(out))
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _assert_same(got, want):
    (out, grads), (want_out, want_grads) = got, want
    assert out.shape == want_out.shape and out.dtype == want_out.dtype
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads):
        assert g is not None and g.shape == w.shape and torch.equal(g, w)  # empty, or zeros


def _torch_mask(mask, seq):
    """fasttx's bool mask (True = attend) as torch's (True = masked out); a causal mask where None."""
    if mask is None:
        return torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return ~mask if mask.dtype == torch.bool else mask


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_multihead_self_attention_matches_torch(shape, mask):
    ours, ref = _attention_pair(mask == "causal")
    x = torch.randn(*shape, D_MODEL)
    seq = shape[1]
    ours_mask = {None: None, "causal": None, "bool": torch.ones(seq, seq, dtype=torch.bool),
                 "float": torch.zeros(seq, seq)}[mask]
    ref_mask = None if mask is None else _torch_mask(ours_mask, seq)
    got = _run(ours, x, lambda m, t: m(t, ours_mask))
    want = _run(ref, x, lambda m, t: m(t, t, t, attn_mask=ref_mask, need_weights=False)[0])
    _assert_same(got, want)


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_transformer_block_matches_torch(shape, norm_first, is_causal):
    ours, ref = _block_pair(norm_first, is_causal)
    x = torch.randn(*shape, D_MODEL)
    got = _run(ours, x, lambda m, t: m(t))
    want = _run(ref, x, lambda m, t: m(t, _torch_mask(None, t.shape[1]) if is_causal else None))
    _assert_same(got, want)


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=SHAPE_IDS)
def test_transformer_block_under_autocast_and_no_grad(shape):
    ours, ref = _block_pair(True, True)
    x = torch.randn(*shape, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(ours, x, lambda m, t: m(t))
        want = _run(ref, x, lambda m, t: m(t, _torch_mask(None, t.shape[1])))
    _assert_same(got, want)
    with torch.no_grad():
        assert ours(x).shape == ref(x).shape == x.shape


def _gpt(kernels):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=HEADS, d_model=D_MODEL,
                         kernels=kernels))


def _gpt_run(model, idx):
    logits, loss = model(idx, idx)
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=SHAPE_IDS)
def test_gpt_matches_plain_pytorch(shape):
    """The fused GPT against its eager path (plain PyTorch): empty logits, the mean cross-entropy of no
    tokens (NaN, as F.cross_entropy gives) and zero gradients."""
    idx = torch.zeros(shape, dtype=torch.long)
    logits, loss, grads = _gpt_run(_gpt("fused"), idx)
    want_logits, want_loss, want_grads = _gpt_run(_gpt("eager"), idx)
    assert logits.shape == want_logits.shape == (*shape, VOCAB)
    assert loss.dtype == want_loss.dtype and loss.isnan() and want_loss.isnan()
    for g, w in zip(grads, want_grads):
        assert g is not None and torch.equal(g, w) and not g.any()
    with torch.no_grad():
        assert _gpt("fused")(idx)[0].shape == want_logits.shape


@pytest.mark.parametrize("kernels", ["fused", "eager"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no cache"])
def test_gpt_generates_for_no_sequences(kernels, use_cache):
    out = _gpt(kernels).generate(torch.zeros(0, 3, dtype=torch.long), 2, use_cache=use_cache)
    assert out.shape == (0, 5) and out.dtype == torch.long


@pytest.mark.parametrize("args,name", [
    ((0, HEADS), "d_model"), ((-D_MODEL, HEADS), "d_model"), ((D_MODEL, 0), "n_heads"), ((D_MODEL, -1), "n_heads"),
    ((16.0, HEADS), "d_model"), ((D_MODEL, True), "n_heads"),
])
def test_multihead_self_attention_refuses_sizes(args, name):
    if isinstance(args[0], int) and isinstance(args[1], int) and not isinstance(args[1], bool):
        with pytest.raises(ValueError):  # torch refuses them too
            torch.nn.MultiheadAttention(*args)
    with pytest.raises(ValueError, match=rf"fasttx.nn.MultiheadSelfAttention: {name} must be positive.*got"):
        MultiheadSelfAttention(*args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(d_model=0), "d_model"), (dict(d_model=-8), "d_model"), (dict(n_heads=0), "n_heads"),
    (dict(n_heads=-2), "n_heads"), (dict(d_hidden=0), "d_hidden"), (dict(d_hidden=-4), "d_hidden"),
])
def test_transformer_block_refuses_sizes(kwargs, name):
    args = dict(d_model=D_MODEL, n_heads=HEADS) | kwargs
    with pytest.raises(ValueError, match=rf"fasttx.nn.TransformerBlock: {name} must be positive.*got"):
        TransformerBlock(**args)


def test_multiple_of_heads_is_still_required():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be a multiple of n_heads \(4\)"):
        MultiheadSelfAttention(10, 4)


@pytest.mark.parametrize("args,name", [((0, 64), "d_model"), ((16, 0), "d_hidden"), ((16, -64), "d_hidden")])
def test_gelu_ffn_module_refuses_sizes(args, name):
    with pytest.raises(ValueError, match=rf"fasttx.nn.GELUFFN: {name} must be positive"):
        GELUFFN(*args)


@pytest.mark.parametrize("field", ["d_model", "n_head", "n_layer", "vocab_size", "block_size"])
def test_gpt_config_refuses_sizes(field):
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"GPTConfig: {field} must be a positive int"):
            GPTConfig(**{field: bad})
