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

Before the walks, the weakest constant ``r`` and ramp ``(r, -1)`` that reach the target when
timed give the *incumbent*: the result is never a setting with a higher calibration KL than it,
and a budget stop returns it rather than an unfinished point. On deep models (``screen``) the
walk starts from 75% of the incumbent's merges, scores options on a subset, repeats a step while
it stays the cheapest, and refines between nearby blocks (:mod:`tokenslim.tune.search`).

The method with the best fidelity at the target wins; it is re-measured once more. With a speed
target, a share of the calibration images (``confirm``, 25% by default) is split off before the
search and never searched on: at the end, the search's best few settings that reach the aim and
the incumbent are evaluated on it, and a setting more invasive than plain ToMe (a searched
schedule, then pruning, then channels) is returned only when it is better there by more than
``confirm_z`` standard errors of the paired KL difference (:mod:`tokenslim.tune.confirm`). With
``max_drop`` instead of ``speedup`` the greedy walk goes on while the drop (top-1 points when
labels exist, else disagreement in percent) stays within the budget, and the fastest setting found
is returned.

The phases are the methods of :class:`tokenslim.tune.search.Search`; the search space (points,
steps, plain schedule families) is :mod:`tokenslim.tune.space`; candidates, the journal and the
output files are :mod:`tokenslim.tune.record`.

Every evaluated candidate and every timing is appended to ``candidates.jsonl`` in ``out_dir`` when
it finishes; a rerun of the same tuning replays them from that file instead of recomputing, so a
killed run resumes where it stopped.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.data import Dataset

from ..fingerprint import fingerprint
from .confirm import DEFAULT_FINALISTS, DEFAULT_SHARE, DEFAULT_Z, MIN_IMAGES, Confirmation, split_indices
from .confirm import confirm as confirm_pick
from .record import Candidate, Journal, TuneResult, candidates_png, write_outputs
from .search import Search
from .space import KEEP_LEVELS, SEARCH_SPACES

DEFAULT_METHODS = ("tome", "diffrate")


