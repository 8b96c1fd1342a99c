"""The timm-aware core: patching ``VisionTransformer`` models for token merging and pruning.

Design:

* The model's class is swapped for a subclass (:class:`TokenSlimVisionTransformer`, or the
  distilled variant) that overrides ``forward_features`` and ``forward_intermediates`` only.
  Blocks and attention modules keep their weights; their classes get a thin subclass
  (:mod:`tokenslim.adapters.calls`) so that the patched forward calls each of them as a module
  with :func:`reducing_block`'s work: forward hooks and pre-hooks fire, and ``state_dict`` keys,
  ``load_state_dict``, ``deepcopy`` and pickling are untouched.
* Per-call state (sizes, source map) is passed from block to block as local values, never stored
  on modules: two threads can share a model and ``torch.compile`` sees no side effects.
* Until the first reduction a block runs as timm's own ``Block.forward``: with nothing to reduce
  the patched model performs exactly the calls of the unpatched one, fused attention included.
* ``forward_features`` expands merged tokens back over the patches they hold (one gather through
  the source map). The output has the unpatched shape; timm's own pooling over it is the
  size-weighted pooling (mean, max, ``map`` attention pooling with proportional attention), and
  ``forward_head(forward_features(x))`` needs no side channel for the sizes.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..ops.attention import AttentionResult, reducing_attention
from . import timm_base
from .calls import base_class, call_through, check_reducible, class_lookup, wire
from .timm_base import MergeTrace, TimmReducing
from ..reduction import BlockStep, reduce_step, step_log_size
from ..schedule import RSpec, TokenPlan
from ..versions import check_installed

TIMM_MIN = (1, 0, 28)
TIMM_MAX = (1, 0, 31)


def check_timm_version(version: Optional[str] = None) -> None:
    """Raise a clear error unless the installed timm is a release tokenslim is tested against."""
    lo, hi = ".".join(map(str, TIMM_MIN)), ".".join(map(str, TIMM_MAX))
    check_installed("timm", version, "timm", TIMM_MIN, TIMM_MAX, "timm's Block/Attention internals", f"timm>={lo},<={hi}")


HEAD_MASK_BUFFER = "tokenslim_head_mask"
"""Non-persistent buffer on a timm Attention marking kept heads (set by :mod:`tokenslim.adapters.timm_channels`)."""

SUPPORTED_BLOCKS = (Block,)
SUPPORTED_ATTENTION = (Attention,)


# --------------------------------------------------------------------------------------------
# Attention and block with reduction
# --------------------------------------------------------------------------------------------

def attention_forward(
    attn: Attention,
    x: torch.Tensor,
    log_size: Optional[torch.Tensor] = None,
    return_metric: bool = False,
    return_cls_attn: bool = False,
    return_value_score: bool = False,
    return_received: bool = False,
) -> AttentionResult:
    """timm ``Attention.forward`` with an additive per-key bias, plus what token reduction needs.

    Args:
        attn: a timm :class:`~timm.layers.attention.Attention`.
        x: ``[B, N, C]`` normalised tokens.
        log_size: ``[B, 1, 1, N]`` float32 proportional-attention bias, or ``None``.
        return_metric / return_cls_attn / return_value_score: see
            :func:`tokenslim.ops.attention.reducing_attention`.

    Returns:
        An :class:`~tokenslim.ops.attention.AttentionResult` whose ``out`` is the projected
        ``[B, N, C]`` output. The fused path calls SDPA exactly as timm does (default scale); the
        manual path (``fused_attn=False``) uses the module's stored scale, as timm does.
    """
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    res = reducing_attention(
        q, k, v, log_size,
        scale=None if attn.fused_attn else attn.scale,
        fused=attn.fused_attn,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        head_mask=getattr(attn, HEAD_MASK_BUFFER, None),
        return_metric=return_metric, return_cls_attn=return_cls_attn, return_value_score=return_value_score,
        return_received=return_received,
    )
    y = attn.norm(res.out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
    if gate is not None:
        y = y * gate
    return res._replace(out=attn.proj_drop(attn.proj(y)))


def _attention_call(attn: Attention, x: torch.Tensor, log_size: Optional[torch.Tensor],
                    step: BlockStep) -> Tuple[torch.Tensor, AttentionResult]:
    res = attention_forward(attn, x, log_size, return_metric=step.wants_metric, return_cls_attn=step.wants_cls_attn,
                            return_value_score=step.wants_value_score, return_received=step.wants_received)
    return res.out, res


def reducing_block(
    block: Block,
    x: torch.Tensor,
    sizes: Optional[torch.Tensor],
    source: Optional[torch.Tensor],
    step: BlockStep,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One timm ``Block`` with token reduction: attention, prune, merge, MLP.

    Reduction sits after the attention residual and before the MLP, as in ToMe and EViT; pruning
    comes before merging when a block does both (:func:`tokenslim.reduction.reduce_step`).
    ``ls1``/``ls2``, ``drop_path1``/``drop_path2`` and every attention sub-module are applied as
    timm applies them.

    The attention runs through ``block.attn.__call__`` (:func:`~tokenslim.adapters.calls.call_through`),
    so its hooks fire; its output as the hooks leave it is the residual branch.

    Returns:
        ``(tokens, sizes, source)`` after the block.
    """
    out, attn = call_through(block.attn, _attention_call, block.norm1(x), step_log_size(step, sizes), step)
    x = x + block.drop_path1(block.ls1(out))
    x, sizes, source = reduce_step(x, attn, sizes, source, step)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, sizes, source


