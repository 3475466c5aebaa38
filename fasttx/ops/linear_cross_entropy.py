"""linear_cross_entropy: an LM head's linear and its cross-entropy, in chunks of tokens, never the logits.

``F.cross_entropy(softcap(hidden @ weight.T + bias), target)`` eagerly holds the (tokens, vocab)
logits, log_softmax's output of the same size, and in backward two more such tensors: at LLaMA-3's
vocabulary (128256) and 8192 tokens each is 4.2 GB in fp32. Here the tokens are walked in chunks of
C rows. Per chunk: one GEMM writes the chunk's logits into a (C, V) buffer reused by every chunk;
one row kernel (the backend's) reads each row twice (a max / sum-of-exp pass, then one pass that
writes the row's gradient over its logits, in place, and the label-smoothing sum); two more GEMMs
turn that gradient into the chunk's rows of grad_hidden and its share of grad_weight.

Design decisions:
  * Gradients in the forward pass (as Liger-Kernel does) for reduction "mean" and "sum" when a
    gradient is needed: 3 GEMMs per chunk (logits, dlogits @ W, dlogits^T @ h), where recomputing
    the logits in backward would take 4. The loss is a scalar, so its gradient in backward is
    a scalar g and the backward only scales the stored gradients by g (g = 1 in training is
    exact). The stored gradients are the size of the inputs, so nothing larger than them is held.
  * reduction "none": each row's grad_output is unknown in forward, so the forward computes the
    losses alone (1 GEMM a chunk) and the backward recomputes each chunk (4 GEMMs in all). The
    alternative, storing the per-row gradient factors, would need the (N, V) softmax.
  * No gradient work at all under no_grad or when no input requires a gradient.
  * Chunk size: C = max(1, min(N, 2**27 // (V * logits element size))) rows, a 128 MiB logits buffer:
    2**25 fp32 logits (262 rows at V = 128256, 1048 at 32000), or on the CPU, where bf16/fp16 logits
    stay bf16/fp16, 2**26 of them. With one chunk grad_weight needs no fp32 accumulator. Eager fp32 holds >= 3 N V floats at its peak, so at
    8192 tokens this is under 0.03x of it at V = 32000 and under 0.01x at 128256; large enough that the
    GEMMs are C x d x V with C in the hundreds, efficient on every backend. ``_CHUNK_ROWS`` (tests only)
    forces a size.
  * Memory, bf16/fp16: the fp32 grad_weight accumulator (V x d x 4 bytes, 2x the gradient itself) is, at
    d = 2048, larger than the chunk buffer; with it the extra memory at 8192 tokens, V = 32000 is ~0.4x
    eager's, not 0.1x. ``_FP32_WEIGHT_GRAD = False`` accumulates in the weight's dtype instead (Liger's
    choice: one rounding per chunk, ~sqrt(chunks) x eager's error), and the extra is the chunk buffer alone.
  * Precision: the loss and the row kernel in fp32 (fp64 for fp64). On CUDA the bf16/fp16 logits
    GEMM writes fp32 (``torch.mm(..., out_dtype=torch.float32)``); on the CPU ATen has no such GEMM, so
    the bf16/fp16 logits are rounded once to the input dtype, exactly as eager's F.linear rounds them.
    grad_weight and grad_bias are accumulated over the chunks in fp32 (fp64) and cast once at the
    end (on the CPU each chunk's bf16 grad_weight share is itself a bf16 GEMM, rounded once: ATen's
    CPU GEMMs have no bf16-in, fp32-out form, and an fp32 GEMM there runs at half the rate);
    grad_hidden's rows come from one GEMM each, with no accumulation across chunks.
  * Deterministic: chunks in a fixed order, rows independent, no atomics.
  * mean divides by the count of non-ignored targets (NaN when all are ignored, as torch gives).

Backends: the row kernel is cpu (csrc/cpu/linear_cross_entropy.cpp), triton
(kernels/linear_cross_entropy.py), cuda (csrc/cuda/linear_cross_entropy.cu) or torch (the
reference, below). The GEMMs are torch.mm with out= into the chunk's buffers for every backend: ATen's
BLAS on the CPU (see _CPU_ONEDNN_GEMM for why not cpu/matmul.h's oneDNN path), cuBLAS on a GPU, as
Liger does (a chunk's GEMMs are large and cuBLAS runs them at peak).
The chunk loop is Python, shared by all backends: a handful of launches per chunk of hundreds of rows.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fasttx import backends
from fasttx.ops._autocast import lower_precision
from fasttx.ops._checks import check_choice, check_float, check_int, check_real, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

REDUCTIONS = ("mean", "sum", "none")
_OP = "linear_cross_entropy"
# The chunk's logits buffer: 128 MiB, 2^25 fp32 logits (2^26 bf16/fp16 ones on the CPU, whose
# bf16 GEMMs write bf16: 2097 rows at V 32000 ran bf16 fwd+bwd 5% faster than 1048).
_CHUNK_BYTES = 2**27
_CHUNK_ROWS: Optional[int] = None  # tests: force the rows per chunk
# CPU bf16 grad_weight: rows of the fp32 accumulator per bf16 GEMM slice (32 MiB temporaries).
_CPU_BF16_SLICE_ELEMENTS = 2**24
# bf16/fp16 grad_weight accumulated across chunks in fp32 (True, exact: one rounding at the end, as eager's
# single GEMM) or in the weight's dtype (False: Liger's choice, one rounding per chunk, but no fp32 V x d
# accumulator, which at d = 2048 is most of this op's extra memory). See the module docstring.
_FP32_WEIGHT_GRAD = True


def chunk_rows(n: int, vocab: int, element_size: int = 4) -> int:
    """Rows per chunk: as many as a buffer of _CHUNK_BYTES holds at this vocabulary and logits element size."""
    if _CHUNK_ROWS is not None:
        return max(1, _CHUNK_ROWS)
    return max(1, min(n, _CHUNK_BYTES // (element_size * max(vocab, 1))))


# ---- reference: plain PyTorch ---------------------------------------------------

def apply_softcap(z: Tensor, softcap: Optional[float]) -> Tensor:
    return z if not softcap else torch.tanh(z / softcap) * softcap


def linear_cross_entropy_ref(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, softcap=None):
    logits = apply_softcap(F.linear(hidden, weight, bias), softcap)
    logits = logits.reshape(-1, weight.shape[0])
    return F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing).reshape(target.shape if reduction == "none" else ())


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the torch backend's row kernel: the contract in PyTorch (csrc/ops.h) --------------

def _torch_rows(logits, target, grad_rows, ignore_index, label_smoothing, softcap):
    """Rows of logits (C, V) (fp32/fp64, or the input's bf16/fp16) and target (C,): returns (loss, lse),
    each (C,) in the opmath type; loss = (1 - eps)(m - z_t) + eps/V sum_j (m - z_j) + log_sum with
    z = softcap(x), m = max z, log_sum = log sum exp(z - m); 0 for an ignored row. If grad_rows (C,) is
    given, the logits are overwritten with grad_rows[n] * (softmax(z) - (1 - eps) onehot - eps / V)
    * softcap'(x) (0 for an ignored row)."""
    x = logits.to(_acc_dtype(logits.dtype))
    z = apply_softcap(x, softcap)
    V = x.shape[1]
    m = z.amax(-1)
    log_sum = torch.log(torch.exp(z - m[:, None]).sum(-1))
    ignored = target == ignore_index
    t = target.masked_fill(ignored, 0)[:, None]
    loss = (1.0 - label_smoothing) * (m - z.gather(1, t)[:, 0]) + log_sum
    if label_smoothing:
        loss = loss + (label_smoothing / V) * (m[:, None] - z).sum(-1)
    loss = torch.where(ignored, 0.0, loss)
    if grad_rows is not None:
        grad = torch.exp((z - m[:, None]) - log_sum[:, None]) - label_smoothing / V
        grad.scatter_add_(1, t, torch.full_like(t, -(1.0 - label_smoothing), dtype=grad.dtype))
        if softcap:
            grad = grad * (1.0 - (z / softcap) ** 2)
        logits.copy_(grad * torch.where(ignored, 0.0, grad_rows)[:, None])
    return loss, m + log_sum


def _cpu_rows(logits, target, grad_rows, ignore_index, label_smoothing, softcap):
    return backends.extension().linear_cross_entropy_rows_cpu(logits, target, grad_rows, ignore_index,
                                                             float(label_smoothing), float(softcap or 0.0))


def _cuda_rows(logits, target, grad_rows, ignore_index, label_smoothing, softcap):
    return backends.extension().linear_cross_entropy_rows_cuda(logits, target, grad_rows, ignore_index,
                                                              float(label_smoothing), float(softcap or 0.0))


def _triton_rows(*args):
    from fasttx.kernels import linear_cross_entropy as k
    return k.linear_cross_entropy_rows(*args)


def _no_backward(*args):
    raise AssertionError("linear_cross_entropy's backward is the chunk loop's, not the backend's")


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_rows, _no_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_rows, _no_backward, backends.up_to_float32("cuda")),
    backends.Implementation("cpu", _cpu_rows, _no_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_rows, _no_backward, backends.device_only("torch")),
)


