"""How much a second CPU thread speeds up one model's forward pass, timed interleaved.

On N cores, N ranks of 1 thread can at best take ``speed-up(N threads) / N`` of the time one
process of N threads takes over the same images; this prints that bound for a checkpoint (the
record behind the torchrun figures in docs/measuring.md).

    .venv/bin/python scripts/thread_scaling.py --checkpoint checkpoints/cifar10_reference.pth --batch-size 64
"""
import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a tokenslim checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="compared with 1 thread")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (two forward passes each)")
    args = p.parse_args()
    from tokenslim.input_size import resolve_img_size
    from tokenslim.loading import load_baseline

    model, _ = load_baseline(None, checkpoint_path=args.checkpoint)
    model.eval()
    h, w = resolve_img_size(model, None)
    x = torch.randn(args.batch_size, 3, h, w)
    times = {1: [], args.threads: []}
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(args.rounds):
            for t in times:
                torch.set_num_threads(t)
                start = time.perf_counter()
                model(x)
                model(x)
                times[t].append((time.perf_counter() - start) / 2)
    one, many = statistics.median(times[1]), statistics.median(times[args.threads])
    print(f"batch {args.batch_size}: 1 thread {one * 1e3:.1f} ms, {args.threads} threads {many * 1e3:.1f} ms per "
          f"forward (medians of {args.rounds} interleaved rounds): speed-up {one / many:.2f}; {args.threads} ranks of "
          f"1 thread take at best {one / many / args.threads:.2f} of one {args.threads}-thread process's time")


if __name__ == "__main__":
    main()
