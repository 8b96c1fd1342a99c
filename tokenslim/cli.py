"""The ``tokenslim`` command: demo, macs, benchmark, eval, sweep, tune and recover from the shell."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="timm model name (default vit_small_patch16_224; optional with a tokenslim checkpoint)")
    p.add_argument("--settings", nargs="+", default=["r=8", "r=13", "r=16"],
                   help="reduction settings, e.g. r=16 'r=(16,-1)' (the unpatched baseline is always included)")
    p.add_argument("--pretrained", action="store_true", help="load timm weights (needs network or a cache)")
    p.add_argument("--checkpoint", default=None, help="a local checkpoint: tokenslim or timm/PyTorch state dict")
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
    _check_output_file(args.jsonl, "--jsonl")
    if not args.model and not args.checkpoint:
        args.model = "vit_small_patch16_224"
    model, name, carried = _load_baseline(args)
    settings = ([carried] if carried else []) + list(args.settings)
    rows = benchmark_settings(
        model, settings, model_name=name, progress=_progress,
        batch_size=args.batch_size, img_size=args.img_size, rounds=args.rounds,
        steps_per_round=args.steps_per_round, latency=not args.no_latency, device=args.device,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
    )
    ctx = rows[0]["context"]
    print(f"{name}, batch {ctx['batch_size']}, {ctx['img_size'][0]}px, {ctx['precision']}, "
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
    from .adapters.timm_vit import token_plan

    import timm

    from .spec import CHANNEL_KEYS

    settings = [parse_setting(t) for t in ["none"] + list(args.settings)]
    if any(k in s for s in settings for k in CHANNEL_KEYS):
        base = timm.create_model(args.model).eval()  # ranking channels needs (random) weights
    else:
        with torch.device("meta"):  # counting needs shapes only: no weights are initialised
            base = timm.create_model(args.model).eval()
    print(f"{args.model}: {UNIT}")
    for setting in settings:
        model = apply_setting(copy.deepcopy(base), setting)
        cost = count_macs(model, img_size=args.img_size)
        plan = token_plan(model, args.img_size)
        print(f"  {format_setting(setting):<36} {cost.gmacs:8.3f} GMACs  {cost.params_m:7.2f} M params  "
              f"tokens per block {list(plan.tokens)}")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="timm model name (optional with a tokenslim checkpoint)")
    p.add_argument("--pretrained", action="store_true", help="load timm weights (needs network or a cache)")
    p.add_argument("--checkpoint", default=None, help="a local checkpoint: tokenslim or timm/PyTorch state dict")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True,
                   help="folder of class folders, .tar/.tar.gz of them, or a label file ('file label' / './path, label')")
    p.add_argument("--settings", nargs="*", default=[], help="reduction settings evaluated against the unpatched model")
    p.add_argument("--limit", type=int, default=None, help="evaluate a deterministic random subset of this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="leave out the N images that --limit N (same --seed) picks, e.g. tune's calibration images, "
                        "and evaluate on the rest")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="float32")
    p.add_argument("--img-size", type=int, default=None, help="override the model's input size")
    p.add_argument("--json", default=None,
                   help="write the results to this JSON file after every setting; a rerun skips settings already there")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in --json/--out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress output")


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


def _check_output_file(path: Optional[str], flag: str) -> None:
    """Create the folder of an output file now, before any work, or say why it cannot be written."""
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; pass a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create the folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")


def _load_baseline(args: argparse.Namespace):
    """The unreduced model a run compares against, its architecture name, and the token-reduction
    settings its checkpoint carries (``None`` if none), said on stderr when they matter."""
    import torch

    from .loading import architecture, load_baseline

    torch.manual_seed(0)  # a randomly initialised model is then the same on every rank and every run
    model, carried = load_baseline(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint)
    name = architecture(model, args.model)
    from .evaluate.distributed import current

    if current().is_main:
        if not args.checkpoint and not args.pretrained:
            _progress(f"note: neither --checkpoint nor --pretrained given: {name} has random weights, so its "
                      "accuracy means nothing (speed and agreement still do)")
        if carried:
            _progress(f"note: {args.checkpoint} carries the settings {carried}; the baseline 'none' is its weights "
                      f"without them, and {carried} is measured as its own row")
    return model, name, carried


def _load_model_and_settings(args: argparse.Namespace):
    """The unreduced model, its architecture name and the parsed settings to compare with it (the
    checkpoint's own settings first), every setting checked against the model."""
    from .spec import check_setting, parse_setting

    settings = [(t, parse_setting(t)) for t in args.settings]  # syntax first, before loading anything
    model, name, carried = _load_baseline(args)
    if carried:
        settings.insert(0, (carried, parse_setting(carried)))
    for text, setting in settings:
        check_setting(model, setting, text)
    return model, name, [s for _, s in settings]


def run_eval(args: argparse.Namespace) -> List[dict]:
    import copy

    from .evaluate import evaluate, init_from_env, open_dataset, resolve_transform, select
    from .spec import apply_setting, format_setting

    from .fingerprint import fingerprint

    info = init_from_env()
    _check_output_file(args.json, "--json")
    base, model_name, settings = _load_model_and_settings(args)
    from .input_size import resolve_img_size

    resolve_img_size(base, args.img_size)  # a size the model refuses: said now, with what it takes
    overrides = {"input_size": (3, args.img_size, args.img_size)} if args.img_size else {}
    transform, data_config = resolve_transform(base, **overrides)
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    if info.is_main:
        print(f"{model_name}: {len(data)} images from {args.data}, world size {info.world_size}, "
              f"input {data_config['input_size']}, mean {data_config['mean']}, std {data_config['std']}",
              file=sys.stderr)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    header = {"model": model_name, "checkpoint": args.checkpoint, "data": args.data, "limit": args.limit,
              "holdout": args.holdout, "seed": args.seed, "precision": args.precision, "data_config": config,
              "run": fingerprint(base, data, model=model_name, limit=args.limit, holdout=args.holdout,
                                 seed=args.seed, precision=args.precision, data_config=config)}
    done = _read_eval_json(args.json, header["run"], args.fresh) if args.json else {}
    rows = []
    common = dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                  precision=args.precision, progress=not args.quiet)
    names = ["none"] + [format_setting(s) for s in settings]
    for name in dict.fromkeys(names):  # repeated settings run once
        if name in done:
            if info.is_main and not args.quiet:
                _progress(f"{name}: already in {args.json}, skipped (--fresh to redo)")
            rows.append(done[name])
            continue
        if name == "none":
            result = evaluate(base, data, label="none", **common)
        else:
            from .spec import parse_setting

            model = apply_setting(copy.deepcopy(base), parse_setting(name))
            result = evaluate(model, data, reference=base, label=name, **common)
        rows.append({"setting": name, "model": model_name, **result.to_dict()})
        if info.is_main and args.json:
            _write_json(args.json, {**header, "results": rows})  # after every setting: nothing lost
    if info.is_main:
        print(format_eval(rows))
    return rows