# ---- the GEMMs of a chunk ---------------------------------------------------------

# The cpu backend's fp32 GEMMs on cpu/matmul.h's oneDNN path (True) or ATen's at::mm (False). At this op's
# shapes (a chunk of 512 x 1024 tokens against V = 32000) on the 2-core EPYC, loaded, at::mm (MKL) ran
# 51-91 GFLOP/s and the oneDNN path 25-32 for the logits and grad_hidden GEMMs (its reduction is cut into
# chunks, which pays at a linear's sizes but not against a vocabulary): at::mm it is, until a quiet
# machine says otherwise.
_CPU_ONEDNN_GEMM = False


class _Gemms:
    """The device's GEMMs: torch.mm (cuBLAS, or ATen's CPU BLAS / oneDNN for bf16), or with
    _CPU_ONEDNN_GEMM fasttx's oneDNN fp32 path (cpu/matmul.h) for the cpu backend."""

    def __init__(self, backend: str, hidden: Tensor):
        self.ext = backends.extension() if backend == "cpu" and _CPU_ONEDNN_GEMM else None
        self.fp32_out = hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)

    def logits_dtype(self, dtype):
        return torch.float32 if self.fp32_out else dtype

    def mm(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        """out = a @ b (out of a's dtype, or fp32 from bf16/fp16 on CUDA)."""
        if self.fp32_out and out.dtype != a.dtype:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        elif self.ext is not None:
            self.ext.linear_cross_entropy_gemm_cpu(out, a, b, False)
        else:
            torch.mm(a, b, out=out)

    def accumulate(self, acc: Tensor, a: Tensor, b: Tensor, overwrite: bool = False) -> None:
        """acc += a @ b (acc = a @ b when overwrite), acc in a's dtype or the opmath type (fp32 for bf16/fp16)."""
        if acc.dtype == a.dtype:
            if self.ext is not None:
                self.ext.linear_cross_entropy_gemm_cpu(acc, a, b, not overwrite)
            elif overwrite:
                torch.mm(a, b, out=acc)
            else:
                acc.addmm_(a, b)
        elif self.fp32_out:
            if overwrite:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        elif a.dtype == torch.bfloat16:
            # CPU bf16: ATen has no fp32-output GEMM for it, and the fp32 GEMM on converted operands
            # ran at half the bf16 GEMM's rate (145 against 323 GFLOP/s at V 32000, d 2048, 2 cores).
            # So each chunk's share is a bf16 GEMM (fp32 inside, rounded once), in slices of acc's rows
            # to bound the temporary, and summed across chunks in fp32: max error 1.05-1.7x eager's
            # single GEMM over 8-32 chunks, where accumulating in bf16 was 2-9x.
            rows = max(1, _CPU_BF16_SLICE_ELEMENTS // max(acc.shape[1], 1))
            for start in range(0, acc.shape[0], rows):
                part = a[start:start + rows] @ b
                if overwrite:
                    acc[start:start + rows].copy_(part)
                else:
                    acc[start:start + rows] += part
        else:  # CPU fp16: ATen has no fp32-output GEMM for it, so the chunk's operands go to fp32
            self.accumulate(acc, a.float(), b.float(), overwrite)


def _chunks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
            label_smoothing: float, softcap: float, grad_rows: Optional[Tensor], needs: tuple[bool, bool, bool],
            backend: str):
    """The chunk loop: (loss_rows, grad_hidden, grad_weight, grad_bias), the gradients for the per-row
    factors grad_rows (None: no gradient), each None where not needed, grad_weight/bias in the opmath type."""
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, hidden)
    N, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    gemm = _Gemms(impl.backend, hidden)
    loss = hidden.new_empty(N, dtype=acc)
    needs = needs if grad_rows is not None else (False, False, False)
    grad_h = torch.empty_like(hidden) if needs[0] else None
    # One chunk: grad_weight is one GEMM over all the tokens, written in the weight's dtype with one
    # rounding, as eager's; no fp32 accumulator (V x d x 4 bytes) to fill, add into and cast.
    one_chunk = chunk_rows(N, V, gemm.logits_dtype(hidden.dtype).itemsize) >= N
    grad_acc = acc if (_FP32_WEIGHT_GRAD and not one_chunk) or hidden.dtype == acc else hidden.dtype
    grad_b = weight.new_zeros(V, dtype=acc) if needs[2] and bias is not None else None
    if N == 0 or V == 0:
        grad_w = weight.new_zeros(weight.shape, dtype=grad_acc) if needs[1] else None
        return loss, grad_h, grad_w, grad_b
    grad_w = weight.new_empty(weight.shape, dtype=grad_acc) if needs[1] else None  # the first chunk writes it
    with torch.autocast(hidden.device.type, enabled=False):  # the entry point cast the inputs already
        _chunk_loop(impl, gemm, hidden, weight, bias, target, ignore_index, label_smoothing, softcap, grad_rows, loss,
                    grad_h, grad_w, grad_b)
    return loss, grad_h, grad_w, grad_b


