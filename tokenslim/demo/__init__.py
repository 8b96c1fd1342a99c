"""The built-in demo: train a small ViT on generated shapes, then sweep token reduction settings.

Runs offline in a few minutes on a CPU and shows the whole workflow: a model without a timm
pretrained config saved as a checkpoint that carries its data config, the accuracy of every setting
against the unpatched model, and speed measured side by side, written as a table, CSV, JSONL and a
Pareto plot.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import List, Optional, Sequence

PACKAGED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_vit.pth")
"""The demo model trained with the defaults (12,000 images, 6 epochs), shipped with the package."""

DEFAULT_SETTINGS = (
    "r=2", "r=4", "r=6", "r=8", "r=(8,-1)",
    "keep_rate=0.6,prune_layers=(1,3),fuse_pruned=True",
    "r=4,keep_rate=0.7,prune_layers=(1,3),fuse_pruned=True",
    "mlp_pruned=0.25", "mlp_pruned=0.25,r=4",
)


def run_demo(
    out_dir: str = "results/demo",
    settings: Sequence[str] = DEFAULT_SETTINGS,
    train_images: int = 12000,
    test_images: int = 2000,
    epochs: int = 6,
    retrain: bool = False,
    rounds: int = 15,
    batch_size: int = 64,
) -> List[dict]:
    """Train (or reuse) the demo model and sweep ``settings``; returns the sweep rows."""
    from ..loading import load_checkpoint, save_checkpoint
    from ..sweep import format_sweep, run_sweep, write_outputs
    from .shapes import CLASSES, data_config, split
    from .train import DEMO_KWARGS, DEMO_MODEL, create_demo_model, train

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "demo_vit.pth")
    log(f"generating {test_images} test images of {len(CLASSES)} shapes")
    _, test_data = split(0, test_images)
    if os.path.exists(ckpt) and not retrain:
        log(f"reusing the trained model in {ckpt} (pass --retrain to train again)")
        model = load_checkpoint(ckpt)
    elif not retrain and _packaged_matches(train_images, epochs):
        shutil.copyfile(PACKAGED_CHECKPOINT, ckpt)
        log(f"using the demo model shipped with tokenslim ({train_images} images, {epochs} epochs), copied to "
            f"{ckpt}; pass --retrain to train it here (a few minutes)")
        model = load_checkpoint(ckpt)
    else:
        log(f"generating {train_images} training images")
        train_data, _ = split(train_images, 0)
        log(f"training {DEMO_MODEL} {DEMO_KWARGS} for {epochs} epochs")
        model = create_demo_model()
        recipe = train(model, train_data, test_data, epochs=epochs, log=log)
        save_checkpoint(model, ckpt, DEMO_MODEL, DEMO_KWARGS, data_config(), extra={"recipe": recipe})
        log(f"saved {ckpt}")
        model = load_checkpoint(ckpt)
    log(f"sweeping {len(settings)} settings: accuracy on {test_images} test images, speed interleaved")
    rows = run_sweep(
        model, settings, test_data, model_name="demo-vit (shapes, 32px)",
        eval_kwargs=dict(batch_size=256, num_workers=0, device="cpu", progress=False),
        bench_kwargs=dict(batch_size=batch_size, rounds=rounds, device="cpu"),
        progress=lambda m: log(f"  timing {m}"),
    )
    paths = write_outputs(rows, out_dir, "demo_sweep", title="demo ViT on generated shapes: top-1 vs measured speed-up")
    print(format_sweep(rows))
    print("* = on the accuracy/throughput Pareto front; d top1 = paired difference to the unpatched model")
    print(timing_note(rows, rounds))
    print("wrote " + ", ".join(paths.values()))
    return rows


def timing_note(rows: List[dict], rounds: int) -> str:
    """How far to trust the speed column: its widest 95% interval, and that runs differ by more."""
    widest = max(rows, key=lambda r: r["throughput_ratio_high"] - r["throughput_ratio_low"])
    return (f"speed: median of {rounds} interleaved rounds with its 95% interval (widest: {widest['setting']} "
            f"[{widest['throughput_ratio_low']:.2f}, {widest['throughput_ratio_high']:.2f}]); on a small model and a "
            "shared CPU two runs can differ by more than that, so compare rows of one run, and give more --rounds "
            "or a larger --batch-size for steadier ratios")


def _packaged_matches(train_images: int, epochs: int) -> bool:
    """Whether the shipped checkpoint was trained with exactly these demo arguments."""
    if not os.path.isfile(PACKAGED_CHECKPOINT):
        return False
    import torch

    recipe = torch.load(PACKAGED_CHECKPOINT, map_location="cpu", weights_only=True).get("extra", {}).get("recipe", {})
    return recipe.get("train_images") == train_images and recipe.get("epochs") == epochs
