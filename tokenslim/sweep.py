"""Sweeps: accuracy against measured speed for a grid of settings, written as tables, CSV, JSONL and a
Pareto plot (SVG, no plotting dependency)."""
from __future__ import annotations

import copy
import csv
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.data import Dataset

from .evaluate import evaluate
from .fingerprint import check_same_run, fingerprint
from .journal import append_jsonl, read_jsonl, remove_journal
from .measure.alone import time_alone
from .measure.table import format_number, benchmark_settings
from .ranks import current, on_main
from .spec import apply_setting, format_setting, parse_setting

CSV_COLUMNS = (
    "setting", "top1", "top5", "agreement", "top1_diff", "top1_diff_se", "kl", "gmacs", "params_m", "mac_ratio",
    "throughput_ratio", "throughput_ratio_low", "throughput_ratio_high", "efficiency", "latency_ratio",
    "step_ms", "latency_ms", "images", "pareto", "error",
)


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[bool]:
    """For ``(speed, accuracy)`` points, whether each is on the front (no other point is at least as
    fast and as accurate and better in one)."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def dedupe_settings(settings: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Canonical names of ``settings`` in order, the unpatched ``none`` first, each once.

    Returns ``(names, duplicates)``: the settings to run and the inputs that repeated an earlier one.
    """
    names, duplicates = ["none"], []
    for text in settings:
        name = format_setting(parse_setting(text))
        if name in names:
            duplicates.append(text)
        else:
            names.append(name)
    return names, duplicates


def read_rows(path: str, run: Dict[str, Any],
              hint: str = "pass --fresh (fresh=True) to start over, or write to another --out") -> Dict[str, Dict[str, Any]]:
    """Finished rows of an earlier run of the same sweep in the JSONL file ``path``, by setting.

    Raises:
        ValueError: the file holds rows of a different run (other weights, data or options; see
            :func:`tokenslim.fingerprint.check_same_run`).
    """
    done: Dict[str, Dict[str, Any]] = {}
    for lineno, row in read_jsonl(path):
        check_same_run(row.get("run"), run, f"{path}:{lineno}", hint)
        done[row["setting"]] = row
    return done