def _chunk_loop(impl, gemm, hidden, weight, bias, target, ignore_index, label_smoothing, softcap, grad_rows, loss,
                grad_h, grad_w, grad_b):
    N, V = hidden.shape[0], weight.shape[0]
    acc = loss.dtype
    logits_dtype = gemm.logits_dtype(hidden.dtype)
    rows = chunk_rows(N, V, logits_dtype.itemsize)
    buffer = hidden.new_empty(min(rows, N), V, dtype=logits_dtype)
    w_t = weight.t()
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        h, logits = hidden[start:stop], buffer[:stop - start]
        gemm.mm(logits, h, w_t)
        if bias is not None:
            logits.add_(bias)
        loss[start:stop], _ = impl.forward(logits, target[start:stop],
                                           None if grad_rows is None else grad_rows[start:stop].contiguous(),
                                           ignore_index, label_smoothing, softcap)
        if grad_rows is None:
            continue
        dlogits = logits if logits.dtype == hidden.dtype else logits.to(hidden.dtype)
        if grad_h is not None:
            gemm.mm(grad_h[start:stop], dlogits, weight)
        if grad_w is not None:
            gemm.accumulate(grad_w, dlogits.t(), h, overwrite=start == 0)
        if grad_b is not None:
            grad_b += logits.sum(0, dtype=acc)


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _reduce(loss_rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum(dtype=torch.float64)
    if reduction == "mean":
        total = total / (target != ignore_index).sum()
    return total.to(loss_rows.dtype)


def _forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
             reduction: str, label_smoothing: float, softcap: float, needs_hidden: bool, needs_weight: bool,
             needs_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias): loss reduced, in the opmath type; for "mean"/"sum" the
    gradients of the loss itself (grad_output = 1) where needed, in the inputs' dtypes; empty otherwise."""
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    grad_rows = None
    if reduction != "none" and any(needs):
        acc = _acc_dtype(hidden.dtype)
        scale = torch.ones((), dtype=acc, device=hidden.device)
        if reduction == "mean":  # a tensor, never .item(): no device sync
            scale = scale / (target != ignore_index).sum()
        grad_rows = scale.expand(hidden.shape[0])
    loss_rows, gh, gw, gb = _chunks(hidden, weight, bias, target, ignore_index, label_smoothing, softcap, grad_rows,
                                    needs, backend)
    return (_reduce(loss_rows, target, ignore_index, reduction),
            gh if gh is not None else _empty(hidden),
            gw.to(weight.dtype) if gw is not None else _empty(hidden),
            gb.to(bias.dtype) if gb is not None else _empty(hidden))


