"""Where the time of a patched ViT goes: operator self-times of the unpatched and a patched model.

torch.profiler's per-operator self CPU time, summed per operator and grouped into what the model
has to do anyway (linear layers, attention, norms, activations) and what token reduction adds
(matching, sorting, gathers/scatters, size bookkeeping). Run it with nothing else on the machine:

    .venv/bin/python scripts/profile_overhead.py --geometry vit_s --batch-size 1 --settings r=13
    .venv/bin/python scripts/profile_overhead.py --geometry tiny65 --batch-size 64 --settings r=4

Prints a table per model (ms per forward, by group and the top operators) and the overhead share.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402

from tokenslim.spec import apply_setting, parse_setting  # noqa: E402

GEOMETRIES = {
    "vit_s": ("vit_small_patch16_224", {}),
    "tiny65": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
    "demo": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}),
}

GROUPS = [
    ("linear", ("addmm", "mm", "bmm", "linear", "matmul")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("norm/activation", ("layer_norm", "gelu", "native_layer_norm")),
    ("sort/top-k/max", ("sort", "topk", "max", "argmax", "argsort")),
    ("gather/scatter/index", ("gather", "scatter", "index", "take", "masked_fill", "where")),
    ("copies/reshapes", ("copy_", "clone", "contiguous", "cat", "stack", "to", "_to_copy", "expand", "empty",
                         "zeros", "ones", "arange", "fill_", "full", "new_")),
    ("elementwise/reductions", ("add", "mul", "div", "sub", "log", "norm", "mean", "sum", "cumsum", "softmax",
                                "exp", "sqrt", "linalg_vector_norm", "clamp", "neg", "rsub")),
]


def group_of(name: str) -> str:
    short = name.replace("aten::", "")
    for group, keys in GROUPS:
        if any(short == k or short.startswith(k + "_") or short.startswith("_" + k) for k in keys):
            return group
    return "other"


def profile_model(model, x, iters: int):
    with torch.no_grad():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    per_op = defaultdict(float)
    for evt in prof.key_averages():
        per_op[evt.key] += evt.self_cpu_time_total / 1e3 / iters  # ms per forward
    return per_op


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="vit_s")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=["r=13"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    name, kw = GEOMETRIES[args.geometry]
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    size = base.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size)
    models = {"none": base}
    for text in args.settings:
        models[text] = apply_setting(copy.deepcopy(base), parse_setting(text))
    print(f"{args.geometry} ({name}, {kw}), batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; self CPU ms per forward (torch.profiler, {args.iters} forwards)")
    results = {}
    for label, model in models.items():
        results[label] = profile_model(model, x, args.iters)
    groups = [g for g, _ in GROUPS] + ["other"]
    header = f"{'group':<24}" + "".join(f"{label:>14}" for label in results)
    print(header)
    print("-" * len(header))
    totals = {label: sum(ops.values()) for label, ops in results.items()}
    for g in groups:
        row = f"{g:<24}"
        for label, ops in results.items():
            row += f"{sum(v for k, v in ops.items() if group_of(k) == g):14.2f}"
        print(row)
    print(f"{'total':<24}" + "".join(f"{totals[label]:14.2f}" for label in results))
    for label, ops in results.items():
        if label == "none":
            continue
        base_ops = results["none"]
        extra = {k: v - base_ops.get(k, 0.0) for k, v in ops.items()}
        added = sorted(((v, k) for k, v in extra.items() if base_ops.get(k, 0.0) == 0.0 and v > 0), reverse=True)
        print(f"\n{label}: operators the unpatched model does not run (ms per forward):")
        for v, k in added[:args.top]:
            print(f"  {k:<40}{v:8.3f}")
        print(f"  {'sum':<40}{sum(v for v, _ in added):8.3f}  ({100 * sum(v for v, _ in added) / totals[label]:.1f}% "
              f"of the patched forward)")


if __name__ == "__main__":
    main()
