"""The one-liner on a timm, a Hugging Face transformers and an open_clip ViT-S/16: measured speed-ups.

The three models have the same geometry (224 px, 16 px patches, width 384, 12 blocks, 6 heads,
MLP 1536) and random weights (nothing can be downloaded on the development machines; pass
``--hf-name``/``--open-clip-name`` where weights are cached). Each framework's patched models are
timed interleaved with its own unpatched model (``tokenslim.measure.compare``), so the ratios are
what ``tokenslim.patch`` buys in that framework.

    .venv/bin/python scripts/bench_frameworks.py --settings r=8 r=13 --batch-size 32
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from tokenslim.measure import compare
from tokenslim.spec import apply_setting, parse_setting


def _models(args):
    import timm

    torch.manual_seed(0)
    models = {"timm": timm.create_model("vit_small_patch16_224", pretrained=False).eval()}
    try:
        from transformers import ViTConfig, ViTModel

        models["transformers"] = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                    intermediate_size=1536, image_size=224, patch_size=16),
                                          add_pooling_layer=False).eval()
    except ImportError:
        print("transformers not installed: pip install 'tokenslim[transformers]'")
    try:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        models["open_clip"] = _build_vision_tower(
            512, CLIPVisionCfg(layers=12, width=384, head_width=64, patch_size=16, image_size=224)).eval()
    except ImportError:
        print("open_clip not installed: pip install 'tokenslim[open_clip]'")
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["r=13"], help="token settings (settings text)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--latency", action="store_true", help="also batch-1 latency")
    p.add_argument("--json", help="write the ratios here")
    args = p.parse_args()
    rows = []
    for framework, model in _models(args).items():
        group = {"none": model}
        for text in args.settings:
            group[text] = apply_setting(copy.deepcopy(model), parse_setting(text))
        print(f"{framework}: timing {list(group)} ({args.rounds} interleaved rounds, batch {args.batch_size})",
              flush=True)
        result = compare(group, batch_size=args.batch_size, img_size=224, rounds=args.rounds,
                         latency=args.latency, device="cpu")
        for name in group:
            if name == "none":
                continue
            t = result.throughput[name]
            row = {"framework": framework, "setting": name, "throughput_x": round(t.median, 3),
                   "low": round(t.low, 3), "high": round(t.high, 3), "ms_unpatched": round(result.step_ms["none"], 1),
                   "ms_patched": round(result.step_ms[name], 1)}
            if args.latency:
                row["latency_x"] = round(result.latency[name].median, 3)
            rows.append(row)
            print(f"  {framework:12s} {name:10s} throughput x{t.median:.2f} [{t.low:.2f}, {t.high:.2f}]  "
                  f"({result.step_ms['none']:.0f} -> {result.step_ms[name]:.0f} ms per batch)"
                  + (f"  batch-1 latency x{row['latency_x']:.2f}" if args.latency else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
