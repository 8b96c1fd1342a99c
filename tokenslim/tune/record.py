"""What ``tune`` records: candidates, the result, the resumable journal and the output files."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from ..fingerprint import check_same_run
from ..journal import append_jsonl, read_jsonl, remove_journal
from ..ranks import current, on_main


@dataclass
class Candidate:
    """One evaluated setting."""

    setting: str
    method: str
    gmacs: float
    mac_ratio: float
    kl: float
    agreement: float
    top1: Optional[float] = None
    top1_diff: Optional[float] = None
    throughput_ratio: Optional[float] = None
    throughput_ratio_low: Optional[float] = None
    throughput_ratio_high: Optional[float] = None
    phase: str = ""

    @property
    def drop(self) -> float:
        """Accuracy cost in points: top-1 drop with labels, else disagreement (%)."""
        return -self.top1_diff if self.top1_diff is not None else 100.0 - self.agreement


@dataclass
class TuneResult:
    """The chosen setting and the search that found it.

    Attributes:
        setting: settings text for ``patch`` / ``sweep`` / ``benchmark`` / checkpoints.
        confirmation: how the confirmation images decided between the search's best settings and
            the plain-ToMe incumbent (:class:`~tokenslim.tune.confirm.Confirmation`), or ``None``
            (not run: a drop budget, too few images, or nothing reached the target).
        stopped_by_budget: the budget ran out before the search finished (a miss then may be the
            budget's; otherwise the search space or the device is what falls short).
        best: the chosen candidate, with its final (re-)measured speed-up.
        candidates: every candidate evaluated, in order.
        target: the speed-up asked for (or ``None`` with ``max_drop``).
        seconds: wall time of this call (replayed candidates cost nothing).
        spent: where ``seconds`` went: wall seconds per phase (``calibration``, ``incumbent``,
            ``greedy``, ``screen``, ``refine``, ``challenge``/``contest``, ``timing`` (every timing,
            whatever phase asked), ``confirm``); evaluations are spread over torchrun ranks,
            timings are not.
        files: output files written (by rank 0 under torchrun; empty on the other ranks).
    """

    setting: str
    best: Candidate
    candidates: List[Candidate]
    target: Optional[float]
    max_drop: Optional[float]
    seconds: float
    files: Dict[str, str] = field(default_factory=dict)
    confirmation: Optional[Any] = None
    stopped_by_budget: bool = False
    spent: Dict[str, float] = field(default_factory=dict)

    @property
    def evaluated(self) -> int:
        """Distinct settings evaluated (a setting assessed in several phases counts once), the count
        ``tune.json``, the CSV and the plot give."""
        return len({c.setting for c in self.candidates})

    @property
    def reached(self) -> Optional[bool]:
        """Whether the chosen setting re-measured at or above the target speed-up (``None`` with
        ``max_drop``, which has no speed target)."""
        if self.target is None or self.best.throughput_ratio is None:
            return None
        return self.best.throughput_ratio >= self.target


class Journal:
    """Append-only record of evaluations and timings, replayed on a rerun."""

    def __init__(self, path: Optional[str], run: Dict[str, Any], fresh: bool) -> None:
        self.path, self.run = path, run
        self.evals: Dict[str, dict] = {}
        self.timings: Dict[str, dict] = {}
        self.confirms: Dict[str, dict] = {}
        self.writes = current().is_main  # under torchrun rank 0 reads and writes; every rank replays
        if path is None:
            return
        for row in on_main(lambda: self._read(path, run, fresh)):
            self._book(row["kind"])[row["setting"]] = row

    @staticmethod
    def _read(path: str, run: Dict[str, Any], fresh: bool) -> List[dict]:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if fresh:
            remove_journal(path)
        rows = []
        for lineno, row in read_jsonl(path):
            check_same_run(row.get("run"), run, f"{path}:{lineno}",
                           "pass fresh=True (--fresh) to start over, or another output folder")
            rows.append(row)
        return rows

    def _book(self, kind: str) -> Dict[str, dict]:
        return {"timing": self.timings, "confirm": self.confirms}.get(kind, self.evals)

    def add(self, kind: str, setting: str, values: dict) -> None:
        """Record one finished ``"eval"``, ``"timing"`` or ``"confirm"`` row (appended to the file at once)."""
        row = {"kind": kind, "setting": setting, **values, "run": self.run}
        self._book(kind)[setting] = row
        if self.path and self.writes:
            append_jsonl(self.path, row)


def write_outputs(result: TuneResult, out_dir: str) -> Dict[str, str]:
    import csv

    paths = {"csv": os.path.join(out_dir, "candidates.csv"), "json": os.path.join(out_dir, "tune.json"),
             "jsonl": os.path.join(out_dir, "candidates.jsonl")}
    fields = [f for f in Candidate.__dataclass_fields__]
    seen = {}
    for c in result.candidates:
        seen[c.setting] = c  # one row per setting, the latest state
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for c in seen.values():
            writer.writerow(asdict(c))
    with open(paths["json"], "w") as f:
        json.dump({"setting": result.setting, "best": asdict(result.best), "target": result.target,
                   "reached": result.reached, "max_drop": result.max_drop, "seconds": round(result.seconds, 1),
                   "candidates": result.evaluated, "stopped_by_budget": result.stopped_by_budget,
                   "seconds_by_phase": {k: round(v, 1) for k, v in result.spent.items()},
                   "confirmation": asdict(result.confirmation) if result.confirmation is not None else None},
                  f, indent=2)
    png = os.path.join(out_dir, "candidates.png")
    if candidates_png(list(seen.values()), result.best, png):
        paths["png"] = png
    return paths


def candidates_png(candidates: Sequence[Candidate], best: Candidate, path: str) -> bool:
    """Every candidate's KL against its MAC ratio (log scale), timed ones with their measured
    speed-up, the choice marked. Returns ``False`` (writing nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    methods = sorted({c.method for c in candidates})
    for i, method in enumerate(methods):
        own = [c for c in candidates if c.method == method]
        ax.scatter([c.mac_ratio for c in own], [max(c.kl, 1e-6) for c in own], s=8, alpha=0.5, color=f"C{i}",
                   label=f"{method} ({len(own)} candidates)")
    for c in candidates:
        if c.throughput_ratio is not None:
            ax.scatter([c.mac_ratio], [max(c.kl, 1e-6)], s=30, facecolors="none", edgecolors="black", lw=0.8)
            ax.annotate(f"{c.throughput_ratio:.2f}x", (c.mac_ratio, max(c.kl, 1e-6)), textcoords="offset points",
                        xytext=(4, -8), fontsize=6.5)
    ax.scatter([best.mac_ratio], [max(best.kl, 1e-6)], marker="*", s=160, color="#d62728", zorder=5,
               label=f"chosen: {best.setting}")
    ax.set_yscale("log")
    ax.set_xlabel("MAC ratio (unpatched / candidate); circled: timed, with the measured speed-up")
    ax.set_ylabel("KL(unpatched || candidate) on the calibration images")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
