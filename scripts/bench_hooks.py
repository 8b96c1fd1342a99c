"""What calling reduced blocks as modules costs: the hooked path against the direct one, interleaved.

Since issue 41 a patched model calls every reducing block and its attention through
``Module.__call__`` (:mod:`tokenslim.adapters.calls`) so that hooks fire. The "direct" path
here is the one before it: the same reduced work called as plain functions (``call_through``
swapped for a direct call in the timm adapter). Both run on the same model object, alternating
in one process, so drift hits both alike. Run with nothing else on the machine:

    .venv/bin/python scripts/bench_hooks.py --rounds 15

Prints, per case, the median milliseconds per forward of each path and the median of the
per-round ratios (hooked / direct) with its 95% interval.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402

import tokenslim  # noqa: E402
from tokenslim.adapters import timm_vit  # noqa: E402
from tokenslim.loading import load_checkpoint  # noqa: E402
from tokenslim.measure.benchmark import median_interval  # noqa: E402

HOOKED = timm_vit.call_through


def _direct(module, fn, x, *state, inputs=None):
    return fn(module, x, *state)


def _time(model, x, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model(x)
    return (time.perf_counter() - start) / steps * 1e3


def run_case(name, model, x, rounds, steps):
    paths = {"hooked": HOOKED, "direct": _direct}
    times = {k: [] for k in paths}
    ratios = []
    with torch.inference_mode():
        for fn in paths.values():  # warm-up both
            timm_vit.call_through = fn
            _time(model, x, 2)
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            this = {}
            for key in order:
                timm_vit.call_through = paths[key]
                this[key] = _time(model, x, steps)
                times[key].append(this[key])
            ratios.append(this["hooked"] / this["direct"])
    timm_vit.call_through = HOOKED
    med, lo, hi = median_interval(ratios)
    print(f"{name:<34} hooked {median_interval(times['hooked'])[0]:8.2f} ms   direct "
          f"{median_interval(times['direct'])[0]:8.2f} ms   ratio {med:.3f} [{lo:.3f}, {hi:.3f}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--checkpoint", default=os.path.join(os.path.dirname(__file__), "..", "checkpoints",
                                                             "cifar10_reference.pth"))
    args = parser.parse_args()
    torch.manual_seed(0)
    vit_s = tokenslim.patch(timm.create_model("vit_small_patch16_224").eval(), r=13)
    run_case("ViT-S/16 224 bs32 r=13", vit_s, torch.randn(32, 3, 224, 224), args.rounds, 2)
    ref = load_checkpoint(args.checkpoint).eval()
    tokenslim.patch(ref, r=(10, -1))
    size = ref.patch_embed.img_size
    run_case("reference bs1 r=(10,-1)", ref, torch.randn(1, 3, *size), args.rounds, 200)


if __name__ == "__main__":
    main()
