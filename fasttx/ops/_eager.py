"""The eager fast path: call an op's implementation through a plain autograd.Function.

Every op is registered with ``torch.library`` so that torch.compile, export and
FakeTensor tracing see one opaque node with a fake implementation. Going
through that registration costs a round trip through the dispatcher, pytree
flattening and a generated autograd.Function on every call: measured on this
project's 2-core machines, about 0.15 ms per forward+backward of a norm, as
much as the whole kernel at (4096, 768). A plain eager call has nothing to
trace, so it runs the very same forward and backward functions through
``torch.autograd.Function`` directly; anything else goes to the registered op.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def plain_eager(*tensors) -> bool:
    """True when nothing traces this call: no compiler, no torch.jit.trace, no dispatch or
    function mode, no functorch transform or forward-mode AD, and only plain tensors or
    nn.Parameters (FakeTensor, FunctionalTensor and other subclasses are not)."""
    return (not torch.compiler.is_compiling()
            and not torch._C._is_tracing()  # torch.jit.trace records the registered op; a Function runs untraced
            and _get_current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled()
            and not under_transform()
            and all(t is None or type(t) in PLAIN_TENSOR_TYPES for t in tensors))


def under_transform() -> bool:
    """True under a torch.func transform (grad, vmap, jvp, jacrev, ...) or inside forward-mode
    AD's dual_level. The ops' Functions and registered ops implement reverse mode only: through
    them functorch's grad raised and a jvp came back silently wrong. There the ops run their
    reference in torch ops instead, which every transform and any order of derivative understands."""
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


# nn.Parameter disables __torch_function__: a module's weights are as plain as a tensor.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function running ``forward`` and, in backward, ``backward(ctx, *grads)``:
    the same three pieces a custom op's ``register_autograd`` takes.

    Written in the ctx-first style on purpose: with a separate setup_context,
    Function.apply binds the arguments through inspect.signature on every call,
    which alone costs more than a small kernel.

    ``backward`` runs with grad mode on when autograd records it (create_graph=True):
    then it must compute in differentiable torch ops (see graphed_backward), never a
    kernel whose result would be a constant to autograd.
    """
    def run_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run_forward),
        "backward": staticmethod(backward),
    })


def graphed_backward() -> bool:
    """True in a backward that autograd records (``create_graph=True``, as a gradient penalty or
    ``torch.autograd.gradgradcheck`` runs it). A kernel's gradients would come back as constants
    there and silently drop the second derivative's terms, so the ops then compute their
    gradients in torch ops from the saved inputs, statistics included."""
    return torch.is_grad_enabled()
