"""The flags every ``tokenslim`` tool shares, defined once so that a flag means the same thing in
every tool, and the checks and loading steps the tools share.

A tool asks for flags by name (:func:`add`); only the help text's wording of *what* the data or
settings are for, and defaults, may differ between tools. Old spellings stay accepted for one
release as hidden aliases (:func:`alias`), each storing into the new flag and saying its name.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from ..sweep import check_out_dir, make_folder  # noqa: F401  (check_out_dir re-exported: every tool's --out check)

FLAGS: Dict[str, Tuple[Tuple[str, ...], Dict[str, Any]]] = {
    "model": (("--model",), dict(default=None, metavar="NAME",
                                 help="timm model name (optional with a tokenslim checkpoint, which names its own)")),
    "pretrained": (("--pretrained",), dict(action="store_true",
                                           help="load timm's pretrained weights (needs network or a cache)")),
    "checkpoint": (("--checkpoint",), dict(default=None, metavar="FILE",
                                           help="a local checkpoint file: tokenslim, or a timm/PyTorch state dict "
                                                "(with --model)")),
    "onnx": (("--onnx",), dict(default=None, metavar="FILE",
                               help="an exported model (tokenslim export), run through ONNX Runtime against the "
                                    "baseline exported beside it")),
    "random_weights": (("--random-weights",), dict(action="store_true",
                                                   help="run on randomly initialised weights without being told so "
                                                        "(no --checkpoint or --pretrained)")),
    "data": (("--data",), dict(required=True, metavar="PATH",
                               help="images: a folder of class folders, a .tar/.tar.gz of them, or a label file")),
    "settings": (("--settings",), dict(nargs="+", default=[], metavar="SETTING",
                                       help="one or more reduction settings, e.g. r=16 'r=(16,-1)' "
                                            "r=8,mlp_pruned=0.25 (the unpatched model is always included)")),
    "limit": (("--limit",), dict(type=int, default=None, metavar="N",
                                 help="use a deterministic random subset of N images (all when not given)")),
    "seed": (("--seed",), dict(type=int, default=0, help="seed of the --limit pick (and of any training)")),
    "holdout": (("--holdout",), dict(type=int, default=None, metavar="N",
                                     help="use the images --limit N (same --seed) leaves out, e.g. tune's "
                                          "calibration images")),
    "batch_size": (("--batch-size",), dict(type=int, default=64, metavar="N",
                                           help="batch size the speed is measured at")),
    "eval_batch_size": (("--eval-batch-size",), dict(type=int, default=64, metavar="N",
                                                     help="batch size of accuracy evaluation (does not change "
                                                          "results)")),
    "rounds": (("--rounds",), dict(type=int, default=15, metavar="N",
                                   help="interleaved timing rounds per measurement (>= 15)")),
    "img_size": (("--img-size",), dict(type=int, default=None, metavar="PX",
                                       help="input size in pixels (default: the model's own)")),
    "device": (("--device",), dict(default=None, help="cpu, cuda, cuda:1, mps, ... (default: CUDA when available)")),
    "precision": (("--precision",), dict(default="float32",
                                         help="float32, bfloat16, float16, amp_bfloat16 or amp_float16")),
    "workers": (("--workers",), dict(type=int, default=0, metavar="N", help="data-loading worker processes")),
    "threads": (("--threads",), dict(type=int, default=None, metavar="N",
                                     help="torch CPU threads (default: torch's choice)")),
    "out": (("--out",), dict(metavar="FOLDER", help="output folder (created if missing)")),
    "jsonl": (("--jsonl",), dict(default=None, metavar="FILE", help="JSON-lines file of the result rows")),
    "fresh": (("--fresh",), dict(action="store_true",
                                 help="ignore the results of an earlier run in the outputs and start over")),
    "quiet": (("--quiet",), dict(action="store_true", help="no progress output")),
}

class _Renamed(argparse.Action):
    """An old flag spelling: stores into the new flag and says the new name once."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is now {self.new} (the old spelling goes in the next release)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add(p: argparse.ArgumentParser, *names: str, **overrides: Dict[str, Any]) -> None:
    """Add the shared flags ``names`` to ``p``; ``overrides[name]`` may change ``default``,
    ``required`` or extend ``help`` (its text is appended), never the type or meaning."""
    for name in names:
        flags, spec = FLAGS[name]
        spec = dict(spec)
        extra = dict(overrides.get(name, {}))
        unknown = set(extra) - {"default", "required", "help"}
        if unknown:
            raise ValueError(f"flag {flags[0]}: only default, required and help may differ per tool, not {unknown}")
        if "help" in extra:
            spec["help"] = f"{spec['help']}; {extra.pop('help')}"
        spec.update(extra)
        p.add_argument(*flags, **spec)


