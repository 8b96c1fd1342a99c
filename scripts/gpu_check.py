"""One-shot CUDA check for a lent GPU: correctness of the patch on CUDA, then throughput.

Run on a machine with a GPU (about 3-5 minutes on an H100):

    python scripts/gpu_check.py --json gpu_check.json

Checks, on random-initialised timm models: r=0 equals the unpatched model (fp32); merging and
pruning run in fp16/bf16 with float32 sizes and stay close to fp32; torch.compile traces a fixed
setting without graph breaks. Then measures ViT-B/16 throughput side by side for r = 0, 8, 13, 16
(fp16 autocast, batch 256) and prints the device name with every number.
"""
import argparse
import copy
import json
import sys

import timm
import torch

import tokenslim
from tokenslim.measure import compare, count_macs


def check_correctness(device: torch.device) -> dict:
    out = {}
    for name in ("vit_small_patch16_224", "deit_small_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"):
        torch.manual_seed(0)
        model = timm.create_model(name, img_size=224).to(device).eval()
        x = torch.randn(8, 3, 224, 224, device=device)
        with torch.no_grad():
            ref = model(x)
            tokenslim.patch(model, r=0)
            r0 = (model(x) - ref).abs().max().item()
            model.tokenslim.r = 13
            fp32 = model(x)
            res = {"r0_max_abs_diff": r0}
            for dtype in (torch.float16, torch.bfloat16):
                with torch.autocast(device.type, dtype=dtype):
                    low = model(x).float()
                    trace = tokenslim.trace_merges(model, x)
                res[str(dtype)] = {
                    "finite": bool(torch.isfinite(low).all()),
                    "max_abs_diff_vs_fp32": (low - fp32).abs().max().item(),
                    "top1_agreement_vs_fp32": (low.argmax(-1) == fp32.argmax(-1)).float().mean().item(),
                    "sizes_dtype": str(trace.sizes.dtype),
                    "sizes_sum_ok": bool((trace.sizes.sum(1) == trace.source.shape[1]).all()),
                }
            if "distilled" not in name:
                model.tokenslim.keep_rate = 0.7
                model.tokenslim.fuse_pruned = True
                res["prune_merge_finite"] = bool(torch.isfinite(model(x)).all())
                model.tokenslim.keep_rate = None
        explanation = torch._dynamo.explain(model)(x)
        res["graph_breaks"] = explanation.graph_break_count
        out[name] = res
        print(name, json.dumps(res), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cuda", help="cuda; 'cpu' only to smoke-test this script")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this script checks the GPU path; run the test suite for the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, timm {timm.__version__}", flush=True)
    report = {"device": name, "correctness": check_correctness(device)}
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224").eval()
    models = {"r=0": base}
    for r in (8, 13, 16):
        models[f"r={r}"] = tokenslim.patch(copy.deepcopy(base), r=r)
    macs = {k: count_macs(m).gmacs for k, m in models.items()}
    result = compare(models, batch_size=args.batch_size, rounds=args.rounds, steps_per_round=3, device=args.device,
                     precision="amp_float16" if device.type == "cuda" else "float32", latency=True)
    print(f"ViT-B/16, {name}, {result.context.precision}, batch {args.batch_size}, {args.rounds} interleaved rounds:")
    rows = []
    for k in models:
        tp, lat = result.throughput[k], result.latency[k]
        row = {"setting": k, "gmacs": macs[k], "mac_ratio": macs["r=0"] / macs[k],
               "throughput_ratio": tp.median, "ci": [tp.low, tp.high],
               "img_per_s": args.batch_size / result.step_ms[k] * 1e3,
               "latency_ratio": lat.median, "latency_ms": result.latency_ms[k]}
        rows.append(row)
        print(f"  {k:<5} {row['gmacs']:6.2f} GMACs  MAC x{row['mac_ratio']:.2f}  throughput x{tp.median:.2f} "
              f"[{tp.low:.2f},{tp.high:.2f}]  {row['img_per_s']:.0f} img/s  b1 latency x{lat.median:.2f} "
              f"({result.latency_ms[k]:.2f} ms)", flush=True)
    report["benchmark"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
