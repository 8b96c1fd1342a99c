"""What works on each variant of timm's rotary ``Eva`` family: the README's table, measured.

For every variant (small random-initialised models of each architecture's own configuration, 32 px
images with 4 px patches) it prints the largest difference to the unpatched model at ``r=0``
(``forward`` and ``forward_features``), whether pruning runs (class-token models; patch-pooled
heads need ``fuse_pruned=True``), and the largest output change of each merging treatment at
``r=4`` next to ``rope=ignore`` (a sanity check that each treatment does something different).

    .venv/bin/python scripts/eva_variants.py
"""
from __future__ import annotations

import argparse

import timm
import torch

import tokenslim

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
VARIANTS = [
    ("RoPE-ViT (axial)", "vit_small_patch16_rope_224", {}),
    ("RoPE-ViT (mixed)", "vit_small_patch16_rope_mixed_224", {}),
    ("RoPE-ViT + abs pos", "vit_small_patch16_rope_ape_224", {}),
    ("DINOv3, token pool", "vit_small_patch16_dinov3", {"global_pool": "token"}),
    ("DINOv3, avg pool", "vit_small_patch16_dinov3", {}),
    ("DINOv3 (SwiGLU)", "vit_huge_plus_patch16_dinov3", {"embed_dim": 64, "num_heads": 4}),
    ("EVA-02", "eva02_tiny_patch14_224", {"patch_size": 4}),
    ("EVA-02 CLIP", "eva02_base_patch16_clip_224", {"embed_dim": 64, "num_heads": 4}),
    ("Perception Encoder (map pool)", "vit_pe_core_small_patch16_384", {"attn_pool_num_heads": 4}),
    ("SBB RoPE (register, no cls)", "vit_medium_patch16_rope_reg1_gap_256", {}),
    ("post-norm blocks", "vit_small_patch16_rope_224", {"use_post_norm": True, "attn_type": "eva"}),
]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print("| variant | timm model | rope | r=0: max abs diff (forward, features) | pruning | merging: mean / blend / "
          "local vs ignore (max output change) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, name, kwargs in VARIANTS:
        torch.manual_seed(0)
        model = timm.create_model(name, **{**SMALL, **kwargs}).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
            ref, ref_feat = model(x), model.forward_features(x)
            tokenslim.patch(model, r=0)
            d_out = (model(x) - ref).abs().max().item()
            d_feat = (model.forward_features(x) - ref_feat).abs().max().item()
            prune = "yes"
            try:
                tokenslim.patch(model, keep_rate=0.5, prune_layers=(1,))
                model(x)
            except ValueError as e:
                try:
                    tokenslim.patch(model, keep_rate=0.5, prune_layers=(1,), fuse_pruned=True)
                    model(x)
                    prune = "with fuse_pruned=True"
                except ValueError:
                    prune = "no (" + str(e).split(";")[0].split(",")[0] + ")"
            outs = {}
            for rope in ("ignore", "mean", "blend", "local"):
                tokenslim.patch(model, r=4, rope=rope)
                outs[rope] = model(x)
        change = " / ".join(f"{(outs[k] - outs['ignore']).abs().max().item():.2g}" for k in ("mean", "blend", "local"))
        rope_type = {"Cat": "cat", "Mixed": "mixed", "DinoV3": "dinov3"}.get(
            type(model.rope).__name__.replace("RotaryEmbedding", ""), type(model.rope).__name__)
        print(f"| {label} | `{name}` | {rope_type} | {d_out:.1g}, {d_feat:.1g} | {prune} | {change} |")


if __name__ == "__main__":
    main()
