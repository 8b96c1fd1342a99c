"""Reduction settings and the per-block token counts they imply.

Everything here is plain Python: no tensors, no timm. The number of tokens that enter every block
follows from the settings and the input token count alone, so the patched forward, the GMAC
counter and the benchmark tables all read it from :func:`plan_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

RSpec = Union[int, Sequence[int], Tuple[int, float]]
"""How many tokens to merge per block.

* ``int``: the same ``r`` in every block;
* ``list`` of ints: one value per block, zero-padded to the model depth (ToMe's convention);
* ``tuple`` ``(r, inflection)`` with ``inflection`` in ``[-1, 1]``: ToMe's linear ramp, from
  ``int(r * (1 - inflection))`` in the first block to ``2r`` minus that in the last.
"""


def parse_r(r: RSpec, depth: int) -> Tuple[int, ...]:
    """Resolve an ``r`` specification into one requested merge count per block.

    The values are requests: a block never merges more than half of its mergeable tokens, which
    :func:`plan_tokens` applies once the token count is known.

    Raises:
        TypeError: ``r`` is not an int, a list of ints or an ``(r, inflection)`` tuple.
        ValueError: negative values, a list longer than the model, an inflection outside [-1, 1].
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if isinstance(r, bool):
        raise TypeError("r must be an int, a list of ints or an (r, inflection) tuple, got a bool")
    if isinstance(r, int):
        _check_count(r, "r")
        return (r,) * depth
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(
                f"a tuple r is ToMe's ramp (r, inflection); got a tuple of length {len(r)}. "
                "Pass a per-block schedule as a list instead."
            )
        base, inflect = r
        if isinstance(base, bool) or not isinstance(base, int):
            raise TypeError(f"ramp r must be an int, got {type(base).__name__}")
        _check_count(base, "ramp r")
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)):
            raise TypeError(f"ramp inflection must be a number, got {type(inflect).__name__}")
        if not -1.0 <= float(inflect) <= 1.0:
            raise ValueError(f"ramp inflection must lie in [-1, 1], got {inflect}")
        first = int(base * (1.0 - inflect))
        last = 2 * base - first
        if depth == 1:
            return (first,)
        step = (last - first) / (depth - 1)
        # int() truncates exactly as ToMe does, so the ramp's token counts match its tables.
        return tuple(max(int(first + step * i), 0) for i in range(depth))
    if isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        values = list(r)
        if len(values) > depth:
            raise ValueError(f"r lists one value per block: got {len(values)} values for {depth} blocks")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"per-block r values must be ints, got {v!r}")
            _check_count(v, "per-block r")
        return tuple(values) + (0,) * (depth - len(values))
    raise TypeError(
        f"r must be an int, a list of ints or an (r, inflection) tuple, got {type(r).__name__}"
    )


def _check_count(v: int, what: str) -> None:
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")


@dataclass(frozen=True)
class TokenPlan:
    """Token counts through a reduced model, for one input token count.

    Attributes:
        tokens: tokens entering each block, then the number leaving the last block
            (``len(tokens) == depth + 1``); prefix tokens included.
        merged: tokens merged away in each block (the requested ``r`` after clamping).
    """

    tokens: Tuple[int, ...]
    merged: Tuple[int, ...]

    @property
    def reduces(self) -> bool:
        """Whether any block removes a token."""
        return any(self.merged)


def plan_tokens(num_tokens: int, num_prefix_tokens: int, r_schedule: Sequence[int]) -> TokenPlan:
    """Token counts per block for a merge schedule.

    Args:
        num_tokens: tokens entering the first block, prefix tokens included (197 for ViT-B/16 at 224).
        num_prefix_tokens: class, distillation and register tokens; never merged.
        r_schedule: requested merges per block, e.g. from :func:`parse_r`.

    A block merges ``min(r, (num_tokens - num_prefix_tokens) // 2)`` tokens: bipartite matching
    can pair at most half of the mergeable tokens.
    """
    if num_prefix_tokens < 0 or num_tokens < num_prefix_tokens:
        raise ValueError(f"need 0 <= num_prefix_tokens <= num_tokens, got {num_prefix_tokens}, {num_tokens}")
    n = num_tokens
    tokens: List[int] = [n]
    merged: List[int] = []
    for r in r_schedule:
        r_eff = min(r, (n - num_prefix_tokens) // 2)
        merged.append(r_eff)
        n -= r_eff
        tokens.append(n)
    return TokenPlan(tuple(tokens), tuple(merged))


class ReductionSettings:
    """The settings of a patched model, readable and changeable between calls.

    Attached to a patched model as ``model.tokenslim``. Assigning a field validates it at once, so a
    bad value fails where it is set rather than inside a forward pass::

        model.tokenslim.r = 8           # a new schedule for the next call
        model.tokenslim.prop_attn = False

    Attributes:
        r: the merge specification (see :data:`RSpec`).
        prop_attn: proportional attention: add ``log(size)`` of every key to the attention logits.
        depth: number of blocks the schedule covers (fixed at patch time).
    """

    def __init__(self, depth: int, r: RSpec = 0, prop_attn: bool = True) -> None:
        self._depth = int(depth)
        self.r = r
        self.prop_attn = prop_attn

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def r(self) -> RSpec:
        return self._r

    @r.setter
    def r(self, value: RSpec) -> None:
        schedule = parse_r(value, self._depth)
        self._r = value
        self._r_schedule = schedule

    @property
    def r_schedule(self) -> Tuple[int, ...]:
        """Requested merges per block (before clamping to the available tokens)."""
        return self._r_schedule

    @property
    def prop_attn(self) -> bool:
        return self._prop_attn

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"prop_attn must be a bool, got {type(value).__name__}")
        self._prop_attn = value

    def plan(self, num_tokens: int, num_prefix_tokens: int) -> TokenPlan:
        """Token counts per block for an input of ``num_tokens`` tokens."""
        return plan_tokens(num_tokens, num_prefix_tokens, self._r_schedule)

    def as_dict(self) -> dict:
        """The settings as plain JSON-serialisable values."""
        r = list(self._r) if isinstance(self._r, (list, tuple)) else self._r
        return {"r": r, "prop_attn": self._prop_attn, "depth": self._depth}

    def __repr__(self) -> str:
        return f"ReductionSettings(r={self._r!r}, prop_attn={self._prop_attn}, depth={self._depth})"
