"""Validation of reduction settings: each check is a pure function of a value and the model facts
it depends on, returns the normalised value, and raises with a message that says what to pass.

:class:`tokenslim.schedule.ReductionSettings` calls these from its setters, so a bad value fails
where it is set rather than inside a forward pass.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

OPTION_OWNERS = {"threshold": "ppt", "margin": "pitome"}
"""Which method each numeric option belongs to."""

KeepRate = Union[float, Tuple[float, ...]]


def check_method(value: str, has_class_token: bool, options: Dict[str, Optional[float]]) -> Any:
    """The :class:`~tokenslim.methods.base.ReductionMethod` named ``value``, refused where it needs
    a class token the model lacks or where an option of another method is set."""
    from .methods import get_method

    method = get_method(value)
    if method.needs_class_token and not has_class_token:
        raise ValueError(
            f"method {method.name!r} ranks tokens by the class token's attention, and this model has no class "
            "token (class_token=False); use method='tome', 'mlerp', 'pitome' or 'atc'"
        )
    for name, current in options.items():
        if current is not None and method.option != name:
            raise ValueError(f"{name}= is an option of another method, not of {method.name!r}; set {name}=None first")
    return method


def check_option(name: str, value: Optional[float], method: Any) -> Optional[float]:
    """A method option (``threshold``, ``margin``) as a finite float, refused for another method."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if method.option != name:
        raise ValueError(f"{name}= is an option of method={OPTION_OWNERS[name]!r}, not of method={method.name!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if name == "threshold" and value < 0:
        raise ValueError(f"threshold is a variance and must be >= 0, got {value}")
    return value


def check_rope(value: Optional[str], has_rope: bool) -> Optional[str]:
    """A rotary treatment name (lower case), refused on models without rotary positions."""
    from .ops.rope import ROPE_TREATMENTS

    if value is None:
        return None
    if not has_rope:
        raise ValueError("rope= sets how merged tokens get their rotary positions, and this model has no "
                         "rotary position embedding; leave rope unset")
    if not isinstance(value, str) or value.lower() not in ROPE_TREATMENTS:
        raise ValueError(f"rope must be one of {', '.join(ROPE_TREATMENTS)}, got {value!r}")
    return value.lower()


def check_prune_layers(value: Sequence[int]) -> Tuple[int, ...]:
    """Block indices as a tuple of distinct ints (their range is checked with the keep rates)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"prune_layers must be a sequence of block indices, got {type(value).__name__}")
    layers = tuple(value)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"prune_layers must hold ints, got {i!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"prune_layers has repeated blocks: {layers}")
    return layers


def check_pruning(layers: Tuple[int, ...], rates: KeepRate, depth: int) -> None:
    """While pruning is on: every pruning block exists and there is one rate per block (or one for all).
    Only checked then, so the default blocks (3, 6, 9) do not break shallow models."""
    for i in layers:
        if not 0 <= i < depth:
            raise ValueError(f"prune layer {i} is out of range for a model with {depth} blocks; "
                             "pass prune_layers=... with 0-based block indices")
    if not isinstance(rates, float) and len(rates) != len(layers):
        raise ValueError(f"keep_rate lists {len(rates)} rates for {len(layers)} pruning blocks {layers}")


def check_keep_rate(value: Optional[Union[float, Sequence[float]]], has_class_token: bool) -> Optional[KeepRate]:
    """A keep rate in (0, 1] or a tuple of them; pruning (a rate below 1) needs a class token."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rates: KeepRate = float(value)
        check = [rates]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        rates = tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value)
        check = list(rates)
    else:
        raise TypeError(f"keep_rate must be a float in (0, 1], a list of them, or None; got {type(value).__name__}")
    for v in check:
        if not isinstance(v, float):
            raise TypeError(f"keep_rate values must be numbers, got {v!r}")
        if not 0.0 < v <= 1.0:
            raise ValueError(f"keep_rate must lie in (0, 1], got {v}")
    if not has_class_token and any(v < 1.0 for v in check):
        raise ValueError("attention-score pruning ranks tokens by the class token's attention, and this model has no "
                         "class token (class_token=False); use token merging (r=...) instead")
    return rates


def check_bool(name: str, value: Any, optional: bool = False) -> Optional[bool]:
    """``value`` if it is a bool (or ``None`` where ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool{' or None' if optional else ''}, got {type(value).__name__}")
    return value


__all__ = ["OPTION_OWNERS", "check_bool", "check_keep_rate", "check_method", "check_option", "check_pruning",
           "check_prune_layers", "check_rope"]
