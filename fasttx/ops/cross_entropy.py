"""cross_entropy: a language model's loss over (tokens, vocab) logits, in two passes.

Eager ``F.cross_entropy`` writes log_softmax's (N, V) output and reads it back
for the nll; its backward zero-fills an (N, V) gradient, scatters into it and
reads and writes it again in log_softmax_backward. At an LM's vocabulary each
of those passes is the size of the logits (412 MB for 2048 tokens of GPT-2's
50257 in fp32). Fused, the forward reads the logits once and keeps two fp32
numbers per row, its max m and log(sum exp(x - m)) (their sum, the log-sum-exp,
would round the second away at a large shared offset); the backward reads the
logits once and writes the gradient, ``g * (softmax(x) - onehot(target))``,
once. bf16/fp16 logits are computed in fp32 without an fp32 copy.

Backends: triton and cuda (a program / block per row, an online max and sum
over column blocks), cpu (softmax_kernels.h's row passes) and torch, the
reference. Rows are independent, so results do not depend on the thread count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fasttx import backends
from fasttx.ops._checks import check_choice, check_float, check_int, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

REDUCTIONS = ("mean", "sum", "none")
_OP = "cross_entropy"


# ---- reference: plain PyTorch ---------------------------------------------------

def cross_entropy_ref(input, target, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the torch backend: the kernels' contract in PyTorch (csrc/ops.h) -------------

def _torch_forward(logits, target, ignore_index):
    x = logits.to(_acc_dtype(logits.dtype))
    row_max = x.amax(-1)
    log_sum = torch.log(torch.exp(x - row_max[:, None]).sum(-1))
    ignored = target == ignore_index
    picked = x.gather(1, target.masked_fill(ignored, 0)[:, None])[:, 0]
    # (max - x_t) + log_sum, never lse - x_t: lse = max + log_sum rounds away log_sum when the
    # logits share a large offset (at 1e8 an fp32 ulp is 8), and max - x_t cancels that offset exactly.
    return torch.where(ignored, 0.0, (row_max - picked) + log_sum), row_max, log_sum


def _torch_backward(grad_rows, logits, target, row_max, log_sum, ignore_index):
    x = logits.to(_acc_dtype(logits.dtype))
    ignored = target == ignore_index
    grad = torch.exp((x - row_max[:, None]) - log_sum[:, None])
    grad.scatter_add_(1, target.masked_fill(ignored, 0)[:, None], -torch.ones_like(log_sum)[:, None])
    grad = grad * torch.where(ignored, 0.0, grad_rows)[:, None]
    # An ignored row holding NaN or +inf is NaN, as torch's log_softmax backward makes it (0 * exp(NaN)).
    lse = row_max + log_sum
    poisoned = ignored & (lse.isnan() | lse.isposinf())
    return grad.masked_fill(poisoned[:, None], float("nan")).to(logits.dtype)


def _differentiable_backward(grad_rows, logits, target, ignore_index):
    """The gradient in torch ops that autograd can differentiate again, for a backward it records
    (create_graph=True); softmax from the logits, as the saved lse carries no graph."""
    x = logits.to(_acc_dtype(logits.dtype))
    ignored = target == ignore_index
    onehot = F.one_hot(target.masked_fill(ignored, 0), x.shape[1]).to(x.dtype)
    return ((torch.softmax(x, -1) - onehot) * torch.where(ignored, 0.0, grad_rows)[:, None]).to(logits.dtype)


def _cpu_forward(*args):
    return backends.extension().cross_entropy_fwd_cpu(*args)


def _cpu_backward(*args):
    return backends.extension().cross_entropy_bwd_cpu(*args)


def _cuda_forward(*args):
    return backends.extension().cross_entropy_fwd_cuda(*args)


def _cuda_backward(*args):
    return backends.extension().cross_entropy_bwd_cuda(*args)


def _triton_forward(*args):
    from fasttx.kernels import cross_entropy as k
    return k.cross_entropy_forward(*args)


def _triton_backward(*args):
    from fasttx.kernels import cross_entropy as k
    return k.cross_entropy_backward(*args)


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.up_to_float32("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


def _forward(logits: Tensor, target: Tensor, ignore_index: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, logits)
    if logits.numel() == 0:
        impl = IMPLEMENTATIONS[-1]
    return impl.forward(logits, target, ignore_index)


def _backward(grad_rows: Tensor, logits: Tensor, target: Tensor, row_max: Tensor, log_sum: Tensor,
              ignore_index: int, backend: str) -> Tensor:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, logits)
    if logits.numel() == 0:
        impl = IMPLEMENTATIONS[-1]
    return impl.backward(grad_rows.contiguous(), logits, target, row_max, log_sum, ignore_index)


@torch.library.custom_op("fasttx::cross_entropy_forward", mutates_args=())
def _cross_entropy_forward_op(logits: Tensor, target: Tensor, ignore_index: int,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(logits, target, ignore_index, backend)


@_cross_entropy_forward_op.register_fake
def _(logits, target, ignore_index, backend):
    acc = _acc_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[0], dtype=acc) for _ in range(3))


@torch.library.custom_op("fasttx::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad_rows: Tensor, logits: Tensor, target: Tensor, row_max: Tensor, log_sum: Tensor,
                               ignore_index: int, backend: str) -> Tensor:
    return _backward(grad_rows, logits, target, row_max, log_sum, ignore_index, backend)


@_cross_entropy_backward_op.register_fake
def _(grad_rows, logits, target, row_max, log_sum, ignore_index, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, backend = inputs
    ctx.save_for_backward(logits, target, output[1], output[2])  # the logits and two floats a row: no (N, V) output
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _autograd_backward(backward):
    def run(ctx, grad_loss, _grad_max, _grad_log_sum):
        logits, target, row_max, log_sum = ctx.saved_tensors
        if graphed_backward():
            return _differentiable_backward(grad_loss, logits, target, ctx.ignore_index), None, None, None
        return backward(grad_loss, logits, target, row_max, log_sum, ctx.ignore_index, ctx.backend), None, None, None
    return run


_cross_entropy_forward_op.register_autograd(_autograd_backward(_cross_entropy_backward_op),
                                            setup_context=_setup_context)
_CrossEntropyFunction = eager_function("_CrossEntropyFunction", _forward, _setup_context,
                                       _autograd_backward(_backward))


def _check(input, target, ignore_index, reduction):
    check_tensor(_OP, "input", input)
    check_tensor(_OP, "target", target)
    check_float(_OP, "input", input)
    if input.dim() != 2:
        raise ValueError(f"fasttx.{_OP}: input must be (N, C) logits, got shape {tuple(input.shape)}")
    if input.shape[1] == 0:
        raise ValueError(f"fasttx.{_OP}: input must have at least one class, got shape {tuple(input.shape)}")
    if target.dtype != torch.long:
        raise TypeError(f"fasttx.{_OP}: target must hold int64 class indices, got {target.dtype}")
    if target.shape != input.shape[:1]:
        raise ValueError(f"fasttx.{_OP}: target must have shape ({input.shape[0]},) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"fasttx.{_OP}: target is on {target.device} but input is on {input.device}")
    check_int(_OP, "ignore_index", ignore_index)
    check_choice(_OP, "reduction", reduction, REDUCTIONS)
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph. Then the cpu kernel raises on a bad target,
        # and the triton and cuda kernels read nothing for it and give its row NaN.
    bad = ((target < 0) | (target >= input.shape[1])) & (target != ignore_index)
    if not target.is_cpu:
        # bad.any() in Python would wait for the GPU on every call and break CUDA-graph capture; a
        # device-side assert fails asynchronously, as torch's own cross_entropy does on CUDA.
        torch._assert_async(~bad.any(), f"fasttx.{_OP}: a target is neither a class index in "
                                        f"[0, {input.shape[1]}) nor ignore_index ({ignore_index})")
        return
    if is_fake(bad):
        return  # FakeTensorMode (torch.export, compile's tracing) has no data to look at
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"fasttx.{_OP}: target[{first}] = {int(target[first])} is not a class index in "
                         f"[0, {input.shape[1]}) nor ignore_index ({ignore_index})")


def cross_entropy_float(input: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """cross_entropy of the logits taken to float32 first (float64 stays), as Hugging Face's LM losses
    do with ``logits.float()``; the kernels read bf16/fp16 logits as they are, without that copy."""
    _check(input, target, ignore_index, reduction)
    logits, target = input.contiguous(), target.contiguous()
    args = (logits, target, ignore_index, backends.requested_backend())
    if plain_eager(logits, target):
        loss_rows, _, _ = _CrossEntropyFunction.apply(*args)
    else:
        loss_rows, _, _ = _torch_forward(*args[:-1]) if under_transform() else _cross_entropy_forward_op(*args)
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum(dtype=torch.float64)  # N row losses of ~log(V) each: float32 sums lose digits
    if reduction == "mean":
        total = total / (target != ignore_index).sum()
    return total.to(loss_rows.dtype)


def cross_entropy(input: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction)`` for (N, C)
    logits and (N,) int64 targets. ``mean`` divides by the number of targets that are not
    ignore_index (NaN when all are, as torch gives). Computed in float32 for bf16/fp16 logits; the
    loss has input's dtype, except under autocast, which runs torch's cross-entropy in float32."""
    loss = cross_entropy_float(input, target, ignore_index, reduction)
    autocast = input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type)
    return loss if autocast else loss.to(input.dtype)
