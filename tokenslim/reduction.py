"""One block's token reduction, independent of the framework that holds the block.

Every adapter (timm, transformers, open_clip) runs its block's attention through
:func:`tokenslim.ops.attention.reducing_attention`, adds the attention residual, then calls
:func:`reduce_step` (prune, then merge by the chosen method) before the MLP. The per-block
:class:`BlockStep` comes from the token plan, which depends on the settings alone, and
:func:`block_steps` yields them for a forward pass.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

from .methods import StepInputs
from .methods.base import ReductionMethod
from .methods.tome import METHOD as TOME
from .ops import merge_tokens, prune_scores, prune_sizes, prune_tokens, select_tokens, size_log_bias, update_source
from .ops.attention import AttentionResult
from .ops.positions import token_positions
from .ops.straight_through import straight_through_merge
from .schedule import ReductionSettings, TokenPlan


class BlockStep(NamedTuple):
    """What one block does to the tokens (from the token plan; static for a setting)."""

    r: int
    keep: Optional[int]
    fuse: bool
    prop_attn: bool
    num_prefix_tokens: int
    has_dropped: bool  # earlier pruning dropped tokens without fusion (source map holds -1)
    method: ReductionMethod = TOME
    option: Optional[float] = None
    layer: int = 0
    depth: int = 1
    embed: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None  # learned merge metric

    @property
    def reduces(self) -> bool:
        """Whether this block removes tokens."""
        return self.r > 0 or self.keep is not None

    @property
    def wants_metric(self) -> bool:
        return self.r > 0 and self.method.needs_keys

    @property
    def wants_cls_attn(self) -> bool:
        return self.keep is not None or (self.r > 0 and self.method.needs_cls_attn)

    @property
    def wants_value_score(self) -> bool:
        return self.r > 0 and self.method.needs_value_score

    @property
    def wants_received(self) -> bool:
        return self.r > 0 and self.method.needs_received


def block_steps(settings: ReductionSettings, plan: TokenPlan, num_prefix_tokens: int,
                policy: Optional[Sequence[Callable]] = None) -> Iterator[BlockStep]:
    """The :class:`BlockStep` of every block, in order, for one token plan.

    ``policy``: the model's learned merge embeddings (:mod:`tokenslim.merge_policy`), one per
    block, used by ``method="learned"``.

    Raises:
        ValueError: ``method="learned"`` on a model without a policy (naming what to run).
    """
    prop_attn = settings.uses_prop_attn
    method, option, depth = settings.method_spec, settings.option, settings.depth
    learned = method.name == "learned"
    if learned and policy is None:
        from .merge_policy import missing_policy_error

        raise missing_policy_error()
    has_dropped = False
    for i in range(depth):
        yield BlockStep(plan.merged[i], plan.kept[i], plan.fused[i], prop_attn, num_prefix_tokens, has_dropped,
                        method, option, i, depth, policy[i] if learned else None)
        has_dropped = plan.dropped[i]


def step_log_size(step: BlockStep, sizes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The proportional-attention bias a block applies, or ``None``."""
    return size_log_bias(sizes) if step.prop_attn and sizes is not None else None


def reduce_step(
    x: torch.Tensor,
    attn: AttentionResult,
    sizes: Optional[torch.Tensor],
    source: Optional[torch.Tensor],
    step: BlockStep,
    grid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Prune, then merge, the tokens ``x`` (after the attention residual) as ``step`` says.

    Args:
        x: ``[B, N, C]`` tokens.
        attn: what the block's attention returned (metric, scores) for these tokens.
        sizes: ``[B, N, 1]`` float32 sizes or ``None`` (all ones).
        source: ``[B, N0]`` source map or ``None`` (nothing reduced yet).
        step: the block's step.
        grid: ``[N0, 2]`` grid positions of the original tokens
            (:func:`tokenslim.ops.positions.grid_positions`): merge spatial neighbours only (the
            method must support it). ``None``: no restriction.

    Returns:
        ``(tokens, sizes, source)`` after the reduction.
    """
    method, reduce = step.method, step.r > 0
    metric, cls_attn, value_score, has_dropped = attn.metric, attn.cls_attn, attn.value_score, step.has_dropped
    received = attn.received
    if step.keep is not None:
        plan = select_tokens(attn.cls_attn, step.keep, step.num_prefix_tokens, step.fuse)
        x = prune_tokens(x, plan, attn.cls_attn)
        if metric is not None:
            metric = prune_tokens(metric, plan, attn.cls_attn)
        if reduce and method.needs_cls_attn:
            cls_attn = prune_scores(cls_attn, plan)
        if value_score is not None:
            value_score = prune_scores(value_score, plan)
        if received is not None:
            received = prune_scores(received, plan)
        sizes = prune_sizes(sizes, plan)
        source = update_source(source, plan.dest, has_dropped)
        has_dropped = has_dropped or not step.fuse
    if reduce:
        positions = None
        if grid is not None:
            if not method.local_merging:
                raise ValueError(f"method {method.name!r} cannot restrict merging to spatial neighbours "
                                 "(rope='local'); use method='tome' or 'mlerp', or another rope treatment")
            positions = token_positions(grid, source, x.shape[1], x.shape[0])
        if step.embed is not None:
            metric = step.embed(x, metric)  # the learned merge metric (tokenslim.merge_policy)
        inputs = StepInputs(x, metric, cls_attn, value_score, step.num_prefix_tokens, step.layer, step.depth,
                            step.option, positions, received, sizes)
        merge = method.plan(inputs, step.r)
        merged, new_sizes = merge_tokens(x, sizes, merge.dest, merge.num_out, has_dropped=method.may_drop,
                                         norm=method.norm)
        if step.embed is not None and metric.requires_grad and getattr(step.embed, "training", False):
            # Training the policy: ToMe's merge forward, the soft matching's gradient backward.
            merged = straight_through_merge(x, sizes, metric, merge.dest, merged, step.r, step.num_prefix_tokens)
        x, sizes = merged, new_sizes
        source = update_source(source, merge.dest, has_dropped)
    return x, sizes, source
