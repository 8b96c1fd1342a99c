"""What every timm family's patched model shares: the token plan, the final norm and unmerge,
``forward_features``, ``forward_intermediates`` on the full grid, ``trace_merges`` and
``token_plan``.

A family's adapter (:mod:`~tokenslim.adapters.timm_vit`, :mod:`~tokenslim.adapters.timm_eva`)
subclasses :class:`TimmReducing` and supplies only what differs:

* ``_tokenslim_embed(x) -> (tokens, context)``: embeddings up to the first block, and whatever
  its blocks need beside the tokens (the rotary table and grid for Eva; ``None`` for ViT);
* ``_tokenslim_blocks(x, context, attn_mask, is_causal, take_indices, last_index, track_source)``
  ``-> (tokens, sizes, source, has_dropped, taken)``: the blocks with reduction;
* ``_tokenslim_check_plan(plan)``: a refusal of its own (optional).

A next timm family is a file of what is new about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from timm.models._features import feature_take_indices
from torch import nn

from ..input_size import resolve_img_size
from ..ops import unmerge
from ..schedule import ReductionSettings, TokenPlan, plan_tokens


@dataclass
class MergeTrace:
    """What token merging did to a batch, for visualisation and unmerging.

    Attributes:
        tokens: ``[B, N, C]`` tokens leaving the last block (before the final norm).
        sizes: ``[B, N]`` original tokens held by each token (float32).
        source: ``[B, N0]`` int64 index of the token that holds each original token (prefix
            positions included). ``source_matrix(source, N)`` gives ToMe's dense 0/1 form;
            ``unmerge(tokens, source)`` expands tokens back to every original position.
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor


class TimmReducing:
    """Mixin of the patched timm model classes (placed before the timm class in the bases)."""

    tokenslim: ReductionSettings

    def tokenslim_plan(self, num_tokens: int) -> TokenPlan:
        """Token counts per block for ``num_tokens`` tokens entering the first block."""
        settings = self.tokenslim
        if settings.depth != len(self.blocks):
            raise RuntimeError(
                f"the model has {len(self.blocks)} blocks but was patched with {settings.depth}; "
                "call tokenslim.patch(model, ...) again after changing its blocks"
            )
        plan = settings.plan(num_tokens, self.num_prefix_tokens)
        self._tokenslim_check_plan(plan)
        return plan

    def _tokenslim_check_plan(self, plan: TokenPlan) -> None:
        """A family's own refusal of a plan (none by default)."""

    def _tokenslim_final(self, x: torch.Tensor, source: Optional[torch.Tensor], has_dropped: bool) -> torch.Tensor:
        x = self.norm(x)  # per token: norming before the unmerge gather is exact and cheaper
        return x if source is None else unmerge(x, source, has_dropped)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Embeddings, blocks with token reduction, final norm.

        Returns ``[B, N0, C]``, the unpatched shape: each merged token is repeated at every patch
        position it holds (prefix tokens first, unchanged). Pooling this output is size-weighted
        pooling of the merged tokens, so ``forward_head(forward_features(x))`` equals ``forward(x)``.
        """
        x, context = self._tokenslim_embed(x)
        x, _, source, dropped, _ = self._tokenslim_blocks(x, context, attn_mask, is_causal)
        return self._tokenslim_final(x, source, dropped)

    def _tokenslim_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]],
        return_prefix_tokens: bool,
        norm: bool,
        stop_early: bool,
        output_fmt: str,
        intermediates_only: bool,
        output_dict: bool,
        attn_mask: Optional[torch.Tensor],
        is_causal: bool,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates`` with token reduction.

        ``output_fmt='NLC'`` returns each block's reduced tokens (token counts shrink with depth).
        ``output_fmt='NCHW'`` unmerges every intermediate to the full patch grid through the source
        map: each patch position gets the value of the token that holds it (zero where pruning
        dropped the token without fusion). The final features are returned as by
        :meth:`forward_features` (unmerged, full length).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x, context = self._tokenslim_embed(x)
        x, _, source, dropped, taken = self._tokenslim_blocks(
            x, context, attn_mask, is_causal, take_indices=take_indices, last_index=max_index if stop_early else None)
        prefix = self.num_prefix_tokens
        intermediates, prefix_tokens = [], []
        for y, y_source, y_dropped in taken:
            if norm:
                y = self.norm(y)
            if output_fmt == "NCHW" and y_source is not None:
                y = unmerge(y, y_source, y_dropped)
            prefix_tokens.append(y[:, :prefix])
            intermediates.append(y[:, prefix:])
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            result: Dict[str, Any] = {"image_intermediates": intermediates}
            if prefix and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self._tokenslim_final(x, source, dropped)
            return result
        if return_prefix_tokens and prefix:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self._tokenslim_final(x, source, dropped), intermediates


def trace_merges(model: nn.Module, images: torch.Tensor, is_patched: Callable[[nn.Module], bool]) -> MergeTrace:
    """Run a patched timm model's blocks on ``images`` and return which patches each token holds
    (see :func:`tokenslim.adapters.timm_vit.trace_merges`)."""
    if not is_patched(model):
        raise TypeError("trace_merges needs a patched model: call tokenslim.patch(model, r=...) first")
    with torch.no_grad():
        x, context = model._tokenslim_embed(images)
        n0 = x.shape[1]
        x, sizes, source, _, _ = model._tokenslim_blocks(x, context, None, False)
    batch = x.shape[0]
    if source is None:
        source = torch.arange(n0, device=x.device).expand(batch, n0)
    if sizes is None:
        sizes = torch.ones(batch, x.shape[1], 1, device=x.device)
    return MergeTrace(tokens=x, sizes=sizes.squeeze(-1), source=source)


def token_plan(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]], is_patched: bool) -> TokenPlan:
    """Tokens entering each block of a supported timm model for one input size, from settings alone."""
    if img_size is None:
        grid = tuple(model.patch_embed.grid_size)
    else:
        grid = tuple(model.patch_embed.dynamic_feat_size(resolve_img_size(model, img_size)))
    num_tokens = grid[0] * grid[1] + model.num_prefix_tokens
    if is_patched:
        return model.tokenslim_plan(num_tokens)
    return plan_tokens(num_tokens, model.num_prefix_tokens, [0] * len(model.blocks))


__all__ = ["MergeTrace", "TimmReducing", "token_plan", "trace_merges"]
