"""The distillation objective: softened KL to the teacher, mixup blends, class-token matching."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn


def distill_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(teacher || student)`` with both outputs softened by ``T`` (Hinton et al.); the
    teacher's log-probabilities are already softened."""
    return temperature ** 2 * F.kl_div((student_logits.float() / temperature).log_softmax(-1), teacher_logp,
                                       log_target=True, reduction="batchmean")


def partners(n: int) -> torch.Tensor:
    """The mixup partner of each item of a batch: neighbours swapped in pairs (0-1, 2-3, ...; an odd
    last item is its own partner). Pairs never cross a split into even shares, so the blend is the
    same whether one process holds the batch or several ranks hold even shares of it."""
    index = torch.arange(n) ^ 1
    index[index >= n] = n - 1
    return index


def beta(alpha: float, g: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from ``g`` by Johnk's method (uniforms only, so the draw
    depends on ``g`` alone; torch.distributions would draw from the global generator)."""
    u = torch.rand(2, generator=g, dtype=torch.float64)
    while True:
        x, y = u[0].item() ** (1.0 / alpha), u[1].item() ** (1.0 / alpha)
        if x + y <= 1.0 and x + y > 0.0:
            return x / (x + y)
        u = torch.rand(2, generator=g, dtype=torch.float64)


def mixup_lambda(alpha: float, seed: int, step: int) -> float:
    """The blend weight of optimizer step ``step``: seeded by the step, so a resumed run and every
    rank draw what the uninterrupted single-process run would."""
    return beta(alpha, torch.Generator().manual_seed(seed * 1_000_003 + step))


class ClassTokenTaps:
    """Forward hooks that keep the class token of the residual stream where it enters each
    block's first norm and the final norm, for teacher and student alike (a reduced block keeps
    the class token first, so index 0 is the same token in both)."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.seen: Dict[str, List[torch.Tensor]] = {"teacher": [], "student": []}
        self.handles = []
        for role, model in (("teacher", teacher), ("student", student)):
            norms = [block.norm1 for block in model.blocks[1:]] + [model.norm]
            for norm in norms:
                self.handles.append(norm.register_forward_hook(self._keep(role)))

    def _keep(self, role: str):
        def hook(module, inputs, output):
            self.seen[role].append(inputs[0][:, 0].float())
        return hook

    def loss(self) -> torch.Tensor:
        t, s = self.seen["teacher"], self.seen["student"]
        if len(t) != len(s) or not t:
            raise RuntimeError(f"class-token taps saw {len(t)} teacher and {len(s)} student blocks")
        total = sum(((si - ti.detach()) ** 2).sum(-1).mean() / (ti.detach() ** 2).sum(-1).mean().clamp_min(1e-12)
                    for si, ti in zip(s, t)) / len(t)
        self.seen = {"teacher": [], "student": []}
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
