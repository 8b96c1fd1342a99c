"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching on the keys, size-weighted mean.

The default method: ``tokenslim.patch(model, r=16)`` is exactly the official ToMe.
"""
from __future__ import annotations

from ..ops.matching import bipartite_soft_matching
from .base import ReductionMethod, StepInputs, StepPlan, half


def plan(inputs: StepInputs, r: int) -> StepPlan:
    merge = bipartite_soft_matching(inputs.keys, r, inputs.num_prefix_tokens, inputs.positions)
    return StepPlan(merge.dest, merge.num_out)


METHOD = ReductionMethod(
    name="tome",
    summary="ToMe: bipartite soft matching on the keys, size-weighted mean (the default)",
    plan=plan,
    max_r=half,
    needs_keys=True,
    local_merging=True,
)
