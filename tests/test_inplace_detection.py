"""In-place changes between forward and backward, inside fasttx's recompute regions.

TransformerBlock and the fused GPT save tensors under saved-tensor hooks
(fasttx/nn/recompute.py), and under hooks autograd no longer checks saved
tensors' versions: fasttx checks them itself. For every parameter and every
input of every module with a recompute region, modified in place after the
forward, backward must raise autograd's error, as the PyTorch module does;
where fasttx's backward never reads that tensor, it may instead give exactly
the gradients of an unmodified run. Never a gradient of some other function.

The legitimate uses around it must keep working: optimizer steps, several
forwards before their backwards, no_grad, and gradient checkpointing.
"""
import contextlib
import functools
import gc
import weakref

import pytest
import torch

from fasttx.models.gpt import GPT, GPTConfig
from fasttx.nn import LayerNorm, TransformerBlock
from fasttx.nn.recompute import recomputed_activations
from fasttx.ops.linear import linear

BATCH, SEQ, D_MODEL, HEADS, VOCAB = 2, 5, 16, 2, 32
INPLACE = "modified by an inplace operation"
RAISED = "raised"
BLOCK_INPUTS = ("x", "float mask", "bool mask")
GPT_INPUTS = ("idx", "targets")


def _modify(t: torch.Tensor) -> None:
    with torch.no_grad():
        if t.dtype == torch.bool:
            t.logical_not_()
        elif t.dtype == torch.long:
            t.mul_(0)  # still valid token ids
        else:
            t.add_(1.0)


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _backward(loss, leaves, target):
    """The gradients of leaves after target (None: nothing) is modified in place, or RAISED."""
    if target is not None:
        _modify(target)
    try:
        loss.float().sum().backward()
    except RuntimeError as e:
        assert INPLACE in str(e), str(e)
        return RAISED
    return [leaf.grad for leaf in leaves]


# ---- TransformerBlock, against torch.nn.TransformerEncoderLayer ----------------------------------

def _block(norm_first):
    torch.manual_seed(0)
    return TransformerBlock(D_MODEL, HEADS, 4 * D_MODEL, "gelu", 0.0, norm_first=norm_first)


def _encoder_layer(block):
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, 0.0, activation="gelu", batch_first=True,
                                             norm_first=block.norm_first)
    layer.load_state_dict(block.state_dict())
    return layer


def _block_inputs(name):
    torch.manual_seed(1)
    x = torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True)
    mask = None
    if name == "float mask":
        mask = torch.randn(SEQ, SEQ)
    elif name == "bool mask":
        mask = torch.rand(SEQ, SEQ) > 0.3
        mask.fill_diagonal_(True)  # True = attend: no row fully masked
    return x, mask


def _block_outcome(module, name, autocast, modify=True):
    x, mask = _block_inputs(name)
    if isinstance(module, torch.nn.TransformerEncoderLayer) and mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # torch's bool masks mark what is masked out
    with _autocast(autocast):
        out = module(x, mask)
    params = dict(module.named_parameters())
    target = params[name] if name in params else {"x": x, "float mask": mask, "bool mask": mask}[name]
    return _backward(out, [x, *params.values()], target if modify else None)


def _block_cases():
    names = [n for n, _ in _block(True).named_parameters()] + list(BLOCK_INPUTS)
    return [pytest.param(nf, ac, n, id=f"{'pre' if nf else 'post'}-LN-{'autocast' if ac else 'fp32'}-{n}")
            for nf in (True, False) for ac in (False, True) for n in names]


def _assert_refused_or_unchanged(got, clean, torch_got, what, unread=()):
    """got: fasttx's outcome; clean: its unmodified gradients; torch_got: PyTorch's outcome; unread: the
    tensors fasttx's backward never reads, where it need not raise when torch does."""
    if torch_got is RAISED and what not in unread:
        assert got is RAISED, f"{what}: torch raises, fasttx does not"
    if got is RAISED:
        return  # fasttx may keep tensors torch does not (its fused ops save other things) and refuse
    assert clean is not RAISED
    for g, c in zip(got, clean):  # not read in backward: then nothing may move, not one bit
        assert (g is None and c is None) or torch.equal(g, c), f"{what}: a silent wrong gradient"


@functools.cache
def _clean_block_grads(norm_first, autocast, inputs):
    return _block_outcome(_block(norm_first), inputs, autocast, modify=False)


@pytest.mark.parametrize("norm_first,autocast,name", _block_cases())
def test_transformer_block_refuses_or_is_unaffected(norm_first, autocast, name):
    got = _block_outcome(_block(norm_first), name, autocast)
    clean = _clean_block_grads(norm_first, autocast, name if name in BLOCK_INPUTS else "x")
    torch_got = _block_outcome(_encoder_layer(_block(norm_first)), name, autocast)
    # post-LN: norm2's output is the block's, saved by nothing inside it; the norm's backward needs no bias
    _assert_refused_or_unchanged(got, clean, torch_got, name, unread=() if norm_first else ("norm2.bias",))


def test_the_error_names_the_tensor():
    """The issue's example: linear2.weight changed after the forward gave an input gradient off by 1.4e3."""
    block = _block(True)
    x, _ = _block_inputs("x")
    out = block(x)
    _modify(block.linear2.weight)
    with pytest.raises(RuntimeError, match=r"one of the variables needed for gradient computation has been modified "
                                           r"by an inplace operation: \[torch.FloatTensor \[16, 64\]\] is at "
                                           r"version \d+; expected version \d+ instead\. fasttx"):
        out.sum().backward()


