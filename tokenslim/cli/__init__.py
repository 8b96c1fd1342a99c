"""The ``tokenslim`` command: one sub-command per tool, each in its own module, sharing the flags
of :mod:`tokenslim.cli.flags` (the same flag means the same thing in every tool)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import flags
from .evaluate import add_eval_args, format_eval, run_eval
from .export import add_export_args, run_export_cmd
from .probe import add_probe_args, run_probe_cmd
from .measure import add_benchmark_args, add_macs_args, run_benchmark, run_macs
from .recover import add_recover_args, run_recover_cmd
from .sweep import add_demo_args, add_sweep_args, run_demo_cmd, run_sweep_cmd
from .tune import add_tune_args, run_tune_cmd
from .vis import add_vis_args, run_vis_cmd

COMMANDS = {
    "demo": (add_demo_args, run_demo_cmd, "offline demo: train a small ViT on generated shapes, then sweep"),
    "eval": (add_eval_args, run_eval, "accuracy and agreement with the unpatched model (torchrun-ready)"),
    "benchmark": (add_benchmark_args, run_benchmark, "side-by-side speed against the unpatched model"),
    "macs": (add_macs_args, run_macs, "GMACs, parameters and token counts per setting"),
    "sweep": (add_sweep_args, run_sweep_cmd, "accuracy and measured speed of many settings, with a Pareto plot"),
    "tune": (add_tune_args, run_tune_cmd, "search the most accurate setting for a measured speed-up"),
    "recover": (add_recover_args, run_recover_cmd,
                "win back accuracy: short distillation, tuned parameters folded back"),
    "vis": (add_vis_args, run_vis_cmd, "picture the patches each merged token holds (PNG)"),
    "probe": (add_probe_args, run_probe_cmd, "fit a linear classifier head on a backbone without classes"),
    "export": (add_export_args, run_export_cmd,
               "a reduced model and its baseline to ONNX (checked in ONNX Runtime) or torch.export"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenslim", description="Make timm ViTs faster without retraining.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, summary) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary)
        add_args(command)
        # Also accepted after the command; SUPPRESS keeps the top-level value when it is not given there.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback on errors")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    flags.check_common(args)
    COMMANDS[args.command][1](args)


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
              "resume)", file=sys.stderr)
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


__all__ = ["COMMANDS", "add_benchmark_args", "build_parser", "format_eval", "main", "run_benchmark"]


if __name__ == "__main__":
    main()
