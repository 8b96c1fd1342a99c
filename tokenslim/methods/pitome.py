"""PiToMe (Tran et al., NeurIPS 2024): protect informative tokens, merge the redundant ones.

Each non-prefix token gets an energy ``E_i = mean_j ELU(cos(k_i, k_j) - m)`` over the non-prefix
tokens (``k``: keys averaged over heads): a token similar to many others has high energy and is
redundant. The ``2r`` tokens of highest energy are the merge candidates, split alternately into
A (ranks 0, 2, 4, ...) and B (ranks 1, 3, 5, ...); every A token merges into its most similar B
token (size-weighted mean). The other tokens are protected. The margin falls with depth,
``m = margin * (1 - layer / depth)`` (``margin=0.75`` by default), as in the official code's
vision setting.

Output order: prefix tokens, protected tokens by descending energy, then the B tokens by energy
rank. The energy needs an ``N x N`` similarity of the keys: about one attention map's worth of
work (fused attention itself is kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ReductionMethod, StepInputs, StepPlan, half, dest_from_ranks
from ..ops.sorting import argsort_desc_stable


def plan(inputs: StepInputs, r: int) -> StepPlan:
    p = inputs.num_prefix_tokens
    keys = inputs.keys[:, p:].float()
    batch, n, _ = keys.shape
    device = keys.device
    if r == 0:
        return StepPlan(torch.arange(p + n, device=device).expand(batch, p + n), p + n)
    base = inputs.option if inputs.option is not None else METHOD.option_default
    margin = base * (1.0 - inputs.layer / inputs.depth)
    k = F.normalize(keys, dim=-1)
    sim = k @ k.transpose(-1, -2)
    score = F.elu(sim - margin).mean(dim=-1)
    rank = argsort_desc_stable(score)  # token at each rank
    a_idx, b_idx = rank[:, : 2 * r : 2], rank[:, 1 : 2 * r : 2]
    ab = sim.gather(1, a_idx.unsqueeze(-1).expand(batch, r, n)).gather(2, b_idx.unsqueeze(1).expand(batch, r, r))
    partner = ab.argmax(dim=-1)  # [B, r], index into B
    protected_slot = p + torch.arange(n - 2 * r, device=device)
    b_slot = p + (n - 2 * r) + torch.arange(r, device=device)
    dest_rank = torch.empty(batch, n, dtype=torch.long, device=device)
    dest_rank[:, 2 * r:] = protected_slot
    dest_rank[:, 1 : 2 * r : 2] = b_slot
    dest_rank[:, : 2 * r : 2] = b_slot[partner]
    return StepPlan(dest_from_ranks(rank, dest_rank, p), p + n - r)


METHOD = ReductionMethod(
    name="pitome",
    summary="PiToMe: the 2r most redundant tokens (energy score) merge pairwise, the rest are protected",
    plan=plan,
    max_r=half,
    needs_keys=True,
    option="margin",
    option_default=0.75,
)
