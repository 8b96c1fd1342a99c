"""The interface every token-reduction method implements.

A method plans one reduction step of a block from what the block's attention already computed,
and says what it needs from that attention. Plans are destination maps (``[B, N]``, the output slot
of every token, ``-1`` for a dropped token), so sizes, source maps, unmerging and proportional
attention work the same for every method; the merge itself is the shared
:func:`tokenslim.ops.merge_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch


class StepInputs(NamedTuple):
    """What a block hands to a method after its attention residual.

    Attributes:
        x: ``[B, N, C]`` tokens.
        keys: ``[B, N, head_dim]`` keys averaged over heads (ToMe's metric), when the method asks.
        cls_attn: ``[B, N]`` the class token's attention row averaged over heads, when asked.
        value_score: ``[B, N]`` sum over heads of class attention times the value norm, when asked.
        num_prefix_tokens: leading tokens that are never reduced and stay first, in order.
        layer: 0-based block index; ``depth``: number of blocks.
        option: the value of the method's option (PPT's ``threshold``, PiToMe's ``margin``), or ``None``.
        positions: ``[B, N, 3]`` grid positions and extents when merging is restricted to spatial
            neighbours (rotary models, ``rope="local"``; methods with ``local_merging`` only), else ``None``.
        received: ``[B, N]`` attention each token receives, averaged over queries and heads, when asked.
        sizes: ``[B, N, 1]`` float32 sizes (original tokens each token holds), or ``None`` (all ones).
    """

    x: torch.Tensor
    keys: Optional[torch.Tensor]
    cls_attn: Optional[torch.Tensor]
    value_score: Optional[torch.Tensor]
    num_prefix_tokens: int
    layer: int
    depth: int
    option: Optional[float]
    positions: Optional[torch.Tensor] = None
    received: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None


class StepPlan(NamedTuple):
    """One reduction step: where every token goes.

    Attributes:
        dest: ``[B, N]`` int64 output slot of every token; ``-1``: dropped (no token holds it).
        num_out: tokens after the step.
    """

    dest: torch.Tensor
    num_out: int


@dataclass(frozen=True)
class ReductionMethod:
    """A named token-reduction method.

    Attributes:
        name: the value of ``method=`` in :func:`tokenslim.patch` and in settings text.
        summary: one line for docs and errors.
        plan: ``plan(inputs, r) -> StepPlan`` removing exactly ``r`` tokens (``r`` already clamped
            to :attr:`max_r`).
        max_r: most tokens one step can remove from ``n`` non-prefix tokens.
        needs_keys / needs_cls_attn / needs_value_score / needs_received: what the attention must return.
        needs_class_token: the method ranks tokens by the class token's attention.
        may_drop: a step may remove tokens without merging them anywhere (pruning).
        norm: how tokens that share a slot are combined (``"mean"`` or ``"max"``, see
            :func:`tokenslim.ops.merge_tokens`).
        full_attention: the method needs the full attention map (fused attention is lost).
        local_merging: the plan honours :attr:`StepInputs.positions` (merges spatial neighbours only).
        option: name of the method's one numeric option (a keyword of :func:`tokenslim.patch`),
            ``None`` if it has none; ``option_default``: its default value.
    """

    name: str
    summary: str
    plan: Callable[[StepInputs, int], StepPlan]
    max_r: Callable[[int], int]
    needs_keys: bool = False
    needs_cls_attn: bool = False
    needs_value_score: bool = False
    needs_received: bool = False
    needs_class_token: bool = False
    may_drop: bool = False
    norm: str = "mean"
    full_attention: bool = False
    local_merging: bool = False
    option: Optional[str] = None
    option_default: Optional[float] = None


def half(n: int) -> int:
    """Bipartite matching pairs at most half of the mergeable tokens."""
    return n // 2


def all_but_one(n: int) -> int:
    """Ranked merging and pruning keep at least one non-prefix token."""
    return max(n - 1, 0)


def dest_from_ranks(rank: torch.Tensor, dest_rank: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``[B, P + n]`` destination map from one given per rank.

    ``rank[b, j]`` is the non-prefix token at rank ``j`` and ``dest_rank[b, j]`` where it goes; the
    prefix tokens keep their own slots, first.
    """
    batch = rank.shape[0]
    dest = torch.empty_like(dest_rank).scatter_(1, rank, dest_rank)
    prefix = torch.arange(num_prefix_tokens, device=rank.device).expand(batch, num_prefix_tokens)
    return torch.cat([prefix, dest], dim=1)
