"""Refinement in ``tune``'s search: merges moved between blocks at equal compute while the KL
improves (on a deep model, the moves scored on the screening subset first).

A mixin of :class:`~tokenslim.tune.search.Search`: it reads the
:class:`~tokenslim.tune.scoring.Scorer` and the search's ``merge_step``, ``depth``, ``search``
and ``promote``.
"""
from __future__ import annotations

from typing import Tuple

from .record import Candidate
from .space import Point, shift

SIMILAR_MACS = 1.002
"""Compute within 0.2% counts as equal (refine and challenge compare points at equal compute)."""


class Refine:
    """Refinement at equal compute (see the module docstring for the state it reads)."""

    def refine(self, method: str, extra: str, point: Point, current: Candidate) -> Tuple[Point, Candidate]:
        """Move ``merge_step`` merges between blocks at equal compute while the KL improves."""
        if self.screen:
            return self.refine_screened(method, extra, point, current)
        improved = True
        while improved and not self.out_of_time() and "merge" in self.search:
            improved = False
            for i in range(self.depth):
                for j in range(self.depth):
                    trial = shift(point, i, j, self.merge_step)  # from the point as it is now
                    if trial is None or self.out_of_time():
                        continue
                    cand = self.assess(trial.text(method, extra), method, "refine")
                    if cand.gmacs <= current.gmacs * SIMILAR_MACS and cand.kl < current.kl - 1e-6:
                        point, current, improved = trial, cand, True
                        self.say(f"{method}: refined to {cand.setting}  KL {cand.kl:.4f}")
        return point, current

    def refine_screened(self, method: str, extra: str, point: Point, current: Candidate,
                        reach: int = 2) -> Tuple[Point, Candidate]:
        """Refine on a deep model: every move between blocks at most ``reach`` apart scored on the
        screening subset, the best :attr:`promote` evaluated on all images, the best of those taken
        if it lowers the KL; repeated while it does. (All ``depth**2`` moves at full price cost a
        12-block search most of its budget.)"""
        while "merge" in self.search and not self.out_of_time():
            base_kl = self.assess_screen(current.setting, method)["kl"]
            scored = []
            for i in range(self.depth):
                for j in range(max(0, i - reach), min(self.depth, i + reach + 1)):
                    trial = shift(point, i, j, self.merge_step)
                    if trial is None or self.out_of_time():
                        continue
                    row = self.assess_screen(trial.text(method, extra), method)
                    if row["gmacs"] <= current.gmacs * SIMILAR_MACS and row["kl"] < base_kl - 1e-6:
                        scored.append((row["kl"], len(scored), trial))
            best_point, best = point, current
            for _, _, trial in sorted(scored, key=lambda s: s[:2])[:self.promote]:
                if self.out_of_time():
                    break
                cand = self.assess(trial.text(method, extra), method, "refine")
                if cand.gmacs <= current.gmacs * SIMILAR_MACS and cand.kl < best.kl - 1e-6:
                    best_point, best = trial, cand
            if best is current:
                break
            point, current = best_point, best
            self.say(f"{method}: refined to {current.setting}  KL {current.kl:.4f}")
        return point, current



__all__ = ["Refine", "SIMILAR_MACS"]