# --------------------------------------------------------------------------------------------
# Patched model classes
# --------------------------------------------------------------------------------------------

class _TokenSlimMixin(TimmReducing):
    """Overrides of ``VisionTransformer`` that thread token reduction through the blocks (the
    parts every timm family shares are :class:`~tokenslim.adapters.timm_base.TimmReducing`)."""

    def _tokenslim_check_plan(self, plan: TokenPlan) -> None:
        if plan.drops:
            _refuse_drops_with_patch_pooling(self)

    def _tokenslim_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), None

    _tokenslim_reducing_block = staticmethod(reducing_block)

    def _tokenslim_plain_block(self, i: int, block: nn.Module, x: torch.Tensor, state: None,
                               attn_mask: Optional[torch.Tensor], is_causal: bool, checkpointing: bool) -> torch.Tensor:
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
        return block(x, attn_mask=attn_mask, is_causal=is_causal)

    def _tokenslim_check_block(self, i: int, block: nn.Module) -> None:
        check_reducible(i, block, getattr(block, "attn", None), SUPPORTED_BLOCKS, SUPPORTED_ATTENTION,
                        "timm's Block with Attention")

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """timm's ``forward_head(forward_features(x))``. When the head reads the prefix tokens only
        (class-token pooling, distilled heads) the reduced tokens go to it as they are: no source
        map is composed and nothing is unmerged, since neither can change what the head reads."""
        if not _reads_prefix_only(self):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x, context = self._tokenslim_embed(x)
        x, _, _, _, _ = self._tokenslim_blocks(x, context, attn_mask, is_causal, track_source=False)
        return self.forward_head(self.norm(x))


class TokenSlimVisionTransformer(_TokenSlimMixin, VisionTransformer):
    """A patched :class:`timm.models.vision_transformer.VisionTransformer` (see :func:`patch`)."""


class TokenSlimVisionTransformerDistilled(_TokenSlimMixin, VisionTransformerDistilled):
    """A patched :class:`timm.models.deit.VisionTransformerDistilled` (see :func:`patch`)."""


_PATCHED_CLASSES = {
    VisionTransformer: TokenSlimVisionTransformer,
    VisionTransformerDistilled: TokenSlimVisionTransformerDistilled,
}
_ORIGINAL_CLASSES = {v: k for k, v in _PATCHED_CLASSES.items()}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def _check_supported(model: nn.Module) -> None:
    """Refuse anything but the timm classes tokenslim reproduces exactly, before changing anything."""
    cls = type(model)
    if cls not in _PATCHED_CLASSES and cls not in _ORIGINAL_CLASSES:
        supported = ", ".join(c.__name__ for c in _PATCHED_CLASSES)
        raise TypeError(
            f"tokenslim cannot patch {cls.__module__}.{cls.__qualname__}: supported model classes are "
            f"{supported} (timm vit_*, deit_*, deit3_*, DINOv2 and CLIP-style ViTs)"
        )
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError("tokenslim expects model.blocks to be a non-empty nn.Sequential of timm Blocks")
    for i, block in enumerate(blocks):
        if base_class(type(block)) not in SUPPORTED_BLOCKS:
            raise TypeError(
                f"tokenslim cannot patch block {i} of type {type(block).__module__}.{type(block).__qualname__}: "
                "only timm.models.vision_transformer.Block is supported (ResPostBlock, ParallelScalingBlock, "
                "ParallelThingsBlock and other block types are refused)"
            )
        if base_class(type(block.attn)) not in SUPPORTED_ATTENTION:
            raise TypeError(
                f"tokenslim cannot patch the attention of block {i}, of type "
                f"{type(block.attn).__module__}.{type(block.attn).__qualname__}: only "
                "timm.layers.attention.Attention is supported"
            )




