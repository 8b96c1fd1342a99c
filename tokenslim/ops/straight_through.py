"""The soft relaxation that trains a learned merge policy: hard ToMe forward, soft gradients.

Bipartite matching is a discrete choice (each A token's best B partner, then the ``r`` best A
tokens), so it has no gradient. The relaxation used here (and why):

* soft partner: ``p(b | a) = softmax_b(sim(a, b) / tau)``;
* soft membership in the top ``r``: ``m(a) = sigmoid((s(a) - t) / tau)`` with ``s(a) = tau *
  logsumexp_b(sim(a, b) / tau)`` (a smooth max) and ``t`` midway between the ``r``-th and
  ``(r+1)``-th largest ``s`` (a constant);
* merge weights ``W = m(a) p(b | a)``, used *straight through*: the forward pass uses the hard
  weights ``H`` (exactly ToMe's merge, token counts shrink as at inference) and the backward pass
  the gradient of ``W`` (``H + W - stop_gradient(W)``).

As ``tau -> 0`` the soft weights become the hard ones (:func:`soft_weights`, tested). The straight
-through form was chosen over keeping every token and shrinking sizes (DTEM's training-time
relaxation): the trained policy is then evaluated exactly as it was trained, the forward pass
costs what inference costs, and no attention over zero-size tokens is needed.
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_TAU = 0.1
"""Temperature of the relaxation, in units of cosine similarity."""


def _similarity(metric: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    a_pre, b_pre = (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2
    if a_pre:
        scores[:, :a_pre, :] = -torch.inf
    if b_pre:
        scores[:, :, :b_pre] = -torch.inf
    return scores


def soft_weights(metric: torch.Tensor, r: int, num_prefix_tokens: int = 0, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """``[B, n_a, n_b]`` soft merge weights ``m(a) p(b | a)`` of bipartite matching (A: even, B: odd
    positions; prefix tokens neither merge nor receive). Their limit as ``tau -> 0`` is the hard
    ToMe assignment (ties aside)."""
    scores = _similarity(metric, num_prefix_tokens)
    a_pre = (num_prefix_tokens + 1) // 2
    finite = scores.clone()
    finite[:, :a_pre, :] = 0.0  # prefix A rows: no partner (masked below)
    p = torch.softmax(finite / tau, dim=-1)
    s = tau * torch.logsumexp(finite / tau, dim=-1)
    s = s.masked_fill(torch.arange(s.shape[1], device=s.device) < a_pre, -torch.inf)
    ordered = s.detach().sort(dim=-1, descending=True).values
    n_eff = s.shape[1] - a_pre
    r = min(r, n_eff)
    if r <= 0:
        return torch.zeros_like(p)
    upper = ordered[:, r - 1]
    lower = ordered[:, r] if r < n_eff else upper - 1.0
    t = ((upper + lower) / 2).unsqueeze(-1)
    m = torch.sigmoid((s - t) / tau)
    return m.unsqueeze(-1) * p


def straight_through_merge(
    x: torch.Tensor,
    sizes: Optional[torch.Tensor],
    metric: torch.Tensor,
    dest: torch.Tensor,
    merged: torch.Tensor,
    r: int,
    num_prefix_tokens: int,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """``merged`` (the hard ToMe merge of ``x`` along ``dest``) with the gradient of the soft weights.

    Args:
        x: ``[B, N, C]`` tokens before the merge; ``sizes``: their ``[B, N, 1]`` sizes or ``None``.
        metric: ``[B, N, D]`` the matching metric ``dest`` was planned from (with its gradient).
        dest: ``[B, N]`` the hard plan (:func:`~tokenslim.ops.matching.bipartite_soft_matching`).
        merged: ``[B, N - r, C]`` :func:`~tokenslim.ops.merge_tokens` of ``x`` along ``dest``.

    Returns:
        A tensor equal to ``merged`` whose B-token slots carry the gradient of ``W`` (see module doc).
    """
    soft = soft_weights(metric, r, num_prefix_tokens, tau)
    dest_b = dest[:, 1::2]
    weights = hard_weights(dest) + (soft - soft.detach())
    xf = x.float()
    s = sizes.float() if sizes is not None else xf.new_ones(x.shape[0], x.shape[1], 1)
    xa, xb, sa, sb = xf[:, ::2], xf[:, 1::2], s[:, ::2], s[:, 1::2]
    wt = weights.transpose(1, 2)  # [B, n_b, n_a]
    num = sb * xb + wt @ (sa * xa)
    den = sb + wt @ sa
    xb_new = (num / den).to(merged.dtype)
    return merged.scatter(1, dest_b.unsqueeze(-1).expand(-1, -1, merged.shape[-1]), xb_new)


def hard_weights(dest: torch.Tensor) -> torch.Tensor:
    """``[B, n_a, n_b]`` 0/1: A token ``a`` merges into B token ``b`` under the plan ``dest``."""
    return (dest[:, ::2].unsqueeze(-1) == dest[:, 1::2].unsqueeze(1)).float()


__all__ = ["DEFAULT_TAU", "hard_weights", "soft_weights", "straight_through_merge"]
