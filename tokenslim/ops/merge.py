"""Size-weighted merging, source maps and unmerging: pure tensor functions.

Sizes are ``[B, N, 1]`` float32 counts of original patches per token (``None`` means all ones).
A *source map* is ``[B, N0]`` int64: for every original token, the index of the current token
that holds it. Sizes are the bincount of the source map; unmerging is one gather through it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def merge_tokens(
    x: torch.Tensor,
    sizes: Optional[torch.Tensor],
    dest: torch.Tensor,
    num_out: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens along a destination map with a size-weighted mean.

    Args:
        x: ``[B, N, C]`` tokens.
        sizes: ``[B, N, 1]`` sizes, or ``None`` for all ones.
        dest: ``[B, N]`` output slot of every token (see :func:`~tokenslim.ops.matching.bipartite_soft_matching`).
        num_out: number of output tokens.

    Returns:
        ``(merged [B, num_out, C] in x's dtype, sizes [B, num_out, 1] float32)``. The size-weighted
        sum of features is preserved; sums are taken in float32 whatever the input dtype.
    """
    batch, n, c = x.shape
    if dest.shape != (batch, n):
        raise ValueError(f"dest must be [{batch}, {n}], got {tuple(dest.shape)}")
    if sizes is None:
        sizes = x.new_ones(batch, n, 1, dtype=torch.float32)
    # Features and sizes travel in one scatter: one pass over memory instead of two.
    weighted = torch.cat([x.float() * sizes, sizes], dim=-1)
    summed = weighted.new_zeros(batch, num_out, c + 1).scatter_add(
        1, dest.unsqueeze(-1).expand(batch, n, c + 1), weighted
    )
    new_sizes = summed[..., c:]
    return (summed[..., :c] / new_sizes).to(x.dtype), new_sizes


def update_source(source: Optional[torch.Tensor], dest: torch.Tensor) -> torch.Tensor:
    """Compose a source map with one merge step's destination map.

    ``source=None`` means no merge has happened yet (the identity map), so the result is ``dest``.
    """
    if source is None:
        return dest
    return dest.gather(1, source)


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Expand ``[B, N, C]`` tokens back to ``[B, N0, C]``: every original position gets its token.

    A plain mean over the result equals the size-weighted mean of ``x``; a softmax over repeated
    keys equals proportional attention. That is why pooling heads need no change.
    """
    return x.gather(1, source.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sizes_from_source(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, num_tokens, 1]`` float32 sizes implied by a source map."""
    counts = torch.zeros(source.shape[0], num_tokens, dtype=torch.float32, device=source.device)
    counts.scatter_add_(1, source, torch.ones_like(source, dtype=torch.float32))
    return counts.unsqueeze(-1)


def source_matrix(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Dense ``[B, num_tokens, N0]`` 0/1 matrix: row ``i`` marks the original tokens token ``i`` holds.

    This is ToMe's visualisation format; the row sums are the sizes.
    """
    tokens = torch.arange(num_tokens, device=source.device)
    return (source.unsqueeze(1) == tokens.view(1, -1, 1)).to(torch.float32)


def size_log_bias(sizes: torch.Tensor) -> torch.Tensor:
    """Proportional-attention bias ``log(size)`` per key, shaped ``[B, 1, 1, N]`` (float32).

    Cast it to the query dtype only at the attention call, so sizes and logs stay float32.
    """
    return sizes.log().transpose(1, 2).unsqueeze(1)
