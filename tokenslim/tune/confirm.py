"""The confirmation step of ``tune``: a part of the calibration images the search never saw
decides between the search's best few settings and the plain-ToMe incumbent.

Why: the search scores about a hundred candidates on the same images and keeps the best, so the
best's score is optimistic by construction (a winner's curse). On a 12-block CIFAR-10 model that
was not in the repository, picks that looked better than plain ToMe on the calibration images
were 0.46 and 1.84 points worse on unseen test images. The confirmation images are split off
before the search (deterministically per seed, never overlapping) and used once, at the end.

The rule (:func:`decide`): the options are ordered from the least to the most invasive kind of
reduction, plain ToMe (the incumbent), a searched merge schedule, with token pruning, with
channel pruning; a more invasive option replaces the current choice only when its per-image KL
to the unpatched model on the confirmation images is lower by more than ``z`` standard errors
of the paired difference. So every kind of reduction is evidence-bound: channel pruning, whose
cost on unseen images the search's KL underestimates most, enters only where the confirmation
part supports it, and the incumbent is left only on evidence.

:func:`confirm` runs the evaluations through the search's journal; the rest are pure functions
on tensors and candidates.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..evaluate import evaluate
from ..ranks import current, gather_rows
from ..spec import apply_setting, parse_setting

DEFAULT_SHARE = 0.25
"""Share of the calibration images kept for confirmation."""
DEFAULT_FINALISTS = 3
"""Search candidates (reaching the aim when timed, lowest search KL first) confirmed against the incumbent."""
DEFAULT_Z = 1.5
"""Standard errors by which a more invasive option must beat the current choice on the confirmation images.

Chosen from six measured runs (docs/tuning.md): at 2 the 12-block model at 2x kept plain ToMe
although the search's pick was better on 9,000 held-out images; 1.5 leaves it, and changes no
other decision (``scripts/confirm_z.py`` replays the journalled runs at any ``z``)."""
MIN_IMAGES = 32
"""Fewer confirmation images than this cannot tell settings apart: confirmation is skipped (and said)."""

LEVELS = ("plain ToMe", "merge schedule", "token pruning", "channel pruning")


def split_indices(n: int, share: float, seed: int) -> Tuple[List[int], List[int]]:
    """``(search, confirm)`` indices of ``n`` calibration images: a seeded random ``share`` of them
    confirms, the rest is searched; disjoint, each sorted, the same for the same arguments."""
    if not 0 <= share < 1:
        raise ValueError(f"confirm share must lie in [0, 1), got {share}")
    k = int(round(n * share))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    confirm = sorted(order[:k])
    chosen = set(confirm)
    return [i for i in range(n) if i not in chosen], confirm


def per_image_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(reference || model)`` of the softmax outputs, one value per image (float64), as
    :func:`tokenslim.evaluate.evaluate` averages it."""
    ref_logp = ref_logits.double().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logits.double().log_softmax(-1))).sum(-1)


def paired(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error of ``a - b`` over the same images."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    n = d.numel()
    if n < 2:
        return float(d.mean()) if n else 0.0, math.inf
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(n))


def level(setting: str, incumbent: Optional[str] = None) -> int:
    """How invasive a setting is: 0 the incumbent, 1 a merge schedule, 2 with token pruning, 3 with channels."""
    if incumbent is not None and setting == incumbent:
        return 0
    parsed = parse_setting(setting)
    if parsed.get("mlp_pruned") or parsed.get("heads_pruned"):
        return 3
    if parsed.get("keep_rate") is not None:
        return 2
    return 1


@dataclass
class Finalist:
    """One option confirmed: its KL on the search part and on the confirmation part, and its paired
    difference (KL, this minus the choice it was tested against) with the standard error."""

    setting: str
    level: int
    search_kl: float
    confirm_kl: float
    against: str = ""
    diff: Optional[float] = None
    se: Optional[float] = None
    accepted: bool = False


