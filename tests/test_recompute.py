"""fasttx.nn.recompute: norm outputs are rebuilt in backward, not kept.

The rebuilt tensors must be the very bits the forward made (gradients equal
bitwise with and without recomputation), the memory held between forward and
backward must drop by exactly those tensors, and nothing may change where
other saved-tensor hooks own the saving.
"""
import pytest
import torch

import fasttx
from backend_params import device_backend_params, skip_unless_runnable
from fasttx.lm.compare import step_peak_bytes
from fasttx.models.gpt import GPT, GPTConfig
from fasttx.nn import TransformerBlock

BATCH, SEQ, D_MODEL, HEADS = 2, 7, 48, 4


def _identity_hooks():
    # Any outer saved-tensor hooks switch ours off: the baseline keeps every tensor.
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _block(norm_first, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    block = TransformerBlock(D_MODEL, HEADS, norm_first=norm_first, is_causal=True, dtype=dtype)
    if not bias:
        for norm in (block.norm1, block.norm2):
            norm.bias = None
    return block


def _grads(block, x, grad):
    x = x.detach().requires_grad_()
    out = block(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("bias", [True, False], ids=["norm bias", "no norm bias"])
def test_gradients_are_bitwise_the_same(norm_first, dtype, bias):
    block = _block(norm_first, dtype, bias)
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=dtype)
    grad = torch.randn_like(x)
    out, grads = _grads(block, x, grad)
    with _identity_hooks():
        kept_out, kept_grads = _grads(block, x, grad)
    assert torch.equal(out, kept_out)
    for got, want in zip(grads, kept_grads):
        assert torch.equal(got, want)


def _autocast_grads(block, x, grad):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _grads(block, x, grad)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_gradients_under_autocast_are_bitwise_the_same(norm_first):
    """Under autocast the lower-precision casts of the norm outputs and of the weights are rebuilt too
    (autocast_operand), replaying the forward's autocast."""
    block = _block(norm_first)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    grad = torch.randn_like(x)
    out, grads = _autocast_grads(block, x, grad)
    with _identity_hooks():
        kept_out, kept_grads = _autocast_grads(block, x, grad)
    assert out.dtype == torch.float32 and torch.equal(out, kept_out)
    for got, want in zip(grads, kept_grads):
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def test_autocast_casts_are_not_held():
    block = _block(True)
    x = torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True)
    run = lambda: _autocast_forward(block, x)
    run()
    recomputed = _net_bytes(run)
    with _identity_hooks():
        kept = _net_bytes(run)
    # bf16 copies of norm1's and norm2's outputs, of the four weight matrices, and of linear1's bias, which
    # gelu_ffn keeps for a second derivative (the other biases are not saved)
    weights = sum(p.numel() for name, p in block.named_parameters() if p.dim() == 2) + block.linear1.bias.numel()
    assert kept - recomputed == (2 * x.numel() + weights) * 2


def _autocast_forward(block, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return block(x)


def _net_bytes(fn):
    """Bytes allocated by fn() and still held when it returns; its result, and so the graph, stays alive."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()  # noqa: F841 (held until the profile is read)
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_norm_outputs_are_not_held(norm_first):
    block = _block(norm_first)
    x = torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True)
    block(x)  # one-time allocations out of the way
    recomputed = _net_bytes(lambda: block(x))
    with _identity_hooks():
        kept = _net_bytes(lambda: block(x))
    # norm1's output (pre-LN; post-LN keeps norm1's, which is the residual and ffn input) and norm2's:
    # each (batch, seq, d_model). The attention's merged heads are a view of its output, kept anyway.
    saved = {True: 2, False: 1}[norm_first]
    assert kept - recomputed == saved * x.nbytes


def test_gpt_training_step_peak_drops():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, d_model=64, kernels="fused"))
    idx = torch.randint(0, 256, (4, 32))

    def step():
        model(idx, idx)[1].backward()
        model.zero_grad(set_to_none=True)

    step()
    recomputed = step_peak_bytes(step)
    with _identity_hooks():
        kept = step_peak_bytes(step)
    assert recomputed < kept


def test_a_recipe_input_modified_in_place_raises():
    block = _block(True)
    x = torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True)
    out = block(x)
    with torch.no_grad():
        block.norm2.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()


def test_other_saved_tensor_hooks_keep_working():
    block = _block(True)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    grad = torch.randn_like(x)
    _, want = _grads(block, x, grad)
    with torch.autograd.graph.save_on_cpu():
        _, got = _grads(block, x, grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_no_grad_forward_is_unchanged():
    block = _block(True)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    with torch.no_grad():
        y = block(x)
    assert torch.equal(y, block(x).detach())


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_add_norm_output_is_the_norm_of_its_sum(device, backend, dtype, rms):
    # What the recipes for add_layer_norm's and add_rms_norm's outputs rely on (TransformerBlock, GPT's llama
    # blocks), the default eps of rms included.
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x, r = (torch.randn(5, 1537, device=device, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(1537, device=device, dtype=dtype) for _ in range(2))
    with fasttx.use_backend(backend):
        if rms:
            normed, total = fasttx.add_rms_norm(x, r, 1537, w)
            assert torch.equal(normed, fasttx.rms_norm(total, 1537, w))
        else:
            normed, total = fasttx.add_layer_norm(x, r, 1537, w, b)
            assert torch.equal(normed, fasttx.layer_norm(total, 1537, w, b))
        assert torch.equal(total, x + r)