def _backward(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
              ignore_index: int, label_smoothing: float, softcap: float, needs_hidden: bool, needs_weight: bool,
              needs_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """reduction "none": each chunk recomputed, its gradient for the rows' grad_output grad_rows (N,)."""
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    _, gh, gw, gb = _chunks(hidden, weight, bias, target, ignore_index, label_smoothing, softcap,
                            grad_rows.to(_acc_dtype(hidden.dtype)).contiguous(), needs, backend)
    return (gh if gh is not None else _empty(hidden),
            gw.to(weight.dtype) if gw is not None else _empty(hidden),
            gb.to(bias.dtype) if gb is not None else _empty(hidden))


@torch.library.custom_op("fasttx::linear_cross_entropy_forward", mutates_args=())
def _lce_forward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                    reduction: str, label_smoothing: float, softcap: float, needs_hidden: bool, needs_weight: bool,
                    needs_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, needs_hidden,
                    needs_weight, needs_bias, backend)


@_lce_forward_op.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, needs_hidden, needs_weight,
      needs_bias, backend):
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty(hidden.shape[0] if reduction == "none" else (), dtype=acc)
    grads = reduction != "none"
    return (loss, hidden.new_empty(hidden.shape) if grads and needs_hidden else _empty(hidden),
            weight.new_empty(weight.shape) if grads and needs_weight else _empty(hidden),
            bias.new_empty(bias.shape) if grads and needs_bias and bias is not None else _empty(hidden))


