"""Train the CIFAR-10 reference ViT: the yardstick for every accuracy claim in the README.

A timm ``vit_tiny_patch16_224`` built for 32 px images with 4 px patches (64 patch tokens + a class
token = 65 tokens), width 192, 3 heads, depth 6, trained from scratch on the real CIFAR-10
(``../shared/data/cifar10-jpg/train.tar.gz``) on a CPU.

Recipe (chosen for a short CPU schedule; every value is a flag):
  * data: the 50k training JPEGs decoded once into a uint8 tensor; per batch a random 32 px crop of
    the image padded by 4 px (reflect) and a random horizontal flip; CIFAR-10 mean/std.
  * AdamW (lr 2e-3, betas 0.9/0.999, weight decay 0.05 on matrices only), batch 128, one epoch of
    linear warm-up, then cosine decay to 0; label smoothing 0.1; gradient clipping at 1.0.
  * bf16 autocast on the CPU (faster here than fp32; the weights and optimizer stay fp32).
  * seed 0 for the weights, the data order and the augmentation.

Interruptions lose at most one epoch: the full training state (weights, optimizer, schedule,
RNG, history) is written atomically to ``--state`` after every epoch and training resumes from it
when the same command is run again. Passing a larger ``--epochs`` to a resumed (or finished) run
stretches the cosine schedule to the new length and trains on (a smaller one, not below the epochs
already trained, shortens it); the history records each change. At the end the model is saved as a
tokenslim checkpoint (``--out``, fp16 weights, with its timm name, arguments and data config) and evaluated on the 10k
test split with the project's evaluator.

    .venv/bin/python scripts/train_reference.py                    # train or resume
    .venv/bin/tokenslim eval --checkpoint checkpoints/cifar10_reference.pth \\
        --data ../shared/data/cifar10-jpg/test.tar.gz
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import time
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODEL_NAME = "vit_tiny_patch16_224"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_split(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """All images of a ``<split>/<class>/<image>.jpg`` tar.gz as uint8 (N, 3, 32, 32) and labels."""
    xs, ys = [], []
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            if not (member.isfile() and member.name.lower().endswith((".jpg", ".jpeg", ".png"))):
                continue
            cls = member.name.strip("/").split("/")[-2]
            if cls not in CLASSES:
                raise ValueError(f"{path}: {member.name} is not in a CIFAR-10 class folder ({', '.join(CLASSES)})")
            img = np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
            if img.shape != (32, 32, 3):
                raise ValueError(f"{path}: {member.name} is {img.shape[1]}x{img.shape[0]}, expected 32x32")
            xs.append(img)
            ys.append(CLASSES.index(cls))
    if not xs:
        raise ValueError(f"{path} holds no images")
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the reflect-padded batch and random horizontal flip (uint8 in, uint8 out)."""
    n, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
    return out.to(torch.uint8)