def run_sweep(
    model: nn.Module,
    settings: Sequence[str],
    data: Dataset,
    model_name: str = "",
    eval_kwargs: Optional[Dict[str, Any]] = None,
    bench_kwargs: Optional[Dict[str, Any]] = None,
    progress: Optional[Callable[[str], None]] = None,
    jsonl_path: Optional[str] = None,
    run: Optional[Dict[str, Any]] = None,
    fresh: bool = False,
) -> List[Dict[str, Any]]:
    """Evaluate and benchmark every setting against the unpatched ``model``.

    Accuracy comes from :func:`tokenslim.evaluate.evaluate` against the unpatched model's outputs,
    computed once; speed from :func:`tokenslim.measure.table.benchmark_settings`, each setting
    interleaved with the unpatched model in one process. Returns one JSON-serialisable row per
    setting, the unpatched model first, with a ``pareto`` flag for the accuracy/throughput front.

    Under ``torchrun`` (a process group joined, e.g. by :func:`tokenslim.ranks.init_from_env`)
    every rank calls this with the same arguments: each evaluates its shard of ``data`` (the
    reference outputs of its shard kept by each), the counts are summed, so the accuracy columns
    equal a single-process run bit for bit; every timing is taken by rank 0 alone while the other
    ranks wait (:func:`tokenslim.measure.alone.time_alone`). Every rank returns the same rows;
    rank 0 alone reads and writes ``jsonl_path`` and calls ``progress``.

    Nothing finished is lost: with ``jsonl_path`` each setting's row is appended to that file the
    moment it is done, and a rerun of the same run skips the settings already there, on any number
    of ranks. The same run means the same :func:`tokenslim.fingerprint.fingerprint`: the model's
    weights, the data and the options in ``run`` (timing and evaluation options that change a
    result); another run's file is refused, naming what differs. ``fresh=True`` deletes the file
    first. Repeated settings run once.
    """
    info = current()
    say = (progress or (lambda msg: None)) if info.is_main else (lambda msg: None)
    eval_kwargs = dict(eval_kwargs or {})
    bench_kwargs = dict(bench_kwargs or {})
    from .measure.benchmark import check_options

    check_options(model, **bench_kwargs)  # timing options are refused now, not after the accuracy pass
    names, duplicates = dedupe_settings(settings)
    if duplicates:
        say(f"skipping repeated settings: {', '.join(duplicates)}")
    if len(names) < 2:
        raise ValueError("a sweep needs at least one setting besides the unpatched model (e.g. r=8)")
    run = fingerprint(model, data, **{"model": model_name, **(run or {})})
    done = on_main(lambda: _resume(jsonl_path, run, fresh, names, info.world_size, say), info) if jsonl_path else {}
    rows: Dict[str, Dict[str, Any]] = dict(done)
    pending_base: Optional[Dict[str, Any]] = None
    reference_logits = None  # the unpatched model's outputs (this rank's shard), every setting's reference
    spent = {"accuracy": 0.0, "timing": 0.0}

    def write(row: Dict[str, Any]) -> None:
        rows[row["setting"]] = row
        if jsonl_path and info.is_main:
            append_jsonl(jsonl_path, row)

    for i, name in enumerate(names):
        if name in done:
            continue
        say(f"[{i + 1}/{len(names)}] {name}: accuracy")
        started = time.perf_counter()
        if name != "none" and reference_logits is None:
            say("unpatched model: outputs for reference")
            reference_logits = evaluate(model, data, label="none", keep_logits=True, **eval_kwargs).logits
        candidate = apply_setting(copy.deepcopy(model), parse_setting(name))
        if name == "none":
            acc = evaluate(candidate, data, label=name, keep_logits=True, **eval_kwargs)
            reference_logits = acc.logits
        else:
            acc = evaluate(candidate, data, reference_logits=reference_logits, label=name, **eval_kwargs)
        spent["accuracy"] += time.perf_counter() - started
        row = {"model": model_name, "setting": name, **{k: v for k, v in acc.to_dict().items() if k != "settings"}}
        row["run"] = run
        if name == "none":
            pending_base = row  # its speed row comes with the first setting's timing
            continue
        say(f"[{i + 1}/{len(names)}] {name}: speed, interleaved with the unpatched model")
        started = time.perf_counter()
        timed = time_alone(lambda: {r["setting"]: r for r in benchmark_settings(model, [name], model_name=model_name,
                                                                               **bench_kwargs)})
        row["timing_seconds"] = time.perf_counter() - started
        spent["timing"] += row["timing_seconds"]
        row.update({k: v for k, v in timed[name].items() if k not in ("model", "setting")})
        if pending_base is not None:
            pending_base.update({k: v for k, v in timed["none"].items() if k not in ("model", "setting")})
            write(pending_base)
            pending_base = None
        write(row)
    if spent["accuracy"]:
        say(f"this run: accuracy {spent['accuracy']:.1f} s on {info.world_size} rank(s), timing "
            f"{spent['timing']:.1f} s (rank 0 alone)")
    rows = [rows[n] for n in names]
    flags = pareto_front([(r["throughput_ratio"], r["top1"]) for r in rows])
    for row, flag in zip(rows, flags):
        row["pareto"] = flag
    return rows


