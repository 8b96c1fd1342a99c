"""Paired differences between reduction settings on the same images: top-1 and KL to the
unpatched model, each against a baseline setting, with standard errors.

``tokenslim eval`` pairs every setting with the unpatched model; this pairs settings with each
other (e.g. a tuned schedule against ToMe's constant ``r`` at the same measured speed), so the
error bar is that of the difference itself.

    .venv/bin/python scripts/paired_settings.py --checkpoint checkpoints/cifar10_reference.pth \\
        --data ../shared/data/cifar10-jpg/test.tar.gz --holdout 1000 --baseline r=9 \\
        --settings 'r=[4,18,4,12,4,0],keep_rate=[0.01],prune_layers=(5,)'
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.evaluate import dataset_targets, evaluate, open_dataset, resolve_transform, select  # noqa: E402
from tokenslim.loading import load_checkpoint  # noqa: E402
from tokenslim.spec import apply_setting, parse_setting  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="tokenslim checkpoint of the unpatched model")
    p.add_argument("--data", required=True, help="labelled images: folder, .tar(.gz) or label file")
    p.add_argument("--baseline", required=True, help="the setting every other is compared with, e.g. r=9")
    p.add_argument("--settings", nargs="+", required=True, help="settings to compare with the baseline")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--limit", type=int, default=None, help="these many images (a deterministic subset)")
    group.add_argument("--holdout", type=int, default=None,
                       help="the images --limit N leaves out (e.g. those tune did not calibrate on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args(argv)

    model = load_checkpoint(args.checkpoint)
    transform, _ = resolve_transform(model)
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    if dataset_targets(data) is None:
        raise SystemExit(f"{args.data} has no labels; paired top-1 needs them")
    kw = dict(batch_size=args.batch_size, num_workers=0, progress=False, keep_logits=True)
    reference = evaluate(model, data, **kw)
    unpatched = reference.logits.log_softmax(-1)

    def run(setting: str, baseline_logits=None):
        """The setting's evaluation (paired with the baseline's logits when given) and its
        per-image KL to the unpatched model."""
        reduced = apply_setting(copy.deepcopy(model), parse_setting(setting))
        result = evaluate(reduced, data, reference_logits=baseline_logits, **kw)
        kl = (unpatched.exp() * (unpatched - result.logits.log_softmax(-1))).sum(-1).double()
        return result, kl

    base, base_kl = run(args.baseline)
    print(f"{len(data)} images; unpatched top-1 {reference.top1:.2f}; baseline {args.baseline}: top-1 {base.top1:.2f}, "
          f"KL {base_kl.mean():.4f}")
    print(f"{'setting':56s} {'top1':>6s} {'d top1 vs baseline':>20s} {'KL':>8s} {'d KL vs baseline':>22s}")
    for setting in args.settings:
        # evaluate's paired top-1 difference, with the baseline's logits as the reference
        result, kl = run(setting, base.logits)
        d_kl = kl - base_kl
        print(f"{setting:56s} {result.top1:6.2f} {result.top1_diff:+9.2f} +- {result.top1_diff_se:5.2f}    "
              f"{kl.mean():8.4f} {d_kl.mean():+11.5f} +- {d_kl.std() / math.sqrt(len(d_kl)):.5f}")

if __name__ == "__main__":
    main()
