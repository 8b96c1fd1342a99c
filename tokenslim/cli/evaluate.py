"""``tokenslim eval``: accuracy and agreement with the unpatched model (torchrun-ready), resumable."""
from __future__ import annotations

import argparse
import copy
import sys
from typing import List

from . import flags


def add_eval_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "random_weights", "onnx", "data")
    flags.add(p, "settings", "limit", "seed", "holdout", "eval_batch_size", "workers", "device", "precision",
              "img_size", "threads", settings={"help": "each evaluated against the unpatched model"})
    flags.alias(p, "--batch-size", "--eval-batch-size", type=int)
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="the model the rows are compared with (the 'none' row), e.g. the original model of a "
                        "recovered checkpoint; default: the checkpoint's own weights without reduction")
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
    from ..journal import append_jsonl, remove_journal
    from ..spec import apply_setting, parse_setting
    from ..sweep import read_rows

    info = init_from_env()
    flags.check_output_file(args.jsonl, "--jsonl")
    if args.onnx:
        return _run_onnx_eval(args)
    base, model_name, settings, carried = flags.load_model_and_settings(args)
    transform, data_config = resolve_transform(base, **flags.input_overrides(base, args.img_size))
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    if info.is_main:
        print(f"{model_name}: {len(data)} images from {args.data}, world size {info.world_size}, "
              f"input {data_config['input_size']}, mean {data_config['mean']}, std {data_config['std']}",
              file=sys.stderr)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    reference = base
    if args.baseline:
        from ..fingerprint import weights_digest
        from ..loading import load_baseline

        reference, _ = load_baseline(None, checkpoint_path=args.baseline)
        if info.is_main:
            flags.progress(f"note: rows are compared with {args.baseline} (the 'none' row), not with the weights of "
                           f"{args.checkpoint or model_name} unreduced")
    run = fingerprint(base, data, model=model_name, limit=args.limit, holdout=args.holdout, seed=args.seed,
                      precision=args.precision, data_config=config,
                      baseline=weights_digest(reference) if args.baseline else None)
    if args.jsonl and args.fresh and info.is_main:
        remove_journal(args.jsonl)
    done = read_rows(args.jsonl, run, "pass --fresh to start over, or give another --jsonl file") if args.jsonl else {}
    rows = []
    reference_logits = None
    common = dict(batch_size=args.eval_batch_size, num_workers=args.workers, device=args.device,
                  precision=args.precision, progress=not args.quiet)
    # Against another baseline, the checkpoint's own weights are a row of their own: as trained when
    # it carries settings (that row leads the settings), else as loaded (a materialised channel
    # plan, or weights recovered without token settings), or it would never be measured.
    own = ["checkpoint"] if args.baseline and not carried else []
    for name in dict.fromkeys(["none"] + own + flags.names(settings)):  # repeated settings run once
        if name in done:
            if info.is_main and not args.quiet:
                flags.progress(f"{name}: already in {args.jsonl}, skipped (--fresh to redo)")
            rows.append(done[name])
            continue
        if name == "none":
            # The reference's logits are kept and reused (under torchrun each rank keeps its shard's):
            # every setting is then one forward pass per batch instead of two.
            result = evaluate(reference, data, label="none", keep_logits=True, **common)
            reference_logits, result.logits = result.logits, None
        else:
            model = base if name == "checkpoint" else apply_setting(copy.deepcopy(base), parse_setting(name))
            against = dict(reference_logits=reference_logits) if reference_logits is not None else \
                dict(reference=reference)
            result = evaluate(model, data, label=name, **against, **common)
        row = {"setting": name, "model": model_name, **result.to_dict(), "run": run}
        rows.append(row)
        if info.is_main and args.jsonl:
            append_jsonl(args.jsonl, row)  # after every setting: nothing lost
    if info.is_main:
        print(format_eval(rows))
    return rows


def _run_onnx_eval(args: argparse.Namespace) -> List[dict]:
    """``eval --onnx``: the exported model against the baseline exported beside it, in ONNX Runtime."""
    from ..evaluate import evaluate, open_dataset, resolve_transform, select
    from ..fingerprint import file_digest, fingerprint
    from ..journal import append_jsonl, remove_journal
    from ..sweep import read_rows

    if args.img_size or args.settings:
        raise ValueError("--onnx runs the setting and input size the file was exported with; leave out "
                         "--settings and --img-size")
    model, base, model_name, setting = flags.load_onnx(args)
    transform, data_config = resolve_transform(base)
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    print(f"{model_name}: {len(data)} images from {args.data}, input {data_config['input_size']}", file=sys.stderr)
    run = fingerprint(None, data, model=model_name, onnx=file_digest(args.onnx), baseline=file_digest(base.path),
                      limit=args.limit, holdout=args.holdout, seed=args.seed)
    if args.jsonl and args.fresh:
        remove_journal(args.jsonl)
    done = read_rows(args.jsonl, run, "pass --fresh to start over, or give another --jsonl file") if args.jsonl else {}
    common = dict(batch_size=args.eval_batch_size, num_workers=args.workers, device="cpu", progress=not args.quiet)
    rows = []
    for name, m, ref in (("none", base, None), (setting, model, base)):
        if name in done:
            rows.append(done[name])
            continue
        result = evaluate(m, data, reference=ref, label=name, **common)
        row = {"setting": name, "model": model_name, **result.to_dict(), "run": run}
        rows.append(row)
        if args.jsonl:
            append_jsonl(args.jsonl, row)
    print(format_eval(rows))
    return rows
