"""Patch a ViT-S/16 with token merging and show what changes: token counts, outputs, speed.

Runs offline on a randomly initialised model (pass --pretrained where timm weights can be
downloaded or are cached). Usage: python scripts/quickstart.py [--r 16] [--pretrained]
"""
import argparse
import statistics
import time

import timm
import torch

import tokenslim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=5, help="interleaved timing pairs")
    parser.add_argument("--pretrained", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    with torch.inference_mode():
        reference = model(x)
        tokenslim.patch(model, r=0)
        print(f"r=0 max |patched - unpatched| = {(model(x) - reference).abs().max().item():.2e}")
        model.tokenslim.r = args.r
        plan = model.tokenslim_plan(model.patch_embed.num_patches + model.num_prefix_tokens)
        print(f"r={args.r}: tokens entering each block {list(plan.tokens[:-1])}, leaving {plan.tokens[-1]}")
        agree = (model(x).argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"r={args.r}: top-1 agreement with the unpatched model on random input: {agree:.2f}")

        ratios = []
        for _ in range(args.pairs):
            times = []
            for r in (0, args.r):
                model.tokenslim.r = r
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            ratios.append(times[0] / times[1])
    print(f"speed-up r={args.r} vs r=0 on {torch.get_num_threads()} CPU threads, batch {args.batch_size}: "
          f"median {statistics.median(ratios):.2f}x over {args.pairs} interleaved pairs")


if __name__ == "__main__":
    main()
