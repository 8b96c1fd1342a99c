"""DiffRate-style prune-then-merge (Chen et al., ICCV 2023, OpenGVLab/DiffRate).

After the attention residual the non-prefix tokens are ranked by the class token's attention
(averaged over heads). Pruning, when the block prunes (``keep_rate`` / ``prune_layers``, without
fusion as in DiffRate), keeps the top of that ranking. Then the ``r`` lowest-ranked kept tokens
merge into their most similar token among the higher-ranked ones, by cosine similarity of the
tokens themselves (DiffRate's metric, not the keys); the merge is size-weighted and proportional
attention is on, as for ToMe.

Two deliberate differences from the official inference code, both toward ToMe's conventions so
that methods compare on equal terms: the official code averages a group without its sizes and
scales the sizes of merged tokens by their similarity; here groups are size-weighted means and
sizes are patch counts.

Output order: prefix tokens, then the kept tokens by descending class attention. A block can merge
up to all but one of its non-prefix tokens (no bipartite limit), so per-block schedules like
DiffRate's learned ones are expressible as ``r=[...]`` with ``keep_rate=[...]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ReductionMethod, StepInputs, StepPlan, all_but_one, dest_from_ranks
from ..ops.sorting import argsort_desc_stable


def ranked_merge(scores: torch.Tensor, metric: torch.Tensor, r: int, num_prefix_tokens: int) -> StepPlan:
    """Merge the ``r`` lowest-scored non-prefix tokens into their most similar higher-scored token.

    Args:
        scores: ``[B, N]`` importance (class attention); prefix entries are ignored.
        metric: ``[B, N, C]`` similarity features.
        r: tokens to merge away, ``0 <= r < N - num_prefix_tokens``.
        num_prefix_tokens: leading tokens kept first and never merged into.
    """
    p = num_prefix_tokens
    batch, n_all = scores.shape
    n = n_all - p
    device = scores.device
    rank = argsort_desc_stable(scores[:, p:].float())  # token at each rank
    n_keep = n - r
    dest_rank = torch.empty(batch, n, dtype=torch.long, device=device)
    dest_rank[:, :n_keep] = p + torch.arange(n_keep, device=device)
    if r > 0:
        m = F.normalize(metric[:, p:].float(), dim=-1)
        m = m.gather(1, rank.unsqueeze(-1).expand(-1, -1, m.shape[-1]))
        sim = m[:, n_keep:] @ m[:, :n_keep].transpose(-1, -2)  # [B, r, n_keep]
        dest_rank[:, n_keep:] = p + sim.argmax(dim=-1)
    return StepPlan(dest_from_ranks(rank, dest_rank, p), p + n_keep)


def plan(inputs: StepInputs, r: int) -> StepPlan:
    return ranked_merge(inputs.cls_attn, inputs.x, r, inputs.num_prefix_tokens)


METHOD = ReductionMethod(
    name="diffrate",
    summary="DiffRate: prune by class attention, merge the lowest-ranked kept tokens into the top ones",
    plan=plan,
    max_r=all_but_one,
    needs_cls_attn=True,
    needs_class_token=True,
)
