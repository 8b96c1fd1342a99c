"""Patch a ViT-S/16 with token merging and show what changes: token counts, outputs, speed.

Runs offline on a randomly initialised model (pass --pretrained where timm weights can be
downloaded or are cached). Usage: python scripts/quickstart.py [--r 16] [--pretrained]
"""
import argparse
import copy

import timm
import torch

import tokenslim
from tokenslim.measure import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (>= 15)")
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
    model.tokenslim.r = 0

    print(f"timing r=0 and r={args.r} side by side ({args.rounds} interleaved rounds)...")
    result = compare({"r=0": model, f"r={args.r}": tokenslim.patch(copy.deepcopy(model), r=args.r)},
                     batch_size=args.batch_size, rounds=args.rounds, latency=False, device="cpu")
    est = result.throughput[f"r={args.r}"]
    print(f"speed-up r={args.r} vs r=0 on {result.context.cpu_threads} CPU threads, batch {args.batch_size}: "
          f"median {est.median:.2f}x [{est.low:.2f}, {est.high:.2f}] over {est.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
