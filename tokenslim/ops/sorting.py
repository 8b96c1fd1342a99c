"""A stable descending argsort that also exports to ONNX.

ONNX has no stable sort (``aten.sort.stable`` has no ONNX function). In eager mode and under
``torch.compile`` this is ``torch.sort(stable=True)``, bit for bit; while a graph is being exported
it is the same permutation computed from comparisons: an element's rank is the number of elements
greater than it plus the number of equal ones before it, and the order is the inverse of the
ranks (one ScatterElements). It costs ``n x n`` comparisons per row, small for token counts.
"""
from __future__ import annotations

import torch


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting()) or torch.onnx.is_in_onnx_export()


def ranks_desc(x: torch.Tensor) -> torch.Tensor:
    """The position of every element of the last dimension in a stable descending order."""
    n = x.shape[-1]
    xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)  # [..., n, 1] against [..., 1, n]
    index = torch.arange(n, device=x.device)
    before = (index.unsqueeze(0) < index.unsqueeze(1))  # [n (i), n (j)]: j comes before i
    ahead = (xj > xi) | ((xj == xi) & before)
    return ahead.sum(-1)


def argsort_desc_stable(x: torch.Tensor) -> torch.Tensor:
    """Indices that sort the last dimension of ``x`` in descending order, ties in index order."""
    if not _exporting():
        return torch.sort(x, dim=-1, descending=True, stable=True).indices
    rank = ranks_desc(x)
    index = torch.arange(x.shape[-1], device=x.device).expand_as(rank).contiguous()
    return torch.zeros_like(rank).scatter(-1, rank, index)
