"""Reduction settings and the per-block token counts they imply.

Everything here is plain Python: no tensors, no timm (a method's limits come from its registry
entry). The number of tokens that enter every block follows from the settings and the input token
count alone, so the patched forward, the GMAC counter and the benchmark tables all read it from
:func:`plan_tokens`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .settings_checks import (check_bool, check_keep_rate, check_method, check_option, check_prune_layers,
                              check_pruning, check_rope)

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

    Within a block, pruning (if any) comes first, then merging; both after the attention residual
    and before the MLP.

    Attributes:
        tokens: tokens entering each block, then the number leaving the last block
            (``len(tokens) == depth + 1``); prefix tokens included.
        merged: tokens merged away in each block (the requested ``r`` after clamping).
        kept: non-prefix tokens kept by pruning in each block (``None``: no pruning there).
        fused: whether the block appends a fused token holding the pruned ones.
        dropped: whether, after each block, some patches hold no token (pruned without fusion).
    """

    tokens: Tuple[int, ...]
    merged: Tuple[int, ...]
    kept: Tuple[Optional[int], ...] = ()
    fused: Tuple[bool, ...] = ()
    dropped: Tuple[bool, ...] = ()

    @property
    def reduces(self) -> bool:
        """Whether any block removes a token."""
        return any(self.merged) or any(k is not None for k in self.kept)

    @property
    def drops(self) -> bool:
        """Whether pruning drops tokens without fusing them (their patches then hold no token)."""
        return bool(self.dropped) and self.dropped[-1]


def plan_tokens(
    num_tokens: int,
    num_prefix_tokens: int,
    r_schedule: Sequence[int],
    keep_rates: Optional[Sequence[float]] = None,
    fuse: bool = False,
    max_merge: Optional[Callable[[int], int]] = None,
    merge_drops: bool = False,
) -> TokenPlan:
    """Token counts per block for a merge schedule and optional pruning.

    Args:
        num_tokens: tokens entering the first block, prefix tokens included (197 for ViT-B/16 at 224).
        num_prefix_tokens: class, distillation and register tokens; never merged or pruned.
        r_schedule: requested merges per block, e.g. from :func:`parse_r`.
        keep_rates: per block, the share of non-prefix tokens pruning keeps (1.0: no pruning).
        fuse: pruned tokens are fused into one extra token.
        max_merge: most tokens the reduction method can remove from ``n`` non-prefix tokens in one
            step; ``n // 2`` (bipartite matching) by default.
        merge_drops: the method's step may drop tokens (PPT's pruning branch), so patches can be
            left without a token from its first reducing block on.

    Pruning keeps ``ceil(keep_rate * n)`` of the ``n`` non-prefix tokens present (a previously
    fused token included, as in EViT). A block merges ``min(r, max_merge(tokens - prefix))``
    tokens: bipartite matching can pair at most half of the mergeable tokens.
    """
    if max_merge is None:
        max_merge = _half
    if num_prefix_tokens < 0 or num_tokens < num_prefix_tokens:
        raise ValueError(f"need 0 <= num_prefix_tokens <= num_tokens, got {num_prefix_tokens}, {num_tokens}")
    depth = len(r_schedule)
    if keep_rates is None:
        keep_rates = (1.0,) * depth
    if len(keep_rates) != depth:
        raise ValueError(f"keep_rates has {len(keep_rates)} entries for {depth} blocks")
    p = num_prefix_tokens
    n = num_tokens
    tokens: List[int] = [n]
    merged: List[int] = []
    kept: List[Optional[int]] = []
    fused: List[bool] = []
    dropped: List[bool] = []
    for r, rate in zip(r_schedule, keep_rates):
        k = None
        if rate < 1.0 and n - p > 1:
            k = min(max(math.ceil(rate * (n - p)), 1), n - p)
            if k == n - p:
                k = None
        kept.append(k)
        fused.append(k is not None and fuse)
        dropped.append((bool(dropped) and dropped[-1]) or (k is not None and not fuse))
        if k is not None:
            n = p + k + int(fuse)
        r_eff = min(r, max_merge(n - p))
        merged.append(r_eff)
        if r_eff and merge_drops:
            dropped[-1] = True
        n -= r_eff
        tokens.append(n)
    return TokenPlan(tuple(tokens), tuple(merged), tuple(kept), tuple(fused), tuple(dropped))


def _half(n: int) -> int:
    return n // 2


