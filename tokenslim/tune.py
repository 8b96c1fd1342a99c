"""``tokenslim.tune``: the most faithful setting that reaches a measured speed-up on this device.

The search needs no labels. Fidelity is measured against the unpatched model on calibration
images (mean KL of the outputs, top-1 agreement; top-1 as well when labels exist); speed is
measured with the interleaved timer on the device, batch size, precision and input size given.
GMACs only steer the search between measurements.

Search, per method in ``methods``:

1. Greedy allocation: starting from no reduction, repeatedly take the one step that costs the
   least fidelity per MAC saved, among: ``step`` more merges in one block, one block's pruning a
   level lower, a larger share of MLP channels removed (every option is evaluated at every step),
   until the MAC ratio reaches the MAC ratio the target needs. Where in the network tokens are
   removed, and how, matters; this finds it from measured sensitivity instead of a fixed ramp. (On
   a class-token model, pruning the last block down to one token costs nothing: only the class
   token is read after it. The search finds that first.)
2. Measure: time the candidate interleaved with the unpatched model. The measured efficiency
   (speed-up / MAC ratio) corrects the MAC ratio the target needs; continue the greedy walk and
   measure again, until the target (plus ``margin``) is met. A point that overshoots it by more
   than 3% sends the walk back to the last point short of it, to approach again with half the
   merge step.
3. Refine: move ``step`` tokens from one block to another while the MACs stay the same; keep moves
   that improve fidelity. Then challenge: the plain schedules (constant ``r``, ToMe's ramp
   ``(r, -1)``) at the same compute, with the pruning found, replace the point if their KL is lower.
4. Contest at the measured target: equal MACs are not equal speed, so once a point reaches the
   aim, the weakest plain schedule of each family (with the pruning found and without) that also
   reaches it when timed is found; the lowest KL among the points that reach the aim wins. A plain
   winner is refined as in 3 and kept refined if it still reaches the aim when timed.

The method with the best fidelity at the target wins; it is re-measured once more. With
``max_drop`` instead of ``speedup`` the greedy walk goes on while the drop (top-1 points when
labels exist, else disagreement in percent) stays within the budget, and the fastest setting found
is returned.

Every evaluated candidate and every timing is appended to ``candidates.jsonl`` in ``out_dir`` when
it finishes; a rerun of the same tuning replays them from that file instead of recomputing, so a
killed run resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.data import Dataset

from .evaluate import evaluate
from .fingerprint import check_same_run, fingerprint
from .journal import append_jsonl, read_jsonl
from .measure.benchmark import compare
from .measure.macs import count_macs
from .schedule import parse_r
from .spec import apply_setting, parse_setting

DEFAULT_METHODS = ("tome", "diffrate")


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
        best: the chosen candidate, with its final (re-)measured speed-up.
        candidates: every candidate evaluated, in order.
        target: the speed-up asked for (or ``None`` with ``max_drop``).
        seconds: wall time of this call (replayed candidates cost nothing).
        files: output files written.
    """

    setting: str
    best: Candidate
    candidates: List[Candidate]
    target: Optional[float]
    max_drop: Optional[float]
    seconds: float
    files: Dict[str, str] = field(default_factory=dict)

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


class _Journal:
    """Append-only record of evaluations and timings, replayed on a rerun."""

    def __init__(self, path: Optional[str], run: Dict[str, Any], fresh: bool) -> None:
        self.path, self.run = path, run
        self.evals: Dict[str, dict] = {}
        self.timings: Dict[str, dict] = {}
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if fresh and os.path.exists(path):
            os.remove(path)
        for lineno, row in read_jsonl(path):
            check_same_run(row.get("run"), run, f"{path}:{lineno}",
                           "pass fresh=True (--fresh) to start over, or another output folder")
            (self.timings if row["kind"] == "timing" else self.evals)[row["setting"]] = row

    def add(self, kind: str, setting: str, values: dict) -> None:
        row = {"kind": kind, "setting": setting, **values, "run": self.run}
        (self.timings if kind == "timing" else self.evals)[setting] = row
        if self.path:
            append_jsonl(self.path, row)


