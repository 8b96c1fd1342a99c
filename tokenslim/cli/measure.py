"""``tokenslim benchmark`` and ``tokenslim macs``: measured speed and counted compute."""
from __future__ import annotations

import argparse
import json
from typing import List

from . import flags

DEFAULT_MODEL = "vit_small_patch16_224"
DEFAULT_SETTINGS = ["r=8", "r=13", "r=16"]


def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "onnx",
              model={"help": f"default {DEFAULT_MODEL} when no checkpoint is given"})
    flags.add(p, "settings", settings={"default": DEFAULT_SETTINGS})
    flags.add(p, "batch_size", "img_size", "rounds", batch_size={"default": 32})
    p.add_argument("--steps-per-round", type=int, default=1, help="timed forward passes per model and round")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency comparison")
    flags.add(p, "device", "precision", "threads", "jsonl", "quiet",
              jsonl={"help": "appended to after all the timing"})
    p.add_argument("--channels-last", action="store_true", help="time in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")


def run_benchmark(args: argparse.Namespace) -> List[dict]:
    from ..measure.table import benchmark_settings

    flags.check_output_file(args.jsonl, "--jsonl")
    if args.onnx:
        return _run_onnx_benchmark(args)
    if not args.model and not args.checkpoint:
        args.model = DEFAULT_MODEL
    model, name, carried = flags.load_baseline(args)
    settings = ([carried] if carried else []) + list(args.settings)
    rows = benchmark_settings(
        model, settings, model_name=name, progress=None if args.quiet else flags.progress,
        batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds,
        steps_per_round=args.steps_per_round, latency=not args.no_latency, device=args.device,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
    )
    ctx = rows[0]["context"]
    print(f"{name}, batch {ctx['batch_size']}, {ctx['img_size'][0]}px, {ctx['precision']}, "
          f"{ctx['device']} ({ctx['device_name']}), {ctx['cpu_threads']} CPU threads, {args.rounds} interleaved "
          f"rounds; ratios are speed-ups over the unpatched model; GMACs per image (1 multiply-add = 1)")
    return _report(rows, args.jsonl)


def _report(rows: List[dict], jsonl) -> List[dict]:
    """Print the benchmark table and append the rows to ``--jsonl``."""
    from ..measure.table import format_rows

    print(format_rows(rows))
    if jsonl:
        with open(jsonl, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def _run_onnx_benchmark(args: argparse.Namespace) -> List[dict]:
    """``benchmark --onnx``: the exported model timed against the exported baseline in ONNX Runtime,
    interleaved, with the columns of the eager benchmark (no GMACs: the graph is not counted)."""
    from ..measure.benchmark import compare

    if args.settings != DEFAULT_SETTINGS or args.img_size or args.compile or args.channels_last or \
            args.precision != "float32":
        raise ValueError("--onnx times the setting, input size and precision the file was exported with; leave out "
                         "--settings, --img-size, --precision, --compile and --channels-last")
    model, base, name, setting = flags.load_onnx(args)
    fixed = model.static_batch or base.static_batch
    if fixed is not None:
        if args.batch_size != fixed:
            raise ValueError(f"{args.onnx} was exported with a fixed batch of {fixed}; time it with --batch-size "
                             f"{fixed}, or export without --static-batch")
        if not args.no_latency and fixed != 1:
            raise ValueError(f"{args.onnx} takes batches of {fixed} only, so batch-1 latency cannot be timed; pass "
                             "--no-latency, or export without --static-batch")
    result = compare({"none": base, setting: model}, baseline="none", batch_size=args.batch_size, rounds=args.rounds,
                     steps_per_round=args.steps_per_round, latency=not args.no_latency, device="cpu",
                     progress=None if args.quiet else flags.progress)
    rows = []
    for key in ("none", setting):
        tp = result.throughput[key]
        row = {"model": name, "setting": key, "gmacs": None, "mac_ratio": None, "throughput_ratio": tp.median,
               "throughput_ratio_low": tp.low, "throughput_ratio_high": tp.high, "efficiency": None,
               "step_ms": result.step_ms[key], "runtime": "onnxruntime", "rounds": tp.rounds}
        if result.latency:
            lat = result.latency[key]
            row.update(latency_ratio=lat.median, latency_ratio_low=lat.low, latency_ratio_high=lat.high,
                       latency_ms=result.latency_ms[key])
        rows.append(row)
    ctx = result.context
    print(f"{name}, batch {ctx.batch_size}, {ctx.img_size[0]}px, float32, ONNX Runtime on the CPU, "
          f"{ctx.cpu_threads} threads, {args.rounds} interleaved rounds; ratios against the exported baseline")
    return _report(rows, args.jsonl)


def add_macs_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "checkpoint", model={"help": f"default {DEFAULT_MODEL} when no checkpoint is given"})
    flags.add(p, "settings", "img_size", "quiet")


def run_macs(args: argparse.Namespace) -> None:
    import copy

    import timm
    import torch

    from ..patching import token_plan
    from ..measure.macs import UNIT, count_macs
    from ..spec import CHANNEL_KEYS, apply_setting, format_setting, parse_setting

    settings = [parse_setting(t) for t in ["none"] + list(args.settings)]
    if args.checkpoint:
        args.pretrained = False
        base, name, carried = flags.load_baseline(args)
        if carried:
            settings.insert(1, parse_setting(carried))
    else:
        name = args.model or DEFAULT_MODEL
        if any(k in s for s in settings for k in CHANNEL_KEYS):
            base = timm.create_model(name).eval()  # ranking channels needs (random) weights
        else:
            with torch.device("meta"):  # counting needs shapes only: no weights are initialised
                base = timm.create_model(name).eval()
    from ..spec import check_setting

    for text, setting in zip(["none"] + list(args.settings), settings):
        check_setting(base, setting, text)  # every setting before the first row is printed
    print(f"{name}: {UNIT}")
    for setting in settings:
        model = apply_setting(copy.deepcopy(base), setting)
        cost = count_macs(model, img_size=args.img_size)
        plan = token_plan(model, args.img_size)
        print(f"  {format_setting(setting):<36} {cost.gmacs:8.3f} GMACs  {cost.params_m:7.2f} M params  "
              f"tokens per block {list(plan.tokens)}")
