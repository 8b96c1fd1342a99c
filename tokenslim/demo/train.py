"""Train the demo's small ViT (a few minutes on a CPU)."""
from __future__ import annotations

import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "num_classes": 10}


def create_demo_model(seed: int = 0) -> nn.Module:
    """A 6-block ViT on 32 px images, 4 px patches: 64 patch tokens plus a class token."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(DEMO_MODEL, pretrained=False, **DEMO_KWARGS)


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Top-1 (%) on ``data`` with the project's evaluator."""
    from ..evaluate import evaluate

    return evaluate(model, data, batch_size=256, num_workers=0, device="cpu", progress=False).top1


def train(
    model: nn.Module,
    train_data: Dataset,
    test_data: Optional[Dataset] = None,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    log=print,
) -> dict:
    """AdamW with linear warm-up and cosine decay, label smoothing 0.1, random horizontal flips.

    Returns the recipe and the final test accuracy (for the checkpoint's record).
    """
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    steps = epochs * len(loader)
    warmup = max(len(loader) // 2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total_loss, seen = 0.0, 0
        for x, y in loader:
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(y)
            seen += len(y)
        msg = f"  epoch {epoch + 1}/{epochs}: train loss {total_loss / seen:.3f}"
        if test_data is not None and (epoch + 1 == epochs or epoch % 2 == 1):
            msg += f", test top-1 {accuracy(model, test_data):.1f}%"
        log(msg + f" ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "train_images": len(train_data), "seconds": round(time.perf_counter() - start, 1),
            "test_top1": accuracy(model, test_data) if test_data is not None else None}