SEARCH_SPACES = ("merge", "prune", "mlp")
KEEP_LEVELS = (1.0, 0.75, 0.5, 0.25, 0.01)
"""Pruning levels a greedy step walks down, per block (0.01 keeps one patch token on models up
to 100 patches: after the last block's attention only the class token is read, so there pruning
everything is free)."""
MLP_STEP, MLP_MAX = 0.125, 0.5
FREE_KL = 1e-7
"""A step that raises the mean KL by less than this costs nothing (float rounding)."""


@dataclass(frozen=True)
class _State:
    """A point of the search space: merges per block, pruning level per block, MLP channel share."""

    r: Tuple[int, ...]
    keep: Tuple[int, ...]  # index into KEEP_LEVELS per block
    mlp: float = 0.0

    def text(self, method: str, extra: str = "") -> str:
        return _schedule_text(self.r, method, extra, [KEEP_LEVELS[k] for k in self.keep], self.mlp)


def _schedule_text(r: Sequence[int], method: str, extra: str = "", keep: Optional[Sequence[float]] = None,
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


def tune(
    model: nn.Module,
    data: Dataset,
    speedup: Optional[float] = 1.5,
    max_drop: Optional[float] = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    step: int = 2,
    search: Sequence[str] = SEARCH_SPACES,
    margin: float = 0.03,
    batch_size: int = 64,
    img_size: Optional[int] = None,
    device: Optional[str] = None,
    precision: str = "float32",
    rounds: int = 25,
    budget_min: float = 20.0,
    eval_batch_size: int = 128,
    num_workers: int = 0,
    method_options: Optional[Dict[str, str]] = None,
    out_dir: Optional[str] = None,
    fresh: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    run_info: Optional[Dict[str, Any]] = None,
) -> TuneResult:
    """Find the most faithful setting that reaches ``speedup`` (or the fastest within ``max_drop``).

    Args:
        model: the unpatched model (left unchanged).
        data: calibration images ``(image, label)``; a few hundred to a few thousand. Labels are
            used for top-1 only when they are valid class indices.
        speedup: measured throughput ratio to reach at ``batch_size`` (interleaved timer).
        max_drop: alternative target: the fastest setting whose drop is at most this many points
            (top-1 with labels, else disagreement in %). Pass ``speedup=None`` with it.
        methods: reduction methods to search (see :mod:`tokenslim.methods`).
        step: tokens added to a block per greedy step.
        search: what a greedy step may change: ``"merge"`` (``step`` more merges in one block),
            ``"prune"`` (one block's pruning one level down :data:`KEEP_LEVELS`, without fusion;
            only on models with a class token, where pruning ranks by class attention) and
            ``"mlp"`` (``0.125`` more of every MLP's hidden channels removed and materialised,
            up to ``0.5``). Every step is judged by the same KL per MAC saved.
        margin: the search aims ``margin`` above the target (``speedup * (1 + margin)``), so that
            an independent re-measurement, which drifts by a few percent on shared machines,
            still reaches the target.
        batch_size, img_size, device, precision, rounds: the timing conditions.
        budget_min: wall-time budget; the search returns its best so far when it runs out.
        method_options: extra settings text per method, e.g. ``{"ppt": "threshold=0.7"}``.
        out_dir: where ``candidates.jsonl``, ``candidates.csv`` and ``tune.json`` go (resumable).
        progress: called with one line per candidate.

    Returns:
        A :class:`TuneResult`; ``result.setting`` is settings text.
    """
    if (speedup is None) == (max_drop is None):
        raise ValueError("give exactly one target: speedup=... (e.g. 1.5) or max_drop=... (points)")
    if speedup is not None and not speedup > 1.0:
        raise ValueError(f"speedup must be > 1 (a speed-up over the unpatched model), got {speedup}")
    if max_drop is not None and not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0 points, got {max_drop}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if budget_min <= 0:
        raise ValueError(f"budget_min must be > 0, got {budget_min}")
    search = tuple(search)
    if not 0 <= margin < 1:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    aim = speedup * (1 + margin) if speedup is not None else None
    unknown = [s for s in search if s not in SEARCH_SPACES]
    if unknown or not search:
        raise ValueError(f"search takes a non-empty subset of {', '.join(SEARCH_SPACES)}; got {list(search)}")
    # Pruning ranks tokens by the class token's attention: only where there is one.
    # Pruning ranks tokens by the class token's attention and, unfused, leaves patches without a
    # token: only where there is a class token and the head reads it alone.
    from .adapters.timm_vit import _pools_patches

    prune_ok = "prune" in search and getattr(model, "cls_token", None) is not None and not _pools_patches(model)
    from .methods import get_method

    for m in methods:
        get_method(m)
    method_options = dict(method_options or {})
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    deadline = start + 60.0 * budget_min
    depth = len(model.blocks)
    run = fingerprint(model, data, target=speedup, max_drop=max_drop, methods=list(methods), step=step,
                      search=list(search), margin=margin, batch_size=batch_size, img_size=img_size,
                      precision=precision, rounds=rounds, method_options=method_options, **(run_info or {}))
    journal = _Journal(os.path.join(out_dir, "candidates.jsonl") if out_dir else None, run, fresh)

    eval_kw = dict(batch_size=eval_batch_size, num_workers=num_workers, device=device, progress=False)
    say(f"calibration: unpatched outputs on {len(data)} images")
    base = evaluate(model, data, keep_logits=True, **eval_kw)
    ref_logits = base.logits
    from .evaluate import dataset_targets

    targets = dataset_targets(data)
    use_labels = targets is not None and all(0 <= t < ref_logits.shape[1] for t in targets)
    base_gmacs = count_macs(model, img_size=img_size).gmacs
    candidates: List[Candidate] = []
    macs_by_plan: Dict[Tuple[Any, ...], float] = {}

    def gmacs_of(candidate_model: nn.Module, method: str, mlp: float) -> float:
        # Compute follows from the token counts (and the method's own matching work): count once.
        from .adapters.timm_vit import token_plan

        key = (method, token_plan(candidate_model, img_size).tokens, mlp)
        if key not in macs_by_plan:
            macs_by_plan[key] = count_macs(candidate_model, img_size=img_size).gmacs
        return macs_by_plan[key]

    def assess(text: str, method: str, phase: str) -> Candidate:
        if text in journal.evals:
            row = journal.evals[text]
        else:
            candidate_model = apply_setting(copy.deepcopy(model), parse_setting(text))
            gmacs = gmacs_of(candidate_model, method, float(parse_setting(text).get("mlp_pruned", 0.0)))
            res = evaluate(candidate_model, data, reference_logits=ref_logits, **eval_kw)
            row = {"method": method, "gmacs": gmacs, "mac_ratio": base_gmacs / gmacs, "kl": res.kl,
                   "agreement": res.agreement, "top1": res.top1 if use_labels else None,
                   "top1_diff": res.top1_diff if use_labels else None}
            journal.add("eval", text, row)
        cand = Candidate(setting=text, method=method, gmacs=row["gmacs"], mac_ratio=row["mac_ratio"], kl=row["kl"],
                         agreement=row["agreement"], top1=row["top1"], top1_diff=row["top1_diff"], phase=phase)
        timing = journal.timings.get(text)
        if timing:
            cand.throughput_ratio = timing["throughput_ratio"]
            cand.throughput_ratio_low, cand.throughput_ratio_high = timing["low"], timing["high"]
        candidates.append(cand)
        return cand

    def measure(cand: Candidate, again: bool = False) -> float:
        key = cand.setting + (" (re-measured)" if again else "")
        if key not in journal.timings:
            say(f"timing {cand.setting} (MAC ratio {cand.mac_ratio:.2f}) interleaved with the unpatched model")
            models = {"none": model, "candidate": apply_setting(copy.deepcopy(model), parse_setting(cand.setting))}
            result = compare(models, baseline="none", batch_size=batch_size, img_size=img_size, rounds=rounds,
                             latency=False, device=device, precision=precision)
            tp = result.throughput["candidate"]
            journal.add("timing", key, {"throughput_ratio": tp.median, "low": tp.low, "high": tp.high})
        t = journal.timings[key]
        cand.throughput_ratio, cand.throughput_ratio_low, cand.throughput_ratio_high = (
            t["throughput_ratio"], t["low"], t["high"])
        say(f"  {cand.setting}: measured {cand.throughput_ratio:.2f}x (target {speedup})")
        return cand.throughput_ratio

    def out_of_time() -> bool:
        return time.perf_counter() > deadline

    def moves(state: _State) -> List[Tuple[Tuple[Any, ...], _State]]:
        """Every one-step extension of ``state`` within the search space, keyed by what it changes."""
        out = []
        if "merge" in search:
            for i in range(depth):
                out.append((("merge", i), _State(state.r[:i] + (state.r[i] + merge_step,) + state.r[i + 1:],
                                                 state.keep, state.mlp)))
        if prune_ok:
            for i in range(depth):
                if state.keep[i] + 1 < len(KEEP_LEVELS):
                    keep = state.keep[:i] + (state.keep[i] + 1,) + state.keep[i + 1:]
                    out.append((("prune", i), _State(state.r, keep, state.mlp)))
        if "mlp" in search and state.mlp + MLP_STEP <= MLP_MAX + 1e-9:
            out.append((("mlp",), _State(state.r, state.keep, round(state.mlp + MLP_STEP, 4))))
        return out

    stale_scores: Dict[str, Dict[Tuple[Any, ...], Tuple[float, float]]] = {}

    def greedy(method: str, extra: str, state: _State, mac_goal: Optional[float], current: Optional[Candidate]):
        """Extend ``state`` greedily until ``mac_goal`` (or the drop budget) is reached.

        Lazy greedy: a step's cost per MAC only grows as more is removed, so each option's score
        from an earlier step is a lower bound. Options are evaluated in the order of those bounds,
        and the walk stops evaluating once the best fresh score beats every remaining bound.
        """
        stale = stale_scores.setdefault(method, {})
        while not out_of_time():
            if mac_goal is not None and current is not None and current.mac_ratio >= mac_goal:
                return state, current
            best, best_state, best_score = None, None, None
            base_cost = current.kl if current is not None else 0.0
            base_macs = current.gmacs if current is not None else base_gmacs
            options = sorted(moves(state), key=lambda kt: stale.get(kt[0], (-math.inf, 0.0)))
            for key, trial in options:
                if best_score is not None and key in stale and stale[key] >= best_score:
                    break  # every remaining option is bounded below by a worse score
                cand = assess(trial.text(method, extra), method, "greedy")
                saved = base_macs - cand.gmacs
                if saved <= 1e-9:
                    stale[key] = (math.inf, 0.0)  # nothing left to remove there
                    continue
                # Free steps (KL unchanged to rounding) tie at zero cost: the larger saving wins.
                cost = cand.kl - base_cost
                score = (max(cost, 0.0) / saved if cost > FREE_KL else 0.0, -saved)
                stale[key] = score
                if best_score is None or score < best_score:
                    best, best_state, best_score = cand, trial, score
            if best is None:
                return state, current  # nothing more can be removed
            if max_drop is not None and best.drop > max_drop:
                return state, current
            state, current = best_state, best
            say(f"{method}: {best.setting}  MAC x{best.mac_ratio:.2f}  KL {best.kl:.4f}  agree {best.agreement:.2f}%")
        return state, current

    def refine(method: str, extra: str, state: _State, current: Candidate) -> Tuple[_State, Candidate]:
        """Move ``step`` merges between blocks at equal compute while the KL improves."""
        improved = True
        while improved and not out_of_time() and "merge" in search:
            improved = False
            for i in range(depth):
                for j in range(depth):
                    s = merge_step
                    if i == j or state.r[i] < s or out_of_time():
                        continue
                    r = list(state.r)
                    r[i] -= s
                    r[j] += s
                    trial = _State(tuple(r), state.keep, state.mlp)
                    cand = assess(trial.text(method, extra), method, "refine")
                    if cand.gmacs <= current.gmacs * 1.002 and cand.kl < current.kl - 1e-6:
                        state, current, improved = trial, cand, True
                        say(f"{method}: refined to {cand.setting}  KL {cand.kl:.4f}")
        return state, current

    def plain(method: str, extra: str, family: str, k: int, keep: Tuple[int, ...], mlp: float,
              phase: str) -> Tuple[_State, Candidate]:
        """Strength ``k`` of a plain schedule family: constant ``r=k`` or ToMe's ramp ``(k, -1)``."""
        trial = _State(tuple(parse_r(k if family == "constant" else (k, -1), depth)), keep, mlp)
        return trial, assess(trial.text(method, extra), method, phase)

    def weakest_plain(method: str, extra: str, family: str, keep: Tuple[int, ...], mlp: float, phase: str,
                      enough: Callable[[Candidate], bool]) -> Optional[Tuple[int, _State, Candidate]]:
        """The weakest member of a family that is ``enough``, walking up in strength; ``None`` when
        time runs out or the family saturates first (every block at its limit)."""
        previous = math.inf
        for k in range(1, 65):
            if out_of_time():
                return None
            trial, cand = plain(method, extra, family, k, keep, mlp, phase)
            if enough(cand):
                return k, trial, cand
            if cand.gmacs >= previous * (1 - 1e-9):
                return None
            previous = cand.gmacs
        return None

    def challenge(method: str, extra: str, state: _State, current: Candidate) -> Tuple[_State, Candidate]:
        """Pit the search's point against the plain schedules users try first: constant ``r`` and
        ToMe's decreasing ramp ``(r, -1)``, each with the pruning and channels found so far. The
        weakest member of each family that removes at least as much compute is evaluated; the
        lowest KL wins. A greedy walk can get stuck where a plain schedule is better."""
        if "merge" not in search:
            return state, current
        best_state, best = state, current
        for family in ("constant", "ramp"):
            found = weakest_plain(method, extra, family, state.keep, state.mlp, "challenge",
                                  lambda c: c.gmacs <= current.gmacs * 1.002)
            if found is not None and found[2].kl < best.kl:
                _, best_state, best = found
                say(f"{method}: plain schedule {best.setting} beats the search: KL {best.kl:.4f}")
        return best_state, best

    def contest(method: str, extra: str, state: _State, current: Candidate) -> Candidate:
        """At the measured target (``current`` reaches the aim when timed), the plain schedules
        challenge the point found: for constant ``r`` and ToMe's ramp ``(r, -1)``, each with the
        pruning found and without any, the weakest member that reaches the aim when timed. Equal
        MACs are not equal speed (the measured efficiency differs between schedules), so this
        compares what the user gets: fidelity at the measured speed. The lowest KL among the points
        that reach the aim wins."""
        if "merge" not in search:
            return current
        efficiency = current.throughput_ratio / current.mac_ratio
        best, best_state = current, state
        for family in ("constant", "ramp"):
            for keep in [state.keep] + ([(0,) * depth] if any(state.keep) else []):
                # The weakest member predicted (by the point's efficiency) to reach the aim ...
                found = weakest_plain(method, extra, family, keep, state.mlp, "contest",
                                      lambda c: c.mac_ratio * efficiency >= aim * 0.97)
                if found is None:
                    continue
                # ... then timed, one strength up or down until it is the weakest that reaches it.
                k = start = found[0]
                reached: Optional[Tuple[_State, Candidate]] = None
                while 1 <= k < 64 and not out_of_time():
                    trial, cand = plain(method, extra, family, k, keep, state.mlp, "contest")
                    if reached is None and k != start and cand.kl >= best.kl:
                        break  # going up, it cannot win: stronger members lose even more
                    if measure(cand) >= aim:
                        reached, k = (trial, cand), k - 1
                    elif reached is not None:
                        break
                    else:
                        k += 1
                if reached is not None and reached[1].kl < best.kl:
                    best_state, best = reached
                    say(f"{method}: plain {best.setting} reaches {best.throughput_ratio:.2f}x with a lower KL "
                        f"({best.kl:.4f}): it replaces the search's point")
        if best is not current:
            # The greedy walk missed this basin: refine from the plain schedule instead, and keep
            # the refined point if it still reaches the aim when timed.
            _, refined = refine(method, extra, best_state, best)
            if refined is not best and measure(refined) >= aim:
                best = refined
        return best

    merge_step = step  # read by moves() and refine(); the speed-up loop below halves it after an overshoot
    finals: List[Candidate] = []
    for method in methods:
        extra = method_options.get(method, "")
        state, current = _State((0,) * depth, (0,) * depth), None
        if speedup is not None:
            goal = speedup  # MAC ratio needed, corrected by measured efficiency
            below: Optional[Tuple[_State, Candidate]] = None  # the last point measured short of the aim
            reached: Optional[Candidate] = None
            merge_step = step
            for _ in range(8):
                state, current = greedy(method, extra, state, goal, current)
                if current is None or out_of_time():
                    break
                state, current = refine(method, extra, state, current)
                state, current = challenge(method, extra, state, current)
                measured = measure(current)
                efficiency = measured / current.mac_ratio
                if measured >= aim:
                    reached = current
                    if measured <= aim * 1.03 or below is None or merge_step == 1:
                        break
                    # Overshot by a whole coarse step: go back to the last point short of the aim
                    # and approach again in smaller steps (less reduction, less accuracy lost).
                    merge_step = max(1, merge_step // 2)
                    state, current = below
                    stale_scores[method] = {}  # bounds from beyond this point no longer hold
                    goal = aim / max(efficiency, 0.3) * 1.01
                    say(f"{method}: {measured:.2f}x overshoots {aim:.2f}; back to {current.setting} with steps of "
                        f"{merge_step}, aiming for MAC ratio {goal:.2f}")
                    continue
                if reached is not None:
                    break  # the finer approach fell short: keep the point that reached the aim
                below = (state, current)
                goal = max(goal, aim / max(efficiency, 0.3)) * 1.02
                say(f"{method}: {measured:.2f}x measured < {aim:.2f} (target + margin); aiming for MAC ratio {goal:.2f}")
            if reached is not None and (current is None or (current.throughput_ratio or 0) < aim):
                current = reached
            if current is not None and (current.throughput_ratio or 0) >= aim:
                current = contest(method, extra, state, current)
        else:
            state, current = greedy(method, extra, state, None, current)
            if current is not None:
                measure(current)
        if current is not None:
            finals.append(current)
    if not finals:
        raise RuntimeError("tuning found no setting that reduces anything; is the model too small for step="
                           f"{step}?")
    if speedup is not None:
        reached = [c for c in finals if (c.throughput_ratio or 0) >= aim]
        pool = reached or finals
        best = min(pool, key=lambda c: (c.kl, -(c.throughput_ratio or 0))) if reached else \
            max(pool, key=lambda c: c.throughput_ratio or 0)
        measure(best, again=True)  # an independent re-measurement of the winner
    else:
        best = max(finals, key=lambda c: c.throughput_ratio or 0)
    result = TuneResult(setting=best.setting, best=best, candidates=candidates, target=speedup, max_drop=max_drop,
                        seconds=time.perf_counter() - start)
    if out_dir:
        result.files = _write(result, out_dir)
    return result


def _write(result: TuneResult, out_dir: str) -> Dict[str, str]:
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
                   "candidates": result.evaluated}, f, indent=2)
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


__all__ = ["KEEP_LEVELS", "SEARCH_SPACES", "Candidate", "TuneResult", "candidates_png", "tune"]
