"""Re-decide finished ``tune`` runs at other confirmation thresholds, from their journals alone.

The confirmation step journals every option's per-image KL on the confirmation images, so the rule
(:func:`tokenslim.tune.confirm.decide`) can be replayed at any ``z`` without evaluating anything:
the record behind the default ``--confirm-z`` in docs/tuning.md::

    .venv/bin/python scripts/confirm_z.py results/tune40_*x --z 0.5 1 1.5 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.tune.confirm import decide, paired  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="tune output folders (with tune.json and candidates.jsonl)")
    p.add_argument("--z", type=float, nargs="+", default=[1.0, 1.5, 2.0], help="thresholds to replay")
    args = p.parse_args(argv)
    for run in args.runs:
        with open(os.path.join(run, "tune.json")) as f:
            confirmation = json.load(f).get("confirmation")
        if not confirmation:
            print(f"{run}: no confirmation step")
            continue
        with open(os.path.join(run, "candidates.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        kls = {r["setting"]: r["kl"] for r in rows if r.get("kind") == "confirm"}
        incumbent = confirmation["incumbent"]
        options = [(f["setting"], f["search_kl"]) for f in confirmation["finalists"]]
        print(f"{run}: incumbent {incumbent}, {confirmation['confirm_images']} confirmation images")
        for setting, _ in options:
            if setting != incumbent and incumbent is not None:
                d, se = paired(kls[setting], kls[incumbent])
                print(f"  {setting}: KL vs incumbent {d:+.5f} +- {se:.5f} ({d / se if se else 0.0:+.1f} SE)")
        for z in args.z:
            chosen, _, _ = decide(options, kls, incumbent, z)
            print(f"  z={z:g}: " + ("the incumbent" if chosen == incumbent else chosen))


if __name__ == "__main__":
    main()
