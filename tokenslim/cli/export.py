"""``tokenslim export``: a reduced model and its unpatched baseline to ONNX or ``torch.export``."""
from __future__ import annotations

import argparse
import copy
import os

from . import flags


def add_export_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint")
    flags.add(p, "settings", settings={"help": "the one setting to export with its baseline (default: the setting a "
                                               "recovered or tuned checkpoint carries)"})
    p.add_argument("--format", default="onnx", choices=("onnx", "torch_export"),
                   help="onnx (checked in ONNX Runtime; needs tokenslim[onnx]) or torch_export (a .pt2 program)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of leaving it free")
    p.add_argument("--example-batch", type=int, default=2, metavar="N",
                   help="the batch of the example input the graph is traced with (the batch stays free)")
    flags.add(p, "img_size", "threads", "out", "quiet",
              out={"default": "results/export", "help": "model.onnx (or model.pt2) and baseline.onnx (.pt2)"})


def run_export_cmd(args: argparse.Namespace):
    import torch

    from ..export import _require_onnx, check_exportable, export, metadata_of
    from ..spec import apply_setting, format_setting

    if len(args.settings) > 1:
        raise ValueError(f"--settings: export writes one setting per run, got {len(args.settings)}")
    if args.format == "onnx":
        _require_onnx()  # before any loading
    flags.check_out_dir(args.out)
    args.random_weights = True  # exporting needs no trained weights (the metadata says which were used)
    base, name, settings, _ = flags.load_model_and_settings(args)
    if not settings:
        raise ValueError("give the setting to export (--settings r=16), or a checkpoint that carries one")
    setting = settings[-1]  # the one given, else the one the checkpoint carries
    from ..input_size import default_img_size

    size = flags.input_overrides(base, args.img_size).get("input_size", (3, *default_img_size(base)))
    example = torch.randn(args.example_batch, *size, generator=torch.Generator().manual_seed(0))
    model = apply_setting(copy.deepcopy(base), setting)
    check_exportable(model)
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    paths = {"model": os.path.join(args.out, "model" + suffix), "baseline": os.path.join(args.out, "baseline" + suffix)}
    import uuid

    export_id = uuid.uuid4().hex  # pairs the two files: eval/benchmark --onnx refuse a baseline of another run
    results = {}
    for role, m, text in (("baseline", base, "none"), ("model", model, format_setting(setting))):
        meta = metadata_of(m, settings=text, baseline=os.path.basename(paths["baseline"]))
        meta["export_id"] = export_id
        results[role] = export(m, example, paths[role], format=args.format, dynamic_batch=not args.static_batch,
                               opset=args.opset, metadata=meta)
        diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in results[role].max_abs_diff.items())
        print(f"exported {text} ({name}) to {paths[role]}; max |{args.format} - eager| {diffs}")
    return results
