"""The input size a ViT takes, checked before any work: pure Python over the patch embedding's settings."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from torch import nn


def default_img_size(model: nn.Module) -> Tuple[int, int]:
    """The input size a timm model was built for (``patch_embed.img_size``, else its data config)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return tuple(size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"][-2:])
    raise ValueError("cannot tell the model's input size: pass img_size=")


def resolve_img_size(model: nn.Module, img_size: Optional[Union[int, Sequence[int]]] = None) -> Tuple[int, int]:
    """``(height, width)`` for ``img_size`` (the model's own size when ``None``), refused early if the
    model cannot take it.

    Raises:
        TypeError: not an int or a pair of ints (e.g. the string ``'32'``).
        ValueError: a size the model's patch embedding refuses: another size than the one a
            fixed-size model was built for, or one that is not a multiple of the patch size.
    """
    if img_size is None:
        return default_img_size(model)
    if isinstance(img_size, bool) or not isinstance(img_size, (int, tuple, list)):
        raise TypeError(f"img_size must be an int or (height, width) of ints, got {img_size!r}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"img_size must be a positive int or (height, width) of positive ints, got {img_size!r}")
    patch_embed = getattr(model, "patch_embed", None)
    built = getattr(patch_embed, "img_size", None)
    patch = getattr(patch_embed, "patch_size", None)
    if built is None or patch is None:
        return size
    if getattr(patch_embed, "strict_img_size", False) and not getattr(patch_embed, "dynamic_img_size", False) \
            and size != tuple(built):
        raise ValueError(
            f"this model takes {built[0]}x{built[1]} px inputs (fixed when it was created); got {size[0]}x{size[1]}. "
            f"Use img_size={built[0]}, or create the model with dynamic_img_size=True (or img_size={size[0]})"
        )
    if not getattr(patch_embed, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(f"img_size {size[0]}x{size[1]} is not a multiple of the model's {patch[0]}x{patch[1]} px "
                         "patches; pick a multiple")
    return size
