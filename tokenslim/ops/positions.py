"""Where tokens sit on the patch grid once they are merged: pure tensor functions.

A token's *position* is the mean ``(row, col)`` of the patches it holds (read from the source map,
see :mod:`tokenslim.ops.merge`), its *extent* the square root of its size: a token of ``s``
patches covers about ``sqrt(s) x sqrt(s)`` of the grid. Rotary models use the positions to give
merged tokens a rotation (:mod:`tokenslim.ops.rope`), and local merging uses positions and extents
to keep merges between spatial neighbours (:func:`neighbour_scores`).
"""
from __future__ import annotations

from typing import Optional

import torch


def grid_positions(height: int, width: int, num_prefix_tokens: int, device=None) -> torch.Tensor:
    """``[P + H*W, 2]`` float32 ``(row, col)`` of every original token in raster order.

    Prefix tokens (class, registers) have no place on the grid; their rows are zero and never read.
    """
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    grid = torch.stack([rows, cols], dim=-1)
    return torch.cat([grid.new_zeros(num_prefix_tokens, 2), grid], dim=0)


def token_positions(
    grid: torch.Tensor,
    source: Optional[torch.Tensor],
    num_tokens: int,
    batch: int,
) -> torch.Tensor:
    """``[B, N, 3]`` float32: the mean ``(row, col)`` of the patches each current token holds, and its extent.

    Args:
        grid: ``[N0, 2]`` positions of the original tokens (:func:`grid_positions`).
        source: ``[B, N0]`` source map (``-1``: dropped), or ``None`` while nothing is reduced.
        num_tokens: current tokens ``N``.
        batch: ``B`` (read when ``source`` is ``None``).

    A token holding nothing (cannot happen for the tokens a source map refers to) gets position 0.
    """
    if source is None:
        pos = grid.unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([pos, pos.new_ones(batch, grid.shape[0], 1)], dim=-1)
    slots = num_tokens + 1  # dropped tokens (-1) land in a last slot that is cut off
    index = torch.where(source < 0, num_tokens, source)
    values = torch.cat([grid.unsqueeze(0).expand(source.shape[0], -1, -1),
                        grid.new_ones(source.shape[0], grid.shape[0], 1)], dim=-1)
    summed = values.new_zeros(source.shape[0], slots, 3).scatter_add_(
        1, index.unsqueeze(-1).expand(-1, -1, 3), values)[:, :num_tokens]
    count = summed[..., 2:]
    pos = summed[..., :2] / count.clamp_min(1.0)
    return torch.cat([pos, count.sqrt()], dim=-1)


def neighbour_scores(scores: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor) -> torch.Tensor:
    """Restrict bipartite similarities to spatial neighbours.

    Two tokens are neighbours when they touch: the Chebyshev distance between their positions is at
    most the mean of their extents (two single patches: the 8 around a patch; a 2x2 token and a
    patch: the patches along its border). Neighbour pairs keep their similarity (in ``[-1, 1]``);
    every other pair scores ``-2 - distance``, below any neighbour pair and nearer pairs first, so
    a step that must merge more tokens than have neighbours takes the nearest pairs instead of
    arbitrary ones.

    Args:
        scores: ``[B, Na, Nb]`` cosine similarities.
        pos_a, pos_b: ``[B, Na, 3]`` and ``[B, Nb, 3]`` from :func:`token_positions`.
    """
    distance = (pos_a[:, :, None, :2] - pos_b[:, None, :, :2]).abs().amax(dim=-1)
    reach = 0.5 * (pos_a[:, :, None, 2] + pos_b[:, None, :, 2]) + 1e-4
    return torch.where(distance <= reach, scores, -2.0 - distance)
