"""A procedurally generated 10-class image data set (coloured shapes on noisy backgrounds).

It needs no download, so the demo runs on any machine; it is hard enough that a small ViT must
look at the shape, not at a colour or a corner.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch.utils.data import TensorDataset

CLASSES = ("disc", "ring", "square", "frame", "hbar", "vbar", "plus", "cross", "triangle", "dots")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _masks(yy: torch.Tensor, xx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``[10, B, H, W]`` masks of every class for centred coordinates ``yy, xx`` and half-size ``s``."""
    r = torch.sqrt(yy ** 2 + xx ** 2)
    box = torch.maximum(yy.abs(), xx.abs())
    thin = s * 0.3
    diag1, diag2 = (yy - xx).abs() / math.sqrt(2), (yy + xx).abs() / math.sqrt(2)
    return torch.stack([
        r <= s,
        (r <= s) & (r >= s * 0.6),
        box <= s * 0.85,
        (box <= s * 0.85) & (box >= s * 0.5),
        (yy.abs() <= thin) & (xx.abs() <= s),
        (xx.abs() <= thin) & (yy.abs() <= s),
        ((yy.abs() <= thin) & (xx.abs() <= s)) | ((xx.abs() <= thin) & (yy.abs() <= s)),
        ((diag1 <= thin) | (diag2 <= thin)) & (box <= s * 0.8),
        (yy <= s * 0.7) & (yy >= -s * 0.8 + 1.6 * xx.abs()),
        (torch.sqrt((yy) ** 2 + (xx - s * 0.55) ** 2) <= s * 0.35)
        | (torch.sqrt((yy) ** 2 + (xx + s * 0.55) ** 2) <= s * 0.35),
    ])


def make_shapes(n: int, img_size: int = 32, seed: int = 0) -> TensorDataset:
    """``n`` normalised images ``[3, img_size, img_size]`` with balanced labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.empty(n, 3, img_size, img_size)
    coords = torch.arange(img_size, dtype=torch.float32)
    for start in range(0, n, 1024):
        b = min(1024, n - start)
        s = img_size * (0.18 + 0.14 * torch.rand(b, 1, 1, generator=g))
        cy = s + (img_size - 2 * s) * torch.rand(b, 1, 1, generator=g)
        cx = s + (img_size - 2 * s) * torch.rand(b, 1, 1, generator=g)
        yy, xx = coords.view(1, -1, 1) - cy, coords.view(1, 1, -1) - cx
        mask = _masks(yy, xx, s)[labels[start:start + b], torch.arange(b)]  # [b, H, W]
        fg = 0.5 + 0.5 * torch.rand(b, 3, 1, 1, generator=g)
        bg = 0.35 * torch.rand(b, 3, 1, 1, generator=g)
        noise = 0.08 * torch.randn(b, 3, img_size, img_size, generator=g)
        img = torch.where(mask.unsqueeze(1), fg, bg) + noise
        images[start:start + b] = (img.clamp(0, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return TensorDataset(images, labels)


def data_config(img_size: int = 32) -> dict:
    """The timm data config of the demo data (for checkpoints and transforms)."""
    return {"input_size": (3, img_size, img_size), "mean": MEAN, "std": STD, "crop_pct": 1.0,
            "num_classes": len(CLASSES)}


def split(n_train: int, n_test: int, img_size: int = 32, seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """Disjoint training and test sets (different generator seeds)."""
    return make_shapes(n_train, img_size, seed), make_shapes(n_test, img_size, seed + 1)
