"""The ``tokenslim`` command: count, benchmark (and later evaluate, sweep, demo) from the shell."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _create_model(name: str, pretrained: bool, checkpoint: Optional[str] = None):
    import timm

    kwargs = {"checkpoint_path": checkpoint} if checkpoint else {}
    return timm.create_model(name, pretrained=pretrained, **kwargs).eval()


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    p.add_argument("--settings", nargs="+", default=["r=8", "r=13", "r=16"],
                   help="reduction settings, e.g. r=16 'r=(16,-1)' (the unpatched baseline is always included)")
    p.add_argument("--pretrained", action="store_true", help="load timm weights (needs network or a cache)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (>= 15)")
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency comparison")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (CUDA when available)")
    p.add_argument("--precision", default="float32",
                   help="float32, bfloat16, float16, amp_bfloat16 or amp_float16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--jsonl", default=None, help="append the rows to this JSON-lines file")


def run_benchmark(args: argparse.Namespace) -> List[dict]:
    import torch

    from .measure.table import benchmark_settings, format_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _create_model(args.model, args.pretrained)
    rows = benchmark_settings(
        model, args.settings, model_name=args.model, progress=_progress,
        batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds,
        steps_per_round=args.steps_per_round, latency=not args.no_latency, device=args.device,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
    )
    ctx = rows[0]["context"]
    print(f"{args.model}, batch {ctx['batch_size']}, {ctx['img_size'][0]}px, {ctx['precision']}, "
          f"{ctx['device']} ({ctx['device_name']}), {ctx['cpu_threads']} CPU threads, {args.rounds} interleaved "
          f"rounds; ratios are speed-ups over the unpatched model; GMACs per image (1 multiply-add = 1)")
    print(format_rows(rows))
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


# ---------------------------------------------------------------------------------------------
# macs
# ---------------------------------------------------------------------------------------------

def add_macs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    p.add_argument("--settings", nargs="*", default=[], help="reduction settings to count besides the baseline")
    p.add_argument("--img-size", type=int, default=None)


def run_macs(args: argparse.Namespace) -> None:
    import copy

    import torch

    from .measure.macs import UNIT, count_macs
    from .spec import apply_setting, format_setting, parse_setting
    from .timm_vit import token_plan

    import timm

    with torch.device("meta"):  # counting needs shapes only: no weights are initialised
        base = timm.create_model(args.model).eval()
    print(f"{args.model}: {UNIT}")
    for text in ["none"] + list(args.settings):
        setting = parse_setting(text)
        model = apply_setting(copy.deepcopy(base), setting)
        cost = count_macs(model, img_size=args.img_size)
        plan = token_plan(model, args.img_size)
        print(f"  {format_setting(setting):<36} {cost.gmacs:8.3f} GMACs  {cost.params_m:7.2f} M params  "
              f"tokens per block {list(plan.tokens)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenslim", description="Make timm ViTs faster without retraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_benchmark_args(sub.add_parser("benchmark", help="side-by-side speed against the unpatched model"))
    add_macs_args(sub.add_parser("macs", help="GMACs, parameters and token counts per setting"))
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "benchmark":
        run_benchmark(args)
    elif args.command == "macs":
        run_macs(args)


if __name__ == "__main__":
    main()