def quick_top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(x), batch):
            correct += (model(normalize(x[i:i + batch])).argmax(-1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x)


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def grown(source: dict, repeat: int) -> dict:
    """A state dict of ``repeat`` times the blocks: source block ``i`` starts blocks ``i*repeat .. i*repeat+repeat-1``;
    every copy but the first has zero output projections (``attn.proj``, ``mlp.fc2``), so the grown model
    computes the source model's function at the start of training."""
    out = {}
    for name, value in source.items():
        if not name.startswith("blocks."):
            out[name] = value
            continue
        _, index, rest = name.split(".", 2)
        for copy in range(repeat):
            zero = copy > 0 and rest.split(".")[0:2] in (["attn", "proj"], ["mlp", "fc2"])
            out[f"blocks.{int(index) * repeat + copy}.{rest}"] = torch.zeros_like(value) if zero else value
    return out


def warm_start(model: torch.nn.Module, path: str, repeat: int = 1) -> None:
    """Copy the tensors of a tokenslim checkpoint whose name and shape match ``model``'s (its blocks
    repeated ``repeat`` times, see :func:`grown`); say what was left."""
    from tokenslim.loading import load_checkpoint

    source = load_checkpoint(path).state_dict()
    if repeat > 1:
        source = grown(source, repeat)
    own = model.state_dict()
    taken = {k: v.float() for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(taken, strict=False)
    left_new = sorted(set(own) - set(taken))
    left_old = sorted(set(source) - set(taken))
    print(f"warm start from {path}: {len(taken)} tensors copied; kept their initialisation: {left_new or 'none'}; "
          f"not used: {left_old or 'none'}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/cifar10-jpg", help="folder with train.tar.gz and test.tar.gz")
    p.add_argument("--out", default="checkpoints/cifar10_reference.pth", help="final tokenslim checkpoint")
    p.add_argument("--state", default="checkpoints/cifar10_reference_state.pt",
                   help="resume state, written after every epoch")
    p.add_argument("--model", default=MODEL_NAME,
                   help="timm model name the architecture is built from (its arguments overridden by the flags below)")
    p.add_argument("--model-args", default="{}",
                   help='more timm model arguments as JSON, e.g. \'{"init_values": null}\'')
    p.add_argument("--init-from", default=None,
                   help="a tokenslim checkpoint whose tensors of matching name and shape start the training "
                        "(a warm start; the rest keeps its random initialisation)")
    p.add_argument("--init-repeat", type=int, default=1,
                   help="with --init-from: each of its blocks starts this many consecutive blocks (a model grown "
                        "in depth; the extra copies start with zero output projections, i.e. as identities)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly (state saved) after the epoch that passes this wall time")
    args = p.parse_args(argv)

    train_path = os.path.join(args.data, "train.tar.gz")
    test_path = os.path.join(args.data, "test.tar.gz")
    for path in (train_path, test_path):
        if not os.path.isfile(path):
            p.error(f"missing {path}: pass --data, the folder holding CIFAR-10's train.tar.gz and test.tar.gz")
    for path in (args.out, args.state):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm
    from tqdm import tqdm

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tokenslim.loading import save_checkpoint

    try:
        extra_args = json.loads(args.model_args)
    except json.JSONDecodeError as e:
        p.error(f"--model-args is not JSON ({e}): write e.g. '{{\"init_values\": null}}'")
    if args.init_from is not None and not os.path.isfile(args.init_from):
        p.error(f"--init-from {args.init_from}: no such file")
    model_kwargs = dict(img_size=32, patch_size=4, embed_dim=args.embed_dim, depth=args.depth,
                        num_heads=args.heads, num_classes=len(CLASSES), **extra_args)
    data_config = dict(input_size=(3, 32, 32), mean=MEAN, std=STD, crop_pct=1.0, crop_mode="center", label_names=CLASSES,
                       interpolation="bicubic", num_classes=len(CLASSES))
    recipe = {k: v for k, v in vars(args).items()
              if k not in ("out", "state", "max_minutes", "threads", "data", "epochs")}

    t0 = time.perf_counter()
    x_train, y_train = load_split(train_path)
    x_test, y_test = load_split(test_path)
    print(f"loaded {len(x_train)} training and {len(x_test)} test images in {time.perf_counter() - t0:.0f}s",
          flush=True)

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, **model_kwargs)
    if args.init_from is not None and not os.path.isfile(args.state):
        warm_start(model, args.init_from, args.init_repeat)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    g = torch.Generator().manual_seed(args.seed)
    start_epoch, history, train_seconds = 0, [], 0.0
    if os.path.isfile(args.state):
        state = torch.load(args.state, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in state["recipe"].items() if k != "epochs"}
        if saved != recipe:
            changed = sorted(k for k in recipe if saved.get(k) != recipe[k])
            p.error(f"{args.state} was written with other settings ({', '.join(changed)}); run with the same "
                    "flags to resume, or delete the file (or pass another --state) to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        start_epoch, history, train_seconds = state["epoch"], state["history"], state["train_seconds"]
        before = state.get("epochs", state["recipe"].get("epochs", args.epochs))
        if args.epochs < start_epoch:
            p.error(f"{args.state} has already trained {start_epoch} epochs; pass --epochs >= {start_epoch}")
        if args.epochs != before:
            # A longer run continues the same cosine schedule stretched to the new length (the learning
            # rate rises again from where the new curve is): recorded in the history.
            history.append({"schedule": f"changed from {before} to {args.epochs} epochs after epoch {start_epoch}"})
        print(f"resuming from {args.state} after epoch {start_epoch}/{args.epochs}", flush=True)

    amp = args.precision == "bf16"
    session_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        epoch_start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10, file=sys.stdout)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = normalize(augment(x_train[idx], g))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr_at(step):.2e}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        top1 = quick_top1(model, x_test, y_test, amp)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 4), "test_top1": round(top1, 2),
                        "seconds": round(seconds, 1)})
        print(json.dumps(history[-1]), flush=True)
        atomic_save({"recipe": recipe, "epochs": args.epochs, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "generator": g.get_state(), "epoch": epoch + 1, "history": history,
                     "train_seconds": train_seconds}, args.state)
        if args.max_minutes is not None and time.perf_counter() - session_start > 60 * args.max_minutes \
                and epoch + 1 < args.epochs:
            print(f"stopping after epoch {epoch + 1} (--max-minutes); run the same command to resume", flush=True)
            return 0

    model.eval()
    half = timm.create_model(args.model, pretrained=False, **model_kwargs)
    half.load_state_dict(model.state_dict())
    half.half()
    extra = {"recipe": recipe, "history": history, "train_minutes": round(train_seconds / 60, 1),
             "command": "python scripts/train_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "data": "CIFAR-10 (../shared/data/cifar10-jpg/train.tar.gz, 50,000 images)"}
    save_checkpoint(half, args.out, args.model, model_kwargs, data_config, extra=extra)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB, fp16 weights); "
          f"training took {train_seconds / 60:.1f} min", flush=True)

    from tokenslim.evaluate import evaluate, open_dataset, resolve_transform
    from tokenslim.loading import load_checkpoint

    final = load_checkpoint(args.out)
    transform, _ = resolve_transform(final)
    result = evaluate(final, open_dataset(test_path, transform), batch_size=250, num_workers=0, device="cpu")
    print(f"test top-1 with the project's evaluator: {result.top1:.2f}% ({len(x_test)} images)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
