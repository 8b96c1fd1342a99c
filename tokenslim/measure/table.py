"""Side-by-side benchmark of reduction settings of one model: MAC ratio against measured speed-up."""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from ..spec import apply_setting, format_setting, parse_setting
from .benchmark import compare
from .macs import count_macs

COLUMNS = ("setting", "gmacs", "mac_ratio", "throughput_ratio", "efficiency", "latency_ratio", "step_ms", "latency_ms")


def benchmark_settings(
    model: nn.Module,
    settings: Sequence[str],
    model_name: str = "",
    progress: Optional[Callable[[str], None]] = None,
    **compare_kwargs: Any,
) -> List[Dict[str, Any]]:
    """Benchmark settings of ``model`` against the unpatched model, interleaved in one process.

    Args:
        model: an unpatched model (left unchanged: each setting patches a copy).
        settings: setting strings (see :mod:`tokenslim.spec`); the baseline is added first.
        model_name: recorded in every row.
        **compare_kwargs: passed to :func:`tokenslim.measure.compare` (batch_size, rounds, ...).

    Returns:
        One plain dict per setting (JSON-serialisable): GMACs, ``mac_ratio`` (baseline / setting),
        ``throughput_ratio`` (median speed-up with its interval), ``efficiency`` (throughput ratio /
        MAC ratio), ``latency_ratio`` (batch 1) and the run context.
    """
    parsed = {"none": {}}
    for text in settings:
        setting = parse_setting(text)
        parsed[format_setting(setting)] = setting
    models = {}
    for name, setting in parsed.items():
        models[name] = apply_setting(copy.deepcopy(model), setting)
    img_size = compare_kwargs.get("img_size")
    costs = {name: count_macs(m, img_size=img_size) for name, m in models.items()}
    result = compare(models, baseline="none", progress=progress, **compare_kwargs)
    base = costs["none"].gmacs
    rows = []
    for name in models:
        tp = result.throughput[name]
        mac_ratio = base / costs[name].gmacs
        row = {
            "model": model_name,
            "setting": name,
            "gmacs": costs[name].gmacs,
            "params_m": costs[name].params_m,
            "mac_ratio": mac_ratio,
            "throughput_ratio": tp.median,
            "throughput_ratio_low": tp.low,
            "throughput_ratio_high": tp.high,
            "efficiency": tp.median / mac_ratio,
            "step_ms": result.step_ms[name],
        }
        if result.latency:
            lat = result.latency[name]
            row.update(latency_ratio=lat.median, latency_ratio_low=lat.low, latency_ratio_high=lat.high,
                       latency_ms=result.latency_ms[name])
        row["rounds"] = tp.rounds
        row["confidence"] = tp.confidence
        row["unit"] = costs[name].unit
        row["context"] = json.loads(json.dumps(result.to_dict()["context"]))
        rows.append(row)
    return rows


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """A fixed-width table of :func:`benchmark_settings` rows."""
    header = (f"{'setting':<36} {'GMACs':>7} {'MAC x':>6} {'thru x [95% CI]':>20} {'eff':>5} "
              f"{'lat x [95% CI]':>20} {'step ms':>8} {'b1 ms':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        tp = f"{r['throughput_ratio']:.2f} [{r['throughput_ratio_low']:.2f},{r['throughput_ratio_high']:.2f}]"
        lat = (f"{r['latency_ratio']:.2f} [{r['latency_ratio_low']:.2f},{r['latency_ratio_high']:.2f}]"
               if "latency_ratio" in r else "-")
        b1 = f"{r['latency_ms']:.1f}" if "latency_ms" in r else "-"
        lines.append(f"{r['setting']:<36} {r['gmacs']:7.2f} {r['mac_ratio']:6.2f} {tp:>20} {r['efficiency']:5.2f} "
                     f"{lat:>20} {r['step_ms']:8.1f} {b1:>7}")
    return "\n".join(lines)
