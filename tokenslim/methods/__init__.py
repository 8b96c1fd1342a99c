"""Token-reduction methods behind one interface (:class:`~tokenslim.methods.base.ReductionMethod`).

Each method is a small pure-tensor module that plans a block's reduction step from what the
attention computed; the framework adapters (e.g. :mod:`tokenslim.adapters.timm_vit`) only wire them in.
Choose one with ``tokenslim.patch(model, r=..., method="...")`` or ``method=...`` in settings text.

===========  ===============================================================================
tome         ToMe: bipartite soft matching on the keys, size-weighted mean (default, exact)
mlerp        ToFu's norm-preserving MLERP merge on ToMe's matching
pitome       PiToMe: energy score picks redundant tokens to merge, protects the rest
diffrate     DiffRate: rank by class attention, merge the lowest into the most similar top ones
ppt          PPT: per image, ToMe-merge or prune by value-weighted class attention
atc          ATC: agglomerative clustering of the keys (complete linkage), any number per block
atc_average  ATC with average linkage
learned      a learned merge policy (DTEM): ToMe's matching on keys + a trained embedding
mctf         MCTF: bidirectional matching by similarity x informativeness x size
===========  ===============================================================================
"""
from __future__ import annotations

from typing import Dict, Tuple

from . import atc, diffrate, learned, mctf, mlerp, pitome, ppt, tome
from .base import ReductionMethod, StepInputs, StepPlan

METHODS: Dict[str, ReductionMethod] = {
    m.name: m for m in (tome.METHOD, mlerp.METHOD, pitome.METHOD, diffrate.METHOD, ppt.METHOD, atc.METHOD, atc.AVERAGE,
                        learned.METHOD, mctf.METHOD)
}
DEFAULT_METHOD = "tome"


def method_names() -> Tuple[str, ...]:
    """Names accepted by ``method=``."""
    return tuple(METHODS)


def get_method(name: str) -> ReductionMethod:
    """The method registered under ``name``.

    Raises:
        ValueError: an unknown name (the error lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {type(name).__name__}")
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "DEFAULT_METHOD", "ReductionMethod", "StepInputs", "StepPlan", "get_method", "method_names"]