def _resume(path: str, run: Dict[str, Any], fresh: bool, names: Sequence[str], world_size: int,
            say: Callable[[str], None]) -> Dict[str, Dict[str, Any]]:
    """The rows of ``names`` an earlier run of the same sweep left in ``path`` (rank 0's work)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fresh:
        remove_journal(path)
    done = read_rows(path, run)
    resumed = [n for n in names if n in done]
    if resumed:
        say(f"resuming: {len(resumed)} of {len(names)} settings already in {path} ({', '.join(resumed)})")
        others = sorted({done[n].get("world_size", 1) for n in resumed} - {world_size})
        if others:
            say(f"note: rows of {path} were evaluated on {' and '.join(map(str, others))} rank(s), this run on "
                f"{world_size}: the accuracy columns are exact sums, the same on any number of ranks, and every "
                "timing was taken by one process alone")
    return done


def format_sweep(rows: Sequence[Dict[str, Any]]) -> str:
    """A fixed-width accuracy/speed table (``*`` marks the Pareto front)."""
    header = (f"{'setting':<38} {'top1':>6} {'d top1 +- se':>14} {'agree':>6} {'GMACs':>7} {'MAC x':>6} "
              f"{'thru x [95% CI]':>20} {'eff':>5} {'b1 lat x':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        diff = f"{r['top1_diff']:+6.2f} +- {r['top1_diff_se']:4.2f}" if r.get("top1_diff") is not None else "-"
        agree = f"{r['agreement']:6.2f}" if r.get("agreement") is not None else f"{'-':>6}"
        tp = f"{r['throughput_ratio']:.2f} [{r['throughput_ratio_low']:.2f},{r['throughput_ratio_high']:.2f}]"
        mark = "*" if r.get("pareto") else " "
        lat = f"{r['latency_ratio']:8.2f}" if r.get("latency_ratio") is not None else f"{'-':>8}"
        lines.append(f"{mark}{r['setting']:<37} {r['top1']:6.2f} {diff:>14} {agree} {format_number(r['gmacs'], 7, 3)} "
                     f"{format_number(r['mac_ratio'], 6, 2)} {tp:>20} {format_number(r['efficiency'], 5, 2)} {lat}")
    errors = [f"{r['setting']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + errors)


def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})


def write_jsonl(rows: Sequence[Dict[str, Any]], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def pareto_svg(rows: Sequence[Dict[str, Any]], title: str = "") -> str:
    """An SVG scatter of top-1 against measured throughput ratio; the Pareto front is joined."""
    w, h, left, right, top, bottom = 720, 460, 70, 200, 40, 55
    xs = [r["throughput_ratio"] for r in rows]
    ys = [r["top1"] for r in rows]
    x0, x1 = min(xs + [1.0]), max(xs + [1.0])
    pad_x = (x1 - x0) * 0.08 or 0.1
    x0, x1 = x0 - pad_x, x1 + pad_x
    y0, y1 = useful_range(ys)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{_escape(title)}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{px(xv) - 12:.1f}" y="{h - bottom + 18}">{xv:.2f}</text>')
        out.append(f'<text x="{left - 48}" y="{py(yv) + 4:.1f}">{yv:.1f}</text>')
    out.append(f'<text x="{(w - right + left) / 2 - 110}" y="{h - 12}">throughput ratio vs unpatched (median, measured)</text>')
    out.append(f'<text x="14" y="{(h) / 2 + 30}" transform="rotate(-90 14 {(h) / 2 + 30})">top-1 accuracy (%)</text>')
    front = sorted((r for r in rows if r.get("pareto") and r["top1"] >= y0), key=lambda r: r["throughput_ratio"])
    if len(front) > 1:
        pts = " ".join(f"{px(r['throughput_ratio']):.1f},{py(r['top1']):.1f}" for r in front)
        out.append(f'<polyline points="{pts}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    for r in rows:
        clipped = r["top1"] < y0
        x, y = px(r["throughput_ratio"]), py(max(r["top1"], y0 + (y1 - y0) * 0.02))
        lo, hi = px(r["throughput_ratio_low"]), px(r["throughput_ratio_high"])
        color = "#d62728" if r.get("pareto") else "#1f77b4"
        label = f'{r["setting"]} ({r["top1"]:.1f}, below the axis)' if clipped else r["setting"]
        out.append(f'<line x1="{lo:.1f}" y1="{y:.1f}" x2="{hi:.1f}" y2="{y:.1f}" stroke="{color}"/>')
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="10">{_escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` now, before any work, or say why it cannot be used."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is an existing file; pass a folder (it is created if missing)")
    make_folder(out_dir, f"--out {out_dir}")


def make_folder(folder: str, what: str) -> None:
    """Create ``folder`` (and its parents) now, or raise naming ``what`` and why it cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: cannot create the folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what}: the folder {folder} is not writable")


