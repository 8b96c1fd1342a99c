"""ONNX Runtime against eager PyTorch: every setting exported with ``tokenslim.export`` and timed
interleaved in one process with the eager models, each runtime's ratios taken against its own
unpatched model (the exported baseline for ONNX Runtime), throughput and batch-1 latency.

    .venv/bin/python scripts/bench_onnx.py --checkpoint checkpoints/cifar10_reference.pth \
        --settings r=8 'r=(8,-1)' --batch-size 64 --rounds 20 --out results/bench_onnx
    .venv/bin/python scripts/bench_onnx.py --model vit_small_patch16_224 --settings r=8 r=13 --batch-size 32
"""
import argparse
import copy
import json
import os

import torch

from tokenslim.export import OnnxModel, export, metadata_of
from tokenslim.loading import architecture, load_baseline
from tokenslim.measure.benchmark import compare
from tokenslim.spec import apply_setting, format_setting, parse_setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="timm model name (random weights: speed only)")
    p.add_argument("--checkpoint", default=None, help="a tokenslim checkpoint")
    p.add_argument("--settings", nargs="+", default=["r=8", "r=13"], help="settings beside the unpatched model")
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (>= 15)")
    p.add_argument("--out", default="results/bench_onnx", help="folder for the exported files and rows.jsonl")
    args = p.parse_args()
    torch.manual_seed(0)
    base, _ = load_baseline(args.model, checkpoint_path=args.checkpoint)
    name = architecture(base, args.model)
    os.makedirs(args.out, exist_ok=True)
    size = tuple(base.patch_embed.img_size)
    example = torch.randn(2, 3, *size)
    eager = {"none": base}
    for text in args.settings:
        eager[format_setting(parse_setting(text))] = apply_setting(copy.deepcopy(base), parse_setting(text))
    models, baselines, diffs = dict(eager), {}, {}
    for i, (key, model) in enumerate(eager.items()):
        path = os.path.join(args.out, f"{i}.onnx")
        result = export(model, example, path, metadata=metadata_of(model, settings=key))
        diffs[key] = max(result.max_abs_diff.values())
        models[f"ort {key}"] = OnnxModel(path)
        baselines[f"ort {key}"] = "ort none"
    res = compare(models, baseline="none", baselines=baselines, batch_size=args.batch_size, rounds=args.rounds,
                  device="cpu", progress=lambda m: None)
    print(f"{name}, {size[0]}px, batch {args.batch_size} (throughput) and 1 (latency), {res.context.cpu_threads} "
          f"threads, {args.rounds} interleaved rounds; each runtime's ratios against its own unpatched model")
    header = f"{'setting':<22} {'eager thru x':>20} {'ORT thru x':>20} {'eager b1 x':>20} {'ORT b1 x':>20} {'ORT/eager ms':>13} {'max|ORT-eager|':>14}"
    print(header)
    print("-" * len(header))
    rows = []
    for key in eager:
        e, o = res.throughput[key], res.throughput[f"ort {key}"]
        el, ol = res.latency[key], res.latency[f"ort {key}"]
        rel = res.step_ms[f"ort {key}"] / res.step_ms[key]
        fmt = lambda r: f"{r.median:.2f} [{r.low:.2f},{r.high:.2f}]"  # noqa: E731
        print(f"{key:<22} {fmt(e):>20} {fmt(o):>20} {fmt(el):>20} {fmt(ol):>20} {rel:13.2f} {diffs[key]:14.1e}")
        rows.append({"model": name, "setting": key, "eager": e.__dict__, "ort": o.__dict__, "eager_latency": el.__dict__,
                     "ort_latency": ol.__dict__, "ort_over_eager_step": rel, "max_abs_diff": diffs[key],
                     "batch_size": args.batch_size, "rounds": args.rounds})
    with open(os.path.join(args.out, "rows.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