DEFAULT_PRUNE_LAYERS = (3, 6, 9)
"""EViT's DeiT setting: prune in blocks 4, 7 and 10 (0-based 3, 6, 9)."""


class ReductionSettings:
    """The settings of a patched model, readable and changeable between calls.

    Attached to a patched model as ``model.tokenslim``. Assigning a field validates it at once, so a
    bad value fails where it is set rather than inside a forward pass::

        model.tokenslim.r = 8           # a new merge schedule for the next call
        model.tokenslim.keep_rate = 0.5

    Attributes:
        r: the merge specification (see :data:`RSpec`).
        keep_rate: share of non-prefix tokens kept at each pruning block (``None``: no pruning); a
            float, or one float per entry of ``prune_layers``.
        prune_layers: 0-based indices of the pruning blocks.
        fuse_pruned: fuse the pruned tokens into one token, weighted by their class attention.
        prop_attn: proportional attention (``log(size)`` added to attention logits). ``None``
            (default) means on when merging is on and off for pruning alone, as in EViT.
        depth: number of blocks the schedule covers (fixed at patch time).
        rope: how merged tokens of a rotary-position model get their rotation (see
            :mod:`tokenslim.ops.rope`); ``None``: the default (``"blend"``). Rotary models only.
    """

    def __init__(self, depth: int, r: RSpec = 0, keep_rate: Optional[Union[float, Sequence[float]]] = None,
                 prune_layers: Sequence[int] = DEFAULT_PRUNE_LAYERS, fuse_pruned: bool = False,
                 prop_attn: Optional[bool] = None, has_class_token: bool = True, method: str = "tome",
                 threshold: Optional[float] = None, margin: Optional[float] = None, pools_patches: bool = False,
                 rope: Optional[str] = None, has_rope: bool = False) -> None:
        self._depth = int(depth)
        self._has_rope = bool(has_rope)
        self._pools_patches = bool(pools_patches)
        self._has_class_token = has_class_token
        self._plans: dict = {}
        self._keep_rate = None
        self._prune_layers: Tuple[int, ...] = ()
        self._options = {"threshold": None, "margin": None}
        self.method = method
        self.r = r
        self.prune_layers = prune_layers
        self.keep_rate = keep_rate
        self.fuse_pruned = fuse_pruned
        self.prop_attn = prop_attn
        self.threshold = threshold
        self.margin = margin
        self.rope = rope
        self._ready = True
        self._check_drops()

    @property
    def drops_tokens(self) -> bool:
        """Whether some patches can be left without a token (pruning without fusion, or a method that prunes)."""
        pruning = any(rate < 1.0 for rate in self.keep_rates) and not self._fuse_pruned
        return pruning or (self._method.may_drop and any(self._r_schedule))

    def _check_drops(self) -> None:
        if self._pools_patches and self.drops_tokens:
            raise ValueError(
                "pruning without fusion drops tokens, but this model pools over patch tokens (its head would "
                "average zeros in); set fuse_pruned=True, or use a class-token pooled model"
            )

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def method(self) -> str:
        """The reduction method that removes the ``r`` tokens of each block (see :mod:`tokenslim.methods`)."""
        return self._method.name

    @method.setter
    def method(self, value: str) -> None:
        self._method = check_method(value, self._has_class_token, getattr(self, "_options", {}))

    @property
    def method_spec(self):
        """The :class:`~tokenslim.methods.base.ReductionMethod` in use."""
        return self._method

    @property
    def threshold(self) -> Optional[float]:
        """PPT's variance threshold (``None``: the method's default)."""
        return self._options["threshold"]

    @threshold.setter
    def threshold(self, value: Optional[float]) -> None:
        self._set_option("threshold", value)

    @property
    def margin(self) -> Optional[float]:
        """PiToMe's energy margin at the first block (``None``: the method's default)."""
        return self._options["margin"]

    @margin.setter
    def margin(self, value: Optional[float]) -> None:
        self._set_option("margin", value)

    def _set_option(self, name: str, value: Optional[float]) -> None:
        self._options = {**self._options, name: check_option(name, value, self._method)}

    @property
    def rope(self) -> Optional[str]:
        """The rotary treatment of merged tokens as requested (``None``: the default); rotary models only."""
        return self._rope

    @rope.setter
    def rope(self, value: Optional[str]) -> None:
        self._rope = check_rope(value, self._has_rope)

    @property
    def rope_treatment(self) -> str:
        """The rotary treatment in use (the default when :attr:`rope` is ``None``)."""
        from .ops.rope import DEFAULT_ROPE

        return self._rope or DEFAULT_ROPE

    @property
    def option(self) -> Optional[float]:
        """The value of the current method's option, or ``None`` (its default)."""
        return self._options.get(self._method.option) if self._method.option else None

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
    def prune_layers(self) -> Tuple[int, ...]:
        return self._prune_layers

    @prune_layers.setter
    def prune_layers(self, value: Sequence[int]) -> None:
        layers = check_prune_layers(value)
        if self._keep_rate is not None:
            check_pruning(layers, self._keep_rate, self._depth)
        self._prune_layers = layers

    @property
    def keep_rate(self) -> Optional[Union[float, Tuple[float, ...]]]:
        return self._keep_rate

    @keep_rate.setter
    def keep_rate(self, value: Optional[Union[float, Sequence[float]]]) -> None:
        rates = check_keep_rate(value, self._has_class_token)
        if rates is not None:
            check_pruning(self._prune_layers, rates, self._depth)
        self._keep_rate = rates

    @property
    def keep_rates(self) -> Tuple[float, ...]:
        """Keep rate of every block (1.0 where nothing is pruned)."""
        rates = [1.0] * self._depth
        if self._keep_rate is not None:
            per_layer = (self._keep_rate,) * len(self._prune_layers) if isinstance(self._keep_rate, float) \
                else self._keep_rate
            for i, rate in zip(self._prune_layers, per_layer):
                rates[i] = rate
        return tuple(rates)

    @property
    def fuse_pruned(self) -> bool:
        return self._fuse_pruned

    @fuse_pruned.setter
    def fuse_pruned(self, value: bool) -> None:
        self._fuse_pruned = check_bool("fuse_pruned", value)

    @property
    def prop_attn(self) -> Optional[bool]:
        """The requested proportional-attention setting (``None``: automatic)."""
        return self._prop_attn

    @prop_attn.setter
    def prop_attn(self, value: Optional[bool]) -> None:
        self._prop_attn = check_bool("prop_attn", value, optional=True)

    @property
    def uses_prop_attn(self) -> bool:
        """Whether proportional attention is applied: as requested, else on exactly when merging."""
        if self._prop_attn is not None:
            return self._prop_attn
        return any(self._r_schedule)

    @property
    def reduces(self) -> bool:
        """Whether the settings remove any token (merging in some block, or pruning)."""
        return any(self._r_schedule) or any(rate < 1.0 for rate in self.keep_rates)

    def __setattr__(self, name: str, value) -> None:
        if not name.startswith("_") and not isinstance(getattr(type(self), name, None), property):
            known = sorted(n for n, v in vars(type(self)).items() if isinstance(v, property) and v.fset is not None)
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}; the settings are {', '.join(known)}")
        # Every setting change invalidates the plans computed for the old settings.
        if not name.startswith("_") and "_plans" in self.__dict__:
            self._plans = {}
        if name.startswith("_") or "_ready" not in self.__dict__:
            super().__setattr__(name, value)
            return
        # A change that would leave a patch-pooling head without tokens is refused and undone.
        saved = dict(self.__dict__)
        super().__setattr__(name, value)
        try:
            self._check_drops()
        except ValueError:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def plan(self, num_tokens: int, num_prefix_tokens: int) -> TokenPlan:
        """Token counts per block for an input of ``num_tokens`` tokens (computed once per setting)."""
        key = (num_tokens, num_prefix_tokens)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_tokens(num_tokens, num_prefix_tokens, self._r_schedule, self.keep_rates, self._fuse_pruned,
                               max_merge=self._method.max_r, merge_drops=self._method.may_drop)
            self._plans[key] = plan
        return plan

    def as_dict(self) -> dict:
        """The settings as plain JSON-serialisable values."""
        def plain(v):
            return list(v) if isinstance(v, (list, tuple)) else v

        return {
            "r": plain(self._r), "keep_rate": plain(self._keep_rate), "prune_layers": list(self._prune_layers),
            "fuse_pruned": self._fuse_pruned, "prop_attn": self._prop_attn, "depth": self._depth,
            "method": self._method.name, "threshold": self.threshold, "margin": self.margin,
            **({"rope": self._rope} if self._has_rope else {}),
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"ReductionSettings({fields})"