@dataclass
class Confirmation:
    """What the confirmation step saw and decided (in ``TuneResult.confirmation`` and ``tune.json``).

    Attributes:
        search_images, confirm_images: the split of the calibration images.
        scored: distinct settings the search scored on its part (how optimistic its best can be).
        incumbent: the plain-ToMe incumbent's setting (``None`` if there was none).
        chosen: the setting returned.
        diff, se: the chosen setting's paired KL difference against the incumbent on the
            confirmation images, and its standard error (0 and 0 when the incumbent is chosen).
        z: the rule's threshold in standard errors.
        reason: one sentence saying why.
        finalists: every option, in the order the rule tested them.
        seconds: wall time of the step in this run (a resumed step replays journalled rows and
            costs about nothing), to set against ``TuneResult.seconds``.
    """

    search_images: int
    confirm_images: int
    scored: int
    incumbent: Optional[str]
    chosen: str
    diff: float
    se: float
    z: float
    reason: str
    finalists: List[Finalist] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the log."""
        if self.incumbent is None:
            return f"confirmation on {self.confirm_images} unseen images: {self.reason}"
        return (f"confirmation on {self.confirm_images} unseen images (search on {self.search_images}, {self.scored} "
                f"settings scored): {self.chosen} vs incumbent {self.incumbent}: KL difference {self.diff:+.5f} "
                f"+- {self.se:.5f}; {self.reason} ({self.seconds:.0f} s)")


def decide(options: Sequence[Tuple[str, float]], kls: Dict[str, List[float]], incumbent: Optional[str],
           z: float = DEFAULT_Z) -> Tuple[str, List[Finalist], str]:
    """Apply the rule to ``options`` (``(setting, search KL)``, the incumbent among them if any)
    with their per-image confirmation KLs ``kls``.

    Returns:
        ``(chosen setting, finalists in test order, reason)``.
    """
    finalists = [Finalist(s, level(s, incumbent), kl, float(sum(kls[s]) / max(len(kls[s]), 1)))
                 for s, kl in options]
    finalists.sort(key=lambda f: (f.level, f.confirm_kl))
    current = finalists[0]
    current.accepted = True
    for f in finalists[1:]:
        f.against = current.setting
        f.diff, f.se = paired(kls[f.setting], kls[current.setting])
        if f.diff + z * f.se < 0:
            f.accepted, current = True, f
    if incumbent is None:
        reason = f"no plain-ToMe incumbent; {current.setting} ({LEVELS[current.level]}) is the least invasive option " \
                 f"not beaten by more than {z:g} standard errors"
    elif current.setting == incumbent:
        beaten = [f for f in finalists[1:] if f.diff is not None and f.diff < 0]
        reason = (f"kept plain ToMe: no searched setting is better on the unseen images by more than {z:g} standard "
                  "errors" + (f" (the closest, {beaten[0].setting}, by {-beaten[0].diff:.5f} +- {beaten[0].se:.5f})"
                              if beaten else " (none is better at all)"))
    else:
        reason = f"{current.setting} ({LEVELS[current.level]}) beats {current.against} on the unseen images by more " \
                 f"than {z:g} standard errors"
    return current.setting, finalists, reason


def confirm(search: Any, held: Optional[Any], data: Any, finalists: int, z: float) -> Tuple[Any, Optional[Confirmation]]:
    """The confirmation step after a :class:`~tokenslim.tune.search.Search`: its ``finalists`` best
    settings that reach the aim when timed (plus the best of each kind of reduction among them)
    and the incumbent ``held``, evaluated on ``data`` (images the search never saw; every row
    journalled, so a resume replays it); :func:`decide` picks one.

    Returns:
        The chosen candidate and the :class:`Confirmation` (``(None, None)`` with no option).
    """
    reached: Dict[str, Any] = {}
    for c in search.candidates:
        if (c.throughput_ratio or 0) >= search.aim:
            reached.setdefault(c.setting, c)
    incumbent = held.setting if held is not None else None
    if held is not None:
        reached[held.setting] = held
    searched = sorted((c for s, c in reached.items() if s != incumbent), key=lambda c: c.kl)
    picked = searched[:finalists]
    for lvl in (1, 2, 3):  # the best of every kind of reduction competes, whatever its rank
        best_of_kind = next((c for c in searched if level(c.setting, incumbent) == lvl), None)
        if best_of_kind is not None and best_of_kind not in picked:
            picked.append(best_of_kind)
    options = ([held] if held is not None else []) + picked
    if not options:
        return None, None
    started = time.perf_counter()
    search.say(f"confirming {len(options)} settings on {len(data)} images the search never saw")
    journal, ref = search.journal, None
    for c in options:
        if c.setting not in journal.confirms:
            if ref is None:
                ref = evaluate(search.model, data, keep_logits=True, **search.eval_kw).logits
            model = apply_setting(copy.deepcopy(search.model), parse_setting(c.setting))
            logits = evaluate(model, data, keep_logits=True, reference_logits=ref, **search.eval_kw).logits
            # Under torchrun each rank holds its shard's outputs: the per-image KLs come back in image order.
            kl = gather_rows(per_image_kl(ref, logits), len(data), current(), search.eval_kw.get("batch_size", 64))
            journal.add("confirm", c.setting, {"kl": [round(float(v), 9) for v in kl]})
    kls = {c.setting: journal.confirms[c.setting]["kl"] for c in options}
    chosen, tested, reason = decide([(c.setting, c.kl) for c in options], kls, incumbent, z)
    diff, se = paired(kls[chosen], kls[incumbent]) if incumbent is not None and chosen != incumbent else (0.0, 0.0)
    result = Confirmation(search_images=len(search.data), confirm_images=len(data),
                          scored=len({c.setting for c in search.candidates}), incumbent=incumbent, chosen=chosen,
                          diff=diff, se=se, z=z, reason=reason, finalists=tested,
                          seconds=time.perf_counter() - started)
    search.say(result.summary())
    search.book("confirm", started)
    return next(c for c in options if c.setting == chosen), result


__all__ = ["Confirmation", "DEFAULT_FINALISTS", "DEFAULT_SHARE", "DEFAULT_Z", "Finalist", "LEVELS", "MIN_IMAGES",
           "confirm", "decide", "level", "paired", "per_image_kl", "split_indices"]
