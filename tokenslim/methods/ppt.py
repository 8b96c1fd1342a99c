"""PPT, adaptive token pruning or pooling per image (Wu et al., 2023, xjwu1024/PPT).

Token importance ``s_i = sum_h A_h[cls, i] * ||v_{h,i}||`` (class attention of each head times the
norm of that head's value). Per image: when the variance of ``s`` over the non-prefix tokens is
below ``threshold`` (attention is spread evenly, nothing stands out), the block pools: ToMe's
bipartite matching merges ``r`` tokens. Otherwise it prunes the ``r`` tokens of lowest ``s``.
Every image removes exactly ``r`` tokens, so a batch stays rectangular.

The threshold is model-dependent: the official code uses ``7e-5`` for DeiT at 224 px; sweep it on
another model. Output order: ToMe's for pooled images; prefix tokens then kept tokens by
descending ``s`` for pruned images.
"""
from __future__ import annotations

import torch

from ..ops.matching import bipartite_soft_matching
from .base import ReductionMethod, StepInputs, StepPlan, half, dest_from_ranks
from ..ops.sorting import argsort_desc_stable


def prune_lowest(scores: torch.Tensor, r: int, num_prefix_tokens: int) -> torch.Tensor:
    """``[B, N]`` destination map that drops the ``r`` lowest-scored non-prefix tokens (``-1``)."""
    p = num_prefix_tokens
    batch, n_all = scores.shape
    n = n_all - p
    device = scores.device
    rank = argsort_desc_stable(scores[:, p:].float())
    dest_rank = torch.full((batch, n), -1, dtype=torch.long, device=device)
    dest_rank[:, : n - r] = p + torch.arange(n - r, device=device)
    return dest_from_ranks(rank, dest_rank, p)


def pools(scores: torch.Tensor, num_prefix_tokens: int, threshold: float) -> torch.Tensor:
    """``[B]`` bool: which images pool (merge) rather than prune."""
    return scores[:, num_prefix_tokens:].float().var(dim=-1) < threshold


def plan(inputs: StepInputs, r: int) -> StepPlan:
    p = inputs.num_prefix_tokens
    threshold = inputs.option if inputs.option is not None else METHOD.option_default
    merge = bipartite_soft_matching(inputs.keys, r, p)
    pruned = prune_lowest(inputs.value_score, r, p)
    pool = pools(inputs.value_score, p, threshold).unsqueeze(-1)
    return StepPlan(torch.where(pool, merge.dest, pruned), merge.num_out)


METHOD = ReductionMethod(
    name="ppt",
    summary="PPT: per image, merge (ToMe) when importance is even, else prune the least important",
    plan=plan,
    max_r=half,
    needs_keys=True,
    needs_value_score=True,
    needs_class_token=True,
    may_drop=True,
    option="threshold",
    option_default=7e-5,
)
