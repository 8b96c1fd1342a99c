"""The search space of ``tune``: points (merges, pruning level and MLP share per block), their
one-step extensions and the plain schedule families. Pure functions of the point and the options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from ..schedule import parse_r

SEARCH_SPACES = ("merge", "prune", "mlp")
KEEP_LEVELS = (1.0, 0.75, 0.5, 0.25, 0.01)
"""Pruning levels a greedy step walks down, per block (0.01 keeps one patch token on models up
to 100 patches: after the last block's attention only the class token is read, so there pruning
everything is free)."""
MLP_STEP, MLP_MAX = 0.125, 0.5
PLAIN_FAMILIES = ("constant", "ramp")


@dataclass(frozen=True)
class Point:
    """A point of the search space: merges per block, pruning level per block, MLP channel share."""

    r: Tuple[int, ...]
    keep: Tuple[int, ...]  # index into KEEP_LEVELS per block
    mlp: float = 0.0

    @classmethod
    def origin(cls, depth: int) -> "Point":
        return cls((0,) * depth, (0,) * depth)

    def text(self, method: str, extra: str = "") -> str:
        """Settings text of this point under ``method`` (and the method's extra options)."""
        return schedule_text(self.r, method, extra, [KEEP_LEVELS[k] for k in self.keep], self.mlp)


def schedule_text(r: Sequence[int], method: str, extra: str = "", keep: Optional[Sequence[float]] = None,
                  mlp: float = 0.0) -> str:
    text = f"r={list(r)}".replace(" ", "")
    layers = [i for i, k in enumerate(keep or ()) if k < 1.0]
    if layers:
        text += f",keep_rate={[keep[i] for i in layers]},prune_layers={tuple(layers)}".replace(" ", "")
    if mlp:
        text += f",mlp_pruned={mlp}"
    if method != "tome":
        text += f",method={method}"
    return text + (f",{extra}" if extra else "")


def moves(point: Point, search: Sequence[str], prune_ok: bool, merge_step: int) -> List[Tuple[Tuple[Any, ...], Point]]:
    """Every one-step extension of ``point`` within the search space, keyed by what it changes:
    ``merge_step`` more merges in one block, one block's pruning a level lower, or a larger MLP
    share."""
    depth = len(point.r)
    out = []
    if "merge" in search:
        for i in range(depth):
            r = point.r[:i] + (point.r[i] + merge_step,) + point.r[i + 1:]
            out.append((("merge", i), Point(r, point.keep, point.mlp)))
    if prune_ok:
        for i in range(depth):
            if point.keep[i] + 1 < len(KEEP_LEVELS):
                keep = point.keep[:i] + (point.keep[i] + 1,) + point.keep[i + 1:]
                out.append((("prune", i), Point(point.r, keep, point.mlp)))
    if "mlp" in search and point.mlp + MLP_STEP <= MLP_MAX + 1e-9:
        out.append((("mlp",), Point(point.r, point.keep, round(point.mlp + MLP_STEP, 4))))
    return out


def shift(point: Point, source: int, target: int, merge_step: int) -> Optional[Point]:
    """``point`` with ``merge_step`` merges moved from block ``source`` to block ``target`` (about
    equal compute), or ``None`` when that move does not exist."""
    if source == target or point.r[source] < merge_step:
        return None
    r = list(point.r)
    r[source] -= merge_step
    r[target] += merge_step
    return Point(tuple(r), point.keep, point.mlp)


def plain(family: str, k: int, depth: int, keep: Tuple[int, ...], mlp: float) -> Point:
    """Strength ``k`` of a plain schedule family: constant ``r=k`` or ToMe's ramp ``(k, -1)``."""
    if family not in PLAIN_FAMILIES:
        raise ValueError(f"plain schedule families are {PLAIN_FAMILIES}, not {family!r}")
    return Point(tuple(parse_r(k if family == "constant" else (k, -1), depth)), keep, mlp)
