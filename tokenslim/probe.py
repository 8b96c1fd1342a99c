"""A linear probe: a classifier head fitted on a frozen backbone's own features.

A pretrained backbone without classes (e.g. DINOv2) can only be judged by feature fidelity. A
linear probe fitted on the *unpatched* backbone's pooled features turns it into a classifier
whose top-1 every tokenslim tool measures: the backbone is unchanged and the head sees reduced
features only at evaluation, so a drop in top-1 is what a reduction costs a frozen-backbone user.

The head is multinomial logistic regression with an L2 penalty, fitted by full-batch L-BFGS.
Given held-back images, each penalty is fitted on the others, the one with the best accuracy on
the held-back images is chosen (ties: the stronger penalty), and the head is refitted with it on
every image. ``tokenslim probe`` is the command.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def extract(model: nn.Module, data: Dataset, batch_size: int = 32, workers: int = 0,
            progress: bool = True) -> torch.Tensor:
    """The model's pooled pre-logit features (its ``num_classes=0`` output) of every item, in order."""
    from tqdm import tqdm

    loader = DataLoader(data, batch_size=batch_size, num_workers=workers)
    out = []
    with torch.inference_mode():
        for images, _ in tqdm(loader, desc="features", unit="batch", file=sys.stderr, disable=not progress):
            out.append(model(images).float())
    return torch.cat(out)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
               steps: int = 300) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, ``mean CE + weight_decay/2 * |W|^2``, by full-batch L-BFGS.

    Features are standardised for the fit (better conditioned; the penalty is on the standardised
    weights) and the scaling is folded back into the returned ``weight [K, C]`` and ``bias [K]``,
    which act on raw features.
    """
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = (weight / std).detach()
    return w, (bias - w @ mean).detach()


@dataclass
class Probe:
    """A fitted probe: ``weight [K, C]`` and ``bias [K]`` on raw features, the penalty chosen, its
    accuracy (``train``, and ``val`` on the held-back images), and every penalty tried."""

    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float
    accuracy: Dict[str, float]
    candidates: List[Dict[str, float]] = field(default_factory=list)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, val: int,
              weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, seed: int = 0,
              say: Callable[[str], None] = lambda msg: None) -> Probe:
    """Fit on all but ``val`` seeded images per penalty, choose by accuracy on those ``val``
    (ties: the stronger penalty), refit the chosen penalty on every image."""
    if not 0 <= val < len(labels):
        raise ValueError(f"val must lie in [0, {len(labels)}) images, got {val}")
    if any(wd < 0 for wd in weight_decays) or not weight_decays:
        raise ValueError(f"weight decays must be >= 0 (at least one), got {list(weight_decays)}")
    if len(weight_decays) > 1 and not val:
        raise ValueError("several weight decays are chosen between on held-back images: hold some back or give one")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, train = order[:val], order[val:]

    def accuracy(weight: torch.Tensor, bias: torch.Tensor, idx: torch.Tensor) -> float:
        return ((features[idx] @ weight.T + bias).argmax(1) == labels[idx]).float().mean().item() * 100

    scores: List[Tuple[float, Dict[str, float], torch.Tensor, torch.Tensor]] = []
    for wd in sorted(weight_decays, reverse=True):  # strongest first: a tie keeps the stronger penalty
        weight, bias = fit_linear(features[train], labels[train], num_classes, wd)
        acc = {"train": accuracy(weight, bias, train)}
        if val:
            acc["val"] = accuracy(weight, bias, held)
        scores.append((wd, acc, weight, bias))
        say(f"weight decay {wd:g}: " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    chosen, acc, weight, bias = max(scores, key=lambda item: item[1].get("val", 0.0))
    if val:  # the reported accuracy came from a fit without them; the kept head uses every image
        weight, bias = fit_linear(features, labels, num_classes, chosen)
    return Probe(weight, bias, chosen, acc, [{"weight_decay": wd, **a} for wd, a, _, _ in scores])


def attach_head(backbone: nn.Module, probe: Probe) -> nn.Module:
    """Give a timm backbone the probe as its classifier (timm's ``reset_classifier``), in place."""
    backbone.reset_classifier(probe.weight.shape[0])
    with torch.no_grad():
        backbone.get_classifier().weight.copy_(probe.weight)
        backbone.get_classifier().bias.copy_(probe.bias)
    return backbone


def probe_record(probe: Probe, **about: Any) -> Dict[str, Any]:
    """What a probe checkpoint says about its head (under ``extra["probe"]``)."""
    return {**about, "weight_decay": probe.weight_decay, "accuracy": probe.accuracy, "candidates": probe.candidates}


__all__ = ["DEFAULT_WEIGHT_DECAYS", "Probe", "attach_head", "extract", "fit_linear", "fit_probe", "probe_record"]
