"""Keep cheap activations as recipes, not tensors, until backward needs them.

In a pre-LN block every LayerNorm output is kept twice: the norm saves its
input for its own backward, and the linear after it saves the output. The
output is a pure function of that input, so keeping it costs d_model values
per token and buys nothing but one elementwise pass.

Inside ``recomputed_activations()``, a tensor given to ``remember(t, rebuild,
*inputs)`` that an autograd function then saves is packed as its recipe
(``rebuild``, which reads only ``inputs``, tensors kept anyway); backward
calls it again. Outside, ``remember`` does nothing.
The recipes here rebuild bit-identical tensors: the same norm kernel on the
same input (add_layer_norm's output equals layer_norm of its saved sum).

Under saved-tensor hooks autograd stops checking saved tensors' versions, so
the hooks check them: every tensor saved inside the block (kept, recomputed,
or read by a recipe) that is modified in place after the forward raises in
backward with autograd's own message, as it would without the hooks.

Nothing is installed under torch.compile (its partitioner chooses what to
recompute), torch.jit.trace (a trace keeps no hooks) or torch.func transforms
(which refuse saved-tensor hooks), without grad mode, or when other
saved-tensor hooks are active (torch.utils.checkpoint, save_on_cpu): ours
would shadow them. A recipe
registered under autocast replays under the same autocast settings.

Under autocast, the lower-precision copies that a linear saves (of a weight,
of a norm's output) are activations too: ``autocast_operand(t)`` makes the
cast autocast would make, and registers it, rebuilt from the parameter or
from t's own recipe.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from fasttx.ops._eager import under_transform


# Autograd's own words, so that users and their tools recognise the error.
_MODIFIED = "one of the variables needed for gradient computation has been modified by an inplace operation"


def _check_version(t: Tensor, version: int) -> None:
    if t._version != version:
        raise RuntimeError(
            f"{_MODIFIED}: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version {version} "
            "instead. fasttx: it was saved for backward inside a fasttx TransformerBlock or GPT (or another "
            "recomputed_activations() block); clone it before modifying it, or modify it after backward")


class _Kept:
    """A saved tensor kept as it is, with the version autograd would have checked."""
    __slots__ = ("tensor", "version")

    def __init__(self, t: Tensor) -> None:
        # Detached (same data, same version counter): t itself would hold its grad_fn, and a node that
        # saves its own output would then hold itself, a cycle Python's collector cannot see.
        self.tensor, self.version = t.detach(), t._version

    def __call__(self) -> Tensor:
        _check_version(self.tensor, self.version)
        return self.tensor


class _Recipe:
    __slots__ = ("rebuild", "inputs", "versions", "registered", "version", "size", "stride", "offset")

    def __init__(self, rebuild: Callable[[], Tensor], inputs: tuple, versions: tuple, saved: Tensor,
                 registered: Tensor) -> None:
        self.rebuild, self.inputs, self.versions = rebuild, inputs, versions
        # saved may be a passing view of registered, which shares its version. Weak: the point is not to
        # keep it; once dead, nothing can modify it any more.
        self.registered, self.version = weakref.ref(registered), saved._version
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()

    def __call__(self) -> Tensor:
        registered = self.registered()
        if registered is not None:
            _check_version(registered, self.version)
        for t, version in zip(self.inputs, self.versions):
            _check_version(t, version)
        with torch.no_grad():
            return self.rebuild().as_strided(self.size, self.stride, self.offset)


class Recipes:
    """The tensors registered in one forward, keyed by storage address, with their recipes."""

    def __init__(self) -> None:
        # storage address -> (weak reference to the tensor, its recipe, the tensors the recipe reads, their
        # versions when t was made). Weak, so that a registered tensor dies as soon as nothing else holds it;
        # a dead entry is ignored, as its address may by then belong to another tensor.
        self._entries: dict[int, tuple[weakref.ref, Callable[[], Tensor], tuple, tuple]] = {}

    def remember(self, t: Tensor, rebuild: Callable[[], Tensor], inputs: tuple,
                 versions: Optional[tuple] = None) -> Tensor:
        """Register t's recipe; versions: those of inputs when t was made, if not now."""
        # Only a fresh, whole, contiguous tensor: the recipe rebuilds exactly that layout.
        whole = t.numel() and t.is_contiguous() and t.storage_offset() == 0 \
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not whole:
            return t
        device = t.device.type
        if torch.is_autocast_enabled(device):  # backward runs outside autocast: replay the forward's
            dtype, inner = torch.get_autocast_dtype(device), rebuild

            def rebuild() -> Tensor:
                with torch.autocast(device, dtype=dtype):
                    return inner()
        versions = tuple(i._version for i in inputs) if versions is None else versions
        self._entries[t.untyped_storage().data_ptr()] = (weakref.ref(t), rebuild, inputs, versions)
        return t

    def recipe_of(self, t: Tensor) -> Optional[tuple[Callable[[], Tensor], tuple, tuple]]:
        """The rebuild, inputs and their versions registered for t itself, or None."""
        entry = self._entries.get(t.untyped_storage().data_ptr())
        return entry[1:] if entry is not None and entry[0]() is t else None

    def clear(self) -> None:
        self._entries.clear()

    def pack(self, t: Tensor):
        try:
            address = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor without real storage (fake, functorch)
            return _Kept(t)
        entry = self._entries.get(address)
        registered = entry[0]() if entry is not None else None
        if registered is None or registered.untyped_storage().data_ptr() != address or registered.dtype != t.dtype:
            return _Kept(t)
        return _Recipe(entry[1], entry[2], entry[3], t, registered)

    @staticmethod  # not a bound method: autograd keeps the unpack hook, and with it would keep _entries
    def unpack(packed):
        return packed()


