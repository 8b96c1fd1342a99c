"""Token reduction in timm's rotary-position ViTs: the ``Eva`` family.

DINOv3 (``vit_*_dinov3``), EVA-02 (``eva02_*``), Perception Encoder (``vit_pe_*``) and RoPE-ViT
(``vit_*_rope_*``) are all timm ``Eva`` models. Their blocks rotate the patch tokens' queries and
keys by a rotary table (RoPE) that timm computes once per forward pass; after a reduction the
table must follow the tokens:

* pruning keeps the rows of the kept tokens (exact for them, as timm's own patch dropout does);
* a merged token gets a rotation by the treatment ``rope=`` (:mod:`tokenslim.ops.rope`): the mean
  of its members' rotations (default), the mean of their angles, one member's (positions ignored),
  or either mean with merging restricted to spatial neighbours.

The design follows :mod:`tokenslim.adapters.timm_vit`: the model's class is swapped for a subclass
that overrides ``forward``, ``forward_features`` and ``forward_intermediates``; blocks run as timm's
own until the first reduction (so ``r=0`` is the unpatched computation); reducing blocks and their
attention are still called as modules, so hooks fire (:mod:`tokenslim.adapters.calls`); per-call
state is local.
The ToMe similarity is measured on the keys before rotation (their content), so two patches that
look alike match wherever they are; the rotation is then the treatment's business.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers.attention import AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from ..ops.attention import AttentionResult, head_mean, reducing_attention
from ..ops.positions import grid_positions, token_positions
from ..ops.rope import affine_angles, check_affine, is_local, reduced_rotary, rotation_of
from ..reduction import BlockStep, reduce_step, step_log_size
from ..schedule import RSpec, TokenPlan
from . import timm_base
from .calls import base_class, call_through, check_reducible, class_lookup, wire
from .timm_base import MergeTrace, TimmReducing
from .timm_vit import check_timm_version

SUPPORTED_BLOCKS = (EvaBlock, EvaBlockPostNorm)
SUPPORTED_ATTENTION = (EvaAttention, AttentionRope)


def _project(attn: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[B, heads, N, D]`` exactly as ``EvaAttention`` / ``AttentionRope`` make them."""
    batch, n, _ = x.shape
    heads, kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
    if attn.qkv is not None:
        bias = getattr(attn, "q_bias", None)
        if bias is None:
            qkv = attn.qkv(x)
        else:
            full = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += full
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=full)
        q, k, v = qkv.reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    q = attn.q_proj(x).reshape(batch, n, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
    return q, k, v


def attention_forward(attn: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor],
                      log_size: Optional[torch.Tensor] = None, step: Optional[BlockStep] = None) -> AttentionResult:
    """timm ``EvaAttention`` / ``AttentionRope`` with a per-key bias, plus what reduction needs.

    Args:
        attn: the block's attention.
        x: ``[B, N, C]`` normalised tokens.
        rope: the rotary table of the current patch tokens (any shape timm's ``apply_rot_embed_cat``
            broadcasts), or ``None``.
        log_size: ``[B, 1, 1, N]`` proportional-attention bias, or ``None``.
        step: the block's reduction step, which says what it needs besides the output (the
            matching metric, class attention, value scores); ``None``: nothing.

    Returns:
        An :class:`~tokenslim.ops.attention.AttentionResult` with the projected ``[B, N, C]`` output;
        its metric is the keys before rotation, averaged over heads.
    """
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = _project(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    metric = head_mean(k, None) if step is not None and step.wants_metric else None
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p, :], apply_rot_embed_cat(q[:, :, p:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p, :], apply_rot_embed_cat(k[:, :, p:, :], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    res = reducing_attention(
        q, k, v, log_size,
        scale=None if attn.fused_attn else attn.scale,
        fused=attn.fused_attn,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        return_cls_attn=step is not None and step.wants_cls_attn,
        return_value_score=step is not None and step.wants_value_score,
        return_received=step is not None and step.wants_received,
    )
    y = attn.norm(res.out.transpose(1, 2).reshape(batch, n, -1))
    if gate is not None:
        y = y * gate
    return res._replace(out=attn.proj_drop(attn.proj(y)), metric=metric)


def _attention_call(attn: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor], log_size: Optional[torch.Tensor],
                    step: BlockStep) -> Tuple[torch.Tensor, AttentionResult]:
    res = attention_forward(attn, x, rope, log_size, step)
    return res.out, res


def reducing_block(
    block: nn.Module,
    x: torch.Tensor,
    sizes: Optional[torch.Tensor],
    source: Optional[torch.Tensor],
    step: BlockStep,
    rope: Optional[torch.Tensor],
    grid: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One ``EvaBlock`` (pre-norm, optional LayerScale) or ``EvaBlockPostNorm`` with token reduction.

    Reduction sits after the attention residual and before the MLP, as in ToMe and EViT.
    ``grid`` (original token positions) restricts merging to spatial neighbours when given.
    """
    post_norm = isinstance(block, EvaBlockPostNorm)
    out, attn = call_through(block.attn, _attention_call, x if post_norm else block.norm1(x), rope,
                             step_log_size(step, sizes), step)
    if post_norm:
        x = x + block.drop_path1(block.norm1(out))
    else:
        y = out if block.gamma_1 is None else block.gamma_1 * out
        x = x + block.drop_path1(y)
    x, sizes, source = reduce_step(x, attn, sizes, source, step, grid)
    if post_norm:
        return x + block.drop_path2(block.norm2(block.mlp(x))), sizes, source
    y = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        y = block.gamma_2 * y
    return x + block.drop_path2(y), sizes, source


class _RotaryState:
    """The rotary tables of one forward pass: the model's table per block, turned into the
    reduced tokens' tables by the settings' treatment (angles fitted once per table)."""

    def __init__(self, model: "TokenSlimEva", table: Optional[torch.Tensor], grid_hw: Tuple[int, int],
                 device: torch.device) -> None:
        self.table, self.mixed = table, bool(getattr(model, "rope_mixed", False)) and table is not None
        self.treatment = model.tokenslim.rope_treatment
        self.height, self.width = grid_hw
        self.num_prefix_tokens = model.num_prefix_tokens
        self.mean_angles = rotation_of(self.treatment) == "mean"
        needs_grid = (self.mean_angles or is_local(self.treatment)) and table is not None
        self.grid = grid_positions(self.height, self.width, self.num_prefix_tokens, device) if needs_grid else None
        self._angles: dict = {}
        self._last: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)

    def block_table(self, i: int) -> Optional[torch.Tensor]:
        """The model's own table for block ``i`` (what timm passes to it)."""
        if self.table is None:
            return None
        return self.table[i] if self.mixed else self.table

    def local_grid(self) -> Optional[torch.Tensor]:
        """Original positions for merging restricted to neighbours (``rope="local"``/``"local_blend"``), else ``None``."""
        return self.grid if is_local(self.treatment) else None

    def reduced(self, i: int, source: Optional[torch.Tensor], num_tokens: int) -> Optional[torch.Tensor]:
        """The table for block ``i``'s current tokens."""
        table = self.block_table(i)
        if table is None or source is None:
            return table
        if not self.mixed and self._last[0] is source:
            return self._last[1]  # no reduction since the last block: the same tokens, the same table
        angles = positions = None
        if self.mean_angles:
            key = i if self.mixed else 0
            if key not in self._angles:
                self._angles[key] = affine_angles(table, self.height, self.width)
            angles = self._angles[key]
            positions = token_positions(self.grid, source, num_tokens, source.shape[0])
        rows = reduced_rotary(table, source, num_tokens, self.num_prefix_tokens, self.treatment, angles, positions)
        self._last = (source, rows)
        return rows


class TokenSlimEva(TimmReducing, Eva):
    """A patched :class:`timm.models.eva.Eva` (see :func:`patch`); what every timm family shares
    is :class:`~tokenslim.adapters.timm_base.TimmReducing`."""

    def _tokenslim_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], Tuple[int, int]]]:
        """Tokens entering the first block, and ``(rotary table, patch grid)`` for the blocks."""
        x = self.patch_embed(x)
        grid_hw = tuple(x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), (rope, grid_hw)

    _tokenslim_reducing_block = staticmethod(reducing_block)
    _tokenslim_source_needed = True  # the rotary tables of merged tokens follow the source map

    def _tokenslim_state(self, context: Tuple[Optional[torch.Tensor], Tuple[int, int]],
                         x: torch.Tensor) -> "_RotaryState":
        rope, grid_hw = context
        return _RotaryState(self, rope, grid_hw, x.device)

    def _tokenslim_plain_block(self, i: int, block: nn.Module, x: torch.Tensor, state: "_RotaryState",
                               attn_mask: Optional[torch.Tensor], is_causal: bool, checkpointing: bool) -> torch.Tensor:
        table = state.block_table(i)
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(block, x, table, attn_mask, is_causal, use_reentrant=False)
        return block(x, rope=table, attn_mask=attn_mask, is_causal=is_causal)

    def _tokenslim_check_block(self, i: int, block: nn.Module) -> None:
        _check_block(i, block)

    def _tokenslim_block_args(self, i: int, state: "_RotaryState", source: Optional[torch.Tensor],
                              num_tokens: int) -> tuple:
        return state.reduced(i, source, num_tokens), state.local_grid()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """timm's ``forward_head(forward_features(x))``; a class-token head reads the reduced tokens as they are."""
        if timm_base.pools_patches(self) or self.global_pool != "token":
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x, context = self._tokenslim_embed(x)
        x, _, _, _, _ = self._tokenslim_blocks(x, context, attn_mask, is_causal)
        return self.forward_head(self.norm(x))


