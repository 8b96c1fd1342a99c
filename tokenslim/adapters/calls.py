"""Reduced blocks called as modules: what every adapter shares so that PyTorch hooks keep firing.

A patched forward does not run a block's ``forward``: attention, the reduction step and the MLP
are the adapter's own function. Calling that function directly would skip ``Module.__call__``,
and with it every forward hook and pre-hook a user put on the block or its attention (feature
extractors, attention explainers, activation statistics, profilers that name modules).

So at :func:`tokenslim.patch` time each block and attention module gets its class swapped for a
subclass (:func:`hooked_class`) whose ``forward`` is the original one unless the call carries a
``tokenslim_call`` keyword. The adapter calls the module through ``__call__`` with that keyword
(:func:`call_through`); the subclass then runs the adapter's function instead. Hooks therefore
fire once per forward with the tensors as they are at that point (the reduced token count), and a
hook that replaces the module's output is honoured. Weights, ``state_dict`` keys and ``deepcopy``
are untouched; the classes are found by name for ``pickle``.

The per-call state rides in a :class:`ReducedCall` made for one call and never stored on a
module. Its inputs are never mutated, so a gradient-checkpointing recompute of the same call
reads the same inputs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from torch import nn

CALL_KEYWORD = "tokenslim_call"
"""The keyword that routes a module call to the adapter's reduced function (pre-hooks registered
``with_kwargs=True`` see it)."""


class ReducedCall:
    """One module call's reduced work: ``fn(module, x, *state) -> (output, *extras)``.

    The output is what the module returns (what forward hooks see); the extras (sizes, source map,
    attention scores) are kept here for the adapter to read after the call.
    """

    __slots__ = ("fn", "state", "extras")

    def __init__(self, fn: Callable[..., Tuple[Any, ...]], state: Tuple[Any, ...]) -> None:
        self.fn, self.state, self.extras = fn, state, ()

    def run(self, module: nn.Module, x: Any) -> Any:
        out, *extras = self.fn(module, x, *self.state)
        self.extras = tuple(extras)
        return out


class CallThrough:
    """Mixin of the hooked classes: the base class's ``forward`` unless a :class:`ReducedCall` is given."""

    _tokenslim_base: type

    def forward(self, *args: Any, tokenslim_call: Optional[ReducedCall] = None, **kwargs: Any) -> Any:
        if tokenslim_call is None:
            return super().forward(*args, **kwargs)
        return tokenslim_call.run(self, args[0])


_HOOKED: Dict[type, type] = {}


def hooked_class(cls: type, module: str) -> type:
    """The hooked subclass of ``cls`` (made once; ``cls`` itself if it is already hooked).

    Args:
        cls: a block or attention class an adapter reduces.
        module: the adapter module that names it (``pickle`` looks ``TokenSlim<Name>`` up there).
    """
    if issubclass(cls, CallThrough):
        return cls
    if cls not in _HOOKED:
        name = f"TokenSlim{cls.__name__}"
        _HOOKED[cls] = type(name, (CallThrough, cls), {
            "__module__": module, "__qualname__": name, "_tokenslim_base": cls,
            "__doc__": f"{cls.__name__} as patched by tokenslim: its own forward, or the reduced block when "
                       "called with tokenslim_call (see tokenslim.adapters.calls).",
        })
    return _HOOKED[cls]


def hooked_by_name(name: str, candidates: Tuple[type, ...], module: str) -> Optional[type]:
    """The hooked class called ``name`` among ``candidates`` (for an adapter module's ``__getattr__``)."""
    for cls in candidates:
        if f"TokenSlim{cls.__name__}" == name:
            return hooked_class(cls, module)
    return None


def base_class(cls: type) -> type:
    """The framework's class behind a hooked class (``cls`` itself otherwise)."""
    return cls._tokenslim_base if issubclass(cls, CallThrough) else cls


def hook_module(module: nn.Module, adapter: str) -> None:
    """Swap ``module``'s class for its hooked subclass (idempotent)."""
    module.__class__ = hooked_class(type(module), adapter)


def unhook_all(root: nn.Module) -> None:
    """Give every hooked module under ``root`` its framework class back."""
    for module in root.modules():
        if isinstance(module, CallThrough):
            module.__class__ = module._tokenslim_base


def call_through(module: nn.Module, fn: Callable[..., Tuple[Any, ...]], x: Any, *state: Any,
                 inputs: Optional[Tuple[Any, ...]] = None) -> Tuple[Any, ...]:
    """Run ``fn(module, x, *state)`` inside ``module.__call__``, so the module's hooks fire.

    Args:
        module: a hooked module (see :func:`hook_module`).
        fn: the reduced work; returns ``(output, *extras)``.
        x: the input the hooks see (after pre-hooks, ``fn`` receives what they return).
        state: further inputs of ``fn``, passed as they are.
        inputs: the positional inputs as the framework's own caller passes them, when they are more
            than ``x`` (``nn.MultiheadAttention`` takes ``(x, x, x)``); the first is ``fn``'s input.

    Returns:
        ``(output, *extras)``: the module's output as the forward hooks left it, then the extras.
    """
    call = ReducedCall(fn, state)
    out = module(*(inputs if inputs is not None else (x,)), **{CALL_KEYWORD: call})
    return (out, *call.extras)


def check_reducible(i: int, block: nn.Module, attn: Optional[nn.Module], blocks: Tuple[type, ...],
                    attentions: Tuple[type, ...], supported: str) -> None:
    """Refuse, naming block ``i``, a block the patch did not wire (replaced after :func:`tokenslim.patch`)."""
    wired = isinstance(block, CallThrough) and isinstance(attn, CallThrough)
    if wired and base_class(type(block)) in blocks and base_class(type(attn)) in attentions:
        return
    attn_name = type(attn).__qualname__ if attn is not None else "no"
    if base_class(type(block)) in blocks and attn is not None and base_class(type(attn)) in attentions:
        raise TypeError(f"block {i} is now a new {type(block).__qualname__}: it was replaced after tokenslim.patch, "
                        "so its reduction is not wired. Call tokenslim.patch(model, ...) again after replacing "
                        "blocks, or tokenslim.unpatch(model) to run it unreduced")
    raise TypeError(f"block {i} is now a {type(block).__qualname__} with {attn_name} attention: it was replaced after "
                    f"tokenslim.patch, and token reduction supports {supported} only. Restore the block, or "
                    "tokenslim.unpatch(model) to run it unreduced")


def wire(blocks: Iterable[nn.Module], attention_of: Callable[[nn.Module], nn.Module], adapter: str) -> None:
    """Hook every block and its attention (``attention_of(block)``) for :func:`call_through`."""
    for block in blocks:
        hook_module(block, adapter)
        hook_module(attention_of(block), adapter)


def class_lookup(adapter: str, candidates: Tuple[type, ...]) -> Callable[[str], type]:
    """A module ``__getattr__`` that finds ``adapter``'s hooked classes by name (``pickle`` asks it
    in a fresh process, where the classes are not made yet)."""

    def __getattr__(name: str) -> type:
        found = hooked_by_name(name, candidates, adapter)
        if found is None:
            raise AttributeError(f"module {adapter!r} has no attribute {name!r}")
        return found

    return __getattr__
