"""``tokenslim tune``: the most faithful setting for a measured speed-up on this device."""
from __future__ import annotations

import argparse

from . import flags
from ..tune.confirm import DEFAULT_Z


def add_tune_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "random_weights", "data",
              data={"help": "calibration images (labels optional)"})
    target = p.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, default=None, help="measured throughput ratio to reach (default 1.5)")
    target.add_argument("--max-drop", type=float, default=None,
                        help="instead: the fastest setting losing at most this many points (top-1, or agreement)")
    p.add_argument("--methods", nargs="+", default=["tome", "diffrate"], metavar="METHOD",
                   help="reduction methods to search (the method= of settings text)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD:SETTING",
                   help="extra settings text for a searched method, e.g. ppt:threshold=0.7")
    flags.add(p, "limit", "seed", limit={"default": 1000, "help": "calibration images"})
    p.add_argument("--step", type=int, default=2, help="tokens added to a block per greedy step")
    p.add_argument("--search", default="merge,prune,mlp",
                   help="what the search may change: a comma list of merge (per-block merges), prune (per-block "
                        "pruning levels, class-token models) and mlp (MLP channel share)")
    p.add_argument("--budget-min", type=float, default=20.0, help="wall-time budget in minutes")
    p.add_argument("--screen", type=int, default=None, metavar="N",
                   help="score every greedy option on N calibration images first and evaluate only the best 4 on "
                        "all (0: off; default: a quarter of them on deep models with >= 800 images)")
    p.add_argument("--confirm", type=float, default=0.25, metavar="SHARE",
                   help="share of the calibration images the search never sees; they decide at the end between its "
                        "best settings and plain ToMe (0: off)")
    p.add_argument("--finalists", type=int, default=3,
                   help="search settings reaching the target that are confirmed against plain ToMe")
    p.add_argument("--confirm-z", type=float, default=DEFAULT_Z, metavar="Z",
                   help="a setting more invasive than plain ToMe must beat it on the confirmation images by more "
                        "than Z standard errors of the paired KL difference")
    p.add_argument("--margin", type=float, default=0.03,
                   help="aim this share above --speedup, so an independent re-measurement still reaches it")
    flags.add(p, "batch_size", "eval_batch_size", "img_size", "rounds", "device", "precision", "workers", "threads",
              rounds={"default": 25, "help": "more rounds, fewer misjudged overshoots"},
              eval_batch_size={"default": 128})
    flags.add(p, "out", "fresh", "quiet",
              out={"default": "results/tune", "help": "candidates.jsonl/csv/png and tune.json; a rerun of the same "
                                                      "run replays candidates.jsonl"})
    p.add_argument("--allow-miss", action="store_true",
                   help="exit 0 even when the chosen setting re-measures below --speedup (default: exit 3)")


def _method_options(args: argparse.Namespace) -> dict:
    from ..methods import get_method
    from ..spec import parse_setting

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
    for method, text in options.items():
        get_method(method)
        parse_setting(f"method={method},{text}")  # bad option text is refused now, not mid-search
    return options


def run_tune_cmd(args: argparse.Namespace):
    from ..evaluate import init_from_env, open_dataset, resolve_transform, subset
    from ..ranks import on_main
    from ..tune import tune

    info = init_from_env()  # under torchrun: evaluations on every rank's shard, timings by rank 0 alone
    on_main(lambda: flags.check_out_dir(args.out), info)
    options = _method_options(args)
    speedup = args.speedup if args.speedup is not None or args.max_drop is not None else 1.5
    model, name, _ = flags.load_baseline(args)
    transform, _ = resolve_transform(model, **flags.input_overrides(model, args.img_size))
    data = subset(open_dataset(args.data, transform), args.limit, args.seed)
    result = tune(
        model, data, speedup=speedup, max_drop=args.max_drop, methods=args.methods, step=args.step,
        search=[s.strip() for s in args.search.split(",") if s.strip()], margin=args.margin,
        batch_size=args.batch_size, img_size=args.img_size, device=args.device, precision=args.precision,
        rounds=args.rounds, budget_min=args.budget_min, eval_batch_size=args.eval_batch_size,
        num_workers=args.workers, method_options=options, out_dir=args.out, fresh=args.fresh,
        progress=None if args.quiet else flags.progress, screen=args.screen,
        run_info={"model": name, "limit": args.limit, "seed": args.seed},
        confirm=args.confirm, finalists=args.finalists, confirm_z=args.confirm_z, seed=args.seed,
    )
    if not info.is_main:
        on_main(lambda: None, info)  # rank 0 says the result (and any miss) before a rank exits
        if result.reached is False and not args.allow_miss:
            raise SystemExit(3)
        return result
    try:
        return _report(args, result)
    finally:
        on_main(lambda: None, info)


def _report(args: argparse.Namespace, result):
    """Rank 0's account of the result; ``SystemExit(3)`` on a missed target unless ``--allow-miss``."""
    b = result.best
    goal = f"target {result.target}x" if result.target else f"drop budget {result.max_drop} points"
    acc = f", top-1 {b.top1:.2f} ({b.top1_diff:+.2f})" if b.top1 is not None else ""
    print(f"setting: {result.setting}")
    print(f"  {goal}; re-measured {b.throughput_ratio:.2f}x [{b.throughput_ratio_low:.2f}, {b.throughput_ratio_high:.2f}] "
          f"at batch {args.batch_size}; MAC ratio {b.mac_ratio:.2f}; agreement {b.agreement:.2f}%, KL {b.kl:.4f}{acc}; "
          f"{result.evaluated} settings evaluated, {result.seconds / 60:.1f} min")
    if result.confirmation is not None:
        print("  " + result.confirmation.summary())
    print("wrote " + ", ".join(result.files.values()))
    if result.reached is False:
        short = 100.0 * (1 - b.throughput_ratio / result.target)
        remedy = ("Give a lower --speedup, a larger --budget-min or more --methods" if result.stopped_by_budget else
                  f"The search ended within its budget without reaching it, so more --budget-min cannot help: "
                  f"{b.throughput_ratio:.2f}x is about what this model, search space and device give; ask for a "
                  "lower --speedup or widen --search")
        print(f"MISSED: the target was {result.target}x and the setting re-measures {b.throughput_ratio:.2f}x "
              f"({short:.0f}% short); tune.json says \"reached\": false. {remedy}"
              f"{'' if args.allow_miss else ', or pass --allow-miss to accept it'}")
        if not args.allow_miss:
            raise SystemExit(3)
    return result
