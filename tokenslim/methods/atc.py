"""Agglomerative token clustering (ATC, Haurum et al., ECCV 2024), training-free.

Every block removes ``r`` tokens by ``r`` steps of bottom-up clustering of its non-prefix tokens:
each step joins the two most similar clusters (cosine similarity of the keys averaged over heads,
ToMe's metric), and a cluster's similarity to the others follows the linkage, kept up to date by
the Lance-Williams rule instead of being recomputed:

* ``atc`` -- complete linkage: the similarity of two clusters is that of their *least* similar
  members, so a cluster only grows by tokens close to all of it;
* ``atc_average`` -- average linkage: the mean similarity over all member pairs.

Unlike ToMe's bipartite matching there is no split into two sets and no limit of half the tokens
per block: any token can join any other and a block can remove all but one non-prefix token, so
the heavy front-loaded schedules that suit ATC are expressible. A cluster becomes one token, the
size-weighted mean of its members (sizes and proportional attention as in ToMe).

Output order: prefix tokens, then one token per cluster in the order of its lowest-indexed member.
Exact ties are resolved toward the lowest (row, column) pair, so plans are deterministic.
The clustering needs the ``N x N`` similarity of the keys (fused attention is kept) and ``r``
small sequential updates of it per block.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .base import ReductionMethod, StepInputs, StepPlan, all_but_one


def cluster(metric: torch.Tensor, r: int, linkage: str = "complete") -> torch.Tensor:
    """Cluster the ``n`` tokens of every row of ``metric`` into ``n - r`` clusters.

    Args:
        metric: ``[B, n, C]`` similarity features (cosine similarity is used).
        r: joins to make, ``0 <= r < n``.
        linkage: ``"complete"`` or ``"average"``.

    Returns:
        ``[B, n]`` int64: for every token, the index of its cluster's lowest-indexed member.
    """
    if linkage not in ("complete", "average"):
        raise ValueError(f"linkage must be 'complete' or 'average', got {linkage!r}")
    batch, n, _ = metric.shape
    if not 0 <= r < max(n, 1):
        raise ValueError(f"r must lie in [0, {n - 1}] for {n} tokens, got {r}")
    device = metric.device
    tokens = torch.arange(n, device=device)
    parent = tokens.expand(batch, n).clone()
    if r == 0:
        return parent
    # fp32: under bf16/fp16 near-ties would otherwise decide the clustering.
    unit = F.normalize(metric.float(), dim=-1)
    # A non-finite image (NaN keys) would make every comparison false and a cluster join itself;
    # below any cosine, such pairs still join in a valid order, and that image's output stays NaN.
    sim = torch.nan_to_num(unit @ unit.transpose(-1, -2), nan=-2.0, posinf=-2.0, neginf=-2.0)
    sim[:, tokens, tokens] = -torch.inf
    rows = torch.arange(batch, device=device)
    count = torch.ones(batch, n, device=device) if linkage == "average" else None
    for _ in range(r):
        # The first maximum in row-major order; the matrix is symmetric, so keep < gone. amax and
        # a comparison are an order of magnitude faster on CPU than argmax over the matrix.
        row_max = sim.amax(dim=-1)
        top = row_max.amax(dim=-1, keepdim=True)
        keep = (row_max == top).byte().argmax(dim=-1)
        s_keep = sim[rows, keep]
        gone = (s_keep == top).byte().argmax(dim=-1)
        s_gone = sim[rows, gone]
        if count is None:
            joined = torch.minimum(s_keep, s_gone)
        else:
            c_keep, c_gone = count[rows, keep].unsqueeze(-1), count[rows, gone].unsqueeze(-1)
            joined = (c_keep * s_keep + c_gone * s_gone) / (c_keep + c_gone)
            count[rows, keep] += count[rows, gone]
        # The diagonals of s_keep and s_gone make joined -inf at keep and gone, as for every
        # cluster already gone: no masking needed.
        sim[rows, keep] = joined
        sim[rows, :, keep] = joined
        sim[rows, gone] = -torch.inf
        sim[rows, :, gone] = -torch.inf
        parent[rows, gone] = keep
    # Pointer jumping: a chain of joins is at most r long.
    for _ in range(max(1, math.ceil(math.log2(r + 1)))):
        parent = parent.gather(1, parent)
    return parent


def plan(linkage: str, inputs: StepInputs, r: int) -> StepPlan:
    """One block's step: ``r`` joins of the non-prefix tokens, one output token per cluster."""
    p = inputs.num_prefix_tokens
    keys = inputs.keys[:, p:]
    batch, n, _ = keys.shape
    root = cluster(keys, r, linkage)
    is_root = root == torch.arange(n, device=keys.device)
    slot = is_root.long().cumsum(dim=-1) - 1 + p  # output slot of every root
    prefix = torch.arange(p, device=keys.device).expand(batch, p)
    return StepPlan(torch.cat([prefix, slot.gather(1, root)], dim=1), p + n - r)


def _method(name: str, linkage: str, summary: str) -> ReductionMethod:
    # functools.partial of a module function, not a closure: a patched model stays picklable.
    return ReductionMethod(name=name, summary=summary, plan=functools.partial(plan, linkage), max_r=all_but_one,
                           needs_keys=True)


METHOD = _method("atc", "complete",
                 "ATC: agglomerative clustering of the keys, complete linkage; up to all but one token per block")
AVERAGE = _method("atc_average", "average", "ATC with average linkage (mean similarity over member pairs)")
