"""``tokenslim.patch`` / ``unpatch`` / ``is_patched`` for every supported framework.

Each framework has one adapter module that wires the shared ops into its modules:
:mod:`tokenslim.adapters.timm_vit` (timm), :mod:`tokenslim.adapters.hf_vit` (Hugging Face ``transformers``) and
:mod:`tokenslim.adapters.open_clip_vit` (``open_clip``). :mod:`tokenslim.adapters.registry` picks the
adapter from the model's package; this module adds the settings every adapter shares and channel
pruning first.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence, Union

from torch import nn

from .adapters.registry import adapter_for
from .schedule import DEFAULT_PRUNE_LAYERS, RSpec


def patch(
    model: nn.Module,
    r: RSpec = 0,
    keep_rate: Optional[Union[float, Sequence[float]]] = None,
    prune_layers: Sequence[int] = DEFAULT_PRUNE_LAYERS,
    fuse_pruned: bool = False,
    prop_attn: Optional[bool] = None,
    method: str = "tome",
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    heads_pruned: Union[float, Sequence[float]] = 0.0,
    mlp_pruned: Union[float, Sequence[float]] = 0.0,
    criterion: str = "l2",
    materialize: bool = True,
    rope: Optional[str] = None,
) -> nn.Module:
    """Patch a Vision Transformer in place for token merging and/or pruning.

    Accepts timm ViTs (:func:`tokenslim.adapters.timm_vit.patch`), timm's rotary ``Eva`` family
    (DINOv3, EVA-02, Perception Encoder, RoPE-ViT: :func:`tokenslim.adapters.timm_eva.patch`), ``transformers`` ViT / DeiT / DINOv2 /
    CLIP vision models (:func:`tokenslim.adapters.hf_vit.patch`) and ``open_clip`` models or vision towers
    (:func:`tokenslim.adapters.open_clip_vit.patch`), with the same settings everywhere.

    Args:
        model: the model; it is changed in place and returned.
        r: tokens merged per block (ToMe): an int, a per-block list, or a ramp ``(r, inflection)``.
        keep_rate: attention-score pruning (EViT): at each block of ``prune_layers`` keep
            ``ceil(keep_rate * n)`` of the ``n`` non-prefix tokens. ``None``: no pruning.
        prune_layers: 0-based pruning blocks; EViT's DeiT setting ``(3, 6, 9)`` by default.
        fuse_pruned: fuse the pruned tokens into one extra token (EViT's inattentive token fusion).
        prop_attn: proportional attention; ``None``: on when merging, off for pruning alone.
        method: ``"tome"`` (default, exact ToMe), ``"mlerp"``, ``"pitome"``, ``"diffrate"``, ``"ppt"``,
            ``"atc"``, ``"atc_average"``.
        threshold: PPT's variance threshold (``method="ppt"`` only).
        margin: PiToMe's energy margin at the first block (``method="pitome"`` only).
        heads_pruned, mlp_pruned: channel pruning first (timm ViTs): the share of attention heads
            and of MLP hidden channels removed in every block (or one value per block), ranked by
            the data-free ``criterion`` (``"l2"`` or ``"l1"`` weight norms) and, with
            ``materialize=True``, sliced into smaller layers (``False`` keeps exact masks). This
            changes the weights and is done once: a model that already carries channel pruning is
            refused (use :func:`tokenslim.prune_channels` to prune further). Settings text takes
            the same keys (``"r=8,mlp_pruned=0.25"``).
        rope: rotary-position models only: how a merged token gets its rotation, ``"blend"`` (the
            default: the size-weighted mean of its patches' rotations), ``"mean"`` (of their angles),
            ``"local"`` / ``"local_blend"`` (either, merging spatial neighbours only) or ``"ignore"``
            (one patch's rotation); see :mod:`tokenslim.ops.rope`.

    Raises:
        TypeError: a model no adapter supports (nothing is changed).
        ValueError: bad settings.
        RuntimeError: an untested release of timm / transformers / open_clip.
    """
    adapter = adapter_for(model)
    if rope is not None and not hasattr(adapter, "has_rope"):
        raise ValueError("rope= sets how merged tokens get their rotary positions, and this model has no rotary "
                         "position embedding; leave rope unset")
    if heads_pruned or mlp_pruned:
        from .adapters.timm_channels import apply_channel_setting, has_masks

        if getattr(model, "tokenslim_channels", None) is not None or has_masks(model):
            raise ValueError("this model already carries channel pruning, which patch applies once; use "
                             "tokenslim.prune_channels(model, ...) and materialize(model) to prune further")
        apply_channel_setting(model, heads_pruned, mlp_pruned, criterion, materialize)
        model.tokenslim_pruned_by_patch = True  # unpatch cannot give these weights back (see unpatch)
    kwargs = {"rope": rope} if hasattr(adapter, "has_rope") else {}
    return adapter.patch(
        model, r=r, keep_rate=keep_rate, prune_layers=prune_layers, fuse_pruned=fuse_pruned, prop_attn=prop_attn,
        method=method, threshold=threshold, margin=margin, **kwargs,
    )


def unpatch(model: nn.Module, keep_channels: bool = False) -> nn.Module:
    """Restore the original classes and behaviour of a patched model (a no-op if not patched).

    Token reduction is undone exactly. Channel pruning applied by :func:`patch` (``heads_pruned`` /
    ``mlp_pruned``) removed weights, which cannot be given back: such a model is refused unless
    ``keep_channels=True``, which removes token reduction and keeps the smaller layers.

    Raises:
        ValueError: the model's channels were pruned by :func:`patch` and ``keep_channels`` is False.
    """
    if model.__dict__.get("tokenslim_pruned_by_patch") and not keep_channels:
        raise ValueError("this model's channels were pruned by tokenslim.patch (heads_pruned / mlp_pruned), which "
                         "removed weights that unpatch cannot give back. To keep the original, patch a copy: "
                         "tokenslim.patch(copy.deepcopy(model), ...). To drop only the token reduction and keep "
                         "the smaller layers: tokenslim.unpatch(model, keep_channels=True)")
    model.__dict__.pop("tokenslim_pruned_by_patch", None)
    return adapter_for(model).unpatch(model)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the vision model inside it) is currently patched by tokenslim."""
    return adapter_for(model).is_patched(model)


def _timm_only(model: nn.Module, what: str) -> ModuleType:
    adapter = adapter_for(model)
    if not hasattr(adapter, what):
        raise TypeError(
            f"{what} reads timm ViTs; {type(model).__name__} is handled by the {adapter.__name__.split('.')[-1]} "
            "adapter, which does not offer it. Token counts from the settings alone: "
            "model.tokenslim.plan(num_tokens, num_prefix_tokens)")
    return adapter


def token_plan(model: nn.Module, img_size: Optional[Union[int, Sequence[int]]] = None):
    """Tokens entering each block for one input size, from the settings alone (timm ViTs; see
    :func:`tokenslim.adapters.timm_vit.token_plan`). Other frameworks' models get a clear ``TypeError``."""
    return _timm_only(model, "token_plan").token_plan(model, img_size)


def trace_merges(model: nn.Module, images):
    """Which patches each token holds after a patched timm ViT's blocks (see
    :func:`tokenslim.adapters.timm_vit.trace_merges`). Other frameworks' models get a clear ``TypeError``."""
    return _timm_only(model, "trace_merges").trace_merges(model, images)
