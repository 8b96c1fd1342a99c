"""Time tokenslim checkpoints interleaved against a baseline checkpoint (with optional settings).

For recovery: the recovered checkpoint against the reference model reduced the same way, so the
ratio shows that recovery left the speed unchanged (``~1.0``).

    .venv/bin/python scripts/compare_checkpoints.py --baseline checkpoints/cifar10_reference.pth \\
        --baseline-settings 'r=(10,-1)' --checkpoints results/recover/merge_r10ramp.pth --batch-size 64
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.loading import load_checkpoint  # noqa: E402
from tokenslim.measure.benchmark import compare  # noqa: E402
from tokenslim.spec import apply_setting, parse_setting  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="tokenslim checkpoint of the baseline")
    p.add_argument("--baseline-settings", default="none", help="settings text applied to the baseline")
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints to time against it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    base = apply_setting(copy.deepcopy(load_checkpoint(args.baseline)), parse_setting(args.baseline_settings))
    models = {f"baseline ({args.baseline_settings})": base}
    for path in args.checkpoints:
        models[path] = load_checkpoint(path)
    res = compare(models, batch_size=args.batch_size, rounds=args.rounds, latency=True)
    print(f"{'model':<48}{'thru x [95% CI]':>22}{'lat x [95% CI]':>22}")
    for name in models:
        t, lat = res.throughput[name], res.latency[name]
        print(f"{name:<48}{t.median:10.3f} [{t.low:.3f},{t.high:.3f}]{lat.median:10.3f} [{lat.low:.3f},{lat.high:.3f}]")


if __name__ == "__main__":
    main()
