"""Where recovery's gain goes: KL to the teacher and top-1 on the training images a recovery run
saw, on training images it did not see, and on test images.

A recovered model that matches the teacher far better on the images it was trained on than on
unseen ones is limited by the number of images, not by its trainable parameters.

    .venv/bin/python scripts/recovery_fit.py --teacher checkpoints/cifar10_reference.pth --settings r=13 \\
        --train ../shared/data/cifar10-jpg/train.tar.gz --test ../shared/data/cifar10-jpg/test.tar.gz \\
        --limit 2000 --checkpoints results/recover/r13_full5_feat.pth
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.evaluate import evaluate, holdout, open_dataset, resolve_transform, subset  # noqa: E402
from tokenslim.loading import load_checkpoint  # noqa: E402
from tokenslim.spec import apply_setting, parse_setting  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="tokenslim checkpoint of the unpatched model")
    p.add_argument("--settings", required=True, help="the reduction the recovery started from (the unrecovered row)")
    p.add_argument("--train", required=True, help="the training images given to `tokenslim recover --data`")
    p.add_argument("--test", required=True, help="test images")
    p.add_argument("--limit", type=int, default=2000, help="recover's --limit (the images it saw)")
    p.add_argument("--seed", type=int, default=0, help="recover's --seed")
    p.add_argument("--images", type=int, default=2000, help="unseen training images and test images to use")
    p.add_argument("--checkpoints", nargs="+", required=True, help="recovered checkpoints")
    args = p.parse_args(argv)

    teacher = load_checkpoint(args.teacher)
    transform, _ = resolve_transform(teacher)
    train = open_dataset(args.train, transform)
    sets = {
        "seen": subset(train, args.limit, args.seed),
        # the training images --limit left out, of which the first --images of another draw
        "unseen": subset(holdout(train, args.limit, args.seed), args.images, args.seed + 1),
        "test": subset(open_dataset(args.test, transform), args.images, args.seed),
    }
    models = {f"unrecovered {args.settings}": apply_setting(copy.deepcopy(teacher), parse_setting(args.settings))}
    models.update({path: load_checkpoint(path) for path in args.checkpoints})
    print(f"{'model':48s}" + "".join(f"{name + ' KL':>12s}{name + ' top1':>12s}" for name in sets))
    for name, model in models.items():
        row = f"{name:48s}"
        for data in sets.values():
            r = evaluate(model, data, reference=teacher, batch_size=250, num_workers=0, progress=False)
            row += f"{r.kl:12.4f}{r.top1:12.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
