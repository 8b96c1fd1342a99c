"""Side-by-side benchmark of reduction settings of one model: MAC ratio against measured speed-up."""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from ..spec import apply_setting, format_setting, parse_setting
from .benchmark import compare
from .macs import UNIT, count_macs

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
    costs, errors = {}, {}
    for name, m in models.items():
        try:
            costs[name] = count_macs(m, img_size=img_size)
        except (ValueError, TypeError):
            raise  # a bad img_size: the timing would refuse it too
        except Exception as e:  # noqa: BLE001  a counting failure must not cost the timing
            errors[name] = f"GMACs not counted: {type(e).__name__}: {str(e)[:160]}"
    result = compare(models, baseline="none", progress=progress, **compare_kwargs)
    base = costs["none"].gmacs if "none" in costs else None
    rows = []
    for name in models:
        tp = result.throughput[name]
        cost = costs.get(name)
        mac_ratio = base / cost.gmacs if cost is not None and base is not None else None
        row = {
            "model": model_name,
            "setting": name,
            "gmacs": cost.gmacs if cost is not None else None,
            "params_m": cost.params_m if cost is not None else sum(p.numel() for p in models[name].parameters()) / 1e6,
            "mac_ratio": mac_ratio,
            "throughput_ratio": tp.median,
            "throughput_ratio_low": tp.low,
            "throughput_ratio_high": tp.high,
            "efficiency": tp.median / mac_ratio if mac_ratio is not None else None,
            "step_ms": result.step_ms[name],
        }
        if name in errors or (base is None and "none" in errors):
            row["error"] = errors.get(name) or errors["none"]
        if result.latency:
            lat = result.latency[name]
            row.update(latency_ratio=lat.median, latency_ratio_low=lat.low, latency_ratio_high=lat.high,
                       latency_ms=result.latency_ms[name])
        row["rounds"] = tp.rounds
        row["confidence"] = tp.confidence
        row["unit"] = UNIT
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
        lines.append(f"{r['setting']:<36} {format_number(r['gmacs'], 7, 2)} {format_number(r['mac_ratio'], 6, 2)} {tp:>20} "
                     f"{format_number(r['efficiency'], 5, 2)} {lat:>20} {r['step_ms']:8.1f} {b1:>7}")
    errors = [f"{r['setting']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + errors)


def format_number(value: Optional[float], width: int, digits: int) -> str:
    """A fixed-width number, or '-' where a metric could not be measured."""
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"
