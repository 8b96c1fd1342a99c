"""Reduction settings written as text, for the command line and result files.

A setting is comma-separated ``key=value`` pairs whose values are Python literals (or
``true``/``false`` and bare words such as method names), e.g. ``r=16``, ``r=(16,-1)``,
``r=[8,8,8],prop_attn=false``, ``mlp_pruned=0.5,r=8``, ``r=8,method=diffrate``. ``none`` (or an
empty string) means the unpatched model. Keys are the keyword arguments of :func:`tokenslim.patch`
and the channel-pruning keys ``heads_pruned``, ``mlp_pruned``, ``criterion`` (a data-free one:
``l1`` or ``l2``) and ``materialize`` (default ``True``: physically smaller layers; ``False``
keeps the masked model, which is exact but not faster).
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Dict, List, Optional, Union

from torch import nn

BASELINE_NAMES = ("", "none", "baseline", "unpatched")
CHANNEL_KEYS = ("heads_pruned", "mlp_pruned", "criterion", "materialize")


def _split_top_level(text: str) -> List[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _patch_keywords() -> List[str]:
    from .patching import patch

    return [p for p in inspect.signature(patch).parameters if p != "model"]


def parse_setting(text: str) -> Dict[str, Any]:
    """Parse ``"r=16,prop_attn=False"`` into ``{"r": 16, "prop_attn": False}``.

    Raises:
        ValueError: malformed pairs, unknown keys, values that are not literals.
    """
    if text.strip().lower() in BASELINE_NAMES:
        return {}
    allowed = _patch_keywords()
    out: Dict[str, Any] = {}
    for pair in _split_top_level(text):
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"setting {text!r}: expected key=value pairs such as r=16, got {pair!r}")
        if key not in allowed:
            raise ValueError(f"setting {text!r}: unknown key {key!r}; known keys: {', '.join(allowed)}")
        if key in out:
            raise ValueError(f"setting {text!r}: {key} is given twice; give each key once")
        out[key] = _parse_value(text, key, value.strip())
    return out


_WORDS = {"true": True, "false": False, "none": None}
WORD_KEYS = ("method", "criterion", "rope")
"""Keys whose values are names, written as bare words (``method=diffrate``)."""


def _parse_value(text: str, key: str, value: str) -> Any:
    """A Python literal; also ``true``/``false``/``none`` in any case, and bare words as strings
    (``method=diffrate``, ``criterion=l1``)."""
    if value.lower() in _WORDS:
        return _WORDS[value.lower()]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if key in WORD_KEYS and value.replace("_", "").replace("-", "").isalnum() and not value[0].isdigit():
            return value
        raise ValueError(
            f"setting {text!r}: cannot read the value of {key}: {value!r}. Write numbers (16, 0.7), lists "
            "([8,8,4]), tuples ((16,-1)), true/false, or a bare word (method=diffrate)"
        ) from None


def apply(model: nn.Module, setting: Union[str, Dict[str, Any], None] = None, **keys: Any) -> nn.Module:
    """Apply settings text (``"r=8,mlp_pruned=0.25"``), a parsed setting, or the same keys as
    keywords, with exactly the meaning they have on the command line; returns ``model``.

    ``tokenslim.apply(model, "r=8,mlp_pruned=0.25")`` equals
    ``tokenslim.apply(model, r=8, mlp_pruned=0.25)``; ``"none"`` leaves the model unpatched.
    """
    if isinstance(setting, str):
        setting = parse_setting(setting)
    merged = {**(setting or {}), **keys}
    unknown = sorted(set(merged) - set(_patch_keywords()))
    if unknown:
        raise TypeError(f"unknown setting keys {unknown}; known: {', '.join(_patch_keywords())}")
    return apply_setting(model, merged)


def format_setting(setting: Dict[str, Any]) -> str:
    """Inverse of :func:`parse_setting` (``"none"`` for the unpatched model)."""
    if not setting:
        return "none"
    return ",".join(f"{k}={v!r}".replace(" ", "") for k, v in setting.items())


def apply_setting(model: nn.Module, setting: Dict[str, Any]) -> nn.Module:
    """Apply a parsed setting: channel pruning first (if any), then the token-reduction patch.

    An empty setting leaves the model unpatched.
    """
    from .adapters.timm_channels import apply_channel_setting
    from .patching import patch, unpatch

    patch_kwargs = {k: v for k, v in setting.items() if k not in CHANNEL_KEYS}
    channel = {k: setting[k] for k in CHANNEL_KEYS if k in setting}
    if channel:
        apply_channel_setting(model, channel.get("heads_pruned", 0.0), channel.get("mlp_pruned", 0.0),
                              channel.get("criterion", "l2"), channel.get("materialize", True))
    model = unpatch(model, keep_channels=True) if not patch_kwargs else patch(model, **patch_kwargs)
    if channel:
        model.tokenslim_pruned_by_patch = True  # unpatch cannot give the removed weights back
    return model


def check_setting(model: nn.Module, setting: Dict[str, Any], text: Optional[str] = None) -> None:
    """Raise the error :func:`apply_setting` would raise for ``model``, without touching it or its weights.

    Used by the command line to refuse a bad setting before any long evaluation or timing starts.
    The patch is tried on a weightless meta-device copy; channel-pruning values are range-checked.
    """
    from .meta import meta_copy
    from .ops.masks import _check_ratio
    from .patching import patch, token_plan

    label = text if text is not None else format_setting(setting)
    try:
        for key in ("heads_pruned", "mlp_pruned"):
            if key in setting:
                _check_ratio(setting[key])
        if setting.get("criterion", "l2") not in ("l1", "l2"):
            raise ValueError(f"criterion must be l1 or l2 in settings text, got {setting['criterion']!r}")
        if not isinstance(setting.get("materialize", True), bool):
            raise TypeError(f"materialize must be true or false, got {setting['materialize']!r}")
        patch_kwargs = {k: v for k, v in setting.items() if k not in CHANNEL_KEYS}
        if patch_kwargs:
            token_plan(patch(meta_copy(model), **patch_kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"setting {label!r} cannot be used with this model: {e}") from None