# ---- GPT, against its own eager path (plain PyTorch) ---------------------------------------------

def _gpt(kernels):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=2, n_head=HEADS, d_model=D_MODEL, kernels=kernels))


def _gpt_outcome(model, name, autocast, modify=True):
    torch.manual_seed(1)
    idx, targets = torch.randint(0, VOCAB, (BATCH, 8)), torch.randint(0, VOCAB, (BATCH, 8))
    with _autocast(autocast):
        loss = model(idx, targets)[1]
    params = dict(model.named_parameters())
    target = params[name] if name in params else {"idx": idx, "targets": targets}[name]
    return _backward(loss, list(params.values()), target if modify else None)


def _gpt_cases():
    names = [n for n, _ in _gpt("fused").named_parameters()] + list(GPT_INPUTS)
    return [pytest.param(ac, n, id=f"{'autocast' if ac else 'fp32'}-{n}") for ac in (False, True) for n in names]


@functools.cache
def _clean_gpt_grads(autocast):
    return _gpt_outcome(_gpt("fused"), "idx", autocast, modify=False)


@pytest.mark.parametrize("autocast,name", _gpt_cases())
def test_gpt_refuses_or_is_unaffected(autocast, name):
    got = _gpt_outcome(_gpt("fused"), name, autocast)
    clean = _clean_gpt_grads(autocast)
    torch_got = _gpt_outcome(_gpt("eager"), name, autocast)
    _assert_refused_or_unchanged(got, clean, torch_got, name)


# ---- a recomputed tensor itself -------------------------------------------------------------------

@pytest.mark.parametrize("consumer", ["mul", "linear"])
def test_a_recomputed_tensor_modified_in_place_raises(consumer):
    """A norm output saved by a later op is rebuilt in backward, not kept: a change to it must still be
    noticed, as autograd notices it without the region. The linear saves a view of it (its rows)."""
    norm, w = LayerNorm(D_MODEL), torch.randn(D_MODEL, D_MODEL, requires_grad=True)
    x = torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True)
    consume = {"mul": lambda y: y * w[0], "linear": lambda y: linear(y, w)}[consumer]
    for region in (contextlib.nullcontext, recomputed_activations):
        with region():
            y = norm(x)
            out = consume(y)
        _modify(y)
        with pytest.raises(RuntimeError, match=INPLACE):
            out.sum().backward()


# ---- what must keep working ------------------------------------------------------------------------

def _identity_hooks():
    # Outer saved-tensor hooks switch fasttx's off: the baseline keeps every tensor.
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _train(model, batches, hooks):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with hooks():
        for idx in batches:
            model(idx, idx)[1].backward()
            opt.step()  # modifies every parameter in place, after its backward
            opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_optimizer_steps_after_backward_are_unaffected():
    torch.manual_seed(2)
    batches = [torch.randint(0, VOCAB, (BATCH, 8)) for _ in range(3)]
    got = _train(_gpt("fused"), batches, contextlib.nullcontext)
    want = _train(_gpt("fused"), batches, _identity_hooks)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_several_forwards_then_their_backwards(norm_first):
    block = _block(norm_first)
    xs = [torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True) for _ in range(2)]
    outs = [block(x) for x in xs]
    for out in reversed(outs):
        out.sum().backward()
    for x in xs:
        want = torch.autograd.grad(block(x).sum(), x)[0]
        assert torch.equal(x.grad, want)


def test_modified_after_backward_then_a_second_backward_raises():
    """retain_graph: the first backward runs; a change before the second one is noticed, as autograd does."""
    block = _block(True)
    x, _ = _block_inputs("x")
    out = block(x)
    out.sum().backward(retain_graph=True)
    out.sum().backward(retain_graph=True)
    _modify(block.linear1.weight)
    with pytest.raises(RuntimeError, match=INPLACE):
        out.sum().backward()


def test_no_grad_forward_then_modify():
    block = _block(True)
    x, _ = _block_inputs("x")
    with torch.no_grad():
        want = block(x)
    _modify(block.linear2.weight)
    with torch.inference_mode():
        got = block(x)
    assert not torch.equal(got, want)  # the change is seen by the next forward, and nothing raised


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_is_unaffected(reentrant):
    def grads(run):
        block = _block(True)
        x, _ = _block_inputs("x")
        run(block, x).sum().backward()  # the reentrant form allows no autograd.grad
        return [x.grad, *(p.grad for p in block.parameters())]

    want = grads(lambda block, x: block(x))
    got = grads(lambda block, x: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_second_order_gradients_through_the_region_are_unaffected():
    """Kept tensors come back detached from the hooks; autograd must reattach them for create_graph."""
    results = []
    for region in (contextlib.nullcontext, recomputed_activations):
        torch.manual_seed(0)
        x, w = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
        with region():
            z = (x * w).sin() * x  # saves x (a leaf), w, and its own intermediate output
        g, = torch.autograd.grad(z.sum(), x, create_graph=True)
        (g ** 2).sum().backward()
        results.append((x.grad, w.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_a_forward_without_backward_frees_what_it_saved():
    """A node that saves its own output held it, and so itself, through the hooks: a cycle the collector
    cannot see, which leaked every forward run without a backward."""
    x = torch.randn(1000, requires_grad=True)
    with recomputed_activations():
        y = x.exp()  # exp saves its own output
    alive = weakref.ref(y)
    del y
    gc.collect()
    assert alive() is None
