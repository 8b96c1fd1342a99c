"""Validation during recovery: the student evaluated after every epoch, the best parameters kept.

"Best" is top-1 where the validation labels fit the model's head, else the lowest KL to the
teacher. A later, worse epoch is undone at the end (:meth:`Validation.restore_best`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..evaluate import dataset_targets


class Validation:
    """The validation images, the history of results and the best parameters so far.

    Args:
        data: the validation images.
        classes: the model's number of classes (labels outside it are not used for top-1).
        batch_size: images per evaluation step.
        say: progress lines.
    """

    def __init__(self, data: Dataset, classes: int, batch_size: int, say: Callable[[str], None]) -> None:
        self.data, self.batch_size, self.say = data, batch_size, say
        targets = dataset_targets(data)
        self.labelled = targets is not None and all(0 <= t < classes for t in targets)
        self.best: Optional[Dict[str, Any]] = None
        self.history: List[Dict[str, Any]] = []

    def __call__(self, student: nn.Module, teacher: nn.Module, params: Dict[str, torch.Tensor], step: int,
                 epoch: int) -> None:
        """Evaluate ``student`` against ``teacher``; keep a copy of ``params`` when it is the best so far."""
        from ..evaluate import evaluate

        student.eval()
        res = evaluate(student, self.data, reference=teacher, batch_size=self.batch_size, num_workers=0,
                       progress=False)
        student.train()
        score = res.top1 if self.labelled else -res.kl
        entry = {"epoch": epoch, "step": step, "top1": res.top1 if self.labelled else None, "kl": res.kl,
                 "agreement": res.agreement}
        self.history.append(entry)
        better = self.best is None or score > self.best["score"]
        if better:
            self.best = {"score": score, "entry": entry, "params": {n: p.detach().clone() for n, p in params.items()}}
        top1 = f"top-1 {res.top1:.2f}, " if self.labelled else ""
        self.say(f"validation after step {step} (epoch {epoch}): {top1}KL {res.kl:.4f}"
                 f"{' (best so far)' if better else ''}")

    def restore_best(self, params: Dict[str, torch.Tensor]) -> None:
        """Put the best validated parameters back into ``params``, when a later epoch was worse."""
        if self.best is None or self.best["entry"] == self.history[-1]:
            return
        with torch.no_grad():
            for n, v in self.best["params"].items():
                params[n].copy_(v)
        self.say(f"kept the best validated parameters: step {self.best['entry']['step']} "
                 f"(epoch {self.best['entry']['epoch']})")


__all__ = ["Validation"]
