"""fasttx.accelerate(): run torch's functional calls on fasttx's kernels, in code fasttx has never seen.

``fasttx.patch`` recognises modules; code that calls ``torch.nn.functional``
inline (nanoGPT's LayerNorm module calling ``F.layer_norm``, its attention
calling ``F.scaled_dot_product_attention``, its loss ``F.cross_entropy``) has
no module to recognise. ``accelerate`` is a ``torch.overrides.TorchFunctionMode``:
inside it, torch hands every overridable call to ``__torch_function__``, which
sends the ones fasttx serves exactly to fasttx's op and every other call,
unchanged, to torch:

    F.layer_norm                      -> fasttx.layer_norm
    F.rms_norm                        -> fasttx.rms_norm
    F.scaled_dot_product_attention    -> fasttx.scaled_dot_product_attention
    F.cross_entropy                   -> fasttx.cross_entropy (2-D logits, class indices, no weight,
                                         no label smoothing, no legacy size_average/reduce)
    F.linear                          -> fasttx's CPU fp32 GEMM (fasttx/ops/linear.py), where it is
                                         not ATen's own: CPU float32 outside autocast

A call is routed only when fasttx serves it exactly: plain tensors or
parameters (no subclass, nested or sparse tensor) on a device where a fasttx
kernel runs (CPU with the extension built; CUDA with the extension or triton,
up to float32), and arguments inside the op's contract. Anything else, and
anything fasttx's own checks refuse, runs torch's function, so torch raises
the errors torch raises. ``report()`` and the ``routed`` / ``passed`` counters say
what went where, and why a call was not routed.

What it cannot see: a fusion across calls (``F.gelu(F.linear(x, w, b))`` is two
calls, seen one at a time, so fasttx's gelu_ffn is out of reach; F.gelu alone is
left to torch, which fasttx has no faster plain kernel for), the structure of
modules (a residual add before a norm stays an add), and code under
``torch.compile``: there the compiler traces the calls itself and they pass
through. ``torch.nn`` modules that call the functions above (``nn.LayerNorm``,
``nn.RMSNorm``, ``nn.Linear``, ``nn.CrossEntropyLoss``) are seen through those calls,
but not calls made inside a function the mode passes on (torch runs it with
the mode off: the attention inside ``F.multi_head_attention_forward``), and
torch's fused inference path of ``nn.TransformerEncoderLayer`` is off inside
the block, as under any TorchFunctionMode.

Inside ``__torch_function__`` torch pops the mode, so fasttx's own calls do not
come back to it and its ops keep their eager fast path (fasttx/ops/_eager.py);
an enclosing accelerate context is popped too for the routed call.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fasttx import backends
from fasttx.ops._eager import PLAIN_TENSOR_TYPES
from fasttx.ops.attention import scaled_dot_product_attention as _fasttx_sdpa
from fasttx.ops.cross_entropy import REDUCTIONS as _CE_REDUCTIONS
from fasttx.ops.cross_entropy import cross_entropy as _fasttx_cross_entropy
from fasttx.ops.layer_norm import layer_norm as _fasttx_layer_norm
from fasttx.ops.layer_norm import rms_norm as _fasttx_rms_norm
from fasttx.ops.linear import _takes_fasttx_gemm
from fasttx.ops.linear import linear as _fasttx_linear

_KERNEL_DEVICES = ("cpu", "cuda")
_FALLBACK_ERRORS = (TypeError, ValueError, backends.BackendUnavailableError)


# ---- when a call can go to fasttx -------------------------------------------------

@functools.lru_cache(maxsize=None)
def _no_kernel_reason(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why no fasttx kernel (only its torch reference, slower than torch's own) would serve this
    device and dtype in auto mode; None when one would. The machine does not change in a process."""
    machine = backends.machine_reasons()
    if device_type == "cpu":
        if machine["cpu"] is None or (machine["triton"] is None and backends.triton_interpreting()):
            return None
        return f"no fasttx CPU kernel on this machine ({machine['cpu']})"
    if device_type == "cuda":
        if machine["cuda"] is not None and machine["triton"] is not None:
            return f"no fasttx CUDA kernel on this machine ({machine['cuda']}; {machine['triton']})"
        if dtype == torch.float64:
            return "fasttx's CUDA kernels take float16, bfloat16 or float32, not float64"
        return None
    return f"fasttx has no kernel for {device_type} tensors"


_STRIDED = torch.strided