@torch.library.custom_op("fasttx::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     ignore_index: int, label_smoothing: float, softcap: float, needs_hidden: bool,
                     needs_weight: bool, needs_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_rows, hidden, weight, bias, target, ignore_index, label_smoothing, softcap, needs_hidden,
                     needs_weight, needs_bias, backend)


@_lce_backward_op.register_fake
def _(grad_rows, hidden, weight, bias, target, ignore_index, label_smoothing, softcap, needs_hidden, needs_weight,
      needs_bias, backend):
    return (hidden.new_empty(hidden.shape) if needs_hidden else _empty(hidden),
            weight.new_empty(weight.shape) if needs_weight else _empty(hidden),
            bias.new_empty(bias.shape) if needs_bias and bias is not None else _empty(hidden))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, needs_hidden, needs_weight,
     needs_bias, backend) = inputs
    # The inputs are referenced (no copy): the "none" backward recomputes from them, and a recorded
    # (create_graph=True) backward differentiates the reference built on them.
    ctx.save_for_backward(hidden, weight, bias, target, *output[1:])
    ctx.args = (ignore_index, reduction, label_smoothing, softcap, needs_hidden, needs_weight, needs_bias, backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _setup_context_eager(ctx, inputs, output):
    """The eager Function's: the stored gradients are kept on ctx, not saved, so that the backward can scale
    them in place (no second gradient-sized copy at the peak) and drop them. They are non-differentiable
    outputs, with no grad_fn, so holding them on ctx makes no reference cycle."""
    _setup_context(ctx, inputs, (output[0],))
    ctx.grads = output[1:]
    ctx.mark_non_differentiable(*output[1:])


def _autograd_backward(backward):
    def run(ctx, grad_loss, _gh, _gw, _gb):
        saved = ctx.saved_tensors
        hidden, weight, bias, target = saved[:4]
        ignore_index, reduction, label_smoothing, softcap, needs_hidden, needs_weight, needs_bias, backend = ctx.args
        needs_bias = needs_bias and bias is not None
        none = (None,) * 9
        if grad_loss is None:
            return (None, None, None) + none
        if graphed_backward():
            grads = _graphed(grad_loss, hidden, weight, bias, target, ignore_index, reduction, label_smoothing,
                             softcap)
            return grads + none
        pick = lambda gh, gw, gb: (gh if needs_hidden else None, gw if needs_weight else None,
                                   gb if needs_bias else None) + none
        eager = hasattr(ctx, "grads")
        if reduction == "none" or (eager and ctx.grads is None):
            # "none"; or a second backward through the same graph (retain_graph=True) after the first
            # consumed the stored gradients: each chunk recomputed for the rows' gradient factors
            rows = grad_loss
            if reduction != "none":
                scale = grad_loss / (target != ignore_index).sum() if reduction == "mean" else grad_loss
                rows = scale.expand(hidden.shape[0])
            return pick(*backward(rows, hidden, weight, bias, target, ignore_index, label_smoothing, softcap,
                                  needs_hidden, needs_weight, needs_bias, backend))
        if eager:  # scaled in place: the only copies of them are the ones returned
            grads, ctx.grads = ctx.grads, None
            return pick(*(t.mul_(grad_loss) if t.numel() else t for t in grads))
        gh, gw, gb = saved[4:]
        return pick(gh * grad_loss.to(gh.dtype), gw * grad_loss.to(gw.dtype), gb * grad_loss.to(gb.dtype))
    return run


def _graphed(grad_loss, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, softcap):
    """Differentiable torch ops from the saved inputs (double backward)."""
    V = weight.shape[0]
    z_raw = F.linear(hidden, weight, bias).to(_acc_dtype(hidden.dtype))
    z = apply_softcap(z_raw, softcap or None)
    ignored = target == ignore_index
    onehot = F.one_hot(target.masked_fill(ignored, 0), V).to(z.dtype)
    dz = torch.softmax(z, -1) - (1.0 - label_smoothing) * onehot - label_smoothing / V
    if reduction == "none":
        rows = grad_loss
    elif reduction == "sum":
        rows = grad_loss.expand(hidden.shape[0])
    else:
        rows = (grad_loss / (~ignored).sum()).expand(hidden.shape[0])
    dz = dz * torch.where(ignored, 0.0, rows.to(z.dtype))[:, None]
    if softcap:
        dz = dz * (1.0 - torch.tanh(z_raw / softcap) ** 2)
    dz = dz.to(hidden.dtype)
    return dz @ weight, dz.t() @ hidden, (dz.sum(0) if bias is not None else None)


_lce_forward_op.register_autograd(_autograd_backward(_lce_backward_op), setup_context=_setup_context)
_LinearCrossEntropyFunction = eager_function("_LinearCrossEntropyFunction", _forward, _setup_context_eager,
                                             _autograd_backward(_backward))


# ---- public API ---------------------------------------------------------------

def _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap):
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        check_tensor(_OP, name, t)
    check_float(_OP, "hidden", hidden)
    if hidden.dim() == 0:
        raise ValueError(f"fasttx.{_OP}: hidden must be (..., d), got a 0-d tensor")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"fasttx.{_OP}: weight must have shape (vocab, {d}) to match the last dimension of hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"fasttx.{_OP}: weight must have at least one class (row), got shape {tuple(weight.shape)}")
    check_same(_OP, "weight", weight, "hidden", hidden)
    if bias is not None:
        check_tensor(_OP, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"fasttx.{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same(_OP, "bias", bias, "hidden", hidden)
    if target.dtype != torch.long:
        raise TypeError(f"fasttx.{_OP}: target must hold int64 class indices, got {target.dtype}")
    tokens = math.prod(hidden.shape[:-1])
    if target.numel() != tokens or (target.dim() != 1 and target.shape != hidden.shape[:-1]):
        raise ValueError(f"fasttx.{_OP}: target must have shape ({tokens},) or {tuple(hidden.shape[:-1])} for hidden "
                         f"of shape {tuple(hidden.shape)}, got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"fasttx.{_OP}: target is on {target.device} but hidden is on {hidden.device}")
    check_int(_OP, "ignore_index", ignore_index)
    check_choice(_OP, "reduction", reduction, REDUCTIONS)
    check_real(_OP, "label_smoothing", label_smoothing, 0.0, 1.0)
    if softcap is not None:
        check_real(_OP, "softcap", softcap)
        if not isinstance(softcap, (torch.SymInt, torch.SymFloat)) and softcap <= 0:
            raise ValueError(f"fasttx.{_OP}: softcap must be None or a finite number > 0, got {softcap!r}")
    if torch.compiler.is_compiling():
        return  # data-dependent: then the cpu kernel raises on a bad target and the GPU kernels give NaN
    V = weight.shape[0]
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if not target.is_cpu:
        torch._assert_async(~bad.any(), f"fasttx.{_OP}: a target is neither a class index in [0, {V}) nor "
                                        f"ignore_index ({ignore_index})")
        return
    if is_fake(bad):
        return
    if bad.any():
        flat = target.reshape(-1)
        first = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"fasttx.{_OP}: target[{first}] = {int(flat[first])} is not a class index in [0, {V}) "
                         f"nor ignore_index ({ignore_index})")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: Optional[float] = None) -> Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias), target, ignore_index=..., reduction=...,
    label_smoothing=...)`` without ever holding the (tokens, vocab) logits; softcap(z) = tanh(z / c) * c
    (Gemma 2), none when None.

    hidden (..., d), weight (V, d) (nn.Linear's layout: an lm_head's weight), bias (V,) or None,
    target of hidden's leading shape or flat, int64. ``reduction="none"`` returns target's shape.
    The loss has hidden's dtype (computed in fp32 for bf16/fp16), except under autocast, where the
    linear runs in the autocast dtype and the loss is fp32, as torch's F.linear then F.cross_entropy."""
    autocast = hidden.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(hidden.device.type)
    hidden, weight, bias = lower_precision(hidden, weight, bias)
    _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap)
    if under_transform():
        return linear_cross_entropy_ref(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                                        softcap)
    rows = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()  # the GEMMs take row-strided views as they are
    flat_target = target.reshape(-1).contiguous()
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    args = (rows, weight, bias, flat_target, int(ignore_index), reduction, float(label_smoothing),
            float(softcap or 0.0), *needs, backends.requested_backend())
    if plain_eager(rows, weight, bias, flat_target):
        loss, *_ = _LinearCrossEntropyFunction.apply(*args)
    else:
        loss, *_ = _lce_forward_op(*args)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss if autocast else loss.to(hidden.dtype)