def tune(model: nn.Module, data: Dataset, speedup: Optional[float] = 1.5, max_drop: Optional[float] = None,
         methods: Sequence[str] = DEFAULT_METHODS, step: int = 2, search: Sequence[str] = SEARCH_SPACES,
         margin: float = 0.03, batch_size: int = 64, img_size: Optional[int] = None, device: Optional[str] = None,
         precision: str = "float32", rounds: int = 25, budget_min: float = 20.0, eval_batch_size: int = 128,
         num_workers: int = 0, method_options: Optional[Dict[str, str]] = None, out_dir: Optional[str] = None,
         fresh: bool = False, progress: Optional[Callable[[str], None]] = None,
         run_info: Optional[Dict[str, Any]] = None, screen: Optional[int] = None, incumbent: bool = True,
         confirm: float = DEFAULT_SHARE, finalists: int = DEFAULT_FINALISTS, confirm_z: float = DEFAULT_Z,
         seed: int = 0) -> TuneResult:
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
        screen: calibration images a greedy step scores every option on before the best
            :data:`~tokenslim.tune.search.PROMOTE` are evaluated on all of them (successive halving);
            0 turns it off; ``None`` picks :func:`~tokenslim.tune.search.auto_screen` (on for deep
            models with plenty of images, off on the 6-block reference model).
        incumbent: first find, timed, the weakest plain ToMe schedule (constant ``r`` or the ramp)
            that reaches the target; the result is never worse on the calibration KL than it, and a
            search stopped by the budget returns it rather than an unfinished point.
        confirm: share of the calibration images the search never sees: at the end they decide
            between the search's ``finalists`` best settings that reach the target and the
            incumbent (:mod:`tokenslim.tune.confirm`); a more invasive setting wins only when its
            KL there is lower by more than ``confirm_z`` standard errors of the paired difference.
            0 turns it off; it is skipped (and said) below
            :data:`~tokenslim.tune.confirm.MIN_IMAGES` images. Speed targets only.
        finalists, confirm_z: see ``confirm``.
        seed: the seed of the confirmation split (the same seed, the same split; a rerun resumes it).

    Returns:
        A :class:`TuneResult`; ``result.setting`` is settings text.
    """
    _check_arguments(speedup, max_drop, step, budget_min, confirm, finalists, confirm_z, margin)
    from ..methods import get_method
    from ..ranks import current

    ranks = current()  # under torchrun only rank 0 speaks; every rank searches alike
    say = (progress or (lambda msg: None)) if ranks.is_main else (lambda msg: None)
    search, prune_ok = _search_space(model, search, say)
    aim = speedup * (1 + margin) if speedup is not None else None
    for m in methods:
        get_method(m)
    method_options = dict(method_options or {})
    start = time.perf_counter()
    deadline = start + 60.0 * budget_min
    run = fingerprint(model, data, target=speedup, max_drop=max_drop, methods=list(methods), step=step,
                      search=list(search), margin=margin, batch_size=batch_size, img_size=img_size,
                      precision=precision, rounds=rounds, method_options=method_options, **(run_info or {}))
    search_data, confirm_data, why_not = _split(data, confirm if speedup is not None else 0.0, seed)
    if why_not:
        say(why_not)
    run = {**run, "confirm": [confirm, finalists, confirm_z, seed] if confirm_data is not None else None}
    screen = _screen_size(model, search, prune_ok, step, len(search_data), screen)
    run = {**run, "screen": screen, "incumbent": bool(incumbent)}
    journal = Journal(os.path.join(out_dir, "candidates.jsonl") if out_dir else None, run, fresh)
    searcher = Search(model, search_data, journal, speedup, max_drop, aim, search, prune_ok, step, deadline,
                      timing=dict(batch_size=batch_size, img_size=img_size, rounds=rounds, device=device,
                                  precision=precision),
                      eval_kw=dict(batch_size=eval_batch_size, num_workers=num_workers, device=device,
                                   progress=False),
                      say=say, screen=screen)
    if screen:
        say(f"screening: every greedy option on {screen} images first, the best {searcher.promote} on all "
            f"{len(search_data)}")
    finals, held = _search_methods(searcher, methods, method_options, speedup is not None and incumbent)
    if not finals:
        if searcher.out_of_time():
            raise RuntimeError(f"the budget of {budget_min} min ran out before any setting reached the end of a "
                               "phase; give a larger budget (--budget-min)")
        raise RuntimeError("tuning found no setting that reduces anything; is the model too small for step="
                           f"{step}?")
    best, confirmation = _choose(searcher, finals, held, aim, confirm_data, finalists, confirm_z)
    result = TuneResult(setting=best.setting, best=best, candidates=searcher.candidates, target=speedup,
                        max_drop=max_drop, seconds=time.perf_counter() - start, confirmation=confirmation,
                        stopped_by_budget=searcher.out_of_time(), spent=dict(searcher.spent))
    say(budget_line(result.spent, result.seconds, ranks.world_size))
    if out_dir and ranks.is_main:
        result.files = write_outputs(result, out_dir)
    return result


def budget_line(spent: Dict[str, float], seconds: float, world_size: int) -> str:
    """Where the wall time went, largest share first: the line ``tune`` ends its log with."""
    parts = ", ".join(f"{phase} {sec / 60:.1f} min ({100 * sec / max(seconds, 1e-9):.0f}%)"
                      for phase, sec in sorted(spent.items(), key=lambda kv: -kv[1]))
    where = f"evaluations on {world_size} ranks, timings on rank 0 alone" if world_size > 1 else "one process"
    return f"budget: {seconds / 60:.1f} min: {parts or 'everything replayed from the journal'} ({where})"


def _screen_size(model: nn.Module, search: Tuple[str, ...], prune_ok: bool, step: int, images: int,
                 screen: Optional[int]) -> int:
    """The screening subset's size: ``screen`` as given, or :func:`~tokenslim.tune.search.auto_screen`'s."""
    from .search import auto_screen
    from .space import Point, moves

    options = len(moves(Point.origin(len(model.blocks)), search, prune_ok, step))
    screen = auto_screen(images, options) if screen is None else int(screen)
    if screen < 0:
        raise ValueError(f"screen must be >= 0 images (0: off), got {screen}")
    return screen


def _search_methods(searcher: Search, methods: Sequence[str], method_options: Dict[str, str],
                    incumbent: bool) -> Tuple[List[Candidate], Optional[Candidate]]:
    """The plain-ToMe incumbent (if asked for) and each method's search result: ``(finals, incumbent)``."""
    finals: List[Candidate] = []
    held = None
    if incumbent:
        held = searcher.incumbent("tome", "")  # plain ToMe, whatever methods are searched
        if held is not None:
            finals.append(held)
    for method in methods:
        extra = method_options.get(method, "")
        current = searcher.reach_speed(method, extra, held) if searcher.speedup is not None else \
            searcher.within_drop(method, extra)
        if current is not None:
            finals.append(current)
    return finals, held


