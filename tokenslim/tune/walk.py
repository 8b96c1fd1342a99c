"""The greedy walk of ``tune``'s search: the cheapest step per MAC saved, repeated up to a MAC
goal (or while the drop stays within its budget).

On deep models the walk is *screened*: every option is scored on a small subset first and only
the best :data:`PROMOTE` are evaluated on all calibration images; far from the goal it merges
twice as many tokens per step. A mixin of :class:`~tokenslim.tune.search.Search`: it reads the
:class:`~tokenslim.tune.scoring.Scorer` (``assess``, ``assess_screen``, ``base_gmacs``, ``say``)
and the search's walk state (``stale`` bounds, ``merge_step``, ``search``, ``prune_ok``,
``max_drop``, ``promote``).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

from .record import Candidate
from .space import Point, moves

FREE_KL = 1e-7
"""A step that raises the mean KL by less than this costs nothing (float rounding)."""
PROMOTE = 4
"""Options promoted from the screening subset to the whole calibration set per greedy step."""


class Walk:
    """The greedy walk (see the module docstring for the state it reads)."""

    def greedy(self, method: str, extra: str, point: Point, mac_goal: Optional[float],
               current: Optional[Candidate]) -> Tuple[Point, Optional[Candidate]]:
        """Extend ``point`` greedily until ``mac_goal`` (or the drop budget) is reached.

        Lazy greedy: a step's cost per MAC only grows as more is removed, so each option's score
        from an earlier step is a lower bound. Options are evaluated in the order of those bounds,
        and the walk stops evaluating once the best fresh score beats every remaining bound.
        """
        stale = self.stale.setdefault(method, {})
        lead: Optional[Tuple[Tuple[Any, ...], float]] = None  # screened: last step's key, runner-up's score
        while not self.out_of_time():
            if mac_goal is not None and current is not None and current.mac_ratio >= mac_goal:
                return point, current
            best, best_point, best_score = None, None, None
            base_cost = current.kl if current is not None else 0.0
            base_macs = current.gmacs if current is not None else self.base_gmacs
            merge_step = self.merge_step
            if self.screen and self.coarse(mac_goal, base_macs):
                merge_step *= 2
            options = sorted(moves(point, self.search, self.prune_ok, merge_step),
                             key=lambda kt: stale.get(kt[0], (-math.inf, 0.0)))
            screened = self.screen and len(options) > self.promote
            if screened and lead is not None:
                # Lazy greedy on the subset: an option's cost per MAC only grows as more is removed,
                # so the runner-up's score of the last round bounds every other option's. The step
                # just taken, taken again, that still scores within the bound is the best step:
                # one screened and one full evaluation instead of a whole round.
                repeat = dict(options).get(lead[0])
                if repeat is not None:
                    score = self._screen_score(repeat.text(method, extra), method, current, base_macs)
                    if score[0] < math.inf and score[0] <= lead[1]:
                        cand = self.assess(repeat.text(method, extra), method, "greedy")
                        if cand.gmacs < base_macs - 1e-9:
                            point, current = repeat, cand
                            self.say(f"{method}: {cand.setting}  MAC x{cand.mac_ratio:.2f}  KL {cand.kl:.4f}  "
                                     f"agree {cand.agreement:.2f}% (the same step, still the best)")
                            continue
                lead = None
            if screened:
                ranked = self.screen_ranked(method, extra, options, current)
                options = [(key, trial) for _, key, trial in ranked[:self.promote]]
            for key, trial in options:
                if not screened and best_score is not None and key in stale and stale[key] >= best_score:
                    break  # every remaining option is bounded below by a worse score
                cand = self.assess(trial.text(method, extra), method, "greedy")
                saved = base_macs - cand.gmacs
                if saved <= 1e-9:
                    stale[key] = (math.inf, 0.0)  # nothing left to remove there
                    continue
                # Free steps (KL unchanged to rounding) tie at zero cost: the larger saving wins.
                cost = cand.kl - base_cost
                score = (max(cost, 0.0) / saved if cost > FREE_KL else 0.0, -saved)
                stale[key] = score
                if best_score is None or score < best_score:
                    best, best_point, best_score = cand, trial, score
            if best is None:
                return point, current  # nothing more can be removed
            if self.max_drop is not None and best.drop > self.max_drop:
                return point, current
            if screened:
                chosen = next(k for k, t in options if t == best_point)
                lead = (chosen, next((sc[0] for sc, k, _ in ranked if k != chosen), math.inf))
            point, current = best_point, best
            self.say(f"{method}: {best.setting}  MAC x{best.mac_ratio:.2f}  KL {best.kl:.4f}  "
                     f"agree {best.agreement:.2f}%")
        return point, current

    def coarse(self, mac_goal: Optional[float], gmacs: float) -> bool:
        """Whether a walk at ``gmacs`` is still far from ``mac_goal``: more than a third of the
        compute to remove is left. Far from it, a screened (deep-model) walk merges twice as many
        tokens per step; near it, the steps are fine again."""
        if mac_goal is None:
            return False
        goal = self.base_gmacs / mac_goal
        return gmacs - goal > (self.base_gmacs - goal) / 3


    def _screen_score(self, text: str, method: str, current: Optional[Candidate],
                      base_macs: float) -> Tuple[float, float]:
        """Cost per MAC saved of ``text`` over ``current`` on the screening subset (infinite when
        it saves nothing; zero when it costs nothing, the larger saving first)."""
        base_kl = self.assess_screen(current.setting, method)["kl"] if current is not None else 0.0
        row = self.assess_screen(text, method)
        saved = base_macs - row["gmacs"]
        cost = row["kl"] - base_kl
        if saved <= 1e-9:
            return math.inf, -saved
        return (max(cost, 0.0) / saved if cost > FREE_KL else 0.0), -saved

    def screen_ranked(self, method: str, extra: str, options: List[Tuple[Tuple[Any, ...], Point]],
                      current: Optional[Candidate]) -> List[Tuple[Tuple[float, float], Tuple[Any, ...], Point]]:
        """Successive halving in one round: every option scored on the screening subset (its cost
        per MAC saved there), best first; options that save nothing are left out. A walk evaluates
        the first :attr:`promote` on all images."""
        base_macs = current.gmacs if current is not None else self.base_gmacs
        scored = []
        for order, (key, trial) in enumerate(options):
            if self.out_of_time():
                break
            scored.append((self._screen_score(trial.text(method, extra), method, current, base_macs), order, key,
                           trial))
        scored.sort(key=lambda s: (s[0], s[1]))
        return [(score, key, trial) for score, _, key, trial in scored if score[0] < math.inf]



__all__ = ["FREE_KL", "PROMOTE", "Walk"]