def useful_range(values: Sequence[float], span: float = 12.0) -> Tuple[float, float]:
    """The y-range worth showing: from the best value down ``span`` points (or to the lowest value,
    when that is closer), padded; points below it are drawn on the lower edge, labelled with their
    value, so one collapsed setting does not squash every other point into a line."""
    top = max(values)
    low = max(min(values), top - span)
    pad = max((top - low) * 0.08, 0.2)
    return low - pad, top + pad


def _place_labels(ax, fig, points: Sequence[Tuple[float, float]], texts: Sequence[str]) -> list:
    """Annotate each point, moving a label up (then down) in steps of its height until it overlaps no
    label placed before it: readable without a dependency."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    for i in order:
        x, y = points[i]
        chosen = None
        for k in range(0, 16):
            dy = 4 + (k + 1) // 2 * 8 * (1 if k % 2 else -1)
            ann = ax.annotate(texts[i], (x, y), textcoords="offset points", xytext=(5, dy), fontsize=6.5)
            box = ann.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in placed):
                chosen = box
                break
            ann.remove()
        if chosen is None:  # crowded: keep the last try rather than drop the label
            ann = ax.annotate(texts[i], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=6.5)
            chosen = ann.get_window_extent(renderer)
        placed.append(chosen)
    return placed


def pareto_png(rows: Sequence[Dict[str, Any]], path: str, title: str = "") -> bool:
    """Top-1 against measured throughput ratio as a PNG (matplotlib, the ``plot`` extra), with the
    95% interval of each ratio as a horizontal bar and the Pareto front joined. Labels are moved
    apart until they do not overlap; the y-axis shows the useful range (:func:`useful_range`).
    Returns ``False`` (writing nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    y0, y1 = useful_range([r["top1"] for r in rows])
    points, texts = [], []
    for r in rows:
        x, y = r["throughput_ratio"], r["top1"]
        color = "#d62728" if r.get("pareto") else "#1f77b4"
        clipped = y < y0
        shown = y0 + (y1 - y0) * 0.02 if clipped else y
        ax.errorbar([x], [shown], xerr=[[x - r["throughput_ratio_low"]], [r["throughput_ratio_high"] - x]],
                    fmt="v" if clipped else "o", color=color, ms=4, capsize=2, lw=1)
        points.append((x, shown))
        texts.append(f"{r['setting']} ({y:.1f}, below the axis)" if clipped else r["setting"])
    front = sorted((r for r in rows if r.get("pareto") and r["top1"] >= y0), key=lambda r: r["throughput_ratio"])
    if len(front) > 1:
        ax.plot([r["throughput_ratio"] for r in front], [r["top1"] for r in front], color="#d62728", lw=1,
                label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("throughput ratio vs unpatched (median of interleaved rounds, 95% interval)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, fig, points, texts)
    fig.savefig(path)
    plt.close(fig)
    return True


def write_outputs(rows: Sequence[Dict[str, Any]], out_dir: str, stem: str, title: str = "") -> Dict[str, str]:
    """Write ``<stem>.csv``, ``<stem>.jsonl`` (with the Pareto flags), ``<stem>.svg``, ``<stem>.txt`` and,
    with matplotlib installed, ``<stem>.png`` into ``out_dir``."""
    check_out_dir(out_dir)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "jsonl", "svg", "txt")}
    write_csv(rows, paths["csv"])
    tmp = paths["jsonl"] + ".tmp"
    write_jsonl(rows, tmp)
    os.replace(tmp, paths["jsonl"])
    with open(paths["svg"], "w") as f:
        f.write(pareto_svg(rows, title))
    with open(paths["txt"], "w") as f:
        f.write(format_sweep(rows) + "\n")
    png = os.path.join(out_dir, f"{stem}.png")
    if pareto_png(rows, png, title):
        paths["png"] = png
    return paths
