"""A learned merge policy (DTEM's idea): ToMe's bipartite matching on a learned metric.

The metric is the model's trained :class:`~tokenslim.merge_policy.MergeEmbedding` of the block,
``keys + W x``, which the reduction step puts in place of the keys (:func:`tokenslim.reduction.reduce_step`);
the plan is then exactly ToMe's, so the method is ToMe's entry under another name. Needs a trained
policy on the model (``tokenslim recover --trainable merge``); see :mod:`tokenslim.merge_policy`.
"""
from __future__ import annotations

from dataclasses import replace

from .tome import METHOD as TOME

METHOD = replace(TOME, name="learned",
                 summary="a learned merge policy: ToMe's matching on keys + a trained embedding of the tokens (DTEM)")
