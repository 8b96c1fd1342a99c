"""The search behind ``tune`` as an object with explicit state, one method per phase.

:class:`Search` holds what every phase shares: the unpatched model and its outputs on the
calibration images, the journal (every evaluation and timing, replayed on a rerun), the deadline,
the candidates seen, the lazy-greedy bounds and the current merge step. The phases:

* :meth:`Search.incumbent`: the weakest plain ToMe schedules that reach the aim when timed;
* :meth:`Search.warm_start`: on a screened (deep) search, the walk starts from 75% of the
  incumbent's merges instead of the origin;
* :meth:`Search.greedy`: the cheapest step per MAC saved, repeated up to a MAC goal (screened on
  deep models: lazy on the subset, coarse far from the goal);
* :meth:`Search.reach_speed`: greedy walks corrected by measured efficiency until the aim is met,
  backing off after an overshoot with a smaller merge step;
* :meth:`Search.refine`: merges moved between blocks at equal compute while the KL improves;
* :meth:`Search.challenge`: plain schedules at the same compute replace the point if better;
* :meth:`Search.contest`: at the measured aim, the weakest plain schedule of each family that
  also reaches it when timed, the lowest KL winning.

After the search, :func:`tokenslim.tune.confirm.confirm` lets images it never saw decide between
its best few settings and the incumbent.

Each phase reads and returns points and candidates; none keeps hidden state of its own.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.data import Dataset

from ..evaluate import evaluate
from ..measure.benchmark import compare
from ..measure.macs import count_macs
from ..spec import apply_setting, parse_setting
from .record import Candidate, Journal
from .space import KEEP_LEVELS, PLAIN_FAMILIES, Point, moves, plain, shift

FREE_KL = 1e-7
"""A step that raises the mean KL by less than this costs nothing (float rounding)."""
SIMILAR_MACS = 1.002
"""Compute within 0.2% counts as equal (refine and challenge compare points at equal compute)."""
PROMOTE = 4
"""Options promoted from the screening subset to the whole calibration set per greedy step."""
WARM_SHARE = 0.75
"""Share of the incumbent's merges a deep model's walk starts from."""


def auto_screen(images: int, options: int) -> int:
    """The screening subset a search uses by default: a quarter of the searched images when the
    step has many options (deep models) and the images are plenty (600 or more: 1,000 calibration
    images less the confirmation share), else none (every option on every image, as the search on
    the 6-block reference model has always done)."""
    return images // 4 if options > 16 and images >= 600 else 0


class Search:
    """One tuning search on ``model`` (unchanged) with calibration ``data``.

    Args:
        model: the unpatched model.
        data: calibration images.
        journal: the record replayed instead of recomputing.
        speedup, max_drop: the target (exactly one is set).
        aim: the speed-up to reach when timed (``speedup`` plus the margin).
        search: the parts of the search space in use (:data:`~tokenslim.tune.space.SEARCH_SPACES`).
        prune_ok: whether pruning steps are allowed on this model.
        step: merges per greedy step.
        deadline: ``time.perf_counter()`` value at which the budget ends.
        timing: keyword arguments of the interleaved timer (batch size, rounds, device, ...).
        eval_kw: keyword arguments of :func:`tokenslim.evaluate.evaluate`.
        say: progress lines.
    """

    def __init__(self, model: nn.Module, data: Dataset, journal: Journal, speedup: Optional[float],
                 max_drop: Optional[float], aim: Optional[float], search: Sequence[str], prune_ok: bool, step: int,
                 deadline: float, timing: Dict[str, Any], eval_kw: Dict[str, Any],
                 say: Callable[[str], None], screen: int = 0, promote: int = PROMOTE) -> None:
        self.model, self.data, self.journal = model, data, journal
        self.screen, self.promote = screen, promote
        self.speedup, self.max_drop, self.aim = speedup, max_drop, aim
        self.search, self.prune_ok, self.step = tuple(search), prune_ok, step
        self.deadline, self.timing, self.eval_kw, self.say = deadline, timing, eval_kw, say
        self.depth = len(model.blocks)
        self.merge_step = step
        self.incumbent_point: Optional[Point] = None
        self.candidates: List[Candidate] = []
        self.stale: Dict[str, Dict[Tuple[Any, ...], Tuple[float, float]]] = {}
        self._macs_by_plan: Dict[Tuple[Any, ...], float] = {}
        say(f"calibration: unpatched outputs on {len(data)} images")
        base = evaluate(model, data, keep_logits=True, **eval_kw)
        self.ref_logits = base.logits
        from ..evaluate import dataset_targets

        targets = dataset_targets(data)
        self.use_labels = targets is not None and all(0 <= t < self.ref_logits.shape[1] for t in targets)
        self.base_gmacs = count_macs(model, img_size=timing.get("img_size")).gmacs
        if screen:
            from torch.utils.data import Subset

            self.screen_data = Subset(data, list(range(min(screen, len(data)))))
            self.screen_logits = self.ref_logits[:len(self.screen_data)]

    # -- evaluation and timing, through the journal ------------------------------------------

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def _gmacs(self, candidate_model: nn.Module, method: str, mlp: float) -> float:
        # Compute follows from the token counts (and the method's own matching work): count once.
        from ..patching import token_plan

        img_size = self.timing.get("img_size")
        key = (method, token_plan(candidate_model, img_size).tokens, mlp)
        if key not in self._macs_by_plan:
            self._macs_by_plan[key] = count_macs(candidate_model, img_size=img_size).gmacs
        return self._macs_by_plan[key]

    def gmacs_of(self, text: str, method: str) -> float:
        """GMACs per image of settings ``text`` (counted, not evaluated; from the journal when the
        setting was evaluated)."""
        if text in self.journal.evals:
            return self.journal.evals[text]["gmacs"]
        setting = parse_setting(text)
        return self._gmacs(apply_setting(copy.deepcopy(self.model), setting), method,
                           float(setting.get("mlp_pruned", 0.0)))

    def assess(self, text: str, method: str, phase: str) -> Candidate:
        """The candidate for settings ``text``: fidelity on the calibration images (from the
        journal when it is there), with its timing if it was ever timed."""
        if text in self.journal.evals:
            row = self.journal.evals[text]
        else:
            setting = parse_setting(text)
            candidate_model = apply_setting(copy.deepcopy(self.model), setting)
            gmacs = self._gmacs(candidate_model, method, float(setting.get("mlp_pruned", 0.0)))
            res = evaluate(candidate_model, self.data, reference_logits=self.ref_logits, **self.eval_kw)
            row = {"method": method, "gmacs": gmacs, "mac_ratio": self.base_gmacs / gmacs, "kl": res.kl,
                   "agreement": res.agreement, "top1": res.top1 if self.use_labels else None,
                   "top1_diff": res.top1_diff if self.use_labels else None}
            self.journal.add("eval", text, row)
        cand = Candidate(setting=text, method=method, gmacs=row["gmacs"], mac_ratio=row["mac_ratio"], kl=row["kl"],
                         agreement=row["agreement"], top1=row["top1"], top1_diff=row["top1_diff"], phase=phase)
        timing = self.journal.timings.get(text)
        if timing:
            cand.throughput_ratio = timing["throughput_ratio"]
            cand.throughput_ratio_low, cand.throughput_ratio_high = timing["low"], timing["high"]
        self.candidates.append(cand)
        return cand

    def measure(self, cand: Candidate, again: bool = False) -> float:
        """``cand``'s speed-up, timed interleaved with the unpatched model (once; ``again`` for an
        independent re-measurement)."""
        key = cand.setting + (" (re-measured)" if again else "")
        if key not in self.journal.timings:
            self.say(f"timing {cand.setting} (MAC ratio {cand.mac_ratio:.2f}) interleaved with the unpatched model")
            models = {"none": self.model,
                      "candidate": apply_setting(copy.deepcopy(self.model), parse_setting(cand.setting))}
            result = compare(models, baseline="none", latency=False, **self.timing)
            tp = result.throughput["candidate"]
            self.journal.add("timing", key, {"throughput_ratio": tp.median, "low": tp.low, "high": tp.high})
        t = self.journal.timings[key]
        cand.throughput_ratio, cand.throughput_ratio_low, cand.throughput_ratio_high = (
            t["throughput_ratio"], t["low"], t["high"])
        self.say(f"  {cand.setting}: measured {cand.throughput_ratio:.2f}x (target {self.speedup})")
        return cand.throughput_ratio

    # -- phases ----------------------------------------------------------------------------------

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

    def assess_screen(self, text: str, method: str) -> Dict[str, float]:
        """KL and GMACs of ``text`` on the screening subset only (journalled like a full one)."""
        key = f"{text} @screen{len(self.screen_data)}"
        if key not in self.journal.evals:
            setting = parse_setting(text)
            candidate_model = apply_setting(copy.deepcopy(self.model), setting)
            gmacs = self._gmacs(candidate_model, method, float(setting.get("mlp_pruned", 0.0)))
            res = evaluate(candidate_model, self.screen_data, reference_logits=self.screen_logits, **self.eval_kw)
            self.journal.add("eval", key, {"method": method, "gmacs": gmacs, "kl": res.kl, "screen": True})
        row = self.journal.evals[key]
        return {"gmacs": row["gmacs"], "kl": row["kl"]}

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

    def incumbent(self, method: str, extra: str) -> Optional[Candidate]:
        """What plain ToMe gives at the aim: the weakest constant ``r`` and the weakest ramp
        ``(r, -1)`` that reach it when timed, the lower KL of the two. The search only replaces it
        with a setting that has a lower KL *and* reaches the aim when timed; a search stopped by the
        budget returns it (or better), never an unfinished point."""
        if "merge" not in self.search or self.aim is None:
            return None
        best = None
        for family in PLAIN_FAMILIES:
            found = self.weakest_plain(method, extra, family, (0,) * self.depth, 0.0, "incumbent",
                                       lambda g: self.base_gmacs / g >= self.aim * 0.97)
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
        """From strength ``start``, timed one strength up or down until it is the weakest member
        that reaches the aim; ``None`` if none does (or none can beat ``to_beat`` going up)."""
        k = start
        reached: Optional[Tuple[Point, Candidate]] = None
        while 1 <= k < 64 and not self.out_of_time():
            trial, cand = self.plain(method, extra, family, k, keep, mlp, phase)
            if reached is None and k != start and cand.kl >= to_beat:
                break  # going up, it cannot win: stronger members lose even more
            if self.measure(cand) >= self.aim:
                reached, k = (trial, cand), k - 1
            elif reached is not None:
                break
            else:
                k += 1
        return reached

    def warm_start(self, method: str, extra: str, held: Candidate,
                   share: float = WARM_SHARE) -> Tuple[Point, Candidate, float]:
        """A deep model's walk starts from the incumbent's merges scaled to ``share`` (rounded per
        block), aiming for the MAC ratio the incumbent's measured efficiency says the aim needs:
        from the origin the walk spends its budget on the first, cheapest steps (on a 12-block
        model at 2x it had reached MAC ratio 1.10 when the 20 minutes ran out)."""
        r = tuple(int(round(x * share)) for x in self.incumbent_point.r)
        point = Point(r, (0,) * self.depth)
        current = self.assess(point.text(method, extra), method, "warm start")
        goal = self.aim / max(held.throughput_ratio / held.mac_ratio, 0.3)
        self.say(f"{method}: starting from {share:.0%} of the incumbent's merges, {current.setting} (MAC "
                 f"x{current.mac_ratio:.2f}), aiming for MAC ratio {goal:.2f}")
        return point, current, goal

    def reach_speed(self, method: str, extra: str, held: Optional[Candidate] = None) -> Optional[Candidate]:
        """Greedy walks, each followed by refine, challenge and a timing; the measured efficiency
        corrects the MAC goal until the aim is met. An overshoot of more than 3% goes back to the
        last point short of the aim and approaches again with half the merge step. A point that
        reaches the aim is then contested by the plain schedules. With the incumbent ``held`` on
        a screened (deep) search, the walk starts from :meth:`warm_start` instead of the origin."""
        point, current = Point.origin(self.depth), None
        goal = self.speedup  # MAC ratio needed, corrected by measured efficiency
        if self.screen and held is not None and self.incumbent_point is not None and not self.out_of_time():
            point, current, goal = self.warm_start(method, extra, held)
        below: Optional[Tuple[Point, Candidate]] = None  # the last point measured short of the aim
        reached: Optional[Candidate] = None
        self.merge_step = self.step
        for _ in range(8):
            point, current = self.greedy(method, extra, point, goal, current)
            if current is None or self.out_of_time():
                break
            point, current = self.refine(method, extra, point, current)
            point, current = self.challenge(method, extra, point, current)
            measured = self.measure(current)
            efficiency = measured / current.mac_ratio
            if measured >= self.aim:
                reached = current
                if measured <= self.aim * 1.03 or below is None or self.merge_step == 1:
                    break
                # Overshot by a whole coarse step: go back to the last point short of the aim
                # and approach again in smaller steps (less reduction, less accuracy lost).
                self.merge_step = max(1, self.merge_step // 2)
                point, current = below
                self.stale[method] = {}  # bounds from beyond this point no longer hold
                goal = self.aim / max(efficiency, 0.3) * 1.01
                self.say(f"{method}: {measured:.2f}x overshoots {self.aim:.2f}; back to {current.setting} with steps "
                         f"of {self.merge_step}, aiming for MAC ratio {goal:.2f}")
                continue
            if reached is not None:
                break  # the finer approach fell short: keep the point that reached the aim
            below = (point, current)
            goal = max(goal, self.aim / max(efficiency, 0.3)) * 1.02
            self.say(f"{method}: {measured:.2f}x measured < {self.aim:.2f} (target + margin); aiming for MAC ratio "
                     f"{goal:.2f}")
        if reached is not None and (current is None or (current.throughput_ratio or 0) < self.aim):
            current = reached
        if current is not None and (current.throughput_ratio or 0) >= self.aim:
            current = self.contest(method, extra, point, current)
        return current

    def within_drop(self, method: str, extra: str) -> Optional[Candidate]:
        """The greedy walk while the drop stays within ``max_drop``; the point reached, timed."""
        _, current = self.greedy(method, extra, Point.origin(self.depth), None, None)
        if current is not None:
            self.measure(current)
        return current


__all__ = ["FREE_KL", "KEEP_LEVELS", "Search"]
