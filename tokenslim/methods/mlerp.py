"""ToFu's MLERP merge (Kim et al., WACV 2024): ToMe's matching, norm-preserving merge.

Averaging two dissimilar tokens shrinks their norm, and later layers (LayerNorm aside, the
residual stream) see a token that is smaller than any of its parts. MLERP keeps the direction of
the size-weighted mean and gives it the largest norm among the merged tokens:
``mean(x) * max_i ||x_i|| / ||mean(x)||``. The matching and the token order are ToMe's.
"""
from __future__ import annotations

from .base import ReductionMethod, half
from .tome import plan

METHOD = ReductionMethod(
    name="mlerp",
    summary="ToFu MLERP: ToMe's matching, merged tokens keep the largest norm of their parts",
    plan=plan,
    max_r=half,
    needs_keys=True,
    norm="max",
    local_merging=True,
)
