"""A learned merge policy (``method="learned"``): per block, a small embedding that decides which
tokens merge, trained on a frozen backbone (DTEM's idea, "Learning to Merge Tokens via Decoupled
Embedding", NeurIPS 2024; written from the paper).

Each block's matching metric becomes ``keys + W x``: ToMe's keys averaged over heads, plus a
linear map of the block's tokens (after the attention residual, the tokens being merged) to the
key width. ``W`` starts at zero, so an untrained policy *is* ToMe, exactly; training moves only
``W`` (``tokenslim recover --trainable merge``), so the backbone is untouched and the policy is
decoupled from the features the attention uses. Everything else stays ToMe: bipartite matching,
sizes, proportional attention, protected prefix tokens, schedules, source tracking.

The modules live in ``model.tokenslim_policy`` (one :class:`MergeEmbedding` per block), so they
travel in the ``state_dict`` and in tokenslim checkpoints; :func:`tokenslim.unpatch` removes them
(the original model exactly).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

POLICY_ATTR = "tokenslim_policy"


class MergeEmbedding(nn.Module):
    """One block's merge metric: ``keys + proj(x)`` with ``proj`` zero at start (ToMe exactly)."""

    def __init__(self, dim: int, key_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, key_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[B, N, key_dim]`` metric from the tokens ``x`` ``[B, N, dim]`` and ToMe's keys."""
        return keys + self.proj(x.to(self.proj.weight.dtype)).to(keys.dtype)


class MergePolicy(nn.ModuleList):
    """The per-block :class:`MergeEmbedding` modules of a model."""


def key_dim_of(model: nn.Module) -> int:
    """The width of ToMe's metric (keys averaged over heads): the attention's head dimension."""
    attn = model.blocks[0].attn
    return int(getattr(attn, "head_dim", None) or attn.qkv.out_features // 3 // attn.num_heads)


def policy_of(model: nn.Module) -> Optional[MergePolicy]:
    """The model's learned merge policy, or ``None``."""
    return getattr(model, POLICY_ATTR, None)


def attach_policy(model: nn.Module, state: Optional[Dict[str, torch.Tensor]] = None) -> MergePolicy:
    """Give a timm ViT / Eva model a merge policy (zero: ToMe exactly) unless it has one.

    Args:
        model: a timm model with ``blocks`` (patched or not).
        state: a state dict holding trained policy weights (``tokenslim_policy.<i>.proj.weight``):
            the modules are shaped after it (loading then fills them).
    """
    existing = policy_of(model)
    if existing is not None:
        return existing
    dim = model.blocks[0].norm1.normalized_shape[-1] if hasattr(model.blocks[0], "norm1") else model.embed_dim
    key_dim = key_dim_of(model)
    if state is not None:
        weight = state.get(f"{POLICY_ATTR}.0.proj.weight")
        if weight is not None:
            key_dim, dim = weight.shape
    device = next(model.parameters()).device
    policy = MergePolicy([MergeEmbedding(dim, key_dim) for _ in model.blocks]).to(device).train(model.training)
    setattr(model, POLICY_ATTR, policy)
    return policy


def has_policy_state(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict carries a learned merge policy."""
    return any(k.startswith(POLICY_ATTR + ".") for k in state)


def detach_policy(model: nn.Module) -> None:
    """Remove the policy (what :func:`tokenslim.unpatch` does)."""
    if POLICY_ATTR in model._modules:
        del model._modules[POLICY_ATTR]


def missing_policy_error() -> ValueError:
    return ValueError("method='learned' merges by a trained merge policy, and this model has none: train one with "
                      "`tokenslim recover --checkpoint MODEL.pth --trainable merge --settings r=...` (or "
                      "tokenslim.recover(model, teacher, data, method='merge')), then load the checkpoint it writes")


__all__ = ["MergeEmbedding", "MergePolicy", "POLICY_ATTR", "attach_policy", "detach_policy", "has_policy_state",
           "key_dim_of", "missing_policy_error", "policy_of"]