def _choose(searcher: Search, finals: List[Candidate], held: Optional[Candidate], aim: Optional[float],
            confirm_data: Optional[Dataset], finalists: int, confirm_z: float):
    """The setting returned, and the confirmation that chose it (``None`` if none ran)."""
    if aim is None:
        return max(finals, key=lambda c: c.throughput_ratio or 0), None
    confirmation = None
    reached = [c for c in finals if (c.throughput_ratio or 0) >= aim]
    if reached:
        best = min(reached, key=lambda c: (c.kl, -(c.throughput_ratio or 0)))
        if confirm_data is not None:
            # Not the lowest KL on the searched images (optimistic after ~100 candidates): the
            # unseen images decide, leaving plain ToMe only on evidence.
            best, confirmation = confirm_pick(searcher, held, confirm_data, finalists, confirm_z)
    else:
        best = max(finals, key=lambda c: c.throughput_ratio or 0)
    searcher.measure(best, again=True)  # an independent re-measurement of the winner
    return best, confirmation


def _check_arguments(speedup, max_drop, step, budget_min, confirm, finalists, confirm_z, margin) -> None:
    """Refuse bad options before anything is evaluated, naming the argument."""
    if (speedup is None) == (max_drop is None):
        raise ValueError("give exactly one target: speedup=... (e.g. 1.5) or max_drop=... (points)")
    if speedup is not None and not speedup > 1.0:
        raise ValueError(f"speedup must be > 1 (a speed-up over the unpatched model), got {speedup}")
    if max_drop is not None and not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0 points, got {max_drop}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if not (budget_min > 0 and math.isfinite(budget_min)):
        raise ValueError(f"budget_min must be a finite number of minutes > 0, got {budget_min}")
    if not 0 <= confirm < 1:
        raise ValueError(f"confirm is the share of calibration images kept for confirmation, in [0, 1); got {confirm}")
    if finalists < 1:
        raise ValueError(f"finalists must be >= 1, got {finalists}")
    if not (confirm_z >= 0 and math.isfinite(confirm_z)):
        raise ValueError(f"confirm_z must be a finite number of standard errors >= 0, got {confirm_z}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")


def _search_space(model: nn.Module, search: Sequence[str],
                  progress: Optional[Callable[[str], None]]) -> Tuple[Tuple[str, ...], bool]:
    """What the search may change on this model, and whether pruning steps are allowed."""
    search = tuple(search)
    from ..adapters.timm_channels import mlp_prunable

    if "mlp" in search and not mlp_prunable(model):
        # e.g. an MLP with a norm over its hidden channels (EVA-02's SwiGLU): search what does apply.
        search = tuple(s for s in search if s != "mlp")
        if not search:
            raise ValueError("search='mlp' alone: this model's MLPs cannot lose channels exactly (see "
                             "tokenslim.prune_channels for the reason); search merge and/or prune")
        if progress is not None:
            progress("this model's MLPs cannot lose channels exactly: searching " + ", ".join(search))
    unknown = [s for s in search if s not in SEARCH_SPACES]
    if unknown or not search:
        raise ValueError(f"search takes a non-empty subset of {', '.join(SEARCH_SPACES)}; got {list(search)}")
    # Pruning ranks tokens by the class token's attention and, unfused, leaves patches without a
    # token: only where there is a class token and the head reads it alone.
    from ..adapters.timm_base import pools_patches as _pools_patches

    return search, "prune" in search and getattr(model, "cls_token", None) is not None and not _pools_patches(model)


def _split(data: Dataset, share: float, seed: int):
    """``(search data, confirmation data or None, why confirmation is off or None)``."""
    if share <= 0:
        return data, None, None
    search_idx, confirm_idx = split_indices(len(data), share, seed)
    if len(confirm_idx) < MIN_IMAGES:
        return data, None, (f"confirmation skipped: {len(confirm_idx)} of {len(data)} calibration images is fewer than "
                            f"{MIN_IMAGES}; the search's own best is returned (give more images to confirm it)")
    from torch.utils.data import Subset

    return Subset(data, search_idx), Subset(data, confirm_idx), None


__all__ = ["Confirmation", "DEFAULT_METHODS", "KEEP_LEVELS", "SEARCH_SPACES", "Candidate", "Search", "TuneResult", "candidates_png",
           "tune"]
