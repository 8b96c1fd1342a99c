"""A learned merge policy (DTEM's idea): ToMe's bipartite matching on a learned metric.

The metric is the model's trained :class:`~tokenslim.merge_policy.MergeEmbedding` of the block,
``keys + W x``, which the reduction step puts in place of the keys (:func:`tokenslim.reduction.reduce_step`);
the plan is then exactly ToMe's. Needs a trained policy on the model (``tokenslim recover
--trainable merge``); see :mod:`tokenslim.merge_policy`.
"""
from __future__ import annotations

from .base import ReductionMethod, half
from .tome import plan

METHOD = ReductionMethod(
    name="learned",
    summary="a learned merge policy: ToMe's matching on keys + a trained embedding of the tokens (DTEM)",
    plan=plan,
    max_r=half,
    needs_keys=True,
    local_merging=True,
)
