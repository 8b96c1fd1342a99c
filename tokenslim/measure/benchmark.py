"""Throughput and latency, alone or side by side.

Follows timm's benchmark.py: random input already on the device, eval mode and
``torch.inference_mode()``, warm-up steps, then timed steps each ended by a device synchronise.
Absolute times drift on shared machines, so :func:`compare` interleaves the models in one process
and reports the median of per-round ratios with a distribution-free confidence interval.
"""
from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..input_size import resolve_img_size
from .alone import check_alone

PRECISIONS = ("float32", "bfloat16", "float16", "amp_bfloat16", "amp_float16")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_precision(precision: str) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(dtype of weights and input, autocast dtype or None)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision.startswith("amp_"):
        return torch.float32, getattr(torch, precision[4:])
    return getattr(torch, precision), None


def _as_size(img_size, model) -> Tuple[int, int]:
    return resolve_img_size(model, img_size)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """Median and a distribution-free confidence interval for the median (order statistics).

    Uses the normal approximation of the binomial ranks; needs at least 6 values.
    """
    n = len(values)
    if n < 6:
        raise ValueError(f"need at least 6 values for an interval, got {n}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    k = max(int(math.floor((n - z * math.sqrt(n)) / 2)), 0)
    s = sorted(values)
    return statistics.median(s), s[k], s[n - 1 - k]


@dataclass
class RunContext:
    """Where and how a measurement ran."""

    device: str
    precision: str
    batch_size: int
    img_size: Tuple[int, int]
    channels_last: bool
    compiled: bool
    cpu_threads: int
    torch_version: str = torch.__version__
    device_name: str = ""
    host: str = field(default_factory=platform.node)  # several hosts under torchrun: which one timed

    def __post_init__(self) -> None:
        if not self.device_name:
            if self.device.startswith("cuda"):
                self.device_name = torch.cuda.get_device_name(torch.device(self.device))
            else:
                self.device_name = platform.processor() or platform.machine()


class _Runner:
    """A model prepared for timing: device, dtype, memory format, compile, fixed random input."""

    def __init__(self, model: nn.Module, ctx: RunContext, batch_size: int) -> None:
        dtype, self.amp_dtype = resolve_precision(ctx.precision)
        self.device = torch.device(ctx.device)
        memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
        model = model.eval().to(device=self.device, dtype=dtype, memory_format=memory_format)
        self.model = torch.compile(model) if ctx.compiled else model
        self.x = torch.randn(batch_size, 3, *ctx.img_size, device=self.device, dtype=dtype).contiguous(
            memory_format=memory_format
        )

    def step(self) -> float:
        """One synchronised forward pass; returns its wall time in seconds."""
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
        _synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode(), amp:
            self.model(self.x)
        _synchronize(self.device)
        return time.perf_counter() - start


@dataclass
class BenchmarkResult:
    """Throughput and latency of one model (times in milliseconds)."""

    samples_per_sec: float
    step_ms_median: float
    step_ms_p10: float
    step_ms_p90: float
    latency_ms_median: float
    latency_ms_p90: float
    steps: int
    context: RunContext

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(int(round(q * (len(s) - 1))), len(s) - 1)]


def _context(model, device, precision, batch_size, img_size, channels_last, compile) -> RunContext:
    check_alone()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolve_precision(precision)
    return RunContext(
        device=str(device), precision=precision, batch_size=batch_size, img_size=_as_size(img_size, model),
        channels_last=channels_last, compiled=compile, cpu_threads=torch.get_num_threads(),
    )


def benchmark(
    model: nn.Module,
    batch_size: int = 64,
    img_size: Optional[Union[int, Tuple[int, int]]] = None,
    warmup: int = 3,
    steps: int = 10,
    latency_steps: int = 20,
    device: Optional[Union[str, torch.device]] = None,
    precision: str = "float32",
    channels_last: bool = False,
    compile: bool = False,
) -> BenchmarkResult:
    """Measure images/s at ``batch_size`` and batch-1 latency of one model.

    Args:
        model: the model (moved to ``device``/dtype in place).
        batch_size: images per timed step.
        img_size: input size; the model's own by default.
        warmup: untimed steps first (compilation and allocator warm-up happen here).
        steps: timed steps at ``batch_size``; throughput = images / total timed wall time.
        latency_steps: timed batch-1 steps (0 skips the latency measurement).
        device: ``"cpu"``, ``"cuda"``, ...; CUDA if available by default.
        precision: one of :data:`PRECISIONS` (``amp_*`` keeps float32 weights under autocast).
        channels_last: channels-last input and weights.
        compile: wrap the model in ``torch.compile``.
    """
    if steps < 1 or warmup < 0 or latency_steps < 0:
        raise ValueError("steps must be >= 1, warmup and latency_steps >= 0")
    ctx = _context(model, device, precision, batch_size, img_size, channels_last, compile)
    runner = _Runner(model, ctx, batch_size)
    for _ in range(warmup):
        runner.step()
    times = [runner.step() for _ in range(steps)]
    latency = [float("nan")]
    if latency_steps:
        single = _Runner(model, ctx, 1)
        for _ in range(max(warmup, 1)):
            single.step()
        latency = [single.step() for _ in range(latency_steps)]
    return BenchmarkResult(
        samples_per_sec=batch_size * steps / sum(times),
        step_ms_median=statistics.median(times) * 1e3,
        step_ms_p10=_percentile(times, 0.1) * 1e3,
        step_ms_p90=_percentile(times, 0.9) * 1e3,
        latency_ms_median=statistics.median(latency) * 1e3,
        latency_ms_p90=_percentile(latency, 0.9) * 1e3,
        steps=steps,
        context=ctx,
    )