def _why_not_tensors(*tensors) -> Optional[str]:
    """None when every argument is None or a plain dense floating tensor on a device fasttx's kernels
    serve (the first tensor's device and dtype decide; the op's checks judge mismatches)."""
    first = None
    for t in tensors:
        if t is None:
            continue
        if type(t) not in PLAIN_TENSOR_TYPES:
            return f"a {type(t).__name__} argument (only plain tensors and parameters are routed)"
        if t.layout is not _STRIDED or t.is_nested:
            return "a nested or non-strided tensor"
        if first is None:
            first = t
    if first is None:
        return "no tensor argument"
    if not first.is_floating_point():
        return f"a {first.dtype} input"
    device = "cpu" if first.is_cpu else "cuda" if first.is_cuda else first.device.type
    if device not in _KERNEL_DEVICES:
        return f"fasttx has no kernel for {device} tensors"
    if backends.requested_backend() != backends.AUTO:
        return None  # a forced backend: fasttx serves it or raises, and then torch runs
    return _no_kernel_reason(device, first.dtype)


# ---- one router per function: parse torch's signature, decide, call fasttx --------
# A router returns the result, or a str: why the call goes to torch instead.

def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    why = _why_not_tensors(input, weight, bias)
    if why:
        return why
    return _fasttx_layer_norm(input, normalized_shape, weight, bias, eps)


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    why = _why_not_tensors(input, weight)
    if why:
        return why
    return _fasttx_rms_norm(input, normalized_shape, weight, eps)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    why = _why_not_tensors(query, key, value)
    if why:
        return why
    if attn_mask is not None and (type(attn_mask) not in PLAIN_TENSOR_TYPES or attn_mask.layout != torch.strided
                                  or attn_mask.is_nested):
        return "an attn_mask that is not a plain dense tensor"
    if dropout_p and query.is_cuda and torch.cuda.is_current_stream_capturing():
        return "dropout_p > 0 inside a CUDA graph capture"  # fasttx refuses it; torch's captures it
    return _fasttx_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction="mean", label_smoothing=0.0):
    if weight is not None:
        return "weight is given"
    if size_average is not None or reduce is not None:
        return "the legacy size_average/reduce arguments"
    if label_smoothing != 0.0:
        return "label_smoothing > 0"
    if reduction not in _CE_REDUCTIONS:
        return f"reduction={reduction!r}"
    why = _why_not_tensors(input)
    if why:
        return why
    if input.dim() != 2:
        return f"{input.dim()}-D input (fasttx takes (N, C) logits)"
    if type(target) not in PLAIN_TENSOR_TYPES or target.dtype != torch.long or target.dim() != 1:
        return "target is not an (N,) int64 tensor of class indices"
    return _fasttx_cross_entropy(input, target, ignore_index, reduction)


def _linear(input, weight, bias=None):
    if not _takes_fasttx_gemm(input, weight, bias):
        return "not a CPU float32 linear outside autocast (ATen's own GEMM is the fast one there)"
    return _fasttx_linear(input, weight, bias)


# name -> (torch function, router). Order is the documentation's.
ROUTES: dict[str, tuple[Callable, Callable]] = {
    "layer_norm": (F.layer_norm, _layer_norm),
    "rms_norm": (F.rms_norm, _rms_norm),
    "scaled_dot_product_attention": (F.scaled_dot_product_attention, _sdpa),
    "cross_entropy": (F.cross_entropy, _cross_entropy),
    "linear": (F.linear, _linear),
}


def _names(ops) -> tuple:
    if ops is None:
        return tuple(ROUTES)
    by_function = {fn: name for name, (fn, _) in ROUTES.items()}
    if isinstance(ops, str) or (callable(ops) and ops in by_function):
        ops = (ops,)
    elif callable(ops):
        raise TypeError(f"fasttx.accelerate: ops must be names or torch.nn.functional functions, got the function "
                        f"{getattr(ops, '__name__', ops)!r}; as a decorator write @fasttx.accelerate(), with the "
                        "parentheses")
    names = []
    for op in ops:
        name = by_function.get(op, op)
        if name not in ROUTES:
            raise ValueError(f"fasttx.accelerate: ops must name functions from {tuple(ROUTES)} (or be those "
                             f"torch.nn.functional functions), got {op!r}")
        names.append(name)
    return tuple(dict.fromkeys(names))


# ---- the mode ---------------------------------------------------------------------