def _read_eval_json(path: str, run: dict, fresh: bool) -> dict:
    """Finished rows of the same evaluation in ``path``, by setting (refused if another run wrote it)."""
    from .fingerprint import check_same_run

    if fresh or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
    except (json.JSONDecodeError, OSError) as e:
        raise ValueError(f"--json {path} exists but cannot be read ({e}); pass --fresh to overwrite it") from None
    check_same_run(old.get("run"), run, f"--json {path}", "pass --fresh to overwrite it or choose another file")
    return {row["setting"]: row for row in old.get("results", [])}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# sweep and demo
# ---------------------------------------------------------------------------------------------

def add_sweep_args(p: argparse.ArgumentParser) -> None:
    add_eval_args(p)
    p.add_argument("--out", default="results/sweep", help="folder for the CSV, JSONL, SVG and text outputs")
    p.add_argument("--bench-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (>= 15)")


def run_sweep_cmd(args: argparse.Namespace) -> List[dict]:
    from .evaluate import open_dataset, resolve_transform, select
    from .sweep import check_out_dir, format_sweep, run_sweep, write_outputs

    from .spec import format_setting

    check_out_dir(args.out)
    model, name, settings = _load_model_and_settings(args)
    from .input_size import resolve_img_size

    resolve_img_size(model, args.img_size)
    overrides = {"input_size": (3, args.img_size, args.img_size)} if args.img_size else {}
    transform, _ = resolve_transform(model, **overrides)
    data = select(open_dataset(args.data, transform), args.limit, args.holdout, args.seed)
    run = dict(limit=args.limit, holdout=args.holdout, seed=args.seed, precision=args.precision,
               img_size=args.img_size, bench_batch_size=args.bench_batch_size, rounds=args.rounds)
    rows = run_sweep(
        model, [format_setting(s) for s in settings], data, model_name=name,
        eval_kwargs=dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                         precision=args.precision, progress=not args.quiet),
        bench_kwargs=dict(batch_size=args.bench_batch_size, rounds=args.rounds, device=args.device,
                          precision=args.precision, img_size=args.img_size),
        progress=None if args.quiet else _progress,
        jsonl_path=os.path.join(args.out, "sweep.jsonl"), run=run, fresh=args.fresh,
    )
    print(format_sweep(rows))
    print("* = on the accuracy/throughput Pareto front; d top1 = paired difference to the unpatched model")
    paths = write_outputs(rows, args.out, "sweep", title=f"{name}: top-1 vs measured speed-up")
    print("wrote " + ", ".join(paths.values()))
    return rows


