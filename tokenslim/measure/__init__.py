"""Measurement: GMACs and parameters, throughput and latency, side-by-side ratios."""
from .alone import check_alone, time_alone
from .benchmark import BenchmarkResult, Comparison, RatioEstimate, RunContext, benchmark, compare, median_interval
from .macs import UNIT, ModelCost, count_macs

__all__ = [
    "UNIT",
    "BenchmarkResult",
    "Comparison",
    "ModelCost",
    "RatioEstimate",
    "RunContext",
    "benchmark",
    "check_alone",
    "compare",
    "count_macs",
    "median_interval",
    "time_alone",
]