def _reads_prefix_only(model: nn.Module) -> bool:
    """Whether ``forward_head`` reads nothing but the prefix tokens (class / distillation tokens)."""
    if isinstance(model, VisionTransformerDistilled):
        return True
    return not timm_base.pools_patches(model) and model.global_pool == "token" and model.num_prefix_tokens > 0


def _refuse_drops_with_patch_pooling(model: nn.Module) -> None:
    """Pruning without fusion leaves patches without a token; a head that pools patch tokens
    (avg/max/map) would then average zeros in."""
    if timm_base.pools_patches(model):
        raise ValueError(
            f"pruning without fusion drops tokens, but this model pools over patch tokens "
            f"(global_pool={model.global_pool!r}); set fuse_pruned=True or use a class-token pooled model"
        )


def patch(model: nn.Module, r: RSpec = 0, **settings: Any) -> nn.Module:
    """Patch a timm Vision Transformer in place for token merging and/or pruning.

    ``r`` and the keyword settings are those of :class:`~tokenslim.schedule.ReductionSettings`
    (an unknown keyword is a ``TypeError``).

    Args:
        model: a timm ``VisionTransformer`` or ``VisionTransformerDistilled`` built from
            ``vision_transformer.Block`` and ``layers.attention.Attention``.
        r: tokens merged per block (ToMe): an int, a per-block list, or a ramp ``(r, inflection)``.
        keep_rate: attention-score pruning (EViT): at each block of ``prune_layers`` keep
            ``ceil(keep_rate * n)`` of the ``n`` non-prefix tokens, those the class token attends
            to most. A float, or one per pruning block. ``None``: no pruning.
        prune_layers: 0-based pruning blocks; EViT's DeiT setting ``(3, 6, 9)`` by default.
        fuse_pruned: fuse the pruned tokens into one extra token, summed with their class-attention
            weights (EViT's inattentive token fusion). Its size is the total size of the tokens it
            holds, so pooling and proportional attention weigh it like a merged token.
        prop_attn: proportional attention, ``log(size)`` of each key added to the logits. ``None``
            (default): on when merging (ToMe), off for pruning alone (EViT has none).
        method: how each block removes its ``r`` tokens (see :mod:`tokenslim.methods`): ``"tome"``
            (default, exact ToMe), ``"mlerp"``, ``"pitome"``, ``"diffrate"``, ``"ppt"``, ``"atc"``,
            ``"atc_average"``.
        threshold: PPT's variance threshold (``method="ppt"`` only; default 7e-5).
        margin: PiToMe's energy margin at the first block (``method="pitome"`` only; default 0.75).

    Returns:
        The same model object, patched. Patching a patched model replaces its settings (it does
        not stack). Settings stay readable and writable as ``model.tokenslim``.

    Raises:
        TypeError: an unsupported model, block or attention class (nothing is changed).
        ValueError: bad settings, pruning on a model without a class token, or pruning without
            fusion on a model that pools patch tokens.
        RuntimeError: an untested timm release.
    """
    check_timm_version()
    _check_supported(model)
    model.tokenslim = timm_base.reduction_settings(model, timm_base.pools_patches(model), r, **settings)
    model.__class__ = _PATCHED_CLASSES.get(type(model), type(model))
    wire(model.blocks, lambda block: block.attn, __name__)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original timm class and behaviour of a patched model (a no-op if not patched)."""
    cls = type(model)
    if cls in _ORIGINAL_CLASSES:
        timm_base.restore(model, _ORIGINAL_CLASSES[cls])
    return model


__getattr__ = class_lookup(__name__, SUPPORTED_BLOCKS + SUPPORTED_ATTENTION)  # the hooked classes, for pickle


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by tokenslim."""
    return type(model) in _ORIGINAL_CLASSES


def trace_merges(model: nn.Module, images: torch.Tensor) -> MergeTrace:
    """Run a patched model's blocks on ``images`` and return which patches each token holds.

    Covers merging and pruning: a fused token holds the patches it fused; a patch whose token was
    pruned without fusion has source ``-1``. Source tracking costs a gather of ``B x N0`` integers
    per merging block; the patched forward keeps the same map anyway (it is how merged tokens are
    expanded for pooling), so this is the documented way to read it out rather than a separate mode.
    """
    return timm_base.trace_merges(model, images, is_patched)


def token_plan(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> TokenPlan:
    """Tokens entering each block of a timm ViT (patched or not) for one input size, from settings alone.

    Args:
        model: a supported timm ViT; an unpatched one reduces nothing.
        img_size: ``H`` or ``(H, W)``; the size the model was built for by default.
    """
    _check_supported(model)
    return timm_base.token_plan(model, img_size, is_patched(model))