class accelerate(TorchFunctionMode):  # noqa: N801  (a context manager used like a function)
    """``with fasttx.accelerate(): ...`` (or ``@fasttx.accelerate()``): inside, calls of
    ``F.layer_norm``, ``F.rms_norm``, ``F.scaled_dot_product_attention``, ``F.cross_entropy``
    and ``F.linear`` that fasttx serves exactly run on fasttx's ops; every other call runs
    torch's, unchanged. See fasttx/patching/accelerate.py for the rules and docs/usage.md.

    ``ops``: names (``"layer_norm"``, ``"rms_norm"``, ``"scaled_dot_product_attention"``,
    ``"cross_entropy"``, ``"linear"``) or the ``torch.nn.functional`` functions themselves to
    route; default all of them.

    After (or during) the block, ``routed[name]`` counts the calls fasttx served,
    ``passed[name]`` those of a routable function that went to torch, ``reasons[name]`` why
    (a Counter of reasons), and ``report()`` says it all in text. The counters add up over
    every use of one object (as a decorator, every call of the function).

    Overhead (``python -m bench.accelerate_nanogpt --overhead``, 1 thread, tiny tensors, this
    project's 2-core machine under load): a torch call that passes through cost 4.6 µs instead
    of 1.4; a routed F.layer_norm 26 µs against 14 µs for fasttx.layer_norm called directly,
    half of the difference torch's own dispatch into a mode. Small next to a model's kernels.
    Autograd, ``torch.no_grad``, autocast and ``torch.func`` work inside it as they do on the
    ops; under ``torch.compile`` calls are the compiler's and pass through.
    """

    def __init__(self, ops: Optional[Iterable] = None):
        super().__init__()
        self.ops = _names(ops)
        self._routes = {ROUTES[name][0]: (name, ROUTES[name][1]) for name in self.ops}
        self.routed: collections.Counter = collections.Counter()
        self.passed: collections.Counter = collections.Counter()
        self.reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = self._routes.get(func)
        if route is None or torch.compiler.is_compiling():
            return func(*args, **(kwargs or {}))
        name, router = route
        kwargs = kwargs or {}
        try:
            if torch._C._len_torch_function_stack():  # inside another context: see _call_without_accelerate
                result = _call_without_accelerate(router, args, kwargs)
            else:
                result = router(*args, **kwargs)
        except _FALLBACK_ERRORS as err:  # fasttx's checks refused it (or torch's signature did): torch judges
            result = f"fasttx refused it ({type(err).__name__}: {err})"
        if type(result) is not str:
            self.routed[name] += 1
            return result
        self.passed[name] += 1
        self.reasons[name][result] += 1
        return func(*args, **kwargs)

    def __exit__(self, exc_type, exc_val, exc_tb):
        popped = torch._C._pop_torch_function_stack()
        if popped is not self:  # exited out of order: put it back and say so, rather than drop another mode
            torch._C._push_on_torch_function_stack(popped)
            raise RuntimeError("fasttx.accelerate: contexts exited out of order")

    def __call__(self, fn: Callable) -> Callable:
        """As a decorator: ``fn`` runs inside this context on every call."""
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)
        return run

    def report(self) -> str:
        names = [n for n in self.ops if self.routed[n] or self.passed[n]]
        lines = [f"fasttx.accelerate: {sum(self.routed.values())} call(s) routed to fasttx, "
                 f"{sum(self.passed.values())} passed to torch"]
        if not names:
            lines.append(f"  no call of {', '.join(self.ops)} was seen")
        for name in names:
            lines.append(f"  {name}: {self.routed[name]} routed, {self.passed[name]} passed to torch")
            for why, count in self.reasons[name].most_common():
                lines.append(f"    {count} x {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"fasttx.accelerate(ops={self.ops!r})"


def _call_without_accelerate(router: Callable, args: tuple, kwargs: dict):
    """``router(*args, **kwargs)``; any enclosing accelerate contexts are popped meanwhile (torch has
    popped this one), so that fasttx's op runs its eager fast path. Another kind of mode stays: it
    sees fasttx's calls, and the ops then take their registered path. Arguments outside torch's
    signature raise TypeError here, and torch's own call then says what is wrong."""
    depth = torch._C._len_torch_function_stack()
    if not all(isinstance(torch._C._get_function_stack_at(i), accelerate) for i in range(depth)):
        return router(*args, **kwargs)
    popped = [torch._C._pop_torch_function_stack() for _ in range(depth)]
    try:
        return router(*args, **kwargs)
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


__all__ = ["accelerate", "ROUTES"]
