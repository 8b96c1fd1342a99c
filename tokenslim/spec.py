"""Reduction settings written as text, for the command line and result files.

A setting is comma-separated ``key=value`` pairs whose values are Python literals, e.g.
``r=16``, ``r=(16,-1)``, ``r=[8,8,8],prop_attn=False``. ``none`` (or an empty string) means the
unpatched model. Keys are the keyword arguments of :func:`tokenslim.patch`.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Dict, List

from torch import nn

BASELINE_NAMES = ("", "none", "baseline", "unpatched")


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
    from .timm_vit import patch

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
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"setting {text!r}: value of {key} is not a literal: {value!r}") from None
    return out


def format_setting(setting: Dict[str, Any]) -> str:
    """Inverse of :func:`parse_setting` (``"none"`` for the unpatched model)."""
    if not setting:
        return "none"
    return ",".join(f"{k}={v!r}".replace(" ", "") for k, v in setting.items())


def apply_setting(model: nn.Module, setting: Dict[str, Any]) -> nn.Module:
    """Patch ``model`` with a parsed setting (an empty setting leaves it unpatched)."""
    from .timm_vit import patch, unpatch

    if not setting:
        return unpatch(model)
    return patch(model, **setting)
