"""``tokenslim recover``: win back accuracy by short distillation, the tuned parameters folded back."""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
from typing import List

from . import flags

TRAINABLE = ("bias, norm, bias_norm, lora, lora_bias_norm (the LoRA ones need tokenslim[peft]), full (every parameter) "
             "or merge (a learned merge policy on the frozen model: the setting's method becomes learned)")


def add_recover_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "random_weights", "data",
              data={"help": "training images"})
    flags.add(p, "settings", settings={"required": True,
                                       "help": "each recovered into its own checkpoint in --out"})
    p.add_argument("--teacher", default=None, metavar="FILE",
                   help="checkpoint of the teacher (default: --checkpoint/--model without any settings it carries); "
                        "give the original model when recovering a recovered checkpoint again")
    p.add_argument("--trainable", default="bias_norm", help=f"what trains: {TRAINABLE}")
    flags.alias(p, "--method", "--trainable")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300 without --epochs)")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the training images instead of --steps (fractions allowed)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3 bias/norm, 5e-4 LoRA, 1e-4 full)")
    p.add_argument("--lr-base", type=float, default=None,
                   help="instead of --lr, timm's convention: lr = LR_BASE x global batch / --lr-base-size")
    p.add_argument("--lr-base-size", type=int, default=256, help="the batch --lr-base is stated for")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    p.add_argument("--train-batch-size", type=int, default=64, metavar="N",
                   help="the global training batch: images per step over all ranks (under torchrun each rank "
                        "takes an even share)")
    flags.alias(p, "--batch-size", "--train-batch-size", type=int)
    p.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                   help="split each rank's share into N forward/backward passes before one update (less memory)")
    flags.add(p, "limit", "seed", "precision", "device", limit={"default": 2000, "help": "training images"},
              precision={"help": "recovery trains float32 weights: float32 or amp_bfloat16/amp_float16 autocast"})
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="read --data through timm's create_dataset with this name (e.g. hfds/cifar10, wds/..., "
                        "torch/cifar10: --data is its root); default: a folder, .tar(.gz) or label file")
    p.add_argument("--val", default=None, metavar="PATH",
                   help="validation images evaluated after every epoch (top-1 and KL to the teacher); the best "
                        "epoch's parameters are kept")
    p.add_argument("--val-limit", type=int, default=None, metavar="N", help="a deterministic subset of --val")
    p.add_argument("--ce-weight", type=float, default=0.0, help="add cross-entropy on the labels with this weight")
    p.add_argument("--augment", action="store_true",
                   help="light augmentation (random 60-100%% crop, flip) instead of the evaluation transform")
    p.add_argument("--hflip", action="store_true",
                   help="the evaluation transform and a seeded horizontal flip of half the images each epoch")
    p.add_argument("--cache-teacher", action="store_true",
                   help="compute the teacher's output for each image (and its flip) once and reuse it in later "
                        "epochs; needs inputs that repeat: not with --augment, --mixup or --feature-weight")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="blend each batch with itself reversed, weight ~ Beta(ALPHA, ALPHA); teacher and student "
                        "see the same blend (e.g. 1.0; 0: off)")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="also match the class token entering every block (relative squared error) with this "
                        "weight; class-token models (e.g. 1.0; 0: off)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="distillation temperature: soften both outputs by T, scale the KL by T^2 (1: plain KL)")
    flags.add(p, "workers", "threads", "out", "quiet",
              out={"default": "results/recover",
                   "help": "recovered.pth (one setting) or recovered_<setting>.pth (several), each with its resume "
                           "state beside it (.state)"})
    p.add_argument("--state", default=None, metavar="FILE",
                   help="resume file of a single setting (default: the checkpoint's path + .state)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out file that tokenslim recover did not write (an input of the "
                        "run is never overwritten)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def output_paths(args: argparse.Namespace, settings: List[str]) -> List[str]:
    """The checkpoint each setting is recovered into (``--out FILE.pth`` is the old spelling).

    Raises:
        ValueError: an output is one of the run's inputs (never overwritten), or an existing file
            that ``recover`` did not write (unless ``--force``), named before any work.
    """
    if args.out.endswith(".pth"):
        if len(settings) > 1:
            raise ValueError(f"--out {args.out} names one file for {len(settings)} settings; pass a folder")
        flags.check_output_file(args.out, "--out")
        paths = [args.out]
    else:
        flags.check_out_dir(args.out)
        if len(settings) == 1:
            paths = [os.path.join(args.out, "recovered.pth")]
        else:
            paths = [os.path.join(args.out, f"recovered_{_slug(s)}.pth") for s in settings]
    for path in paths:
        _check_overwrite(args, path)
    return paths


def _check_overwrite(args: argparse.Namespace, path: str) -> None:
    if not os.path.exists(path):
        return
    for flag in ("checkpoint", "teacher", "data", "val"):
        source = getattr(args, flag, None)
        if source and os.path.exists(source) and os.path.samefile(source, path):
            raise ValueError(f"--out {path} is the --{flag} of this run; recovering would overwrite its own input. "
                             "Write the recovered checkpoint to another file or folder")
    if getattr(args, "force", False):
        return
    from ..loading import _read_tokenslim_checkpoint

    try:
        obj = _read_tokenslim_checkpoint(path)
    except ValueError:
        obj = None
    if obj is None or "recovered_from" not in (obj.get("extra") or {}):
        raise ValueError(f"--out {path} exists and is not a checkpoint tokenslim recover wrote; pass --force to "
                         "overwrite it, or name another file")


def run_recover_cmd(args: argparse.Namespace):
    from ..evaluate import open_dataset, resolve_transform, subset
    from ..loading import load_baseline
    from ..spec import check_setting, format_setting, parse_setting

    for flag in ("lr", "lr_base"):
        value = getattr(args, flag)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive learning rate, got {value}")
    settings = [parse_setting(t) for t in args.settings]
    for text, setting in zip(args.settings, settings):
        if not setting:
            raise ValueError(f"--settings {text} names no reduction; give the setting to recover from, e.g. r=8")
    if args.trainable.startswith("lora"):
        from ..recover import _require_peft

        _require_peft()
    names = [format_setting(s) for s in settings]
    paths = output_paths(args, names)
    if args.state and len(paths) > 1:
        raise ValueError("--state names one resume file; with several settings each keeps its own beside its "
                         "checkpoint")
    states = [args.state or p + ".state" for p in paths]
    for state in states:
        flags.check_output_file(state, "--state")
    start, name, carried = flags.load_baseline(args)  # the weights to recover, without settings they carry
    teacher = start
    if args.teacher:
        teacher, teacher_carries = load_baseline(None, checkpoint_path=args.teacher)
        if teacher_carries:
            flags.progress(f"note: the teacher {args.teacher} carries settings {teacher_carries}; it teaches "
                           "without them")
    elif carried:
        flags.progress(f"warning: the teacher is {args.checkpoint} without its settings {carried}; a recovered "
                       "checkpoint's weights are not the original model's, so pass --teacher ORIGINAL.pth to distil "
                       "from the model it was reduced from")
    if args.trainable == "merge":
        from ..merge_policy import attach_policy

        for text, setting in zip(args.settings, settings):
            if setting.get("method", "tome") not in ("tome", "learned") or not setting.get("r"):
                raise ValueError(f"--trainable merge learns ToMe's matching: --settings {text} must merge (r=...) with "
                                 "method=tome or learned")
        attach_policy(start)  # zero: ToMe exactly, until trained (the teacher runs unreduced and ignores it)
    for text, setting in zip(args.settings, settings):
        check_setting(start, setting, text)
    transform, config = resolve_transform(start)
    if args.cache_teacher and args.augment:
        raise ValueError("--cache-teacher reuses the teacher's output for an image, and --augment crops it anew "
                         "every epoch; use --hflip (the flip is cached) instead of --augment")
    if args.augment:
        from ..evaluate.data import light_augmentation

        transform = light_augmentation(config)
    data = _training_data(args, transform)
    val = None
    if args.val:
        val_transform, _ = resolve_transform(start)
        val = subset(open_dataset(args.val, val_transform), args.val_limit, args.seed)
    if args.steps is None and args.epochs is None:
        args.steps = 300
    if args.lr_base is not None:
        if args.lr is not None:
            raise ValueError("give --lr or --lr-base, not both")
        args.lr = args.lr_base * args.train_batch_size / args.lr_base_size
    results = []
    for setting, path, state in zip(settings, paths, states):
        results.append(_recover_one(args, start, teacher, name, config, data, val, setting, path, state))
    return results[0] if len(results) == 1 else results


def _training_data(args: argparse.Namespace, transform):
    """The training images: tokenslim's readers, or timm's ``create_dataset`` with ``--dataset``."""
    from ..evaluate import open_dataset, subset

    if args.dataset is None:
        return subset(open_dataset(args.data, transform), args.limit, args.seed)
    from timm.data import create_dataset

    try:
        data = create_dataset(args.dataset, root=args.data, split="train", is_training=True, download=False,
                              transform=transform, batch_size=args.train_batch_size, seed=args.seed)
    except Exception as e:  # noqa: BLE001  timm's readers raise many kinds; say which data set failed
        raise ValueError(f"--dataset {args.dataset} with --data {args.data}: timm could not open it "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    from torch.utils.data import IterableDataset

    if isinstance(data, IterableDataset):
        if args.limit is not None and args.limit != 2000:
            raise ValueError("--limit picks images of a map-style data set; a stream is read as it comes")
        return data
    if getattr(data, "transform", None) is None and hasattr(data, "transform"):
        data.transform = transform
    return subset(data, args.limit, args.seed)


def _recover_one(args, start, teacher, name, config, data, val, setting, path, state):
    from ..ranks import current
    from ..loading import save_checkpoint
    from ..recover import recover
    from ..spec import CHANNEL_KEYS, apply_setting, format_setting

    model = apply_setting(copy.deepcopy(start), setting)
    result = recover(model, teacher, data, method=args.trainable, steps=args.steps, epochs=args.epochs, lr=args.lr,
                     batch_size=args.train_batch_size, accum=args.grad_accum_steps, precision=args.precision,
                     ce_weight=args.ce_weight, num_workers=args.workers, device=args.device,
                     lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, mixup=args.mixup,
                     feature_weight=args.feature_weight, temperature=args.temperature, seed=args.seed,
                     state_path=state, progress=not args.quiet, val_data=val, hflip=args.hflip,
                     cache_teacher=args.cache_teacher,
                     run_info={"settings": format_setting(setting), "model": name, "augment": bool(args.augment)})
    if not current().is_main:
        return result  # rank 0 alone writes the checkpoint
    token_setting = {k: v for k, v in setting.items() if k not in CHANNEL_KEYS}
    if args.trainable == "merge":
        token_setting["method"] = "learned"  # the checkpoint merges with the policy it carries
    identity = _checkpoint_identity(start, args)
    label_names = (getattr(start, "pretrained_cfg", None) or {}).get("label_names")
    save_checkpoint(model, path, identity["name"], identity["kwargs"],
                    {**{k: config[k] for k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
                        if k in config}, **({"label_names": list(label_names)} if label_names else {})},
                    extra={"recovered_from": format_setting(setting), "method": args.trainable, "steps": result.steps,
                           "augment": bool(args.augment), "hflip": bool(args.hflip), "mixup": args.mixup,
                           "ce_weight": args.ce_weight,
                           "feature_weight": args.feature_weight, "temperature": args.temperature,
                           "images": result.images, "minutes": round(result.seconds / 60, 2),
                           "epochs": result.epochs, "ranks": result.world_size, "batch_size": result.batch_size,
                           "best": result.best,
                           "teacher": args.teacher or args.checkpoint or args.model},
                    settings=format_setting(token_setting) if token_setting else None)
    ranks = f" on {result.world_size} ranks" if result.world_size > 1 else ""
    best = f"; kept the best validated epoch {result.best['epoch']} (step {result.best['step']})" if result.best else ""
    print(f"recovered {format_setting(setting)} with {args.trainable}: {result.steps} steps of {result.batch_size} "
          f"on {result.images} images{ranks}, {result.trainable} trained parameters, {result.seconds / 60:.1f} min; "
          f"{result.loss_summary()}{best}; wrote {path}")
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
