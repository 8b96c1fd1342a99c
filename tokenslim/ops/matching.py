"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) as a pure tensor function.

The result of a matching step is a *destination map*: for every current token, the index of the
output token it ends up in. Unmerged tokens map to their own output slot, merged tokens to their
partner's slot. One map drives everything downstream: the size-weighted merge is a single
``scatter_add`` over it, and the per-patch source map is updated with a single ``gather``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from .positions import neighbour_scores
from .sorting import argsort_desc_stable


class MergePlan(NamedTuple):
    """Where every token goes in one merge step.

    Attributes:
        dest: ``[B, N]`` int64, output slot of every input token.
        num_out: number of output tokens (``N - r``).
    """

    dest: torch.Tensor
    num_out: int


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    num_prefix_tokens: int = 0,
    positions: Optional[torch.Tensor] = None,
) -> MergePlan:
    """Plan the merge of ``r`` tokens by bipartite soft matching.

    Tokens at even absolute positions form set A, odd positions set B (prefix tokens included in
    the split, as in ToMe). Each A token picks its most similar B token (cosine similarity of the
    metric); the ``r`` A tokens with the highest similarity merge into their partners. Prefix
    tokens (the first ``num_prefix_tokens``: class, distillation, registers) never merge and
    nothing merges into them.

    Output order: prefix tokens in their original order, then the unmerged non-prefix A tokens in
    index order, then the non-prefix B tokens in index order. For a class token, and for class +
    distillation tokens, this is exactly ToMe's order.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe: keys averaged over heads).
        r: tokens to remove; clamped to ``(N - num_prefix_tokens) // 2``.
        num_prefix_tokens: leading tokens that are protected.
        positions: ``[B, N, 3]`` grid positions and extents of the tokens
            (:func:`~tokenslim.ops.positions.token_positions`): merge spatial neighbours only
            (:func:`~tokenslim.ops.positions.neighbour_scores`). ``None``: ToMe's matching.

    Returns:
        A :class:`MergePlan`.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [batch, tokens, channels], got shape {tuple(metric.shape)}")
    batch, n, _ = metric.shape
    p = num_prefix_tokens
    if not 0 <= p <= n:
        raise ValueError(f"num_prefix_tokens must lie in [0, {n}], got {p}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    r = min(r, (n - p) // 2)
    device = metric.device

    # Similarity in fp32: under bf16/fp16 near-ties would otherwise decide the pairing.
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    a_pre, b_pre = (p + 1) // 2, p // 2  # prefix tokens that fall in A and in B

    if r == 0:
        dest = torch.arange(n, device=device).expand(batch, n)
        return MergePlan(dest, n)

    scores = a @ b.transpose(-1, -2)
    if positions is not None:
        scores = neighbour_scores(scores, positions[:, ::2].float(), positions[:, 1::2].float())
    if a_pre:
        scores[:, :a_pre, :] = -torch.inf
    if b_pre:
        scores[:, :, :b_pre] = -torch.inf
    best, partner = scores.max(dim=-1)  # [B, n_a]
    # A stable sort makes ties (identical patches are common in real images) deterministic.
    order = argsort_desc_stable(best)
    src = order[:, :r]  # A indices that merge away
    dst = partner.gather(1, src)  # their B partners

    # Output slots of B tokens do not depend on the batch: prefix B tokens keep their absolute
    # position, the others follow the prefix and the unmerged A tokens.
    b_slot = torch.empty(n_b, dtype=torch.long, device=device)
    b_slot[:b_pre] = torch.arange(b_pre, device=device) * 2 + 1
    b_slot[b_pre:] = p + (n_a - a_pre - r) + torch.arange(n_b - b_pre, device=device)

    merged = torch.zeros(batch, n_a, dtype=torch.bool, device=device).scatter_(1, src, True)
    kept = (~merged[:, a_pre:]).long()
    a_slot = torch.empty(batch, n_a, dtype=torch.long, device=device)
    a_slot[:, :a_pre] = torch.arange(a_pre, device=device) * 2
    a_slot[:, a_pre:] = p - 1 + kept.cumsum(dim=1)
    a_slot = a_slot.scatter(1, src, b_slot[dst])

    dest = torch.empty(batch, n, dtype=torch.long, device=device)
    dest[:, ::2] = a_slot
    dest[:, 1::2] = b_slot
    return MergePlan(dest, n - r)
