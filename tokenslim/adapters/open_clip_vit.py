"""The ``open_clip`` adapter: token reduction in open_clip's ``VisionTransformer`` towers.

open_clip's own towers (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``) get reduction
without rebuilding or re-initialising any layer: the class of the tower's ``transformer`` is
swapped for a subclass whose ``forward`` runs the blocks with the shared ops, and the tower's own
pooling, ``ln_post`` and projection run unchanged on the expanded tokens (merged tokens repeated
over the patches they hold: ``'tok'`` pooling reads the class token, ``'avg'`` pooling is the
size-weighted mean, attentional pooling over repeated keys is proportional attention).

Models whose vision tower is a timm trunk (``TimmModel``, e.g. ``ViT-B-16-SigLIP``) are timm ViTs
underneath and are patched through :mod:`tokenslim.adapters.timm_vit`.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import unmerge
from ..ops.attention import AttentionResult, reducing_attention
from ..reduction import BlockStep, block_steps, reduce_step, step_log_size
from ..schedule import ReductionSettings
from ..versions import check_installed
from .calls import base_class, call_through, check_reducible, hooked_by_name, unhook_all, wire

OPEN_CLIP_MIN = (3, 0, 0)
OPEN_CLIP_MAX = (3, 3, 999)


def check_open_clip_version(version: Optional[str] = None) -> None:
    """Raise a clear error unless the installed ``open_clip`` is a release tokenslim is tested with."""
    check_installed("open_clip", version, "open_clip_torch", OPEN_CLIP_MIN, OPEN_CLIP_MAX, "open_clip's ResidualAttentionBlock",
                  "open_clip_torch>=3.0,<3.4")


def mha_attention(attn: nn.MultiheadAttention, x: torch.Tensor, log_size: Optional[torch.Tensor],
                  step: BlockStep) -> AttentionResult:
    """``nn.MultiheadAttention`` self-attention (batch first, packed in-projection) with the size bias.

    The packed ``in_proj_weight`` is a parameter, not a module, so it is applied as
    ``nn.MultiheadAttention`` applies it; ``out_proj`` is called as a module.
    """
    batch, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    res = reducing_attention(
        q, k, v, log_size, fused=True, dropout_p=attn.dropout if attn.training else 0.0,
        return_metric=step.wants_metric, return_cls_attn=step.wants_cls_attn,
        return_value_score=step.wants_value_score, return_received=step.wants_received,
    )
    return res._replace(out=attn.out_proj(res.out.transpose(1, 2).reshape(batch, n, c)))


def _attention_call(attn: nn.MultiheadAttention, x: torch.Tensor, log_size: Optional[torch.Tensor], step: BlockStep):
    # nn.MultiheadAttention returns (output, weights); weights are not computed when reducing.
    res = mha_attention(attn, x, log_size, step)
    return (res.out, None), res


def reducing_block(block: nn.Module, x, sizes, source, step):
    """One open_clip ``ResidualAttentionBlock`` with token reduction (after the attention residual).

    The attention is called through ``block.attn.__call__`` with ``(x, x, x)`` as open_clip calls
    it, so its hooks fire (:mod:`tokenslim.adapters.calls`)."""
    y = block.ln_1(x)
    out, attn = call_through(block.attn, _attention_call, y, step_log_size(step, sizes), step, inputs=(y, y, y))
    x = x + block.ls_1(out[0])
    x, sizes, source = reduce_step(x, attn, sizes, source, step)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, sizes, source


class TokenSlimTransformer(nn.Module):
    """Mixin for a patched open_clip ``Transformer`` (vision tower only); see :func:`patch`."""

    tokenslim: ReductionSettings

    def _tokenslim_run(self, x: torch.Tensor, take: Sequence[int] = ()) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        plan = self.tokenslim.plan(x.shape[1], 1)
        sizes = source = None
        has_dropped = False
        taken: List[torch.Tensor] = []
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for i, (block, step) in enumerate(zip(self.resblocks, block_steps(self.tokenslim, plan, 1))):
            has_dropped = plan.dropped[i]
            if source is None and not step.reduces:
                x = block(x)
            else:
                check_reducible(i, block, getattr(block, "attn", None), *_supported(),
                                "open_clip's ResidualAttentionBlock with nn.MultiheadAttention")
                # Through block.__call__, so the block's hooks fire (tokenslim.adapters.calls).
                if checkpointing:
                    x, sizes, source = torch.utils.checkpoint.checkpoint(
                        call_through, block, reducing_block, x, sizes, source, step, use_reentrant=False)
                else:
                    x, sizes, source = call_through(block, reducing_block, x, sizes, source, step)
            if i in take:
                taken.append(x if source is None else unmerge(x, source, has_dropped))
        # open_clip applies ln_post after the transformer, per token (or only to the pooled token):
        # the expanded sequence gives the same pooled features either way.
        return (x if source is None else unmerge(x, source, has_dropped)), taken

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None and self.tokenslim.reduces:
            raise ValueError("attn_mask cannot be combined with token reduction; set r=0 and keep_rate=None")
        return self._tokenslim_run(x)[0]

    def forward_intermediates(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                              indices: Optional[Union[int, List[int]]] = None, stop_early: bool = False):
        """open_clip's ``Transformer.forward_intermediates``; each intermediate is expanded to full length."""
        from timm.models._features import feature_take_indices

        take_indices, _ = feature_take_indices(len(self.resblocks), indices)
        return self._tokenslim_run(x, take_indices)


