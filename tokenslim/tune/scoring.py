"""Evaluation and timing for ``tune``'s search, each through the journal (a rerun replays
every row instead of recomputing it).

:class:`Scorer` holds what every phase of the search reads: the unpatched model and its outputs
on the calibration images (and on the screening subset of a deep model's search), the journal,
the deadline, and the candidates seen so far. The phases (:mod:`.walk`, :mod:`.refine`,
:mod:`.plain_schedules`) call :meth:`Scorer.assess` for fidelity and :meth:`Scorer.measure` for
measured speed; they never evaluate or time a model themselves.

Under ``torchrun`` every rank runs the same search: each evaluation is spread over the ranks'
shards of the images (exact sums, so every rank sees the same numbers and takes the same branch),
each timing is taken by rank 0 alone while the others wait
(:func:`tokenslim.measure.alone.time_alone`), and whether the budget is spent is rank 0's clock's
decision. :attr:`Scorer.spent` says where the wall time went, per phase.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Dict, List, Optional

from torch import nn
from torch.utils.data import Dataset, Subset

from ..evaluate import dataset_targets, evaluate
from ..measure.alone import time_alone
from ..measure.benchmark import compare
from ..measure.macs import count_macs
from ..ranks import current, on_main, shard_indices
from ..spec import apply_setting, parse_setting
from .record import Candidate, Journal


class Scorer:
    """Fidelity and speed of settings on ``model`` (unchanged) with calibration ``data``.

    Args:
        model: the unpatched model.
        data: calibration images.
        journal: the record replayed instead of recomputing.
        deadline: ``time.perf_counter()`` value at which the budget ends.
        timing: keyword arguments of the interleaved timer (batch size, rounds, device, ...).
        eval_kw: keyword arguments of :func:`tokenslim.evaluate.evaluate`.
        say: progress lines.
        screen: images of the screening subset (the first ``screen`` of ``data``; 0: none).
        speedup: the target, for progress lines only.
    """

    def __init__(self, model: nn.Module, data: Dataset, journal: Journal, deadline: float, timing: Dict[str, Any],
                 eval_kw: Dict[str, Any], say: Callable[[str], None], screen: int = 0,
                 speedup: Optional[float] = None) -> None:
        self.model, self.data, self.journal = model, data, journal
        self.deadline, self.timing, self.eval_kw, self.say = deadline, timing, eval_kw, say
        self.screen, self.speedup = screen, speedup
        self.candidates: List[Candidate] = []
        self._macs_by_plan: Dict[Any, float] = {}
        self.spent: Dict[str, float] = {}
        self.ranks = current()
        say(f"calibration: unpatched outputs on {len(data)} images")
        started = time.perf_counter()
        # Each rank keeps the unpatched outputs of its own shard: computed once, never gathered.
        self.ref_logits = evaluate(model, data, keep_logits=True, **eval_kw).logits
        self.book("calibration", started)
        targets = dataset_targets(data)
        self.use_labels = targets is not None and all(0 <= t < self.ref_logits.shape[1] for t in targets)
        self.base_gmacs = count_macs(model, img_size=timing.get("img_size")).gmacs
        if screen:
            self.screen_data = Subset(data, list(range(min(screen, len(data)))))
            # The screening subset is data's first images: each rank's shard of it is a prefix of its shard.
            own = len(shard_indices(len(self.screen_data), self.ranks.rank, self.ranks.world_size,
                                    eval_kw.get("batch_size", 64)))
            self.screen_logits = self.ref_logits[:own]

    def out_of_time(self) -> bool:
        """Whether the budget is spent (rank 0's clock decides for every rank, so none walks on alone)."""
        return on_main(lambda: time.perf_counter() > self.deadline, self.ranks)

    def book(self, phase: str, started: float) -> None:
        """Add the wall time since ``started`` to ``phase`` in :attr:`spent`."""
        self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - started

    def _gmacs(self, candidate_model: nn.Module, method: str, mlp: float) -> float:
        # Compute follows from the token counts (and the method's own matching work): count once.
        from ..patching import token_plan  # the adapters sit above tune's pure parts; imported late

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
            started = time.perf_counter()
            setting = parse_setting(text)
            candidate_model = apply_setting(copy.deepcopy(self.model), setting)
            gmacs = self._gmacs(candidate_model, method, float(setting.get("mlp_pruned", 0.0)))
            res = evaluate(candidate_model, self.data, reference_logits=self.ref_logits, **self.eval_kw)
            self.book(phase, started)
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
            started = time.perf_counter()
            result = time_alone(lambda: compare(models, baseline="none", latency=False, **self.timing))
            self.book("timing", started)
            tp = result.throughput["candidate"]
            self.journal.add("timing", key, {"throughput_ratio": tp.median, "low": tp.low, "high": tp.high})
        t = self.journal.timings[key]
        cand.throughput_ratio, cand.throughput_ratio_low, cand.throughput_ratio_high = (
            t["throughput_ratio"], t["low"], t["high"])
        self.say(f"  {cand.setting}: measured {cand.throughput_ratio:.2f}x (target {self.speedup})")
        return cand.throughput_ratio


    def assess_screen(self, text: str, method: str) -> Dict[str, float]:
        """KL and GMACs of ``text`` on the screening subset only (journalled like a full one)."""
        key = f"{text} @screen{len(self.screen_data)}"
        if key not in self.journal.evals:
            started = time.perf_counter()
            setting = parse_setting(text)
            candidate_model = apply_setting(copy.deepcopy(self.model), setting)
            gmacs = self._gmacs(candidate_model, method, float(setting.get("mlp_pruned", 0.0)))
            res = evaluate(candidate_model, self.screen_data, reference_logits=self.screen_logits, **self.eval_kw)
            self.book("screen", started)
            self.journal.add("eval", key, {"method": method, "gmacs": gmacs, "kl": res.kl, "screen": True})
        row = self.journal.evals[key]
        return {"gmacs": row["gmacs"], "kl": row["kl"]}


__all__ = ["Scorer"]
