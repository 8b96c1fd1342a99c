"""What every timm family's patched model shares: the token plan, the final norm and unmerge,
``forward_features``, ``forward_intermediates`` on the full grid, ``trace_merges`` and
``token_plan``.

A family's adapter (:mod:`~tokenslim.adapters.timm_vit`, :mod:`~tokenslim.adapters.timm_eva`)
subclasses :class:`TimmReducing` and supplies only what differs:

* ``_tokenslim_embed(x) -> (tokens, context)``: embeddings up to the first block, and whatever
  its blocks need beside the tokens (the rotary table and grid for Eva; ``None`` for ViT);
* ``_tokenslim_reducing_block``: its block with reduction, ``(block, x, sizes, source, step,
  *extra) -> (x, sizes, source)``, called through the block's ``__call__`` so hooks fire;
* ``_tokenslim_plain_block(i, block, x, state, attn_mask, is_causal, checkpointing)``: its block
  as the framework calls it, before anything is reduced;
* ``_tokenslim_check_block(i, block)``: the refusal of a block it cannot reduce;
* optionally ``_tokenslim_state(context, x)`` (per-forward state of its blocks, e.g. rotary
  tables), ``_tokenslim_block_args(i, state, source, num_tokens)`` (what its reducing block takes
  beyond the tokens), ``_tokenslim_source_needed`` (the source map is composed even when the caller
  does not read it) and ``_tokenslim_check_plan(plan)`` (a refusal of its own).

A next timm family is a file of what is new about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from timm.models._features import feature_take_indices
from torch import nn

from ..input_size import resolve_img_size
from ..merge_policy import detach_policy, missing_policy_error, policy_of
from ..ops import unmerge
from ..reduction import block_steps
from ..schedule import ReductionSettings, TokenPlan, plan_tokens
from .calls import call_through, unhook_all

Taken = List[Tuple[torch.Tensor, Optional[torch.Tensor], bool]]


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

    _tokenslim_source_needed = False

    def _tokenslim_state(self, context: Any, x: torch.Tensor) -> Any:
        """Per-forward state the family's blocks read (none by default)."""
        return None

    def _tokenslim_block_args(self, i: int, state: Any, source: Optional[torch.Tensor], num_tokens: int) -> tuple:
        """What block ``i``'s reducing call takes beyond tokens, sizes, source and step (nothing by default)."""
        return ()

    def _tokenslim_blocks(self, x: torch.Tensor, context: Any, attn_mask: Optional[torch.Tensor], is_causal: bool,
                          take_indices: Optional[List[int]] = None, last_index: Optional[int] = None,
                          track_source: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                              Optional[torch.Tensor], bool, Taken]:
        """Run the blocks.

        Returns tokens, sizes, source map, whether pruning dropped tokens without fusion, and
        ``(tokens, source, has_dropped)`` of every block in ``take_indices``. With
        ``track_source=False`` no source map is composed (it is returned as ``None``) unless the
        family needs it: for callers that read the prefix tokens only.
        """
        plan = self.tokenslim_plan(x.shape[1])
        if plan.reduces and (attn_mask is not None or is_causal):
            raise ValueError(
                "attn_mask / is_causal cannot be combined with token reduction: reduced tokens no "
                "longer line up with the mask. Set r=0 and keep_rate=None to use masks."
            )
        state = self._tokenslim_state(context, x)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        sizes: Optional[torch.Tensor] = None
        source: Optional[torch.Tensor] = None
        has_dropped = reduced = False
        taken: Taken = []
        steps = block_steps(self.tokenslim, plan, self.num_prefix_tokens, policy_of(self))
        for i, (block, step) in enumerate(zip(self.blocks, steps)):
            if last_index is not None and i > last_index:
                break
            has_dropped = plan.dropped[i]
            if not reduced and not step.reduces:
                # Nothing reduced yet: the framework's own block, so no reduction is the unpatched computation.
                x = self._tokenslim_plain_block(i, block, x, state, attn_mask, is_causal, checkpointing)
            else:
                self._tokenslim_check_block(i, block)
                reduced = True
                extra = self._tokenslim_block_args(i, state, source, x.shape[1])
                # Through block.__call__, so the block's hooks fire (tokenslim.adapters.calls).
                if checkpointing:
                    x, sizes, source = torch.utils.checkpoint.checkpoint(
                        call_through, block, self._tokenslim_reducing_block, x, sizes, source, step, *extra,
                        use_reentrant=False)
                else:
                    x, sizes, source = call_through(block, self._tokenslim_reducing_block, x, sizes, source, step,
                                                    *extra)
                if not track_source and not self._tokenslim_source_needed:
                    source = None  # composing it is all the cost: a block's own map comes free
            if take_indices is not None and i in take_indices:
                taken.append((x, source, has_dropped))
        return x, sizes, source, has_dropped, taken

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

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
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


def pools_patches(model: nn.Module) -> bool:
    """Whether the head pools over patch tokens (attention pool, avg, max) rather than reading the class token."""
    return model.attn_pool is not None or model.global_pool not in ("token", "")


def restore(model: nn.Module, original: type) -> nn.Module:
    """Undo a patch: the original class, no settings, no hooked subclasses, no merge policy: the
    original model, exactly."""
    model.__class__ = original
    del model.tokenslim
    unhook_all(model)
    detach_policy(model)
    return model


def reduction_settings(model: nn.Module, pools_patches: bool, r: Any = 0, **settings: Any) -> ReductionSettings:
    """The :class:`~tokenslim.schedule.ReductionSettings` of a timm model (validated before anything
    changes); ``method="learned"`` needs the merge policy attached first."""
    result = ReductionSettings(len(model.blocks), r=r, has_class_token=getattr(model, "cls_token", None) is not None,
                               pools_patches=pools_patches, **settings)
    if result.method == "learned" and policy_of(model) is None:
        raise missing_policy_error()
    return result


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