_PATCHED = {}


def _vision_tower(model: nn.Module):
    """``(tower, kind)``: kind is ``'open_clip'`` for a VisionTransformer, ``'timm'`` for a timm trunk."""
    from open_clip.transformer import VisionTransformer

    candidates = [model, getattr(model, "visual", None)]
    for c in candidates:
        if isinstance(c, VisionTransformer):
            return c, "open_clip"
    for c in candidates:
        trunk = getattr(c, "trunk", None)
        if trunk is not None:
            return trunk, "timm"
    return None, None


def _patched_transformer() -> type:
    """open_clip's ``Transformer`` with tokenslim's blocks, made once."""
    from open_clip.transformer import Transformer

    if Transformer not in _PATCHED:
        _PATCHED[Transformer] = type("TokenSlimOpenCLIPTransformer", (TokenSlimTransformer, Transformer),
                                     {"__module__": __name__, "__qualname__": "TokenSlimOpenCLIPTransformer"})
    return _PATCHED[Transformer]


def _supported() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    from open_clip.transformer import ResidualAttentionBlock

    return (ResidualAttentionBlock,), (nn.MultiheadAttention,)


def __getattr__(name: str) -> type:
    """The patched classes by name, made on demand, so ``pickle`` can load a saved patched model."""
    if name == "TokenSlimOpenCLIPTransformer":
        return _patched_transformer()
    if name.startswith("TokenSlim"):
        blocks, attentions = _supported()
        hooked = hooked_by_name(name, blocks + attentions, __name__)
        if hooked is not None:
            return hooked
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch(model: nn.Module, **settings: Any) -> nn.Module:
    """Patch an open_clip model (``CLIP``, ``CustomTextCLIP``, ...) or its ``visual`` tower in place.

    Only the image tower is reduced; the text tower is untouched. ``settings`` are those of
    :func:`tokenslim.patch`; they stay readable and writable as ``model.tokenslim``.

    Raises:
        TypeError: no vision tower, or blocks other than ``ResidualAttentionBlock`` (open_clip's
            ``CustomResidualAttentionBlock`` for qk-norm / scaled-cosine models is refused).
        ValueError: bad settings; pruning without fusion on a tower that averages patch tokens.
    """
    check_open_clip_version()
    if str(settings.get("method", "")).lower() == "learned":
        raise ValueError("method='learned' (a trained merge policy) is available on timm ViT and Eva models; the open_clip "
                         "adapter takes the training-free methods. Load the same weights into the timm model to use it")
    tower, kind = _vision_tower(model)
    if tower is None:
        raise TypeError(f"tokenslim cannot patch {type(model).__qualname__}: no open_clip VisionTransformer or timm "
                        "trunk found as the model or its .visual")
    if kind == "timm":
        from . import timm_vit

        timm_vit.patch(tower, **settings)
        if model is not tower:
            model.tokenslim = tower.tokenslim
        return model
    from open_clip.transformer import ResidualAttentionBlock, Transformer

    transformer = tower.transformer
    if type(transformer) not in (Transformer, _PATCHED.get(Transformer)):
        raise TypeError(f"tokenslim supports open_clip's Transformer, not {type(transformer).__qualname__}")
    if not transformer.batch_first:
        raise TypeError("tokenslim supports batch-first open_clip towers only (open_clip 3.x builds them so)")
    for i, block in enumerate(transformer.resblocks):
        if base_class(type(block)) is not ResidualAttentionBlock or not block.attn.batch_first:
            raise TypeError(f"tokenslim cannot patch block {i} of type {type(block).__qualname__}: only open_clip's "
                            "ResidualAttentionBlock (nn.MultiheadAttention) is supported")
    pools_patches = tower.attn_pool is not None or tower.pool_type != "tok"
    reduction = ReductionSettings(len(transformer.resblocks), has_class_token=True, pools_patches=pools_patches,
                                  **settings)
    transformer.__class__ = _patched_transformer()
    transformer.tokenslim = reduction
    wire(transformer.resblocks, lambda block: block.attn, __name__)
    model.tokenslim = reduction
    if tower is not model:
        tower.tokenslim = reduction
    return model


def _patched_modules(model: nn.Module):
    return [m for m in model.modules() if type(m) in _PATCHED.values()]


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (a no-op on an unpatched model)."""
    tower, kind = _vision_tower(model)
    if kind == "timm":
        from . import timm_vit

        timm_vit.unpatch(tower)
    originals = {v: k for k, v in _PATCHED.items()}
    for module in _patched_modules(model):
        module.__class__ = originals[type(module)]
        unhook_all(module)
    for module in model.modules():
        if "tokenslim" in module.__dict__:
            del module.tokenslim
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether the model's vision tower is patched."""
    tower, kind = _vision_tower(model)
    if kind == "timm":
        from . import timm_vit

        return timm_vit.is_patched(tower)
    return bool(_patched_modules(model))
