"""The search behind ``tune``: an object with explicit state whose phases live in their own modules.

* :mod:`.scoring` (:class:`~tokenslim.tune.scoring.Scorer`): every evaluation and timing, through
  the journal;
* :meth:`Search.incumbent` (:mod:`.plain_schedules`): the weakest plain ToMe schedules that reach
  the aim when timed;
* :meth:`Search.warm_start`: on a screened (deep) search, the walk starts from 75% of the
  incumbent's merges instead of the origin;
* :meth:`Search.greedy` (:mod:`.walk`): the cheapest step per MAC saved, repeated up to a MAC goal
  (screened on deep models: lazy on the subset, coarse far from the goal);
* :meth:`Search.reach_speed`: greedy walks corrected by measured efficiency until the aim is met,
  backing off after an overshoot with a smaller merge step;
* :meth:`Search.refine` (:mod:`.refine`): merges moved between blocks at equal compute while the
  KL improves;
* :meth:`Search.challenge` (:mod:`.plain_schedules`): plain schedules at the same compute replace
  the point if better;
* :meth:`Search.contest` (:mod:`.plain_schedules`): at the measured aim, the weakest plain schedule
  of each family that also reaches it when timed, the lowest KL winning.

After the search, :func:`tokenslim.tune.confirm.confirm` lets images it never saw decide between
its best few settings and the incumbent.

Each phase reads and returns points and candidates; the state they share is set here, in
:meth:`Search.__init__`, and named in each phase module's docstring.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.data import Dataset

from .plain_schedules import PlainSchedules
from .record import Candidate, Journal
from .refine import SIMILAR_MACS, Refine
from .scoring import Scorer
from .space import KEEP_LEVELS, Point
from .walk import FREE_KL, PROMOTE, Walk

WARM_SHARE = 0.75
"""Share of the incumbent's merges a deep model's walk starts from."""


def auto_screen(images: int, options: int) -> int:
    """The screening subset a search uses by default: a quarter of the searched images when the
    step has many options (deep models) and the images are plenty (600 or more: 1,000 calibration
    images less the confirmation share), else none (every option on every image, as the search on
    the 6-block reference model has always done)."""
    return images // 4 if options > 16 and images >= 600 else 0



class Search(Scorer, Walk, Refine, PlainSchedules):
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
        super().__init__(model, data, journal, deadline, timing, eval_kw, say, screen=screen, speedup=speedup)
        self.promote = promote
        self.max_drop, self.aim = max_drop, aim
        self.search, self.prune_ok, self.step = tuple(search), prune_ok, step
        self.depth = len(model.blocks)
        self.merge_step = step
        self.incumbent_point: Optional[Point] = None
        self.efficiencies: List[float] = []  # measured speed-up / MAC ratio of each plain schedule timed
        self.stale: Dict[str, Dict[Tuple[Any, ...], Tuple[float, float]]] = {}

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


__all__ = ["FREE_KL", "KEEP_LEVELS", "PROMOTE", "SIMILAR_MACS", "Search", "WARM_SHARE", "auto_screen"]
