"""Size-weighted merging, source maps and unmerging: pure tensor functions.

Sizes are ``[B, N, 1]`` float32 counts of original patches per token (``None`` means all ones).
A *source map* is ``[B, N0]`` int64: for every original token, the index of the current token
that holds it, or ``-1`` once pruning has dropped it without fusion. Sizes are the bincount of the
source map; unmerging is one gather through it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def merge_tokens(
    x: torch.Tensor,
    sizes: Optional[torch.Tensor],
    dest: torch.Tensor,
    num_out: int,
    has_dropped: bool = False,
    norm: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens along a destination map with a size-weighted mean.

    Args:
        x: ``[B, N, C]`` tokens.
        sizes: ``[B, N, 1]`` sizes, or ``None`` for all ones.
        dest: ``[B, N]`` output slot of every token (see :func:`~tokenslim.ops.matching.bipartite_soft_matching`);
            ``-1`` drops a token (only read when ``has_dropped``).
        num_out: number of output tokens.
        has_dropped: ``dest`` may hold ``-1``: those tokens are dropped, with their sizes. A static
            flag, so the common case pays nothing for it.
        norm: ``"mean"``: the size-weighted mean (ToMe). ``"max"``: the size-weighted mean rescaled
            to the largest norm among the merged tokens (ToFu's norm-preserving MLERP merge); a token
            merged with nothing is unchanged either way.

    Returns:
        ``(merged [B, num_out, C] in x's dtype, sizes [B, num_out, 1] float32)``. With ``"mean"`` the
        size-weighted sum of features is preserved; sums are taken in float32 whatever the input dtype.
    """
    batch, n, c = x.shape
    if dest.shape != (batch, n):
        raise ValueError(f"dest must be [{batch}, {n}], got {tuple(dest.shape)}")
    if norm not in ("mean", "max"):
        raise ValueError(f"norm must be 'mean' or 'max', got {norm!r}")
    slots = num_out
    if has_dropped:
        # Dropped tokens go to one extra slot that is cut off afterwards.
        dest = torch.where(dest < 0, num_out, dest)
        slots = num_out + 1
    xf = x.float()
    # Features and sizes travel in one scatter: one pass over memory instead of two.
    if sizes is None:
        weighted = torch.cat([xf, xf.new_ones(batch, n, 1)], dim=-1)  # all sizes 1: nothing to weight
    else:
        weighted = torch.cat([xf * sizes, sizes], dim=-1)
    summed = weighted.new_zeros(batch, slots, c + 1).scatter_add(
        1, dest.unsqueeze(-1).expand(batch, n, c + 1), weighted
    )[:, :num_out]
    new_sizes = summed[..., c:]
    merged = summed[..., :c] / new_sizes
    if norm == "max":
        largest = xf.new_zeros(batch, slots, 1).scatter_reduce(
            1, dest.unsqueeze(-1), xf.norm(dim=-1, keepdim=True), reduce="amax", include_self=False
        )[:, :num_out]
        merged = merged * (largest / merged.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(merged.dtype).tiny))
    return merged.to(x.dtype), new_sizes


def update_source(source: Optional[torch.Tensor], dest: torch.Tensor, has_dropped: bool = False) -> torch.Tensor:
    """Compose a source map with one reduction step's destination map.

    ``source=None`` means nothing has been reduced yet (the identity map), so the result is
    ``dest``. ``has_dropped`` says that ``source`` may hold ``-1`` (dropped tokens), which stay
    ``-1``; it is a static flag so that the common case costs one gather and nothing else.
    """
    if source is None:
        return dest
    if not has_dropped:
        return dest.gather(1, source)
    return dest.gather(1, source.clamp(min=0)).masked_fill(source < 0, -1)


def unmerge(x: torch.Tensor, source: torch.Tensor, has_dropped: bool = False) -> torch.Tensor:
    """Expand ``[B, N, C]`` tokens back to ``[B, N0, C]``: every original position gets its token.

    A plain mean over the result equals the size-weighted mean of ``x``; a softmax over repeated
    keys equals proportional attention. That is why pooling heads need no change. Positions of
    tokens dropped without fusion (``-1``, only when ``has_dropped``) are zero.
    """
    if source.dim() != 2 or x.dim() != 3 or source.shape[0] != x.shape[0]:
        raise ValueError(f"unmerge needs tokens [B, N, C] and a source map [B, N0] of the same batch size, "
                         f"got {tuple(x.shape)} and {tuple(source.shape)}")
    index = source.clamp(min=0) if has_dropped else source
    out = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.masked_fill((source < 0).unsqueeze(-1), 0) if has_dropped else out


def sizes_from_source(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, num_tokens, 1]`` float32 sizes implied by a source map."""
    counts = torch.zeros(source.shape[0], num_tokens + 1, dtype=torch.float32, device=source.device)
    # Dropped positions (-1) are counted in an extra bin that is cut off.
    counts.scatter_add_(1, source.clamp(min=-1) % (num_tokens + 1), torch.ones_like(source, dtype=torch.float32))
    return counts[:, :num_tokens].unsqueeze(-1)


def source_matrix(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Dense ``[B, num_tokens, N0]`` 0/1 matrix: row ``i`` marks the original tokens token ``i`` holds.

    This is ToMe's visualisation format; the row sums are the sizes.

    Raises:
        ValueError: ``num_tokens`` smaller than a token index in ``source`` (rows would be lost).
    """
    if source.numel() and int(source.max()) >= num_tokens:
        raise ValueError(f"the source map refers to token {int(source.max())}, but num_tokens={num_tokens}: "
                         "pass the number of tokens the map refers to (e.g. trace.tokens.shape[1])")
    tokens = torch.arange(num_tokens, device=source.device)
    return (source.unsqueeze(1) == tokens.view(1, -1, 1)).to(torch.float32)


def size_log_bias(sizes: torch.Tensor) -> torch.Tensor:
    """Proportional-attention bias ``log(size)`` per key, shaped ``[B, 1, 1, N]`` (float32).

    Cast it to the query dtype only at the attention call, so sizes and logs stay float32.
    """
    return sizes.log().transpose(1, 2).unsqueeze(1)
