"""Pictures of what merging did: the patches each token holds, from the source map.

:func:`merge_picture` is a pure tensor function: every token's patches are filled with the mean
colour of the image under them and outlined where neighbouring patches belong to different tokens
(patches whose token was pruned away are grey), as in ToMe's visualisation. :func:`save_grid`
writes a grid of such pictures (rows: images, columns: settings) as a PNG through matplotlib
(the ``plot`` extra).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def patch_tokens(source: torch.Tensor, num_prefix_tokens: int, grid: Tuple[int, int]) -> torch.Tensor:
    """``[B, gh, gw]`` token index holding each patch (``-1``: dropped), from a ``[B, N0]`` source map."""
    batch = source.shape[0]
    gh, gw = grid
    if source.shape[1] != num_prefix_tokens + gh * gw:
        raise ValueError(f"the source map has {source.shape[1]} positions, expected {num_prefix_tokens} prefix "
                         f"tokens + {gh}x{gw} patches")
    return source[:, num_prefix_tokens:].reshape(batch, gh, gw)


def merge_picture(image: torch.Tensor, tokens: torch.Tensor, patch: Tuple[int, int]) -> torch.Tensor:
    """Colour ``image`` by merged token.

    Args:
        image: ``[3, H, W]`` in ``[0, 1]`` (H, W multiples of the patch size).
        tokens: ``[gh, gw]`` token index per patch (see :func:`patch_tokens`), ``-1`` for dropped.
        patch: ``(ph, pw)`` patch size in pixels.

    Returns:
        ``[3, H, W]`` picture in ``[0, 1]``.
    """
    ph, pw = patch
    gh, gw = tokens.shape
    if image.shape[1:] != (gh * ph, gw * pw):
        raise ValueError(f"image is {tuple(image.shape[1:])}, the token grid {gh}x{gw} of {ph}x{pw} patches")
    pixel_tokens = tokens.repeat_interleave(ph, 0).repeat_interleave(pw, 1)  # [H, W]
    flat = pixel_tokens.flatten()
    valid = flat >= 0
    ids = torch.where(valid, flat, flat.max().clamp(min=0) + 1)
    slots = int(ids.max()) + 1
    sums = torch.zeros(slots, 3).index_add_(0, ids, image.reshape(3, -1).t().float())
    counts = torch.zeros(slots).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32)).clamp(min=1)
    picture = (sums / counts[:, None])[ids].t().reshape(image.shape)
    picture[:, ~valid.reshape(image.shape[1:])] = 0.5
    # Outline: a pixel whose right or lower neighbour belongs to another token.
    edge = torch.zeros(image.shape[1:], dtype=torch.bool)
    edge[:, :-1] |= pixel_tokens[:, :-1] != pixel_tokens[:, 1:]
    edge[:-1, :] |= pixel_tokens[:-1, :] != pixel_tokens[1:, :]
    picture[:, edge] = picture[:, edge] * 0.25
    return picture.clamp(0, 1)


def save_grid(pictures: Sequence[Sequence[torch.Tensor]], titles: Sequence[str], path: str,
              scale: int = 4) -> None:
    """Write rows of ``[3, H, W]`` pictures as one PNG (``titles`` label the columns).

    Raises:
        ImportError: matplotlib is missing (``pip install 'tokenslim[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("tokenslim vis writes PNG through matplotlib: pip install 'tokenslim[plot]'") from None
    rows, cols = len(pictures), len(titles)
    h, w = pictures[0][0].shape[1:]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * max(w * scale / 100, 1.2), rows * max(h * scale / 100, 1.2)),
                             squeeze=False, dpi=100)
    for i, row in enumerate(pictures):
        for j, pic in enumerate(row):
            ax = axes[i][j]
            ax.imshow(pic.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the evaluation transform's normalisation of ``[3, H, W]`` or ``[B, 3, H, W]`` images."""
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    return (x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)).clamp(0, 1)


def token_counts(tokens: torch.Tensor) -> List[int]:
    """Distinct tokens holding the patches of each image in ``[B, gh, gw]`` (dropped excluded)."""
    return [int(t[t >= 0].unique().numel()) for t in tokens]


__all__ = ["merge_picture", "patch_tokens", "save_grid", "token_counts", "unnormalize"]

