"""``tokenslim eval``: accuracy and agreement with the unpatched model (torchrun-ready), resumable."""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import List

from . import flags


def add_eval_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "random_weights", "data")
    flags.add(p, "settings", "limit", "seed", "holdout", "eval_batch_size", "workers", "device", "precision",
              "img_size", "threads", settings={"help": "each evaluated against the unpatched model"})
    flags.alias(p, "--batch-size", "--eval-batch-size", type=int)
    flags.add(p, "jsonl", "fresh", "quiet",
              jsonl={"help": "one row per setting, written as each finishes; a rerun of the same run skips the "
                             "settings already there"})
    flags.alias(p, "--json", "--jsonl")


def format_eval(rows: List[dict]) -> str:
    header = f"{'setting':<36} {'top1':>6} {'top5':>6} {'agree':>6} {'d top1 +- se':>14} {'KL':>7} {'images':>6} {'sec':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        agree = f"{r['agreement']:6.2f}" if r.get("agreement") is not None else f"{'-':>6}"
        diff = (f"{r['top1_diff']:+6.2f} +- {r['top1_diff_se']:4.2f}" if r.get("top1_diff") is not None else "-")
        kl = f"{r['kl']:7.4f}" if r.get("kl") is not None else f"{'-':>7}"
        lines.append(f"{r['setting']:<36} {r['top1']:6.2f} {r['top5']:6.2f} {agree} {diff:>14} {kl} "
                     f"{r['images']:6d} {r['seconds']:6.1f}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> List[dict]:
    from ..evaluate import evaluate, init_from_env, open_dataset, resolve_transform, select
    from ..fingerprint import fingerprint
    from ..journal import append_jsonl
    from ..spec import apply_setting, parse_setting
    from ..sweep import read_rows

    info = init_from_env()
    flags.check_output_file(args.jsonl, "--jsonl")
    base, model_name, settings = flags.load_model_and_settings(args)
    transform, data_config = resolve_transform(base, **flags.input_overrides(base, args.img_size))
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    if info.is_main:
        print(f"{model_name}: {len(data)} images from {args.data}, world size {info.world_size}, "
              f"input {data_config['input_size']}, mean {data_config['mean']}, std {data_config['std']}",
              file=sys.stderr)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    run = fingerprint(base, data, model=model_name, limit=args.limit, holdout=args.holdout, seed=args.seed,
                      precision=args.precision, data_config=config)
    if args.jsonl and args.fresh and info.is_main and os.path.exists(args.jsonl):
        os.remove(args.jsonl)
    done = read_rows(args.jsonl, run) if args.jsonl else {}
    rows = []
    common = dict(batch_size=args.eval_batch_size, num_workers=args.workers, device=args.device,
                  precision=args.precision, progress=not args.quiet)
    for name in dict.fromkeys(["none"] + flags.names(settings)):  # repeated settings run once
        if name in done:
            if info.is_main and not args.quiet:
                flags.progress(f"{name}: already in {args.jsonl}, skipped (--fresh to redo)")
            rows.append(done[name])
            continue
        if name == "none":
            result = evaluate(base, data, label="none", **common)
        else:
            model = apply_setting(copy.deepcopy(base), parse_setting(name))
            result = evaluate(model, data, reference=base, label=name, **common)
        row = {"setting": name, "model": model_name, **result.to_dict(), "run": run}
        rows.append(row)
        if info.is_main and args.jsonl:
            append_jsonl(args.jsonl, row)  # after every setting: nothing lost
    if info.is_main:
        print(format_eval(rows))
    return rows