def add_tune_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="calibration images (labels optional): folder, .tar(.gz) or label file")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, default=None, help="measured throughput ratio to reach (default 1.5)")
    target.add_argument("--max-drop", type=float, default=None,
                        help="instead: the fastest setting losing at most this many points (top-1, or agreement)")
    p.add_argument("--methods", nargs="+", default=["tome", "diffrate"], help="reduction methods to search")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD:SETTING",
                   help="extra settings text for a method, e.g. ppt:threshold=0.7")
    p.add_argument("--limit", type=int, default=1000, help="calibration images (a deterministic subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=2, help="tokens added to a block per greedy step")
    p.add_argument("--search", default="merge,prune,mlp",
                   help="what the search may change: a comma list of merge (per-block merges), prune (per-block "
                        "pruning levels, class-token models) and mlp (MLP channel share)")
    p.add_argument("--budget-min", type=float, default=20.0, help="wall-time budget in minutes")
    p.add_argument("--margin", type=float, default=0.03,
                   help="aim this share above --speedup, so an independent re-measurement still reaches it")
    p.add_argument("--batch-size", type=int, default=64, help="batch size the speed-up is measured at")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=25,
                   help="interleaved timing rounds per measurement (>= 15; more rounds, fewer misjudged overshoots)")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="float32")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--out", default="results/tune", help="folder for candidates.jsonl/csv and tune.json (resumable)")
    p.add_argument("--fresh", action="store_true", help="ignore earlier candidates in --out")
    p.add_argument("--allow-miss", action="store_true",
                   help="exit 0 even when the chosen setting re-measures below --speedup (default: exit 3)")
    p.add_argument("--quiet", action="store_true")