def alias(p: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept ``old``, the previous spelling of the flag ``new``, hidden from ``--help``."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, action=_Renamed, new=new, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                   **kwargs)


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def check_common(args: argparse.Namespace) -> None:
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
    for flag in ("threads", "batch_size", "eval_batch_size", "train_batch_size", "example_batch", "rounds", "limit",
                 "train_images", "img_size", "holdout", "steps", "lora_rank", "grad_accum_steps", "val_limit",
                 "lr_base_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    epochs = getattr(args, "epochs", None)
    if epochs is not None and not epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {epochs}")
    rounds = getattr(args, "rounds", None)
    if rounds is not None and rounds < 15:
        raise ValueError(f"--rounds must be >= 15 (fewer rounds give no meaningful interval), got {rounds}")
    for flag in ("workers", "ce_weight", "mixup", "feature_weight"):
        value = getattr(args, flag, None)
        if value is not None and not value >= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def check_output_file(path: Optional[str], flag: str) -> None:
    """Create the folder of an output file now, before any work, or say why it cannot be written."""
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; pass a file name")
    make_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")


def load_baseline(args: argparse.Namespace):
    """The unreduced model a run compares against, its architecture name, and the token-reduction
    settings its checkpoint carries (``None`` if none), said on stderr when they matter."""
    import torch

    from ..ranks import current
    from ..loading import architecture, load_baseline as load

    if not args.checkpoint and not args.pretrained and not getattr(args, "random_weights", True):
        raise ValueError("neither --checkpoint nor --pretrained given: the model would have random weights and its "
                         "accuracy would mean nothing. Pass weights, or --random-weights to run anyway")
    torch.manual_seed(0)  # a randomly initialised model is then the same on every rank and every run
    model, carried = load(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint)
    name = architecture(model, args.model)
    if current().is_main:
        if not args.checkpoint and not args.pretrained:
            progress(f"note: {name} has random weights (no --checkpoint or --pretrained): speed and agreement "
                     "mean something, accuracy does not")
        if carried:
            progress(f"note: {args.checkpoint} carries the settings {carried}; the baseline 'none' is its weights "
                     f"without them, and {carried} is measured as its own row")
    return model, name, carried


def load_onnx(args: argparse.Namespace):
    """``--onnx FILE``: the exported model, the baseline exported beside it, and the setting it
    carries; refused with other model flags (the file says what it is)."""
    from ..export import OnnxModel, baseline_path

    given = [f for f in ("model", "checkpoint") if getattr(args, f, None)] + \
        (["pretrained"] if getattr(args, "pretrained", False) else [])
    if given:
        raise ValueError(f"--onnx names the model and its setting; leave out --{', --'.join(given)}")
    if getattr(args, "device", None) not in (None, "cpu"):
        raise ValueError("--onnx runs in ONNX Runtime on the CPU; leave out --device")
    model = OnnxModel(args.onnx, threads=getattr(args, "threads", None))
    base = OnnxModel(baseline_path(args.onnx), threads=getattr(args, "threads", None))
    check_onnx_pair(model, base)
    name = model.metadata.get("architecture") or "onnx"
    return model, base, f"{name} (ONNX Runtime)", model.metadata.get("settings") or "none"


def check_onnx_pair(model, base) -> None:
    """Refuse a baseline file that was not exported with the model file (another architecture, data
    config or export run), naming both."""
    a, b = model.metadata, base.metadata
    problems = []
    if a.get("architecture") != b.get("architecture"):
        problems.append(f"architecture {a.get('architecture')} vs {b.get('architecture')}")
    if a.get("export_id") and b.get("export_id") and a["export_id"] != b["export_id"]:
        problems.append("written by different export runs")
    if (a.get("data_config") or {}).get("input_size") != (b.get("data_config") or {}).get("input_size"):
        problems.append(f"input size {(a.get('data_config') or {}).get('input_size')} vs "
                        f"{(b.get('data_config') or {}).get('input_size')}")
    if b.get("settings") not in (None, "none"):
        problems.append(f"the baseline carries settings {b.get('settings')}")
    if problems:
        raise ValueError(f"{base.path} is not the baseline exported with {model.path} ({'; '.join(problems)}); "
                         "export both again with tokenslim export into one folder")


def load_model_and_settings(args: argparse.Namespace):
    """The unreduced model, its architecture name, the parsed settings to compare with it (the
    checkpoint's own settings first) and the text of the settings the checkpoint carried (``None``
    if it carried none), every setting checked against the model before any work."""
    from ..spec import check_setting, parse_setting

    settings = [(t, parse_setting(t)) for t in args.settings]  # syntax first, before loading anything
    model, name, carried = load_baseline(args)
    if carried:
        settings.insert(0, (carried, parse_setting(carried)))
    for text, setting in settings:
        check_setting(model, setting, text)
    return model, name, [s for _, s in settings], carried or None


def input_overrides(model, img_size: Optional[int]) -> Dict[str, Any]:
    """The data-config override for ``--img-size``, refused now if the model cannot take that size."""
    from ..input_size import resolve_img_size

    resolve_img_size(model, img_size)
    return {"input_size": (3, img_size, img_size)} if img_size else {}


def names(settings: List[dict]) -> List[str]:
    from ..spec import format_setting

    return [format_setting(s) for s in settings]
