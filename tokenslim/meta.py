"""A weightless copy of a module on the meta device: for counting compute and for trying a setting
on a model without touching (or copying) its weights."""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, made without copying any weight data."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        # No gradients on the copy: FlopCounterMode's module tracker hooks autograd on any tensor that
        # requires one, and fails on views of such leaves made under no_grad (attention-pool latents).
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


__all__ = ["meta_copy"]