@dataclass
class RatioEstimate:
    """A speed ratio against the baseline: > 1 means faster than the baseline."""

    median: float
    low: float
    high: float
    confidence: float
    rounds: int


@dataclass
class Comparison:
    """Side-by-side timing of several models against a baseline.

    Attributes:
        baseline: name of the reference model.
        throughput: per model, baseline step time / model step time at ``batch_size``.
        latency: per model, the same ratio at batch 1 (absent if not measured).
        step_ms: per model, median step time at ``batch_size`` (drifts; prefer the ratios).
        latency_ms: per model, median batch-1 time.
    """

    baseline: str
    throughput: Dict[str, RatioEstimate]
    latency: Dict[str, RatioEstimate]
    step_ms: Dict[str, float]
    latency_ms: Dict[str, float]
    context: RunContext

    def to_dict(self) -> dict:
        return asdict(self)


def _interleaved(runners: Mapping[str, _Runner], rounds: int, steps_per_round: int,
                 progress: Optional[Callable[[str], None]]) -> Dict[str, List[float]]:
    """Per-round times of every runner; the order alternates each round so drift cancels."""
    from tqdm import tqdm

    names = list(runners)
    times: Dict[str, List[float]] = {n: [] for n in names}
    # A bar on a terminal; where stderr is a log, the caller's line per round instead.
    bar = tqdm(total=rounds, desc=f"  timing {len(names)} models", unit="round", file=sys.stderr, leave=False,
               disable=None if progress else True)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(sum(runners[name].step() for _ in range(steps_per_round)))
        bar.update(1)
        if progress and bar.disable:
            progress(f"round {i + 1}/{rounds}")
    bar.close()
    return times


def _ratios(times: Dict[str, List[float]], baseline: str, confidence: float,
            baselines: Optional[Mapping[str, str]] = None) -> Dict[str, RatioEstimate]:
    out = {}
    for name, ts in times.items():
        own = (baselines or {}).get(name, baseline)
        per_round = [b / t for b, t in zip(times[own], ts)]
        med, low, high = median_interval(per_round, confidence)
        out[name] = RatioEstimate(med, low, high, confidence, len(per_round))
    return out


def check_options(
    model: nn.Module,
    batch_size: int = 32,
    img_size: Optional[Union[int, Tuple[int, int]]] = None,
    rounds: int = 15,
    steps_per_round: int = 1,
    precision: str = "float32",
    **_: object,
) -> None:
    """Refuse timing options :func:`compare` would refuse, before a caller's longer work (a sweep's
    accuracy pass, a tune search) starts instead of after it."""
    if rounds < 15:
        raise ValueError(f"rounds must be >= 15 for a meaningful interval, got {rounds}")
    if batch_size < 1 or steps_per_round < 1:
        raise ValueError(f"batch_size and steps_per_round must be >= 1, got {batch_size} and {steps_per_round}")
    resolve_precision(precision)
    from ..input_size import resolve_img_size

    resolve_img_size(model, img_size)


def compare(
    models: Mapping[str, nn.Module],
    baseline: Optional[str] = None,
    batch_size: int = 32,
    img_size: Optional[Union[int, Tuple[int, int]]] = None,
    rounds: int = 15,
    steps_per_round: int = 1,
    warmup: int = 2,
    latency: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    precision: str = "float32",
    channels_last: bool = False,
    compile: bool = False,
    confidence: float = 0.95,
    progress: Optional[Callable[[str], None]] = None,
    baselines: Optional[Mapping[str, str]] = None,
) -> Comparison:
    """Time models interleaved in one process and report ratios against a baseline.

    Each round times every model once (order alternating between rounds); the ratio of the
    baseline's time to a model's time in the same round is one sample. The result gives the median
    of ``rounds`` samples and a ``confidence`` interval for it.

    Args:
        models: name -> model (at least two). Models are moved to ``device`` in place.
        baseline: the reference name; the first model by default.
        rounds: interleaved rounds (at least 15 for the interval to mean something).
        latency: also compare batch-1 latency the same way.
        progress: called with a short message after each round.
        baselines: per model, another model of ``models`` to take its ratio against (e.g. an ONNX
            Runtime model against the exported unpatched one) in the same interleaved rounds;
            ``baseline`` for the rest.
    """
    if len(models) < 2:
        raise ValueError("compare needs at least two models")
    if baseline is None:
        baseline = next(iter(models))
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of {list(models)}")
    if rounds < 15:
        raise ValueError(f"rounds must be >= 15 for a meaningful interval, got {rounds}")
    if steps_per_round < 1 or warmup < 0:
        raise ValueError("steps_per_round must be >= 1 and warmup >= 0")
    first = next(iter(models.values()))
    ctx = _context(first, device, precision, batch_size, img_size, channels_last, compile)
    runners = {n: _Runner(m, ctx, batch_size) for n, m in models.items()}
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    times = _interleaved(runners, rounds, steps_per_round, progress)
    lat_ratios, lat_ms = {}, {}
    if latency:
        singles = {n: _Runner(m, ctx, 1) for n, m in models.items()}
        for r in singles.values():
            for _ in range(max(warmup, 1)):
                r.step()
        lat_times = _interleaved(singles, rounds, steps_per_round, progress)
        lat_ratios = _ratios(lat_times, baseline, confidence, baselines)
        lat_ms = {n: statistics.median(t) / steps_per_round * 1e3 for n, t in lat_times.items()}
    return Comparison(
        baseline=baseline,
        throughput=_ratios(times, baseline, confidence, baselines),
        latency=lat_ratios,
        step_ms={n: statistics.median(t) / steps_per_round * 1e3 for n, t in times.items()},
        latency_ms=lat_ms,
        context=ctx,
    )
