"""Small random-initialised timm models covering every supported ViT variant."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import LayerNorm, SwiGLUPacked
from timm.layers.attention import Attention

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

# name -> (timm model name, overrides on top of SMALL). LayerScale init is raised from DeiT-III's
# 1e-5 so that every block visibly changes the tokens and a wrong block shows in the output.
VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "clip_prenorm": ("vit_base_patch16_clip_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"init_values": 0.5}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"init_values": 0.5}),
    "avg_no_class": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "map_pool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "map"}),
    "dynamic_img": ("vit_tiny_patch16_224", {"dynamic_img_size": True}),
    "swiglu_scale_norms": (
        "vit_tiny_patch16_224",
        {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "mlp_ratio": 8 / 3,
         "scale_mlp_norm": True},
    ),
    "gated_attn_dim": ("vit_tiny_patch16_224", {}),  # attention replaced below
}


def make_model(variant: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A small random-initialised model of a supported variant, in eval mode."""
    name, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **overrides, **extra})
    if variant == "gated_attn_dim":
        # Attention width differs from the embedding width, with scale_norm and a gate.
        for block in model.blocks:
            block.attn = Attention(
                SMALL["embed_dim"], num_heads=3, attn_head_dim=24, qkv_bias=True,
                scale_norm=True, gated=True, norm_layer=LayerNorm,
            )
    # Random init leaves biases at zero and norms at identity; perturb them so every path counts.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
shared_data = pytest.mark.skipif(
    not (SHARED / "data").is_dir(), reason=f"{SHARED}/data is absent (CI and dev machines have it)"
)


def read_rows(path) -> list:
    """The rows of a JSON-lines result file (``tokenslim eval --jsonl``, sweeps)."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
