"""The speed table of BENCHMARKS.md: where the removed MACs show up as time, on both model sizes.

Every suite times its models interleaved in one process (``tokenslim.measure.benchmark.compare``,
median of ``--rounds`` paired rounds, 95% interval) against the unpatched model with the same
random weights. Run it with nothing else on the machine:

    .venv/bin/python scripts/bench_speed.py --suites vit_s tiny65 demo softmax compile

Suites:
  vit_s    ViT-S/16 224 px, batch 32 throughput and batch-1 latency: r=0, r=13, pruning keep 0.7 at
           blocks 4/7/10, materialised 50% MLP.
  tiny65   ViT-Ti geometry at 32 px, 4 px patches (65 tokens, width 192, depth 12), batch 64: r=2, r=4.
  demo     the demo model's geometry (65 tokens, width 96, depth 6), batch 64: every token-removing setting.
  softmax  tokenslim (fused SDPA with the size bias) against the same algorithm with an explicit
           softmax (ToMe's own way), ViT-S batch 32, r=0 and r=13.
  compile  torch.compile (inductor, CPU) of the unpatched and a patched tiny65 model: graph breaks,
           and compiled ratios beside eager ones.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402

from tokenslim.measure.benchmark import compare  # noqa: E402
from tokenslim.measure.macs import count_macs  # noqa: E402
from tokenslim.spec import apply_setting, parse_setting  # noqa: E402

GEOMETRIES = {
    "vit_s": ("vit_small_patch16_224", {}),
    "tiny65": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
    "demo": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}),
}


def build(geometry: str) -> torch.nn.Module:
    name, kw = GEOMETRIES[geometry]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()


def variants(base: torch.nn.Module, settings):
    models = {"none": base}
    for text in settings:
        models[text] = apply_setting(copy.deepcopy(base), parse_setting(text))
    return models


def table(title: str, models, result, latency: bool, out: list) -> None:
    base_macs = count_macs(models[result.baseline]).gmacs
    print(f"\n{title}")
    head = f"{'setting':<34}{'GMACs':>7}{'MAC x':>7}{'thru x [95% CI]':>20}{'eff':>6}"
    if latency:
        head += f"{'lat x [95% CI]':>20}{'lat eff':>8}"
    head += f"{'step ms':>9}"
    print(head)
    print("-" * len(head))
    for name, model in models.items():
        gmacs = count_macs(model).gmacs
        mac = base_macs / gmacs
        t = result.throughput[name]
        row = f"{name:<34}{gmacs:7.3f}{mac:7.2f}{t.median:8.2f} [{t.low:.2f},{t.high:.2f}]{t.median / mac:6.2f}"
        rec = {"suite": title, "setting": name, "gmacs": gmacs, "mac_ratio": mac, "throughput_ratio": t.median,
               "low": t.low, "high": t.high, "efficiency": t.median / mac, "step_ms": result.step_ms[name]}
        if latency:
            lat = result.latency[name]
            row += f"{lat.median:8.2f} [{lat.low:.2f},{lat.high:.2f}]{lat.median / mac:8.2f}"
            rec.update(latency_ratio=lat.median, latency_low=lat.low, latency_high=lat.high,
                       latency_efficiency=lat.median / mac, latency_ms=result.latency_ms[name])
        row += f"{result.step_ms[name]:9.1f}"
        print(row, flush=True)
        out.append(rec)


def suite_vit_s(args, out):
    base = build("vit_s")
    models = variants(base, ["r=0", "r=13", "keep_rate=0.7", "mlp_pruned=0.5"])
    res = compare(models, batch_size=32, rounds=args.rounds, latency=True)
    table("vit_s: ViT-S/16 224 px, batch 32 (throughput) and batch 1 (latency)", models, res, True, out)


def suite_tiny65(args, out):
    base = build("tiny65")
    models = variants(base, ["r=0", "r=2", "r=4", "r=6"])
    res = compare(models, batch_size=64, rounds=args.rounds, latency=True)
    table("tiny65: ViT-Ti geometry, 32 px / 4 px patches (65 tokens), batch 64", models, res, True, out)


def suite_demo(args, out):
    base = build("demo")
    models = variants(base, ["r=2", "r=4", "r=6", "r=8", "r=(8,-1)", "keep_rate=0.6,prune_layers=(1,3),fuse_pruned=True",
                             "mlp_pruned=0.25"])
    res = compare(models, batch_size=64, rounds=args.rounds, latency=True)
    table("demo: 65 tokens, width 96, depth 6, batch 64", models, res, True, out)


def explicit_softmax(model: torch.nn.Module) -> torch.nn.Module:
    """The same model computing attention with an explicit softmax (timm's ``fused_attn=False``
    path, which is how ToMe's own patch computes it)."""
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def suite_softmax(args, out):
    base = build("vit_s")
    for text in ("r=0", "r=13"):
        fused = apply_setting(copy.deepcopy(base), parse_setting(text))
        explicit = explicit_softmax(apply_setting(copy.deepcopy(base), parse_setting(text)))
        models = {f"{text} explicit softmax": explicit, f"{text} tokenslim (SDPA)": fused}
        res = compare(models, baseline=f"{text} explicit softmax", batch_size=32, rounds=args.rounds, latency=False)
        table(f"softmax: {text}, ViT-S batch 32, tokenslim's speed over the explicit-softmax version", models, res,
              False, out)


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> int:
    import torch._dynamo as dynamo

    dynamo.reset()
    return dynamo.explain(model)(x).graph_break_count


def suite_compile(args, out):
    base = build("tiny65")
    x = torch.randn(64, 3, 32, 32)
    for text in ("none", "r=4"):
        eager = base if text == "none" else apply_setting(copy.deepcopy(base), parse_setting(text))
        breaks = graph_breaks(eager, x)
        print(f"compile: {text}: graph breaks {breaks}", flush=True)
        out.append({"suite": "compile", "setting": text, "graph_breaks": breaks})
    patched = apply_setting(copy.deepcopy(base), parse_setting("r=4"))
    start = time.perf_counter()
    models = {"none": base, "r=4": patched}
    res = compare(models, batch_size=64, rounds=args.rounds, latency=False, compile=True)
    print(f"(compiled in {time.perf_counter() - start:.0f} s including the timing)")
    table("compile: tiny65 batch 64, both models torch.compile'd (inductor)", models, res, False, out)
    eager = compare({"none": base, "r=4": apply_setting(copy.deepcopy(base), parse_setting("r=4"))}, batch_size=64,
                    rounds=args.rounds, latency=False)
    table("compile: the same pair in eager mode", models, eager, False, out)


SUITES = {"vit_s": suite_vit_s, "tiny65": suite_tiny65, "demo": suite_demo, "softmax": suite_softmax,
          "compile": suite_compile}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=["vit_s", "tiny65", "demo", "softmax"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--jsonl", default="results/bench_speed.jsonl")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, float32, "
          f"random weights, {args.rounds} interleaved rounds")
    out: list = []
    for name in args.suites:
        SUITES[name](args, out)
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    with open(args.jsonl, "a") as f:
        for rec in out:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