def _check_block(i: int, block: nn.Module) -> None:
    check_reducible(i, block, getattr(block, "attn", None), SUPPORTED_BLOCKS, SUPPORTED_ATTENTION,
                    "timm's EvaBlock / EvaBlockPostNorm with EvaAttention / AttentionRope")


def _check_supported(model: nn.Module) -> None:
    """Refuse, by name and before changing anything, what tokenslim cannot reduce exactly."""
    if not isinstance(model, Eva) or type(model) not in (Eva, TokenSlimEva):
        raise TypeError(f"tokenslim's Eva adapter takes timm.models.eva.Eva models, got {type(model).__qualname__}")
    if not isinstance(model.blocks, nn.ModuleList) or len(model.blocks) == 0:
        raise TypeError("tokenslim expects model.blocks to be a non-empty nn.ModuleList of timm EvaBlocks")
    for i, block in enumerate(model.blocks):
        if base_class(type(block)) not in SUPPORTED_BLOCKS:
            raise TypeError(f"tokenslim cannot patch block {i} of type {type(block).__qualname__}: only timm's "
                            "EvaBlock and EvaBlockPostNorm are supported")
        if base_class(type(block.attn)) not in SUPPORTED_ATTENTION:
            raise TypeError(f"tokenslim cannot patch the attention of block {i}, of type "
                            f"{type(block.attn).__qualname__}: only EvaAttention and AttentionRope are supported")
        if block.attn.num_prefix_tokens != model.num_prefix_tokens:
            raise TypeError(f"block {i} skips the rotary table for {block.attn.num_prefix_tokens} prefix tokens but the "
                            f"model has {model.num_prefix_tokens}; tokenslim needs them to agree")
    if model.patch_drop is not None:
        raise ValueError("this Eva model was built with patch dropout (patch_drop_rate > 0), which drops random "
                         "tokens before the blocks; token reduction cannot follow it. Build the model with "
                         "patch_drop_rate=0 (patch dropout is a training-time regulariser)")
    rope = getattr(model, "rope", None)
    if rope is not None and not hasattr(rope, "feat_shape") and not model.dynamic_img_size:
        raise TypeError(f"tokenslim cannot read the rotary table of {type(rope).__qualname__} (it has no feature "
                        "shape); supported rope types: cat, mixed, dinov3")




