"""Where a recovery step's time goes: the teacher's forward pass against the student's forward,
backward and update, in float32 and under bf16 autocast, timed interleaved (medians of rounds).

This is what `--cache-teacher` saves: after the first epochs a cached run pays for the student alone.

    .venv/bin/python scripts/profile_recover_step.py --checkpoint checkpoints/cifar10_reference.pth \\
        --settings 'r=(10,-1)' --batch-size 128
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch

from tokenslim.loading import load_baseline
from tokenslim.spec import apply_setting, parse_setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--settings", required=True, help="the student's reduction, e.g. 'r=(10,-1)'")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    teacher, _ = load_baseline(None, checkpoint_path=args.checkpoint)
    teacher.eval()
    student = apply_setting(copy.deepcopy(teacher), parse_setting(args.settings)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    size = teacher.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))

    def teacher_forward():
        with torch.no_grad():
            teacher(x)

    def student_step():
        opt.zero_grad(set_to_none=True)
        student(x).logsumexp(-1).mean().backward()
        opt.step()

    cases = {(part, prec): fn for part, fn in (("teacher forward", teacher_forward), ("student step", student_step))
             for prec in ("float32", "amp_bfloat16")}
    times = {k: [] for k in cases}
    for r in range(args.rounds + 1):  # the first round warms up and is not kept
        for (part, prec), fn in cases.items():
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "amp_bfloat16" else nullcontext()
            with ctx:
                start = time.perf_counter()
                fn()
                if r:
                    times[(part, prec)].append(time.perf_counter() - start)
    print(f"{args.settings}, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} "
          "interleaved rounds (seconds)")
    for prec in ("float32", "amp_bfloat16"):
        t = statistics.median(times[("teacher forward", prec)])
        s = statistics.median(times[("student step", prec)])
        print(f"{prec:<13} teacher forward {t:.3f}   student forward+backward+update {s:.3f}   "
              f"teacher share {t / (t + s):.0%}")


if __name__ == "__main__":
    main()