def run_tune_cmd(args: argparse.Namespace):
    from .evaluate import open_dataset, resolve_transform, subset
    from .sweep import check_out_dir
    from .tune import tune

    check_out_dir(args.out)
    options = {}
    for item in args.method_option:
        method, sep, text = item.partition(":")
        if not sep:
            raise ValueError(f"--method-option {item!r}: write METHOD:SETTING, e.g. ppt:threshold=0.7")
        options[method] = text
    unused = sorted(set(options) - set(args.methods))
    if unused:
        raise ValueError(f"--method-option for {', '.join(unused)}, which --methods ({' '.join(args.methods)}) does "
                         "not search; add it to --methods or drop the option")
    from .methods import get_method
    from .spec import parse_setting

    for method, text in options.items():
        get_method(method)
        parse_setting(f"method={method},{text}")  # bad option text is refused now, not mid-search
    speedup = args.speedup if args.speedup is not None or args.max_drop is not None else 1.5
    model, name, _ = _load_baseline(args)
    overrides = {"input_size": (3, args.img_size, args.img_size)} if args.img_size else {}
    transform, _ = resolve_transform(model, **overrides)
    data = subset(open_dataset(args.data, transform), args.limit, args.seed)
    result = tune(
        model, data, speedup=speedup, max_drop=args.max_drop, methods=args.methods, step=args.step,
        search=[s.strip() for s in args.search.split(",") if s.strip()], margin=args.margin,
        batch_size=args.batch_size, img_size=args.img_size, device=args.device, precision=args.precision,
        rounds=args.rounds, budget_min=args.budget_min, num_workers=args.workers, method_options=options,
        out_dir=args.out, fresh=args.fresh, progress=None if args.quiet else _progress,
        run_info={"model": name, "limit": args.limit, "seed": args.seed},
    )
    b = result.best
    goal = f"target {result.target}x" if result.target else f"drop budget {result.max_drop} points"
    acc = f", top-1 {b.top1:.2f} ({b.top1_diff:+.2f})" if b.top1 is not None else ""
    print(f"setting: {result.setting}")
    print(f"  {goal}; re-measured {b.throughput_ratio:.2f}x [{b.throughput_ratio_low:.2f}, {b.throughput_ratio_high:.2f}] "
          f"at batch {args.batch_size}; MAC ratio {b.mac_ratio:.2f}; agreement {b.agreement:.2f}%, KL {b.kl:.4f}{acc}; "
          f"{len(result.candidates)} candidates, {result.seconds / 60:.1f} min")
    print("wrote " + ", ".join(result.files.values()))
    if result.reached is False:
        short = 100.0 * (1 - b.throughput_ratio / result.target)
        print(f"MISSED: the target was {result.target}x and the setting re-measures {b.throughput_ratio:.2f}x "
              f"({short:.0f}% short); tune.json says \"reached\": false. Give a lower --speedup, a larger "
              f"--budget-min or more --methods{'' if args.allow_miss else ', or --allow-miss to accept it'}")
        if not args.allow_miss:
            raise SystemExit(3)
    return result


def add_recover_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)  # the unpatched model, the teacher
    p.add_argument("--settings", required=True, help="the reduction to recover from, e.g. r=8 or mlp_pruned=0.5")
    p.add_argument("--data", required=True, help="training images: folder, .tar(.gz) or label file")
    p.add_argument("--method", default="bias_norm",
                   help="bias, norm, bias_norm, lora, lora_bias_norm (the LoRA ones need tokenslim[peft]) or full "
                        "(every parameter)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=2000, help="training images (a deterministic subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="add cross-entropy on the labels with this weight")
    p.add_argument("--augment", action="store_true",
                   help="light augmentation (random 60-100%% crop, flip) instead of the evaluation transform")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="blend each batch with itself reversed, weight ~ Beta(ALPHA, ALPHA); teacher and student "
                        "see the same blend (e.g. 1.0; 0: off)")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="also match the class token entering every block (relative squared error) with this "
                        "weight; class-token models (e.g. 1.0; 0: off)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="distillation temperature: soften both outputs by T, scale the KL by T^2 (1: plain KL)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", required=True, help="the recovered tokenslim checkpoint (carries settings and channels)")
    p.add_argument("--state", default=None, help="resume file (default: OUT.state)")
    p.add_argument("--teacher", default=None,
                   help="checkpoint of the teacher (default: --checkpoint/--model without any settings it carries); "
                        "give the original model when recovering a recovered checkpoint again")
    p.add_argument("--quiet", action="store_true")