def has_rope(model: nn.Module) -> bool:
    """Whether ``model`` rotates queries and keys by rotary position embeddings."""
    return getattr(model, "rope", None) is not None


def patch(model: nn.Module, r: RSpec = 0, **settings: Any) -> nn.Module:
    """Patch a timm ``Eva`` model (DINOv3, EVA-02, Perception Encoder, RoPE-ViT) in place.

    Takes the settings of :func:`tokenslim.adapters.timm_vit.patch`, plus ``rope``: how a merged
    token gets its rotary position (``"blend"``, the default; ``"mean"``, ``"local"``, ``"local_blend"``, ``"ignore"``;
    see :mod:`tokenslim.ops.rope`). Rotary models only.

    Raises:
        TypeError: an unsupported block, attention or rope type (nothing is changed).
        ValueError: bad settings, patch dropout, or ``rope=`` on a model without rotary positions.
    """
    check_timm_version()
    _check_supported(model)
    settings = timm_base.reduction_settings(model, timm_base.pools_patches(model), r, has_rope=has_rope(model), **settings)
    if is_local(settings.rope_treatment) and has_rope(model) and any(settings.r_schedule) \
            and not settings.method_spec.local_merging:
        raise ValueError(f"rope={settings.rope_treatment!r} restricts ToMe's matching to spatial neighbours, and method "
                         f"{settings.method!r} does not use that matching; use method='tome' or 'mlerp'")
    if has_rope(model) and rotation_of(settings.rope_treatment) == "mean":
        _check_rope_table(model)
    model.tokenslim = settings
    model.__class__ = TokenSlimEva
    wire(model.blocks, lambda block: block.attn, __name__)
    return model


def _check_rope_table(model: nn.Module) -> None:
    """The mean-angle treatments read the table as affine in the grid coordinates: check it once."""
    grid = tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        try:
            table = model.rope.get_embed(shape=list(grid))
        except (TypeError, AssertionError):
            table = model.rope.get_embed()
    if table.is_meta:
        return
    check_affine(table, *grid)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore timm's ``Eva`` class (a no-op if not patched)."""
    if type(model) is TokenSlimEva:
        timm_base.restore(model, Eva)
    return model


__getattr__ = class_lookup(__name__, SUPPORTED_BLOCKS + SUPPORTED_ATTENTION)  # the hooked classes, for pickle


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by tokenslim."""
    return type(model) is TokenSlimEva


def trace_merges(model: nn.Module, images: torch.Tensor) -> MergeTrace:
    """Which patches each token holds after a patched Eva model's blocks (see
    :func:`tokenslim.adapters.timm_vit.trace_merges`)."""
    return timm_base.trace_merges(model, images, is_patched)


def token_plan(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> TokenPlan:
    """Tokens entering each block of a timm Eva model (patched or not) for one input size."""
    _check_supported(model)
    return timm_base.token_plan(model, img_size, is_patched(model))
