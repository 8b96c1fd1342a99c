"""MCTF (Lee, Choi and Kim, CVPR 2024): multi-criteria token fusion, training-free.

Written from the paper's description. Tokens are split as ToMe splits them (A: even positions,
B: odd; prefix tokens never merge and nothing merges into them). The attraction of ``a`` to ``b``
multiplies three criteria, each raised to ``1 / tau``:

* similarity ``((cos(k_a, k_b) + 1) / 2)`` of the keys averaged over heads (ToMe's metric);
* informativeness ``i_a * i_b`` with ``i = (1 / attention received) / max``: tokens the others
  attend to little merge first (attention received: averaged over queries and heads);
* size ``s_a * s_b`` with ``s = (1 / size) / max``: small tokens merge first, so no token grows
  to hold most of the image.

Bidirectional matching: ``r // 2`` A tokens (the highest attraction to their best B) merge into
it; then ``r - r // 2`` B tokens (with what they just received) merge into their best A among
those still unmerged. Defaults are the official code's (``tau_sim=1``, ``tau_info=20``,
``tau_size=40``, bidirectional).

Where tokenslim differs from the paper, by design: fused tokens are the size-weighted mean (ToMe's
rule, so sizes, proportional attention and unmerging hold as for every method) rather than
MCTF's attention-weighted mean; and informativeness comes from the attention the block has just
computed. The paper's one-step-ahead attention (the map of the attention that follows the fusion,
estimated by merging the current map) needs fusion before a block's attention; every tokenslim
method reduces between attention and MLP, as ToMe, where the next attention map does not exist
yet. The received attention needs the whole map: about one attention map of extra work per
reducing block (fused attention itself is kept).

Output order: prefix tokens, the kept A tokens, then the kept B tokens, each in index order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.sorting import argsort_desc_stable
from .base import ReductionMethod, StepInputs, StepPlan, half

TAU_SIM, TAU_INFO, TAU_SIZE = 1.0, 20.0, 40.0
"""The official code's defaults: similarity decides, informativeness and size temper it."""


def _inverse_share(values: torch.Tensor, p: int) -> torch.Tensor:
    """``(1 / v) / max(1 / v)`` over the non-prefix tokens: 1 for the smallest value, less for larger."""
    inv = 1.0 / values.float().clamp_min(1e-12)
    return inv / inv[:, p:].amax(dim=-1, keepdim=True)


def _power(w: torch.Tensor, tau: float) -> torch.Tensor:
    return w if tau == 1.0 else w.pow(1.0 / tau)


def attraction(keys: torch.Tensor, num_prefix_tokens: int, received: Optional[torch.Tensor] = None,
               sizes: Optional[torch.Tensor] = None, tau_sim: float = TAU_SIM, tau_info: float = TAU_INFO,
               tau_size: float = TAU_SIZE) -> torch.Tensor:
    """``[B, N_A, N_B]`` attraction of every A token (even position) to every B token (odd), with
    ``-inf`` where either is a prefix token. A criterion is off with ``tau = inf`` or its input ``None``."""
    p = num_prefix_tokens
    k = F.normalize(keys.float(), dim=-1)
    w = _power((k[:, ::2] @ k[:, 1::2].transpose(-1, -2) + 1.0).mul(0.5).clamp_min(0.0), tau_sim)
    for values, tau in ((received, tau_info), (None if sizes is None else sizes[..., 0], tau_size)):
        if values is not None and math.isfinite(tau):
            share = _inverse_share(values, p)
            w = w * _power(share[:, ::2, None] * share[:, None, 1::2], tau)
    n = keys.shape[1]
    positions = torch.arange(n, device=keys.device)
    w = w.masked_fill((positions[::2] < p).view(1, -1, 1), -math.inf)
    return w.masked_fill((positions[1::2] < p).view(1, 1, -1), -math.inf)


def mctf_matching(keys: torch.Tensor, r: int, num_prefix_tokens: int, received: Optional[torch.Tensor] = None,
                  sizes: Optional[torch.Tensor] = None, tau_sim: float = TAU_SIM, tau_info: float = TAU_INFO,
                  tau_size: float = TAU_SIZE, bidirectional: bool = True) -> StepPlan:
    """The destination map of MCTF's (bidirectional) matching removing ``r`` tokens (clamped to
    half the non-prefix tokens)."""
    batch, n, _ = keys.shape
    p, device = num_prefix_tokens, keys.device
    r = min(r, (n - p) // 2)
    if r <= 0:
        return StepPlan(torch.arange(n, device=device).expand(batch, n), n)
    w = attraction(keys, p, received, sizes, tau_sim, tau_info, tau_size)
    n_a, n_b = w.shape[1], w.shape[2]
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    best_a, partner_a = w.max(dim=-1)
    merged_a = argsort_desc_stable(best_a)[:, :r1]
    a_gone = torch.zeros(batch, n_a, dtype=torch.bool, device=device).scatter_(1, merged_a, True)
    best_b, partner_b = w.transpose(1, 2).masked_fill(a_gone[:, None, :], -math.inf).max(dim=-1)
    merged_b = argsort_desc_stable(best_b)[:, :r2]
    b_gone = torch.zeros(batch, n_b, dtype=torch.bool, device=device).scatter_(1, merged_b, True)

    # Slots: prefix tokens first (their own order), then the kept non-prefix A, then the kept B.
    pos_a, pos_b = torch.arange(0, n, 2, device=device), torch.arange(1, n, 2, device=device)
    kept_a = ~a_gone & (pos_a >= p)
    kept_b = ~b_gone & (pos_b >= p)
    slot_a = torch.where(pos_a < p, pos_a, p + kept_a.long().cumsum(1) - 1)
    slot_b = torch.where(pos_b < p, pos_b, p + kept_a.sum(1, keepdim=True) + kept_b.long().cumsum(1) - 1)
    dest_b = torch.where(b_gone, slot_a.gather(1, partner_b), slot_b)
    dest_a = torch.where(a_gone, dest_b.gather(1, partner_a), slot_a)
    dest = torch.empty(batch, n, dtype=torch.long, device=device)
    dest[:, 0::2], dest[:, 1::2] = dest_a, dest_b
    return StepPlan(dest, n - r)


def plan(inputs: StepInputs, r: int) -> StepPlan:
    return mctf_matching(inputs.keys, r, inputs.num_prefix_tokens, inputs.received, inputs.sizes)


METHOD = ReductionMethod(
    name="mctf",
    summary="MCTF: bidirectional matching by similarity x informativeness x size (training-free)",
    plan=plan,
    max_r=half,
    needs_keys=True,
    needs_received=True,
)