def run_recover_cmd(args: argparse.Namespace):
    import copy

    from .evaluate import open_dataset, resolve_transform, subset
    from .loading import load_baseline, save_checkpoint
    from .recover import recover
    from .spec import CHANNEL_KEYS, apply_setting, format_setting, parse_setting

    _check_output_file(args.out, "--out")
    setting = parse_setting(args.settings)
    if not setting:
        raise ValueError("--settings names no reduction; give the setting to recover from, e.g. r=8")
    if args.method.startswith("lora"):
        from .recover import _require_peft

        _require_peft()
    state_path = args.state or args.out + ".state"
    _check_output_file(state_path, "--state")
    start, name, carried = _load_baseline(args)  # the weights to recover, without settings they carry
    teacher = start
    if args.teacher:
        teacher, teacher_carries = load_baseline(None, checkpoint_path=args.teacher)
        if teacher_carries:
            _progress(f"note: the teacher {args.teacher} carries settings {teacher_carries}; it teaches without them")
    elif carried:
        _progress(f"warning: the teacher is {args.checkpoint} without its settings {carried}; a recovered "
                  "checkpoint's weights are not the original model's, so pass --teacher ORIGINAL.pth to distil "
                  "from the model it was reduced from")
    from .spec import check_setting

    check_setting(start, setting, args.settings)
    transform, config = resolve_transform(start)
    if args.augment:
        from .evaluate.data import light_augmentation

        transform = light_augmentation(config)
    data = subset(open_dataset(args.data, transform), args.limit, args.seed)
    model = apply_setting(copy.deepcopy(start), setting)
    result = recover(model, teacher, data, method=args.method, steps=args.steps, lr=args.lr,
                     batch_size=args.batch_size, ce_weight=args.ce_weight, num_workers=args.workers,
                     lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, mixup=args.mixup,
                     feature_weight=args.feature_weight, temperature=args.temperature, seed=args.seed,
                     state_path=state_path, progress=not args.quiet,
                     run_info={"settings": format_setting(setting), "model": name, "augment": bool(args.augment)})
    token_setting = {k: v for k, v in setting.items() if k not in CHANNEL_KEYS}
    ckpt_kwargs = _checkpoint_identity(start, args)
    save_checkpoint(model, args.out, ckpt_kwargs["name"], ckpt_kwargs["kwargs"],
                    {k: config[k] for k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
                     if k in config},
                    extra={"recovered_from": format_setting(setting), "method": args.method, "steps": result.steps,
                           "augment": bool(args.augment), "mixup": args.mixup, "ce_weight": args.ce_weight,
                           "feature_weight": args.feature_weight, "temperature": args.temperature,
                           "images": result.images, "minutes": round(result.seconds / 60, 2),
                           "teacher": args.teacher or args.checkpoint or args.model},
                    settings=format_setting(token_setting) if token_setting else None)
    print(f"recovered {format_setting(setting)} with {args.method}: {result.steps} steps on {result.images} images, "
          f"{result.trainable} trained parameters, {result.seconds / 60:.1f} min; loss {result.losses[0]:.4f} -> "
          f"{result.losses[-1]:.4f}; wrote {args.out}")
    return result


def _checkpoint_identity(model, args) -> dict:
    """The timm name and constructor arguments that rebuild ``model`` (from a tokenslim checkpoint if any)."""
    if args.checkpoint:
        import torch

        obj = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "model_name" in obj:
            return {"name": obj["model_name"], "kwargs": obj.get("model_kwargs", {})}
    if not args.model:
        raise ValueError("pass --model with the timm name of the checkpoint's model")
    return {"name": args.model, "kwargs": {"num_classes": model.num_classes}}


def add_vis_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--data", required=True, help="images: folder, .tar(.gz) or label file")
    p.add_argument("--settings", nargs="+", default=["r=4", "r=8"], help="one column per setting")
    p.add_argument("--images", type=int, default=4, help="rows: a deterministic random pick of this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/vis.png", help="PNG file")


