"""``tokenslim sweep`` and ``tokenslim demo``: accuracy against measured speed for many settings."""
from __future__ import annotations

import argparse
import os
from typing import List

from . import flags


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "random_weights", "data")
    flags.add(p, "settings", "limit", "seed", "holdout", "batch_size", "eval_batch_size", "rounds", "workers",
              "device", "precision", "img_size", "threads",
              batch_size={"default": 32})
    flags.alias(p, "--bench-batch-size", "--batch-size", type=int)
    flags.add(p, "out", "fresh", "quiet",
              out={"default": "results/sweep", "help": "sweep.{csv,jsonl,svg,txt,png}; a rerun of the same run "
                                                       "resumes from sweep.jsonl"})


def run_sweep_cmd(args: argparse.Namespace) -> List[dict]:
    from ..evaluate import init_from_env, open_dataset, resolve_transform, select
    from ..ranks import on_main
    from ..sweep import format_sweep, run_sweep, write_outputs

    info = init_from_env()  # under torchrun: accuracy on every rank's shard, timing by rank 0 alone
    on_main(lambda: flags.check_out_dir(args.out), info)
    model, name, settings, _ = flags.load_model_and_settings(args)
    transform, _ = resolve_transform(model, **flags.input_overrides(model, args.img_size))
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    run = dict(limit=args.limit, holdout=args.holdout, seed=args.seed, precision=args.precision,
               img_size=args.img_size, bench_batch_size=args.batch_size, rounds=args.rounds)
    rows = run_sweep(
        model, flags.names(settings), data, model_name=name,
        eval_kwargs=dict(batch_size=args.eval_batch_size, num_workers=args.workers, device=args.device,
                         precision=args.precision, progress=not args.quiet),
        bench_kwargs=dict(batch_size=args.batch_size, rounds=args.rounds, device=args.device,
                          precision=args.precision, img_size=args.img_size),
        progress=None if args.quiet else flags.progress,
        jsonl_path=os.path.join(args.out, "sweep.jsonl"), run=run, fresh=args.fresh,
    )
    if not info.is_main:
        return rows
    print(format_sweep(rows))
    print("* = on the accuracy/throughput Pareto front; d top1 = paired difference to the unpatched model")
    paths = write_outputs(rows, args.out, "sweep", title=f"{name}: top-1 vs measured speed-up")
    print("wrote " + ", ".join(paths.values()))
    return rows


def add_demo_args(p: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULT_SETTINGS

    flags.add(p, "settings", "limit", "batch_size", "rounds", "threads", "out", "quiet",
              settings={"default": list(DEFAULT_SETTINGS)}, limit={"default": 2000, "help": "test images"},
              out={"default": "results/demo", "help": "the trained checkpoint and the sweep outputs"})
    flags.alias(p, "--test-images", "--limit", type=int)
    p.add_argument("--epochs", type=int, default=6, help="training epochs (when the model is trained here)")
    p.add_argument("--train-images", type=int, default=12000, help="generated training images")
    p.add_argument("--retrain", action="store_true", help="train again even if the checkpoint exists")


def run_demo_cmd(args: argparse.Namespace) -> None:
    from ..demo import run_demo
    from ..demo.train import create_demo_model
    from ..spec import check_setting, parse_setting

    shape_only = create_demo_model()
    for text in args.settings:
        check_setting(shape_only, parse_setting(text), text)  # refused now, not after the training
    flags.check_out_dir(args.out)
    run_demo(args.out, args.settings, args.train_images, args.limit, args.epochs, args.retrain, args.rounds,
             args.batch_size)
