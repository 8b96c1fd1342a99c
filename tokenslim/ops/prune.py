"""Attention-score token pruning (EViT, Liang et al., ICLR 2022) as pure tensor functions.

Like a merge step, a pruning step is described by a destination map (``[B, N]``, the output slot
of every token), so sizes and source maps compose the same way. A dropped token maps to the fused
token's slot when fusion is on, and to ``-1`` (no token) when it is not.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from .sorting import argsort_desc_stable


class PrunePlan(NamedTuple):
    """Which tokens a pruning step keeps.

    Attributes:
        keep_idx: ``[B, P + k]`` input indices of the output tokens: prefix tokens in order, then
            the kept tokens by descending class attention (EViT's order).
        drop_idx: ``[B, n - k]`` input indices of the dropped tokens, in index order.
        dest: ``[B, N]`` output slot of every input token (dropped: the fused slot, or -1).
        num_out: output tokens (``P + k``, plus one when fusing).
    """

    keep_idx: torch.Tensor
    drop_idx: torch.Tensor
    dest: torch.Tensor
    num_out: int


def select_tokens(scores: torch.Tensor, keep: int, num_prefix_tokens: int, fuse: bool) -> PrunePlan:
    """Keep the ``keep`` non-prefix tokens with the highest scores.

    Args:
        scores: ``[B, N]`` importance of every token (EViT: class attention averaged over heads);
            the first ``num_prefix_tokens`` entries are ignored (prefix tokens are always kept).
        keep: non-prefix tokens to keep, ``1 <= keep <= N - num_prefix_tokens``.
        num_prefix_tokens: leading tokens that are always kept, first and in order.
        fuse: whether the dropped tokens will be fused into one extra last token (only when at
            least one token is dropped).
    """
    batch, n = scores.shape
    p = num_prefix_tokens
    if not 1 <= keep <= n - p:
        raise ValueError(f"keep must lie in [1, {n - p}], got {keep}")
    device = scores.device
    top = scores[:, p:].topk(keep, dim=1, largest=True, sorted=True).indices + p
    keep_idx = torch.cat([torch.arange(p, device=device).expand(batch, p), top], dim=1)
    n_keep = p + keep
    dropped = ~torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, keep_idx, True)
    # A stable sort of the drop mask lists dropped tokens first, in index order.
    drop_idx = argsort_desc_stable(dropped.to(torch.float32))[:, : n - n_keep]
    fused = fuse and n > n_keep
    dest = torch.full((batch, n), n_keep if fused else -1, dtype=torch.long, device=device)
    dest.scatter_(1, keep_idx, torch.arange(n_keep, device=device).expand(batch, n_keep))
    return PrunePlan(keep_idx, drop_idx, dest, n_keep + int(fused))


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def prune_tokens(
    x: torch.Tensor,
    plan: PrunePlan,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply a pruning plan to ``[B, N, C]`` tokens.

    Args:
        x: tokens (or any per-token tensor, e.g. keys used as a merge metric).
        plan: from :func:`select_tokens`.
        weights: ``[B, N]`` fusion weights (EViT: the raw class attention). When the plan fuses,
            the dropped tokens are summed with these weights into one extra last token.
    """
    kept = _gather(x, plan.keep_idx)
    if plan.num_out == plan.keep_idx.shape[1]:
        return kept
    if weights is None:
        raise ValueError("the plan fuses dropped tokens: pass their fusion weights")
    w = weights.gather(1, plan.drop_idx).unsqueeze(-1)
    fused = (_gather(x, plan.drop_idx).float() * w.float()).sum(dim=1, keepdim=True)
    return torch.cat([kept, fused.to(x.dtype)], dim=1)


def prune_sizes(sizes: Optional[torch.Tensor], plan: PrunePlan) -> Optional[torch.Tensor]:
    """Sizes after pruning: kept tokens keep theirs; a fused token holds the dropped tokens' total.

    ``None`` (all ones) stays ``None`` when nothing is fused.
    """
    batch, n = plan.dest.shape
    fused = plan.num_out > plan.keep_idx.shape[1]
    if not fused:
        return None if sizes is None else sizes.gather(1, plan.keep_idx.unsqueeze(-1))
    if sizes is None:
        sizes = torch.ones(batch, n, 1, dtype=torch.float32, device=plan.dest.device)
    out = sizes.new_zeros(batch, plan.num_out, 1)
    return out.scatter_add_(1, plan.dest.unsqueeze(-1), sizes)


def prune_scores(scores: torch.Tensor, plan: PrunePlan) -> torch.Tensor:
    """``[B, N]`` per-token scores after pruning: kept tokens keep theirs, a fused token gets the
    dropped tokens' total (the attention it now stands for)."""
    kept = scores.gather(1, plan.keep_idx)
    if plan.num_out == plan.keep_idx.shape[1]:
        return kept
    return torch.cat([kept, scores.gather(1, plan.drop_idx).sum(dim=1, keepdim=True)], dim=1)
