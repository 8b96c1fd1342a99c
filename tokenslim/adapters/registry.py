"""Which adapter handles a model, picked from the model's package.

The optional frameworks are imported only when a model of theirs is passed. Both
:mod:`tokenslim.patching` and the channel code (:mod:`tokenslim.adapters.timm_channels`) ask
here, so neither imports the other.
"""
from __future__ import annotations

from types import ModuleType

from torch import nn


def _package(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module.startswith("tokenslim.adapters.hf_vit"):
            return "transformers"
        if module.startswith("tokenslim.adapters.open_clip_vit"):
            return "open_clip"
        if module.startswith("transformers."):
            return "transformers"
        if module.startswith("open_clip."):
            return "open_clip"
    return "timm"


def _holds(model: nn.Module, package: str) -> bool:
    """Whether a module of ``package`` (e.g. open_clip's vision tower) sits inside ``model``."""
    return any(_package(m) == package for m in model.modules())


def adapter_for(model: nn.Module) -> ModuleType:
    """The adapter module that handles ``model``."""
    package = _package(model)
    if package == "timm" and _holds(model, "open_clip"):
        package = "open_clip"
    if package == "transformers":
        from . import hf_vit

        return hf_vit
    if package == "open_clip":
        from . import open_clip_vit

        return open_clip_vit
    if _is_eva(model):
        from . import timm_eva

        return timm_eva
    from . import timm_vit

    return timm_vit


def _is_eva(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Eva`` (the rotary-position family: DINOv3, EVA-02, PE, RoPE-ViT)."""
    from timm.models.eva import Eva

    return isinstance(model, Eva)