def run_vis_cmd(args: argparse.Namespace) -> None:
    import copy

    import torch

    from .evaluate import open_dataset, resolve_transform, subset
    from .spec import apply_setting, format_setting
    from .adapters.timm_vit import trace_merges
    from .vis import merge_picture, patch_tokens, save_grid, token_counts, unnormalize

    if not args.out.lower().endswith(".png"):
        args.out += ".png"  # what matplotlib would write: say the file that is really there
    _check_output_file(args.out, "--out")
    model, _, settings = _load_model_and_settings(args)
    transform, config = resolve_transform(model)
    data = subset(open_dataset(args.data, transform), args.images, args.seed)
    x = torch.stack([data[i][0] for i in range(len(data))])
    raw = unnormalize(x, config["mean"], config["std"])
    grid, patch = tuple(model.patch_embed.grid_size), tuple(model.patch_embed.patch_size)
    columns = [[img for img in raw]]
    titles = ["image"]
    for setting in settings:
        patched = apply_setting(copy.deepcopy(model), setting)
        if not hasattr(patched, "tokenslim"):
            raise ValueError(f"setting {format_setting(setting)!r} reduces no tokens: nothing to show")
        trace = trace_merges(patched, x)
        tokens = patch_tokens(trace.source, model.num_prefix_tokens, grid)
        columns.append([merge_picture(img, t, patch) for img, t in zip(raw, tokens)])
        counts = token_counts(tokens)
        titles.append(f"{format_setting(setting)}\n{min(counts)}-{max(counts)} tokens")
    save_grid([list(row) for row in zip(*columns)], titles, args.out)
    print(f"wrote {args.out}: {len(data)} images x {len(titles)} columns")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_SETTINGS

    p.add_argument("--out", default="results/demo", help="folder for the checkpoint and the sweep outputs")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--retrain", action="store_true", help="train again even if the checkpoint exists")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (>= 15)")
    p.add_argument("--batch-size", type=int, default=64, help="benchmark batch size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenslim", description="Make timm ViTs faster without retraining.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    add_benchmark_args(sub.add_parser("benchmark", help="side-by-side speed against the unpatched model"))
    add_macs_args(sub.add_parser("macs", help="GMACs, parameters and token counts per setting"))
    add_eval_args(sub.add_parser("eval", help="accuracy and agreement with the unpatched model (torchrun-ready)"))
    add_sweep_args(sub.add_parser("sweep", help="accuracy and measured speed of many settings, with a Pareto plot"))
    add_tune_args(sub.add_parser("tune", help="search the most accurate setting for a measured speed-up"))
    add_vis_args(sub.add_parser("vis", help="picture the patches each merged token holds (PNG)"))
    add_recover_args(sub.add_parser("recover", help="win back accuracy: short distillation, tuned parameters folded back"))
    add_demo_args(sub.add_parser("demo", help="offline demo: train a small ViT on generated shapes, then sweep"))
    for command in sub.choices.values():
        # Also accepted after the command; SUPPRESS keeps the top-level value when it is not given there.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback on errors")
    return parser


def _check_common(args: argparse.Namespace) -> None:
    """Flags every command shares, checked before anything is loaded."""
    import torch

    device = getattr(args, "device", None)
    if device:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ValueError(f"--device {device}: not a device name; use cpu, cuda, cuda:1, mps, ...") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    for flag in ("threads", "batch_size", "bench_batch_size", "rounds", "epochs", "limit", "train_images",
                 "test_images", "img_size", "holdout", "steps", "lora_rank", "images"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    rounds = getattr(args, "rounds", None)
    if rounds is not None and rounds < 15:
        raise ValueError(f"--rounds must be >= 15 (fewer rounds give no meaningful interval), got {rounds}")
    for flag in ("workers", "ce_weight", "mixup", "feature_weight"):
        value = getattr(args, flag, None)
        if value is not None and not value >= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")


def _dispatch(args: argparse.Namespace) -> None:
    _check_common(args)
    if args.command == "benchmark":
        run_benchmark(args)
    elif args.command == "macs":
        run_macs(args)
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "sweep":
        run_sweep_cmd(args)
    elif args.command == "tune":
        run_tune_cmd(args)
    elif args.command == "recover":
        run_recover_cmd(args)
    elif args.command == "vis":
        run_vis_cmd(args)
    elif args.command == "demo":
        from .demo import run_demo
        from .demo.train import create_demo_model
        from .spec import check_setting, parse_setting

        shape_only = create_demo_model()
        for text in args.settings:
            check_setting(shape_only, parse_setting(text), text)  # refused now, not after the training
        run_demo(args.out, args.settings, args.train_images, args.test_images, args.epochs, args.retrain,
                 args.rounds, args.batch_size)


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError, RuntimeError, KeyError,
               ImportError)


def main(argv: Optional[List[str]] = None) -> None:
    """Run the ``tokenslim`` command. Errors print one message and exit with status 2 (``--debug``:
    the full traceback); Ctrl-C exits with 130 after saying that finished work is kept."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _dispatch(args)
    except KeyboardInterrupt:
        print(f"tokenslim {args.command}: interrupted; finished results are kept (run the same command to "
              "resume sweeps and --json evaluations)", file=sys.stderr)
        raise SystemExit(130)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, KeyError):
            message = f"missing key {message}"
        if "DataLoader worker process" in message and "Original Traceback" in message:
            message = message.splitlines()[-1]  # the worker's error itself, not its traceback
        print(f"tokenslim {args.command}: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
