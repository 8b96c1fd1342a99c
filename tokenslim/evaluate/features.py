"""Label-free fidelity of a reduced model's features to the unpatched model's: cosine similarities.

For backbones without a classifier (DINOv2, CLIP towers) agreement and KL do not apply; what a
user keeps is the feature vector. :func:`feature_fidelity` compares ``forward_features`` of a
model and its reference on the same images: the class token (the first prefix token) and the mean
over the patch tokens. A reduced timm model returns the unpatched shape from ``forward_features``
(merged tokens repeated over the patches they hold), so the patch mean is the size-weighted mean of
the merged tokens, the pooling the reduced model itself would apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .accuracy import _progress_bar


@dataclass
class FeatureFidelity:
    """Mean cosine similarity to the reference's features (1.0: identical directions).

    Attributes:
        images: images compared.
        cls_cos, cls_cos_se: class-token similarity, its mean and standard error over images
            (``None`` for models without a class token).
        patch_cos, patch_cos_se: similarity of the mean over patch tokens.
    """

    images: int
    cls_cos: Optional[float]
    cls_cos_se: Optional[float]
    patch_cos: float
    patch_cos_se: float


def _mean_se(values: List[torch.Tensor]) -> "tuple[float, float]":
    v = torch.cat(values).double()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


def pooled_features(model: nn.Module, images: torch.Tensor) -> "tuple[Optional[torch.Tensor], torch.Tensor]":
    """``(class token or None, mean over patch tokens)`` of ``model.forward_features(images)``."""
    feats = model.forward_features(images)
    if feats.dim() != 3:
        raise ValueError(f"forward_features returned shape {tuple(feats.shape)}; a token sequence [B, N, C] is needed")
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    has_cls = bool(getattr(model, "cls_token", None) is not None) and prefix > 0
    return (feats[:, 0] if has_cls else None), feats[:, prefix:].mean(dim=1)


@torch.no_grad()
def reference_features(
    reference: nn.Module,
    data: Dataset,
    batch_size: int = 32,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
) -> List["tuple[Optional[torch.Tensor], torch.Tensor]"]:
    """Pooled features of ``reference`` per batch, to compare several models against it without
    running it again (pass the same ``data`` and ``batch_size`` to :func:`feature_fidelity`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device or "cpu")
    reference.eval().to(device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return [pooled_features(reference, images.to(device)) for images, _ in loader]


@torch.no_grad()
def feature_fidelity(
    model: nn.Module,
    reference: Optional[nn.Module],
    data: Dataset,
    batch_size: int = 32,
    num_workers: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    label: str = "features",
    reference_pooled: Optional[List["tuple[Optional[torch.Tensor], torch.Tensor]"]] = None,
) -> FeatureFidelity:
    """Cosine similarity of class-token and mean-patch features to ``reference`` on ``data``.

    Args:
        model: the reduced model (a timm ViT, patched or not).
        reference: the unpatched model with the same weights (``None`` with ``reference_pooled``).
        data: ``(image, label)`` pairs; labels are ignored.
        reference_pooled: :func:`reference_features` of the reference on the same data and batch size.
    """
    if (reference is None) == (reference_pooled is None):
        raise ValueError("pass either reference or reference_pooled")
    if reference_pooled is None:
        reference_pooled = reference_features(reference, data, batch_size, num_workers, device)
    device = torch.device(device or "cpu")
    model.eval().to(device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if len(reference_pooled) != len(loader):
        raise ValueError(f"reference_pooled holds {len(reference_pooled)} batches, the data gives {len(loader)}: "
                         "compute it on the same data and batch size")
    cls_sims: List[torch.Tensor] = []
    patch_sims: List[torch.Tensor] = []
    bar = _progress_bar(len(data), progress, label)
    for (images, _), (ref_cls, ref_patch) in zip(loader, reference_pooled):
        cls, patch = pooled_features(model, images.to(device))
        patch_sims.append(F.cosine_similarity(patch.float(), ref_patch.float(), dim=-1).cpu())
        if cls is not None and ref_cls is not None:
            cls_sims.append(F.cosine_similarity(cls.float(), ref_cls.float(), dim=-1).cpu())
        bar.update(images.shape[0])
    bar.close()
    if not patch_sims:
        raise ValueError("the dataset is empty: nothing to compare")
    cls_mean, cls_se = _mean_se(cls_sims) if cls_sims else (None, None)
    patch_mean, patch_se = _mean_se(patch_sims)
    return FeatureFidelity(sum(t.numel() for t in patch_sims), cls_mean, cls_se, patch_mean, patch_se)


__all__ = ["FeatureFidelity", "feature_fidelity", "pooled_features", "reference_features"]
