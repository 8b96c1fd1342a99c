"""Channel-count rounding and top-k masks from importance scores: pure functions."""
from __future__ import annotations

import torch


def kept_heads(num_heads: int, ratio: float) -> int:
    """Heads kept when pruning ``ratio`` of ``num_heads``: whole heads, at least one."""
    _check_ratio(ratio)
    return max(num_heads - round(num_heads * ratio), 1)


def kept_channels(num_channels: int, ratio: float, multiple: int = 8) -> int:
    """Channels kept when pruning ``ratio``: a multiple of ``multiple`` where possible, never zero.

    ``ratio=0`` keeps every channel, even when ``num_channels`` is not a multiple.
    """
    _check_ratio(ratio)
    if ratio == 0:
        return num_channels
    keep = int(round(num_channels * (1.0 - ratio) / multiple)) * multiple
    return min(max(keep, min(multiple, num_channels), 1), num_channels)


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"a pruning ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a pruning ratio must lie in [0, 1) (the share removed), got {ratio}")


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` highest scores (ties: lower index wins)."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"keep must lie in [1, {scores.numel()}], got {keep}")
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:keep]] = True
    return mask