def _other_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # where torch cannot say, assume they are


_CURRENT: contextvars.ContextVar[Optional[Recipes]] = contextvars.ContextVar("fasttx_recipes", default=None)


@contextlib.contextmanager
def recomputed_activations() -> Iterator[None]:
    """Saved tensors registered with ``remember`` inside this block are recomputed in backward.

    Nested uses share the outer one's hooks.
    """
    if (torch.compiler.is_compiling() or torch._C._is_tracing() or under_transform() or _CURRENT.get() is not None
            or not torch.is_grad_enabled() or _other_hooks_active()):
        yield
        return
    recipes = Recipes()
    token = _CURRENT.set(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
            yield
    finally:
        _CURRENT.reset(token)
        recipes.clear()


def remember(t: Tensor, rebuild: Callable[[], Tensor], *inputs: Tensor) -> Tensor:
    """t, to be rebuilt by ``rebuild()`` (which reads only ``inputs``; None among them is skipped) if an
    autograd function saves it inside ``recomputed_activations()``; elsewhere just t."""
    if torch.compiler.is_compiling():
        return t
    recipes = _CURRENT.get()
    return recipes.remember(t, rebuild, tuple(i for i in inputs if i is not None)) if recipes is not None else t


def autocast_dtype(t: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype autocast hands t to a linear in (its lower-precision dtype), or None where t passes
    through as it is: outside autocast, for float64, non-floating tensors and None."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64 \
            or not torch.is_autocast_enabled(t.device.type):
        return None
    dtype = torch.get_autocast_dtype(t.device.type)
    return None if t.dtype == dtype else dtype


def autocast_operand(t: Optional[Tensor]) -> Optional[Tensor]:
    """t as autocast hands it to a linear or an attention (its lower-precision dtype; float64, non-floating
    and None pass through), and outside autocast t itself. The cast is made here, not inside the op, so
    that inside ``recomputed_activations()`` it is rebuilt in backward instead of kept: a parameter's
    from the parameter, a remembered activation's from its recipe. Other tensors are only cast."""
    dtype = autocast_dtype(t)
    if dtype is None:
        return t
    cast = t.to(dtype)
    recipes = _CURRENT.get()
    if recipes is None or torch.compiler.is_compiling():
        return cast
    found = recipes.recipe_of(t)
    if found is not None:
        rebuild, inputs, versions = found
        return recipes.remember(cast, lambda: rebuild().to(dtype), inputs, versions)
    if isinstance(t, torch.nn.Parameter):
        return recipes.remember(cast, lambda: t.to(dtype), (t,))
    return cast
