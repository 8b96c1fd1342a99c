"""GMACs and parameter counts of a (possibly patched or narrowed) model, without real data.

The model is copied onto the meta device (no weights are copied, no real forward runs) and run
once under ``torch.utils.flop_counter.FlopCounterMode``, so the count follows the real per-block
token counts of a patched model and the real widths of a narrowed one. Unit: GMACs, one
multiply-add = 1 (the unit papers call "GFLOPs": DeiT-S 4.6, ViT-B/16 17.58), attention matmuls
included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..input_size import default_img_size, resolve_img_size  # noqa: F401  (default_img_size re-exported)
from ..meta import meta_copy  # noqa: F401  (re-exported)
from torch.utils.flop_counter import FlopCounterMode

UNIT = "GMACs (1 multiply-add = 1; attention matmuls included)"


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of attention: q @ k^T and attn @ v. FlopCounterMode counts 0 for this op."""
    b, h, n_q, d = query_shape
    n_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * b * h * n_q * n_k * (d + d_v)


def _custom_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    return mapping


@dataclass
class ModelCost:
    """Compute and size of a model for one image.

    Attributes:
        gmacs: multiply-adds per image, in billions (see :data:`UNIT`).
        params_m: parameters, in millions.
        img_size: ``(height, width)`` counted at.
        unit: the MAC convention, stated with every number.
    """

    gmacs: float
    params_m: float
    img_size: Tuple[int, int]
    unit: str = UNIT

    def to_dict(self) -> dict:
        return asdict(self)


def count_macs(
    model: nn.Module,
    img_size: Optional[Union[int, Sequence[int]]] = None,
    in_chans: int = 3,
) -> ModelCost:
    """Count GMACs per image and parameters of ``model``.

    Args:
        model: any ``nn.Module`` taking ``[B, C, H, W]`` images; a patched model is counted with
            its current settings.
        img_size: ``H`` or ``(H, W)``; defaults to the size the model was built for.
        in_chans: input channels.
    """
    size = resolve_img_size(model, img_size)
    params = sum(p.numel() for p in model.parameters())
    meta = meta_copy(model).eval()
    x = torch.empty(1, in_chans, *size, device="meta")
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter, torch.no_grad():
        meta(x)
    return ModelCost(gmacs=counter.get_total_flops() / 2e9, params_m=params / 1e6, img_size=size)
