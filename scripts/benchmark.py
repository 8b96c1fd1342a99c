"""Benchmark reduction settings of a timm ViT side by side against the unpatched model.

Prints GMACs, MAC ratio, measured throughput ratio (median and 95% interval over interleaved
rounds), efficiency (throughput ratio / MAC ratio) and batch-1 latency ratio; optionally writes the
rows as JSON lines. Same as ``tokenslim benchmark`` (same flags).

    python scripts/benchmark.py --model vit_small_patch16_224 --settings r=8 r=13 r=16
"""
import sys

from tokenslim.cli import main

if __name__ == "__main__":
    main(["benchmark", *sys.argv[1:]])
