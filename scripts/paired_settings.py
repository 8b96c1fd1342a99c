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

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.evaluate import dataset_targets, evaluate, holdout, open_dataset, resolve_transform, subset  # noqa: E402
from tokenslim.loading import load_checkpoint  # noqa: E402
from tokenslim.spec import apply_setting, parse_setting  # noqa: E402


def _mean_se(values: torch.Tensor):
    return float(values.mean()), float(values.std()) / math.sqrt(len(values))


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
    data = open_dataset(args.data, transform)
    data = holdout(data, args.holdout, args.seed) if args.holdout else subset(data, args.limit, args.seed)
    targets = dataset_targets(data)
    if targets is None:
        raise SystemExit(f"{args.data} has no labels; paired top-1 needs them")
    labels = torch.tensor(targets)
    kw = dict(batch_size=args.batch_size, num_workers=0, progress=False, keep_logits=True)
    reference = evaluate(model, data, **kw).logits.log_softmax(-1)

    def per_image(setting: str):
        logits = evaluate(apply_setting(copy.deepcopy(model), parse_setting(setting)), data, **kw).logits
        kl = (reference.exp() * (reference - logits.log_softmax(-1))).sum(-1)
        return kl, (logits.argmax(-1) == labels).double() * 100

    base_kl, base_correct = per_image(args.baseline)
    print(f"{len(labels)} images; baseline {args.baseline}: top-1 {base_correct.mean():.2f}, KL {base_kl.mean():.4f}")
    print(f"{'setting':56s} {'top1':>6s} {'d top1 vs baseline':>20s} {'KL':>8s} {'d KL vs baseline':>22s}")
    for setting in args.settings:
        kl, correct = per_image(setting)
        d_top1, se_top1 = _mean_se(correct - base_correct)
        d_kl, se_kl = _mean_se((kl - base_kl).double())
        print(f"{setting:56s} {correct.mean():6.2f} {d_top1:+9.2f} +- {se_top1:5.2f}    {kl.mean():8.4f} "
              f"{d_kl:+11.5f} +- {se_kl:.5f}")


if __name__ == "__main__":
    main()
