"""Plain schedules in ``tune``'s search: what a user tries first (constant ``r`` and ToMe's
decreasing ramp ``(r, -1)``) as the incumbent to beat, as a challenger at equal compute, and as
the contest at the measured aim.

A mixin of :class:`~tokenslim.tune.search.Search`: it reads the
:class:`~tokenslim.tune.scoring.Scorer` (``assess``, ``gmacs_of``, ``measure``), the search's
``aim``, ``depth`` and ``search``, sets ``incumbent_point`` and adds to ``efficiencies`` (every
plain schedule's measured speed-up over its MAC ratio, which aims the next timing); the contest refines a plain
winner with :meth:`~tokenslim.tune.refine.Refine.refine`.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Optional, Tuple

from .record import Candidate
from .refine import SIMILAR_MACS
from .space import PLAIN_FAMILIES, Point, plain


class PlainSchedules:
    """The incumbent, the challenge and the contest (see the module docstring for the state they read)."""

    def incumbent(self, method: str, extra: str) -> Optional[Candidate]:
        """What plain ToMe gives at the aim: the weakest constant ``r`` and the weakest ramp
        ``(r, -1)`` that reach it when timed, the lower KL of the two. The search only replaces it
        with a setting that has a lower KL *and* reaches the aim when timed; a search stopped by the
        budget returns it (or better), never an unfinished point."""
        if "merge" not in self.search or self.aim is None:
            return None
        best = None
        for family in PLAIN_FAMILIES:
            # The first family starts from counted MACs; the next from the efficiency timed so far.
            efficiency = self.plain_efficiency()
            found = self.weakest_plain(method, extra, family, (0,) * self.depth, 0.0, "incumbent",
                                       lambda g: self.base_gmacs / g * efficiency >= self.aim * 0.97)
            if found is None:
                continue
            reached = self._weakest_timed(method, extra, family, (0,) * self.depth, 0.0, found[0], math.inf,
                                          phase="incumbent")
            if reached is not None and (best is None or reached[1].kl < best.kl):
                best, self.incumbent_point = reached[1], reached[0]
        if best is not None:
            self.say(f"{method}: plain ToMe reaches {best.throughput_ratio:.2f}x with {best.setting} (KL {best.kl:.4f}):"
                     " the incumbent the search must beat")
        return best

    def plain(self, method: str, extra: str, family: str, k: int, keep: Tuple[int, ...], mlp: float,
              phase: str) -> Tuple[Point, Candidate]:
        trial = plain(family, k, self.depth, keep, mlp)
        return trial, self.assess(trial.text(method, extra), method, phase)

    def weakest_plain(self, method: str, extra: str, family: str, keep: Tuple[int, ...], mlp: float, phase: str,
                      enough: Callable[[float], bool]) -> Optional[Tuple[int, Point, Candidate]]:
        """The weakest member of a family whose GMACs are ``enough``, walking up in strength; ``None``
        when time runs out or the family saturates first (every block at its limit).

        Compute needs no evaluation: the walk counts MACs and only the member found is evaluated
        on the calibration images."""
        previous = math.inf
        for k in range(1, 65):
            if self.out_of_time():
                return None
            trial = plain(family, k, self.depth, keep, mlp)
            gmacs = self.gmacs_of(trial.text(method, extra), method)
            if enough(gmacs):
                return k, trial, self.assess(trial.text(method, extra), method, phase)
            if gmacs >= previous * (1 - 1e-9):
                return None
            previous = gmacs
        return None

    def challenge(self, method: str, extra: str, point: Point, current: Candidate) -> Tuple[Point, Candidate]:
        """Pit the search's point against the plain schedules users try first: constant ``r`` and
        ToMe's decreasing ramp ``(r, -1)``, each with the pruning and channels found so far. The
        weakest member of each family that removes at least as much compute is evaluated; the
        lowest KL wins. A greedy walk can get stuck where a plain schedule is better."""
        if "merge" not in self.search:
            return point, current
        best_point, best = point, current
        for family in PLAIN_FAMILIES:
            found = self.weakest_plain(method, extra, family, point.keep, point.mlp, "challenge",
                                       lambda g: g <= current.gmacs * SIMILAR_MACS)
            if found is not None and found[2].kl < best.kl:
                _, best_point, best = found
                self.say(f"{method}: plain schedule {best.setting} beats the search: KL {best.kl:.4f}")
        return best_point, best

    def contest(self, method: str, extra: str, point: Point, current: Candidate) -> Candidate:
        """At the measured aim (``current`` reaches it when timed), the plain schedules challenge
        the point found: for constant ``r`` and ToMe's ramp ``(r, -1)``, each with the pruning
        found and without any, the weakest member that reaches the aim when timed. Equal MACs are
        not equal speed, so this compares what the user gets: fidelity at the measured speed. The
        lowest KL among the points that reach the aim wins; a plain winner is refined and kept
        refined if it still reaches the aim when timed."""
        if "merge" not in self.search:
            return current
        efficiency = current.throughput_ratio / current.mac_ratio
        best, best_point = current, point
        for family in PLAIN_FAMILIES:
            for keep in [point.keep] + ([(0,) * self.depth] if any(point.keep) else []):
                # The weakest member predicted (by the point's efficiency) to reach the aim ...
                found = self.weakest_plain(method, extra, family, keep, point.mlp, "contest",
                                           lambda g: self.base_gmacs / g * efficiency >= self.aim * 0.97)
                if found is None:
                    continue
                reached = self._weakest_timed(method, extra, family, keep, point.mlp, found[0], best.kl)
                if reached is not None and reached[1].kl < best.kl:
                    best_point, best = reached
                    self.say(f"{method}: plain {best.setting} reaches {best.throughput_ratio:.2f}x with a lower KL "
                             f"({best.kl:.4f}): it replaces the search's point")
        if best is not current:
            # The greedy walk missed this basin: refine from the plain schedule instead, and keep
            # the refined point if it still reaches the aim when timed.
            _, refined = self.refine(method, extra, best_point, best)
            if refined is not best and self.measure(refined) >= self.aim:
                best = refined
        return best

    def _weakest_timed(self, method: str, extra: str, family: str, keep: Tuple[int, ...], mlp: float, start: int,
                       to_beat: float, phase: str = "contest") -> Optional[Tuple[Point, Candidate]]:
        """From strength ``start``, timed until it is the weakest member that reaches the aim;
        ``None`` if none does (or none can beat ``to_beat`` going up). Going up, a miss jumps to
        the weakest member its measured efficiency predicts to reach the aim (on a large model each
        timing costs a minute; one strength at a time spent the budget before the search began);
        after a hit, one strength down at a time."""
        k = start
        reached: Optional[Tuple[Point, Candidate]] = None
        while 1 <= k < 64 and not self.out_of_time():
            trial, cand = self.plain(method, extra, family, k, keep, mlp, phase)
            if reached is None and k != start and cand.kl >= to_beat:
                break  # going up, it cannot win: stronger members lose even more
            measured = self.measure(cand)
            self.efficiencies.append(measured / cand.mac_ratio)
            if measured >= self.aim:
                reached, k = (trial, cand), k - 1
            elif reached is not None:
                break
            else:
                k = self._predicted(method, extra, family, keep, mlp, k, self.plain_efficiency())
        return reached

    def plain_efficiency(self) -> float:
        """The median measured efficiency (speed-up / MAC ratio) of the plain schedules timed so
        far, 1 before any: one timing drifts by several percent on a shared machine, the median
        of several much less."""
        return statistics.median(self.efficiencies) if self.efficiencies else 1.0

    def _predicted(self, method: str, extra: str, family: str, keep: Tuple[int, ...], mlp: float, k: int,
                   efficiency: float) -> int:
        """The weakest strength above ``k`` whose MAC ratio times ``efficiency`` reaches the aim
        (counted, not evaluated); ``k + 1`` when none below 64 does."""
        for strength in range(k + 1, 64):
            gmacs = self.gmacs_of(plain(family, strength, self.depth, keep, mlp).text(method, extra), method)
            if self.base_gmacs / gmacs * efficiency >= self.aim:
                return strength
        return k + 1


__all__ = ["PlainSchedules"]
